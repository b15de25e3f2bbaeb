"""Hallucination benchmarks for any checkpoint or any system's answers; rule-based with no keys, or
scored as the published numbers were (``--protocol paper``) with a judge.

    python -m rlaifv_jax.evaluate --suite object_halbench|mmhal|amber|pope --data PATH \\
        (--model HF_DIR | --answers ANSWERS.jsonl) --out OUT.json [--protocol default|paper] \\
        [--judge HF_DIR | --judge_url http://HOST:PORT/v1 --judge_model NAME] [--images DIR] [--labels DIR] \\
        [--best_of N (--reference HF_DIR | --reward labeler [--labeler HF_DIR] [--claims llm --claims_model DIR])] \\
        [--tensorboard DIR]

``--model`` answers every question with our engine using the suite's official decoding (greedy,
or beam search with 3 beams for Object HalBench and MMHal-Bench; ``--num_beams`` and
``--max_new_tokens`` override it). ``--answers`` scores a JSONL of ``{"id", "answer"}`` from any
system. The judge is required for MMHal-Bench and optional for Object HalBench (the official
extraction prompt instead of the CHAIR rule path): ``--judge`` is a local chat LLM, ``--judge_url``
any OpenAI-compatible server (key from the variable ``--judge_key_env`` names, replies cached;
``eval/endpoint.py``). ``--protocol paper`` refuses to run without the judge the suite's published
numbers used, and with any change to the official decoding. ``--labels`` labels LLaVA's POPE
question file from POPE's files. ``--best_of N`` samples N answers
per question and keeps the one with the highest reward, writing every score beside its answer:
``--reward implicit`` (default), the length-normalised implicit reward against the pre-alignment
model ``--reference`` (METHOD.md §6); ``--reward labeler``, minus the claims the labeler rejects
(``--labeler``, default the model itself; claims split by the toy world's rules or, with
``--claims llm``, by the split/convert LLMs as in training). ``--tensorboard DIR`` also writes the
numeric metrics as TensorBoard scalars.

Writes OUT.json atomically (metrics, ``protocol`` and ``scoring``, the judge's settings, the
answers-file report, and per question: answer and the suite's details) and prints a table. Bad
input ends with one line on stderr and exit code 2. See docs/EVALUATION.md for each suite's files
and how the numbers can differ from the official scorers.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sys
from typing import Any

from absl import flags

from rlaifv_jax.core import paths
from rlaifv_jax.data.chat import TEMPLATES
from rlaifv_jax.eval import suites
from rlaifv_jax.eval.answers import read_answers

_SUITE = flags.DEFINE_enum("suite", None, list(suites.NAMES), "Benchmark to run.")
_DATA = flags.DEFINE_string("data", None, "The suite's official files (see docs/EVALUATION.md).")
_MODEL = flags.DEFINE_string("model", None, "Hugging Face LLaVA directory to generate answers with.")
_ANSWERS = flags.DEFINE_string("answers", None, 'JSONL of {"id": question id, "answer": text} to score.')
_OUT = flags.DEFINE_string("out", None, "Where to write the results JSON.")
_JUDGE = flags.DEFINE_string("judge", None, "Hugging Face chat-LLM directory used as the judge.")
_JUDGE_URL = flags.DEFINE_string("judge_url", None, "The judge's OpenAI-compatible endpoint, e.g. http://HOST:PORT/v1.")
_JUDGE_MODEL = flags.DEFINE_string("judge_model", None, "The judge's model name at --judge_url.")
_JUDGE_KEY_ENV = flags.DEFINE_string("judge_key_env", "OPENAI_API_KEY",
                                     "Environment variable holding the --judge_url key (unset: no key is sent).")
_JUDGE_CACHE = flags.DEFINE_string("judge_cache", None, "Reply cache of --judge_url (default: OUT.judge_cache/).")
_JUDGE_CONCURRENCY = flags.DEFINE_integer("judge_concurrency", 8, "Requests to --judge_url in flight at most.")
_JUDGE_TIMEOUT = flags.DEFINE_float("judge_timeout", 120.0, "Seconds before a --judge_url request is retried.")
_JUDGE_RETRIES = flags.DEFINE_integer("judge_retries", 6, "Retries of a --judge_url request (429, 5xx, timeouts).")
_JUDGE_TEMPERATURE = flags.DEFINE_float("judge_temperature", None,
                                        "--judge_url temperature (default: the official script's for the suite).")
_PROTOCOL = flags.DEFINE_enum("protocol", "default", ["default", "paper"],
                              "paper: the published numbers' scoring (official decoding and judge; refused "
                              "without the judge the suite needs).")
_IMAGES = flags.DEFINE_string("images", None, "Image directory (POPE, AMBER; MMHal-Bench default: beside --data).")
_LABELS = flags.DEFINE_string("labels", None, "POPE: directory of coco_pope_{adversarial,popular,random}.json that "
                              "labels LLaVA's llava_pope_test.jsonl (default: coco/ beside it).")
_BEST_OF = flags.DEFINE_integer("best_of", 1, "Sample N answers per question and keep the best by --reward.")
_REWARD = flags.DEFINE_enum("reward", "implicit", ["implicit", "labeler"],
                            "Best-of-N reward: implicit (needs --reference) or labeler (claim verification).")
_REFERENCE = flags.DEFINE_string("reference", None, "The pre-alignment model (π_ref) for --reward implicit.")
_BETA = flags.DEFINE_float("beta", 0.1, "β of the implicit reward.")
_LABELER = flags.DEFINE_string("labeler", None, "Labeler MLLM directory for --reward labeler (default: --model).")
_LABELER_TEMPLATE = flags.DEFINE_enum("labeler_template", None, list(TEMPLATES),
                                      "The labeler's prompt format (default: chat for Qwen2.5-VL, else llava_v1).")
_CLAIMS = flags.DEFINE_enum("claims", "rule", ["rule", "llm"],
                            "Claim extractor of --reward labeler: the toy world's rules or split/convert LLMs.")
_CLAIMS_MODEL = flags.DEFINE_string("claims_model", None, "Split LLM directory for --claims llm.")
_CONVERT_MODEL = flags.DEFINE_string("convert_model", None, "Convert LLM directory (default: --claims_model).")
_TEMPERATURE = flags.DEFINE_float("temperature", 1.0, "Sampling temperature for --best_of.")
_TOP_P = flags.DEFINE_float("top_p", None, "Top-p for --best_of sampling.")
_TOP_K = flags.DEFINE_integer("top_k", None, "Top-k for --best_of sampling.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed for --best_of.")
_NUM_BEAMS = flags.DEFINE_integer("num_beams", None, "Override the suite's number of beams (1 = greedy).")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", None, "Override the suite's answer length limit.")
_JUDGE_MAX_NEW = flags.DEFINE_integer("judge_max_new_tokens", 512, "Length limit of the judge's replies.")
_TEMPLATE = flags.DEFINE_enum("template", None, list(TEMPLATES),
                              "Prompt format of --model (default: chat for Qwen2.5-VL, else llava_v1).")
_PROMPT_SUFFIX = flags.DEFINE_string("prompt_suffix", "", "Text appended to every question when generating.")
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32", "float16"], "Compute dtype of the models.")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Prompts decoded together.")
_LIMIT = flags.DEFINE_integer("limit", 0, "Only the first N questions (0 = all).")
_PROGRESS = flags.DEFINE_bool("progress", True, "Show progress bars.")
_TENSORBOARD = flags.DEFINE_string("tensorboard", None, "Also write the metrics as TensorBoard scalars here.")
_TB_STEP = flags.DEFINE_integer("tensorboard_step", 0, "Step of the TensorBoard scalars (e.g. the checkpoint's).")


def _check_flags() -> None:
    for name, flag in (("--suite", _SUITE), ("--data", _DATA), ("--out", _OUT)):
        if not flag.value:
            raise ValueError(f"{name} is required")
    if bool(_MODEL.value) == bool(_ANSWERS.value):
        raise ValueError("give exactly one of --model (generate answers) or --answers (score a JSONL file)")
    if _BEST_OF.value < 1:
        raise ValueError(f"--best_of must be >= 1, got {_BEST_OF.value}")
    if _BEST_OF.value > 1 and not (_MODEL.value and (_REFERENCE.value or _REWARD.value == "labeler")):
        raise ValueError("--best_of N > 1 needs --model (the aligned model) and --reference (its base) "
                         "or --reward labeler")
    if _BEST_OF.value > 1 and _REWARD.value == "labeler" and _CLAIMS.value == "llm" and not _CLAIMS_MODEL.value:
        raise ValueError("--claims llm needs --claims_model (the split LLM)")
    for name, flag in (("--num_beams", _NUM_BEAMS), ("--max_new_tokens", _MAX_NEW), ("--limit", _LIMIT),
                       ("--batch_size", _BATCH)):
        if flag.value is not None and flag.value < (0 if name == "--limit" else 1):
            raise ValueError(f"{name} must be >= {0 if name == '--limit' else 1}, got {flag.value}")
    if _JUDGE.value and _JUDGE_URL.value:
        raise ValueError("give one judge: --judge HF_DIR (local) or --judge_url URL --judge_model NAME")
    if bool(_JUDGE_URL.value) != bool(_JUDGE_MODEL.value):
        raise ValueError("--judge_url and --judge_model go together")
    if _PROTOCOL.value == "paper":
        changed = [name for name, flag in (("--num_beams", _NUM_BEAMS), ("--max_new_tokens", _MAX_NEW),
                                           ("--limit", _LIMIT), ("--prompt_suffix", _PROMPT_SUFFIX))
                   if flag.value] + (["--best_of"] if _BEST_OF.value > 1 else [])
        if changed:
            raise ValueError(f"--protocol paper uses the official questions and decoding; drop {', '.join(changed)}")
    for name, flag in (("--model", _MODEL), ("--judge", _JUDGE), ("--reference", _REFERENCE), ("--labeler", _LABELER),
                       ("--claims_model", _CLAIMS_MODEL), ("--convert_model", _CONVERT_MODEL)):
        if flag.value and not os.path.isfile(os.path.join(flag.value, "config.json")):
            raise ValueError(f"{name} {flag.value}: not a Hugging Face model directory (no config.json)")


def _generate(questions: list, decoding: dict[str, int]) -> tuple[dict[str, str], dict, str]:
    """Answers from ``--model`` (and, with ``--best_of``, every sample with its reward), and the
    prompt format used."""
    from rlaifv_jax.eval import policy as policy_lib
    policy = policy_lib.Policy(_MODEL.value, dtype=_DTYPE.value, template=_TEMPLATE.value)
    common = dict(max_new_tokens=decoding["max_new_tokens"], batch_size=_BATCH.value, suffix=_PROMPT_SUFFIX.value,
                  progress=_PROGRESS.value)
    if _BEST_OF.value == 1:
        texts = policy.answer(questions, num_beams=decoding["num_beams"], **common)
        return {q.id: t for q, t in zip(questions, texts)}, {}, policy.template
    with contextlib.ExitStack() as stack:
        best = policy_lib.best_of_n(policy, questions, _reward(policy, stack), n=_BEST_OF.value,
                                    temperature=_TEMPERATURE.value, top_k=_TOP_K.value, top_p=_TOP_P.value,
                                    seed=_SEED.value, **common)
    return ({q.id: b["answer"] for q, b in zip(questions, best)},
            {q.id: {"samples": b["samples"]} for q, b in zip(questions, best)}, policy.template)


def _judge(bench: suites.Benchmark):
    """The local (``--judge``) or endpoint (``--judge_url``) judge, with the suite's official request settings."""
    if _JUDGE.value:
        from rlaifv_jax.eval.judge import Judge
        return Judge(_JUDGE.value, dtype=_DTYPE.value, max_new_tokens=_JUDGE_MAX_NEW.value, batch_size=_BATCH.value,
                     progress=_PROGRESS.value)
    from rlaifv_jax.eval.endpoint import EndpointJudge
    official = bench.paper_judge or {"role": "user", "temperature": 0.0, "max_tokens": 512}
    temperature = official["temperature"] if _JUDGE_TEMPERATURE.value is None else _JUDGE_TEMPERATURE.value
    cache = _JUDGE_CACHE.value or os.path.splitext(os.path.abspath(_OUT.value))[0] + ".judge_cache"
    return EndpointJudge(_JUDGE_URL.value, _JUDGE_MODEL.value, cache_dir=cache, key_env=_JUDGE_KEY_ENV.value,
                         role=official["role"], temperature=temperature, max_tokens=official["max_tokens"],
                         timeout_s=_JUDGE_TIMEOUT.value, retries=_JUDGE_RETRIES.value,
                         concurrency=_JUDGE_CONCURRENCY.value)


