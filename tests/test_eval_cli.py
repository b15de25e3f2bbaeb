"""``python -m rlaifv_jax.evaluate``: scoring answers files, one-line errors, a tiny random Llama as
the judge, a tiny random LLaVA answering every suite's fixture, best-of-N with the implicit and the
labeler reward, and TensorBoard scalars."""
import json
import os
import struct

import numpy as np
import pytest
from tokenizers import AddedToken, Regex, Tokenizer, models, pre_tokenizers
from transformers import CLIPImageProcessor, PreTrainedTokenizerFast

import tiny_hf
import tiny_qwen
from rlaifv_jax import evaluate
from rlaifv_jax.eval import policy as evaluate_policy
from rlaifv_jax.data.chat import LLAVA_V1_SYSTEM

FIX = os.path.join(os.path.dirname(__file__), "fixtures", "eval")
DATA = {"object_halbench": os.path.join(FIX, "object_halbench"),
        "pope": os.path.join(FIX, "pope", "coco_pope_random.json"),
        "amber": os.path.join(FIX, "amber", "data", "query", "query_all.json"),
        "mmhal": os.path.join(FIX, "mmhal", "response_template.json")}
IMAGES = {"pope": os.path.join(FIX, "pope", "images"), "amber": os.path.join(FIX, "amber", "images")}
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")


def tokenizer():
    """Word-level tokenizer over the prompt words; ``<image>`` is tiny_hf.IMAGE_TOKEN."""
    specials = ["<pad>", "<s>", "</s>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "\n"]
    words = sorted(set((LLAVA_V1_SYSTEM + " USER ASSISTANT : Yes No yes no there is a dog cat car person tree in "
                        "the image ? Rating rating").replace(".", " . ").replace(",", " , ").replace("'", " ' ").split()))
    vocab = specials + words
    vocab += [f"w{i}" for i in range(tiny_hf.IMAGE_TOKEN - len(vocab))] + ["<image>"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"\w+|[^\w\s]|\n"), behavior="removed", invert=True)
    tok.add_special_tokens([AddedToken(t, special=True) for t in specials[:6] + ["<image>"]])
    t = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<pad>",
                                pad_token="<pad>")
    t.chat_template = LLAMA3_TEMPLATE
    return t


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_models")
    out = {}
    for name, seed in (("policy", 0), ("reference", 1)):
        path = root / name
        tiny_hf.llava(path, seed=seed)
        tokenizer().save_pretrained(path)
        CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}).save_pretrained(path)
        out[name] = str(path)
    tiny_hf.llama(root / "judge", seed=2)
    tokenizer().save_pretrained(root / "judge")
    out["judge"] = str(root / "judge")
    return out


def run(tmp_path, suite, *extra):
    out = tmp_path / f"{suite}.json"
    argv = ["evaluate", f"--suite={suite}", f"--data={DATA[suite]}", f"--out={out}", "--noprogress",
            "--dtype=float32", *extra]
    if suite in IMAGES:
        argv.append(f"--images={IMAGES[suite]}")
    rc = evaluate.main(argv)
    return rc, (json.loads(out.read_text()) if rc == 0 else None)


@pytest.mark.parametrize("suite,key,value", [("object_halbench", "mention_hall", 3 / 11),
                                             ("pope", "random", None), ("amber", "discriminative", None)])
def test_scores_answers_files(tmp_path, capsys, suite, key, value):
    rc, result = run(tmp_path, suite, f"--answers={os.path.join(FIX, 'answers', suite + '.jsonl')}")
    assert rc == 0
    if value is not None:
        assert result["metrics"][key] == pytest.approx(value)
    assert key in result["metrics"] and result["answers_report"]["missing"] == []
    assert len(result["items"]) == result["n_questions"] and all("answer" in i for i in result["items"])
    printed = capsys.readouterr().out
    assert printed.startswith(f"{suite}: ") and key in printed


