"""Stage 8, the policy measured: on held-out toy images exactly (CHAIR and recall of greedy captions,
and the policy's yes/no accuracy scored like the labeler), or on a benchmark suite of ``eval/``
inside a training job; each measurement is stored as a one-record stage. ("eval" names the
benchmark package ``eval/``, its command ``evaluate`` and the config section ``eval``.)"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

from rlaifv_jax.data import toy_world
from rlaifv_jax.data.chat import labeler_question
from rlaifv_jax.engine.generate import generate
from rlaifv_jax.engine.score import Labeler
from rlaifv_jax.eval import chair
from rlaifv_jax.feedback.verdicts import accept_claim
from rlaifv_jax.stages import bundle, runner

NO_GROUND_TRUTH = {"chair_response": None, "chair_mention": None, "recall": None, "yesno_accuracy": None}
# The metrics a checkpoint can be selected by (eval.select_metric, named as offline selection names
# Object HalBench's) and which way is better; RECORD_KEYS: where this stage's record holds each one.
DIRECTIONS = {"response_hall": "min", "mention_hall": "min", "chair_s": "min", "recall": "max",
              "yesno_accuracy": "max", "yesno_f1": "max"}
RECORD_KEYS = {"response_hall": "chair_response", "mention_hall": "chair_mention"}


@dataclasses.dataclass(frozen=True)
class MeasureSettings:
    max_new_tokens: int = 40  # greedy captions
    batch_size: int = 64
    decode_rows: int | None = None  # continuous batching of the captions through this many slots (None: off)


def measure_toy(b: bundle.Bundle, records: list[dict[str, Any]], world: toy_world.WorldSettings,
                settings: MeasureSettings, mesh=None) -> dict[str, Any]:
    """CHAIR (response, mention), recall and yes/no accuracy of the bundle's model on ``records``."""
    prompts = [b.prompt(r) for r in records]  # each image encoded once, for captions and questions
    captions = []
    for lo in range(0, len(records), settings.batch_size):
        outs = generate(b.model, prompts[lo:lo + settings.batch_size], num_samples=1,
                        max_new_tokens=settings.max_new_tokens, temperature=0.0, stop_token_ids=b.stop_ids(),
                        batch_size=settings.batch_size, mesh=mesh, decode_rows=settings.decode_rows,
                        progress=False)
        captions += [b.tokenizer.decode(o["tokens"][0], skip_special_tokens=True).strip() for o in outs]
    metrics = chair.chair_metrics([chair.toy_mentions(c, world) for c in captions],
                                  [{tuple(o) for o in r["objects"]} for r in records])
    suffix = labeler_question("")  # the labeler appends it itself
    labeler = Labeler(b.model, b.tokenizer, template=b.template, batch_size=settings.batch_size)
    items = [{"questions": [q.removesuffix(suffix) for q, _ in r["yesno"]],
              "pixel_values": prompt["pixel_values"], "image_sizes": prompt["image_sizes"]}
             for r, prompt in zip(records, prompts)]
    said = [accept_claim(py, pn) for per in labeler.score(items) for py, pn in per]
    yesno = chair.yesno_metrics(said, [a for r in records for _, a in r["yesno"]])
    metrics.update({"yesno_accuracy": yesno["accuracy"], "yesno_f1": yesno["f1"]})
    metrics["examples"] = captions[:3]
    return metrics


def run(stage_dir: str, policy: bundle.ModelSettings, records: list[dict[str, Any]],
        world: toy_world.WorldSettings | None, settings: MeasureSettings, *, mesh) -> dict[str, Any]:
    """The evaluation of ``policy`` (one record, computed once and reused on rerun); without a
    ground-truth world the metrics are None."""

    @contextlib.contextmanager
    def open_fn():
        if world is None:
            yield lambda chunk: [dict(NO_GROUND_TRUTH)]
            return
        with bundle.loaded(policy, mesh) as b:
            yield lambda chunk: [measure_toy(b, records, world, settings, mesh)]

    out = runner.run(stage_dir, [{"key": "eval"}], open_fn, chunk_size=1, desc="eval", progress=False)
    return {k: v for k, v in out[0].items() if k != "key"}


@dataclasses.dataclass(frozen=True)
class SuiteSettings:
    """A benchmark suite run inside a training job (``eval/suites.py``; no judge: MMHal-Bench is out)."""

    name: str  # object_halbench | amber | pope
    data: str  # the suite's --data path
    images: str | None = None  # the suite's --images directory
    num_beams: int = 0  # 0: the suite's official decoding
    max_new_tokens: int = 0  # 0: the suite's official limit
    batch_size: int = 8
    limit: int = 0  # first N questions only (0: all)
    decode_rows: int | None = None  # greedy answers through this many continuous-batching slots (None: off)


def flat_metrics(metrics: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """The numbers of a suite's (nested) metrics under dotted names, e.g. ``random.f1``."""
    out: dict[str, float] = {}
    for k, v in metrics.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flat_metrics(v, name + "."))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[name] = float(v)
    return out


def load_suite(s: SuiteSettings):
    """The suite's questions (the first ``limit``) and scorer (``eval.suites.Benchmark``)."""
    from rlaifv_jax.eval import suites
    bench = suites.load(s.name, s.data, s.images)
    if s.limit:
        bench.questions = bench.questions[:s.limit]
    return bench


def suite_metric_names(bench) -> list[str]:
    """The dotted metric names the suite reports (scored on placeholder answers, no model)."""
    return sorted(flat_metrics(bench.score({q.id: "No." for q in bench.questions}, None)[0]))


def answer_suite(b: bundle.Bundle, bench, s: SuiteSettings, mesh=None) -> dict[str, str]:
    """The bundle's answer to every question, with the suite's official decoding (greedy or beam)."""
    from rlaifv_jax.eval.policy import answer_chunks
    from rlaifv_jax.eval.questions import load_image
    size = 4 * s.batch_size
    chunks = ([b.prompt({"id": q.id, "question": q.question, "image": load_image(q)})
               for q in bench.questions[lo:lo + size]] for lo in range(0, len(bench.questions), size))
    texts = answer_chunks(b.model, chunks, stop_ids=b.stop_ids(),
                          decode=lambda t: b.tokenizer.decode(t, skip_special_tokens=True).strip(),
                          num_beams=s.num_beams or bench.decoding["num_beams"],
                          max_new_tokens=s.max_new_tokens or bench.decoding["max_new_tokens"],
                          batch_size=s.batch_size, mesh=mesh, decode_rows=s.decode_rows)
    return {q.id: t for q, t in zip(bench.questions, texts)}


def run_suite(stage_dir: str, policy: bundle.ModelSettings, bench, settings: SuiteSettings, *, mesh) -> dict[str, Any]:
    """The suite's flattened metrics of ``policy`` (one record with the answers, computed once)."""

    @contextlib.contextmanager
    def open_fn():
        with bundle.loaded(policy, mesh) as b:
            def fn(chunk):
                answers = answer_suite(b, bench, settings, mesh)
                return [{"metrics": flat_metrics(bench.score(answers, None)[0]), "answers": answers}]
            yield fn

    out = runner.run(stage_dir, [{"key": "eval"}], open_fn, chunk_size=1, desc=f"eval {settings.name}",
                     progress=False)
    return out[0]["metrics"]