def _reward(policy, stack: contextlib.ExitStack):
    """The ``--reward`` of best-of-N; claim LLMs stay loaded for the ``stack``'s lifetime."""
    from rlaifv_jax.eval import policy as policy_lib
    if _REWARD.value == "implicit":
        reference = policy_lib.load_reference(_REFERENCE.value, policy, _DTYPE.value)
        return policy_lib.ImplicitReward(policy, reference, _BETA.value, _BATCH.value)
    from rlaifv_jax.core.sharding import serve_mesh
    from rlaifv_jax.engine.score import Labeler
    from rlaifv_jax.engine.vision import layout_key
    from rlaifv_jax.feedback.claim_reward import ClaimReward
    from rlaifv_jax.stages import claims
    labeler = (policy_lib.Policy(_LABELER.value, dtype=_DTYPE.value, template=_LABELER_TEMPLATE.value)
               if _LABELER.value else policy)
    settings = claims.ClaimSettings(kind=_CLAIMS.value, split_path=_CLAIMS_MODEL.value or "",
                                    convert_path=_CONVERT_MODEL.value or "", dtype=_DTYPE.value)
    extractor = stack.enter_context(claims.extractor(settings, None, serve_mesh(), _SEED.value))
    scorer = Labeler(labeler.model, labeler.tokenizer, template=labeler.template, batch_size=8 * _BATCH.value)
    return ClaimReward(extractor, scorer.score, labeler.encode_image, layout_key(labeler.model))