def test_missing_and_unknown_answers_are_named(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"id": 1, "answer": "Yes"}\n{"id": 1, "answer": "No"}\n{"id": 42, "answer": "No"}\n')
    rc, result = run(tmp_path, "pope", f"--answers={path}")
    assert rc == 0 and result["metrics"]["random"]["n"] == 1
    report = result["answers_report"]
    assert report["missing"] == ["2", "3", "4", "5", "6", "7"] and report["duplicate"] == ["1"]
    assert report["unknown"] == ["42"]


@pytest.mark.parametrize("args,message", [
    ([], "--suite is required"),
    (["--suite=pope", "--data=x", "--out=o.json"], "exactly one of --model"),
    (["--suite=pope", f"--data={DATA['pope']}", "--out=o.json", "--answers=missing.jsonl"], "missing.jsonl"),
    (["--suite=mmhal", f"--data={DATA['mmhal']}", "--out=o.json", "--answers=a.jsonl"], "pass --judge"),
    (["--suite=nope"], "suite"),
    (["--suite=pope", "--data=x", "--out=o", "--model=/nonexistent"], "no config.json"),
    (["--suite=pope", "--data=x", "--out=o", "--answers=a", "--best_of=2"], "--reference"),
    (["--suite=pope", "--data=x", "--out=o", "--model=m", "--best_of=2", "--reward=labeler", "--claims=llm"],
     "--claims_model"),
])
def test_bad_input_is_one_line_and_exit_2(capsys, args, message):
    assert evaluate.main(["evaluate", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("evaluate: error:") and message in err


def test_tiny_llama_judge_flow(tmp_path, dirs):
    """A random judge: replies are parsed (and fail) as the real ones would be; flow and counts only."""
    judge = [f"--judge={dirs['judge']}", "--judge_max_new_tokens=4"]
    rc, result = run(tmp_path, "mmhal", f"--answers={os.path.join(FIX, 'answers', 'mmhal.jsonl')}", *judge)
    assert rc == 0 and result["metrics"]["n"] == 4
    assert result["metrics"]["n_unparseable"] == 4 and result["metrics"]["score"] == 0.0
    assert all(isinstance(i["judge_reply"], str) and i["rating"] is None for i in result["items"])
    rc, result = run(tmp_path, "object_halbench", f"--answers={os.path.join(FIX, 'answers', 'object_halbench.jsonl')}",
                     *judge)
    m = result["metrics"]
    assert rc == 0 and m["extractor"] == "llm" and m["n_extraction_failed"] == 4
    assert m["mention_hall"] == pytest.approx(3 / 11)  # every answer fell back to the rule path


def test_model_answers_every_suite(tmp_path, dirs):
    for suite in ("pope", "amber", "object_halbench", "mmhal"):
        extra = [f"--judge={dirs['judge']}", "--judge_max_new_tokens=4"] if suite == "mmhal" else []
        rc, result = run(tmp_path, suite, f"--model={dirs['policy']}", "--max_new_tokens=4", *extra)
        assert rc == 0, suite
        beams = 3 if suite in ("object_halbench", "mmhal") else 1  # the official decoding
        assert result["decoding"] == {"num_beams": beams, "max_new_tokens": 4}
        assert len(result["items"]) == result["n_questions"] and result["metrics"]
        assert all(isinstance(i["answer"], str) for i in result["items"])


def test_best_of_n(tmp_path, dirs):
    rc, result = run(tmp_path, "pope", f"--model={dirs['policy']}", f"--reference={dirs['reference']}",
                     "--best_of=3", "--max_new_tokens=3", "--limit=2", "--beta=0.5")
    assert rc == 0 and result["decoding"]["best_of"] == 3 and len(result["items"]) == 2
    for item in result["items"]:
        samples = item["samples"]
        assert len(samples) == 3
        for s in samples:
            assert s["reward"] == pytest.approx(0.5 * (s["logp"] - s["ref_logp"]) / s["tokens"], rel=1e-6)
        assert item["answer"] == samples[int(np.argmax([s["reward"] for s in samples]))]["answer"]


@pytest.mark.parametrize("claims", ["rule", "llm"])
def test_best_of_n_labeler_reward(tmp_path, dirs, claims):
    """Claims by the toy world's rules with another model as the labeler, or by a (random) split/convert
    LLM with self-feedback: every sample carries its claims and reward (None without usable claims);
    the answer is the best sample's."""
    extra = ([f"--labeler={dirs['reference']}"] if claims == "rule" else
             ["--claims=llm", f"--claims_model={dirs['judge']}"])
    rc, result = run(tmp_path, "pope", f"--model={dirs['policy']}", "--reward=labeler", *extra,
                     "--best_of=2", "--max_new_tokens=3", "--limit=2")
    assert rc == 0 and result["decoding"]["reward"] == "labeler" and result["decoding"]["claims"] == claims
    assert result["decoding"]["labeler"] == dirs["reference" if claims == "rule" else "policy"]
    for item in result["items"]:
        samples = item["samples"]
        assert len(samples) == 2
        for s in samples:
            assert s["status"] in ("ok", "no_claims", "unparseable", "count_mismatch")
            assert s["reward"] == (-float(sum(not a for a in s["accepted"])) if s["status"] == "ok" else None)
        assert item["answer"] == samples[evaluate_policy.best_index([s["reward"] for s in samples])]["answer"]


def _scalars(directory):
    """``{tag: (step, value)}`` of the TensorBoard event files in ``directory`` (TFRecord framing)."""
    from tensorboardX.proto import event_pb2
    out = {}
    for name in os.listdir(directory):
        data, pos = (directory / name).read_bytes(), 0
        while pos < len(data):
            (n,) = struct.unpack("<Q", data[pos:pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + n])
            pos += 12 + n + 4
            out.update({v.tag: (event.step, v.simple_value) for v in event.summary.value})
    return out


def test_tensorboard_scalars(tmp_path):
    tb = tmp_path / "tb"
    rc, result = run(tmp_path, "pope", f"--answers={os.path.join(FIX, 'answers', 'pope.jsonl')}",
                     f"--tensorboard={tb}", "--tensorboard_step=7")
    assert rc == 0
    got = _scalars(tb)
    want = {f"eval/pope/{k}": v for k, v in evaluate.flatten(result["metrics"])
            if isinstance(v, (int, float)) and not isinstance(v, bool)}
    assert want and set(got) == set(want)
    for tag, value in want.items():
        assert got[tag] == (7, pytest.approx(value, rel=1e-6)), tag


def test_qwen_model_beam_search_and_best_of_n(tmp_path):
    """A tiny random Qwen2.5-VL through --model (its chat template by default): beam search on Object
    HalBench, implicit-reward best-of-N on POPE."""
    for name, seed in (("qwen", 0), ("qwen_ref", 1)):
        tiny_qwen.model(tmp_path / name, seed=seed)
    rc, result = run(tmp_path, "object_halbench", f"--model={tmp_path / 'qwen'}", "--max_new_tokens=3", "--limit=2")
    assert rc == 0 and result["decoding"]["num_beams"] == 3 and result["template"] == "chat"
    assert len(result["items"]) == 2 and all(isinstance(i["answer"], str) for i in result["items"])
    rc, result = run(tmp_path, "pope", f"--model={tmp_path / 'qwen'}", f"--reference={tmp_path / 'qwen_ref'}",
                     "--best_of=2", "--max_new_tokens=3", "--limit=2")
    assert rc == 0 and len(result["items"]) == 2
    for item in result["items"]:
        for s in item["samples"]:
            assert s["reward"] == pytest.approx(0.1 * (s["logp"] - s["ref_logp"]) / s["tokens"], rel=1e-6)
