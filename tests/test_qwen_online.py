"""A tiny Qwen2.5-VL, and a tiny Qwen3-VL, runs the online loop end to end with self-feedback: prompt file → sampling →
claims (a tiny split/convert LLM) → labels → pairs → encoded → reference log-probs → DPO →
checkpoint → export, which transformers loads and generates from.

The claims LLM is ``claims_llm.bigram_splitter``: every response gets one claim whose word depends on
the response, the labeler's verdicts differ between words (checked for this seed), and prompts get
pairs to train on.
"""
import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText

import tiny_qwen
from claims_llm import BRANCHES, bigram_splitter
from configs import default
from rlaifv_jax.core import records
from rlaifv_jax.pipelines import online

# family: (build, seed at which the labeler's verdicts differ between claim words, encode, architecture,
# a merger weight that trains)
FAMILIES = {
    "qwen2_5": (tiny_qwen.model, 3, tiny_qwen.encode, "Qwen2_5_VLForConditionalGeneration",
                "model.visual.merger.mlp.0.weight"),
    "qwen3": (tiny_qwen.model3, 4, tiny_qwen.encode3, "Qwen3VLForConditionalGeneration",
              "model.visual.deepstack_merger_list.0.linear_fc1.weight"),
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_tiny_qwen_runs_the_online_loop_and_exports(tmp_path, family):
    build, seed, encode, architecture, merger = FAMILIES[family]
    policy, splitter = tmp_path / "policy", tmp_path / "splitter"
    # Weights 5x transformers' default scale: the labeler's verdicts then depend on the claim word
    # (at 0.02 a tiny random model says "yes" or "no" to every question alike: no pairs).
    initial = build(policy, seed=seed, text=dict(initializer_range=0.1))
    bigram_splitter(splitter)
    lines, images = [], {}
    for i, (h, w) in enumerate([(40, 30), (60, 90), (100, 100)]):
        images[f"p{i}"] = tiny_qwen.image(h, w, seed=10 + i)
        Image.fromarray(images[f"p{i}"]).save(tmp_path / f"{i}.png")
        lines.append(json.dumps({"id": f"p{i}", "image_path": f"{i}.png", "question": "describe the image ."}))
    (tmp_path / "prompts.jsonl").write_text("\n".join(lines) + "\n")
    c = default.get_config("smoke")
    c.source, c.prompts.path, c.policy.path = "files", str(tmp_path / "prompts.jsonl"), str(policy)
    c.policy.template = c.labeler.template = "chat"
    c.claims.kind, c.claims.split_path = "llm", str(splitter)
    c.iterations, c.progress, c.seed = 1, False, 0
    c.sampling.num_samples, c.sampling.max_new_tokens, c.sampling.temperature = 4, 6, 1.0
    c.pairs.balance_lengths = False
    c.dpo.batch_size, c.dpo.max_length, c.dpo.learning_rate, c.dpo.warmup_ratio = 8, 96, 1e-2, 0.0
    workdir = tmp_path / "run"
    summary = online.run(c, str(workdir))

    assert [e["iteration"] for e in summary] == [0, 1] and summary[1]["pairs"] > 0
    claims = records.read_stage(str(workdir / "iter_00" / "claims"))
    assert {q for r in claims for cl in r["claims"] for q in cl["questions"]} <= {f"w{i}" for i in range(BRANCHES)}
    for e in records.read_stage(str(workdir / "iter_00" / "encoded")):  # image tokens counted per image
        grid = encode(images[e["image_key"]])[1]
        assert sum(t == tiny_qwen.IMAGE for t in e["prompt_ids"]) == np.prod(grid) // 4
    assert (workdir / "checkpoints" / "1").exists()

    export = workdir / "export"
    assert json.load(open(export / "config.json"))["architectures"] == [architecture]
    back = AutoModelForImageTextToText.from_pretrained(str(export)).eval()
    before, after = initial.state_dict(), back.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("model.visual.blocks"))  # frozen
    assert not torch.equal(before[merger], after[merger])
    assert not torch.equal(before["lm_head.weight"], after["lm_head.weight"])
    tok = tiny_qwen.tokenizer()
    px, grid = encode(tiny_qwen.image(60, 90, seed=11))
    text = tok.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "describe"}]}],
                                   tokenize=False, add_generation_prompt=True)
    ids = np.asarray([tok(text.replace("<|image_pad|>", "<|image_pad|>" * (int(np.prod(grid)) // 4)),
                          add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        out = back.generate(input_ids=torch.tensor(ids), pixel_values=torch.tensor(px),
                            image_grid_thw=torch.tensor(grid),
                            mm_token_type_ids=torch.tensor((ids == tiny_qwen.IMAGE).astype(np.int64)),
                            max_new_tokens=4, do_sample=False)
    assert out.shape == (1, ids.shape[1] + 4) or out[0, -1] == tiny_qwen.IM_END