def _reward_settings() -> dict[str, Any]:
    if _REWARD.value == "implicit":
        return {"reference": _REFERENCE.value, "beta": _BETA.value}
    return {"labeler": _LABELER.value or _MODEL.value, "claims": _CLAIMS.value, "claims_model": _CLAIMS_MODEL.value,
            "convert_model": _CONVERT_MODEL.value}


def run() -> dict[str, Any]:
    """Evaluate as the flags say; returns what is written to ``--out``."""
    _check_flags()
    bench = suites.load(_SUITE.value, _DATA.value, _IMAGES.value, _LABELS.value)
    has_judge = bool(_JUDGE.value or _JUDGE_URL.value)
    if bench.paper_judge and not has_judge and (bench.judge == "required" or _PROTOCOL.value == "paper"):
        why = ("is scored by a judge LLM" if bench.judge == "required"
               else "--protocol paper extracts objects with a judge")
        raise ValueError(f"{bench.name} {why}: pass --judge_url URL --judge_model NAME (the paper's: "
                         f"{bench.paper_judge['model']}, key in ${_JUDGE_KEY_ENV.value}) or --judge HF_DIR")
    if bench.judge == "unused" and has_judge:
        logging.warning("%s does not use a judge; ignoring the judge", bench.name)
    questions = bench.questions[:_LIMIT.value] if _LIMIT.value else bench.questions
    decoding = {"num_beams": _NUM_BEAMS.value or bench.decoding["num_beams"],
                "max_new_tokens": _MAX_NEW.value or bench.decoding["max_new_tokens"]}
    result: dict[str, Any] = {"suite": bench.name, "data": _DATA.value, "n_questions": len(questions),
                              "protocol": _PROTOCOL.value}
    extra: dict[str, dict] = {}
    if _ANSWERS.value:
        answers, report = read_answers(_ANSWERS.value, [q.id for q in questions])
        result["answers"] = _ANSWERS.value
        result["answers_report"] = report.to_dict()
        if report.missing or report.duplicate or report.unknown or report.malformed:
            logging.warning("%s", report.summary())
    else:
        answers, extra, template = _generate(questions, decoding)
        result["model"] = _MODEL.value
        result["decoding"] = decoding if _BEST_OF.value == 1 else {
            "best_of": _BEST_OF.value, "reward": _REWARD.value, **_reward_settings(), "temperature": _TEMPERATURE.value,
            "top_k": _TOP_K.value, "top_p": _TOP_P.value, "seed": _SEED.value,
            "max_new_tokens": decoding["max_new_tokens"]}
        result["template"], result["prompt_suffix"] = template, _PROMPT_SUFFIX.value
    judge = _judge(bench) if has_judge and bench.judge != "unused" else None
    result["scoring"] = (bench.scoring if judge is None
                         else f"judge ({'extraction' if bench.judge == 'optional' else 'rating'})")
    metrics, items = bench.score(answers, judge)
    if judge is not None:
        result["judge"] = judge.settings()
    result["metrics"] = metrics
    result["items"] = [{"id": q.id, "question": q.question, "answer": answers[q.id], **items.get(q.id, {}),
                        **extra.get(q.id, {})} for q in questions if q.id in answers]
    paths.makedirs(os.path.dirname(os.path.abspath(_OUT.value)))
    paths.atomic_write_text(_OUT.value, json.dumps(result, indent=1, ensure_ascii=False))
    if _TENSORBOARD.value:
        write_scalars(_TENSORBOARD.value, result, _TB_STEP.value)
    return result


