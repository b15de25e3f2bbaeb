"""Any labeler with any policy: a tiny LLaVA policy (llava_v1 prompts, word-level tokenizer) labeled
by a tiny Qwen2.5-VL (its own ChatML template, tokenizer and image processor, other yes/no ids)
runs the online loop to pairs and a DPO step (the machinery of ``test_qwen_online``); and a labeler
whose tokenizer cannot spell a one-token yes/no answer is refused at start, in one line."""
import json

import pytest
from PIL import Image
from transformers import CLIPImageProcessor

import tiny_hf
import tiny_qwen
from configs import default
from rlaifv_jax.core import records
from rlaifv_jax.data.yesno import ANSWER_WORDS
from rlaifv_jax.pipelines import online
from rlaifv_jax.stages import bundle
from claims_llm import BRANCHES, bigram_splitter


def _config(tmp_path, labeler):
    policy, splitter = tmp_path / "policy", tmp_path / "splitter"
    tiny_hf.llava(policy, seed=1)
    tiny_hf.word_tokenizer(policy)
    CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}).save_pretrained(str(policy))
    bigram_splitter(splitter)
    lines = []
    for i, (h, w) in enumerate([(40, 30), (60, 90), (100, 100)]):
        Image.fromarray(tiny_qwen.image(h, w, seed=10 + i)).save(tmp_path / f"{i}.png")
        lines.append(json.dumps({"id": f"p{i}", "image_path": f"{i}.png", "question": "describe the image ."}))
    (tmp_path / "prompts.jsonl").write_text("\n".join(lines) + "\n")
    c = default.get_config("smoke")
    c.source, c.prompts.path, c.policy.path = "files", str(tmp_path / "prompts.jsonl"), str(policy)
    c.policy.template = "llava_v1"
    c.labeler.kind, c.labeler.path, c.labeler.template = "model", str(labeler), "chat"
    c.claims.kind, c.claims.split_path = "llm", str(splitter)
    c.iterations, c.progress, c.seed = 1, False, 0
    c.sampling.num_samples, c.sampling.max_new_tokens, c.sampling.temperature = 4, 6, 1.0
    c.pairs.balance_lengths = False
    c.dpo.batch_size, c.dpo.max_length, c.dpo.learning_rate, c.dpo.warmup_ratio = 8, 96, 1e-2, 0.0
    return c


def test_llava_policy_with_a_qwen_labeler_makes_pairs_and_trains(tmp_path):
    labeler = tmp_path / "labeler"
    tiny_qwen.model(labeler, seed=3, text=dict(initializer_range=0.1))  # verdicts depend on the claim word
    c = _config(tmp_path, labeler)
    policy_tok, labeler_tok = bundle.tokenizer(c.policy.path), bundle.tokenizer(str(labeler))
    assert all(policy_tok.convert_tokens_to_ids(w) != labeler_tok.convert_tokens_to_ids(w) for w in ANSWER_WORDS)
    workdir = tmp_path / "run"
    summary = online.run(c, str(workdir))
    assert [e["iteration"] for e in summary] == [0, 1] and summary[1]["pairs"] > 0
    claims = records.read_stage(str(workdir / "iter_00" / "claims"))
    assert {q for r in claims for cl in r["claims"] for q in cl["questions"]} <= {f"w{i}" for i in range(BRANCHES)}
    labels = [p for r in records.read_stage(str(workdir / "iter_00" / "labels")) for resp in r["labels"]
              for q in resp for p in q]
    assert labels and 0 < min(labels) and max(labels) < 1  # the Qwen labeler's own yes/no ids were read
    assert (workdir / "checkpoints" / "1").exists()


def test_labeler_without_a_one_token_answer_is_refused_at_start(tmp_path):
    labeler = tmp_path / "labeler"
    tiny_qwen.model(labeler)
    words = [w for w in tiny_qwen.WORDS if w not in ("No", "no")]  # "No" / "no" become unknown
    tiny_hf.word_tokenizer(labeler, words, image_token=None)
    c = _config(tmp_path, labeler)
    with pytest.raises(ValueError) as err:
        online.run(c, str(tmp_path / "run"))
    msg = str(err.value)
    assert "\n" not in msg and "labeler tokenizer" in msg and "' No' -> [0]" in msg and "answer_prefix" in msg
    assert not (tmp_path / "run" / "iter_00").exists()  # nothing ran