def flatten(metrics: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """``(path/of/key, value)`` of every leaf of nested ``metrics``, in order."""
    rows = []
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        rows += flatten(value, name + "/") if isinstance(value, dict) else [(name, value)]
    return rows


def write_scalars(directory: str, result: dict[str, Any], step: int) -> None:
    """The numeric metrics (finite ints and floats, not booleans) as TensorBoard scalars
    ``eval/{suite}/{metric path}`` at ``step``."""
    from tensorboardX import SummaryWriter
    with SummaryWriter(directory) as tb:
        for name, value in flatten(result["metrics"]):
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                tb.add_scalar(f"eval/{result['suite']}/{name}", value, step)


def _cell(value: Any) -> str:
    if isinstance(value, list):
        return f"{len(value)} listed in the JSON" if value else "none"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def format_table(result: dict[str, Any]) -> str:
    """The metrics as an aligned two-column table."""
    rows = [(k, _cell(v)) for k, v in flatten(result["metrics"])]
    width = max([len(k) for k, _ in rows] + [6])
    head = f"{result['suite']}: {result['n_questions']} questions"
    return "\n".join([head, "-" * len(head)] + [f"{k.ljust(width)}  {v}" for k, v in rows])


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code (2 for bad input, with one line on stderr)."""
    argv = sys.argv if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        if flags.FLAGS.is_parsed():  # main() may run several times in one process (tests)
            flags.FLAGS.unparse_flags()
        flags.FLAGS(argv)
        result = run()
    except (flags.Error, ValueError, FileNotFoundError, NotADirectoryError, KeyError) as e:
        message = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
        print(f"evaluate: error: {message.splitlines()[0] if message else type(e).__name__}", file=sys.stderr)
        return 2
    print(format_table(result))
    print(f"wrote {_OUT.value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
