"""Qwen2.5-VL and Qwen3-VL (DeepStack carried in the image features) through the engine, against
transformers on tiny random models (float32, highest matmul precision): greedy sampling token for
token (one image; two images of different sizes in one left-padded batch, n samples sharing the
prefix), the labeler's shared-prefix yes/no probabilities, DPO pair log-probs from the batch builder,
one DPO step's loss against the DPO formula on PyTorch log-probs, the frozen tower, and LoRA (with remat)."""
import numpy as np
import pytest
import torch
from flax import nnx

import tiny_qwen
from rlaifv_jax.data import chat, prompts as prompts_lib
from rlaifv_jax.data.yesno import NO_WORDS, YES_WORDS
from rlaifv_jax.engine import generate as sampler
from rlaifv_jax.engine.logps import reference_logps
from rlaifv_jax.engine.score import Labeler
from rlaifv_jax.models import hf
from rlaifv_jax.stages import bundle
from rlaifv_jax.training import lora
from rlaifv_jax.training.step import DPOStep, LossSettings, OptimSettings

TOL = 1e-4
QUESTIONS = ("describe the image .", "describe the image w1 w2 w3 w4 .")
t = torch.tensor


FAMILIES = {"qwen2_5": (tiny_qwen.model, tiny_qwen.encode), "qwen3": (tiny_qwen.model3, tiny_qwen.encode3)}


@pytest.fixture(scope="module", params=list(FAMILIES))
def setup(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    build, encode_image = FAMILIES[request.param]
    ref = build(path)
    # Qwen2.5-VL: 10x8 and 6x14 patches; Qwen3-VL: 10x6 and 6x12
    images = [tiny_qwen.image(150, 100, 1), tiny_qwen.image(84, 196, 2)]
    return ref, hf.load_pretrained(str(path)), tiny_qwen.tokenizer(), images, str(path), encode_image


def _prompt(setup, image, question, i):
    _, model, tok, _, _, encode_image = setup
    px, grid = encode_image(image)
    ids = chat.encode_prompt(tok, question, model.num_image_tokens(grid), image_token_id=tiny_qwen.IMAGE,
                             template="chat")
    return {"id": i, "input_ids": ids.tolist(), "pixel_values": px, "image_grid_thw": grid}


def _hf_generate(ref, prompts, steps):
    width = max(len(p["input_ids"]) for p in prompts)
    ids = np.array([[tiny_qwen.EOS] * (width - len(p["input_ids"])) + p["input_ids"] for p in prompts])
    mask = (np.arange(width)[None] >= np.array([[width - len(p["input_ids"])] for p in prompts])).astype(np.int64)
    with torch.no_grad():
        out = ref.generate(input_ids=t(ids), attention_mask=t(mask),
                           pixel_values=t(np.concatenate([p["pixel_values"] for p in prompts])),
                           image_grid_thw=t(np.concatenate([p["image_grid_thw"] for p in prompts])),
                           mm_token_type_ids=t((ids == tiny_qwen.IMAGE).astype(np.int64)), max_new_tokens=steps,
                           do_sample=False)
    return out[:, width:].numpy()


def _hf_logits(ref, ids, px, grid):
    ids = np.asarray(ids)[None]
    with torch.no_grad():
        return ref(input_ids=t(ids), pixel_values=t(px), image_grid_thw=t(grid),
                   mm_token_type_ids=t((ids == tiny_qwen.IMAGE).astype(np.int64))).logits[0].double()


def test_chat_prompt_is_qwens_image_then_text_rendering(setup):
    _, model, tok, images, _, enc = setup
    p = _prompt(setup, images[0], QUESTIONS[0], 0)
    n = model.num_image_tokens(p["image_grid_thw"])
    text = tok.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTIONS[0]}]}],
                                   tokenize=False, add_generation_prompt=True)
    assert p["input_ids"] == tok(text.replace("<|image_pad|>", "<|image_pad|>" * n), add_special_tokens=False)["input_ids"]
    assert chat.end_of_turn_id(tok, "chat") == tiny_qwen.IM_END


def test_greedy_sampling_is_token_identical_to_transformers(setup):
    ref, model, tok, images, _, enc = setup
    steps = 6
    one = [_prompt(setup, images[0], QUESTIONS[0], 0)]
    got = sampler.generate(model, one, max_new_tokens=steps, stop_token_ids=[tiny_qwen.IM_END], progress=False)
    np.testing.assert_array_equal(got[0]["tokens"][0], _hf_generate(ref, one, steps)[0])
    # Two images of different sizes (5 and 6 chunks: one vision program) in one left-padded batch,
    # two samples per prompt sharing its prefix cache.
    before = sampler.compiled_programs().get("vision", 0)
    two = [_prompt(setup, images[0], QUESTIONS[0], 0), _prompt(setup, images[1], QUESTIONS[1], 1)]
    assert len(two[0]["input_ids"]) != len(two[1]["input_ids"])
    got = sampler.generate(model, two, num_samples=2, max_new_tokens=steps, stop_token_ids=[tiny_qwen.IM_END],
                           batch_size=2, progress=False)
    want = _hf_generate(ref, two, steps)
    for g, w in zip(got, want):
        assert g["tokens"] == [w.tolist()] * 2
    assert sampler.compiled_programs()["vision"] - before <= 1
    with pytest.raises(ValueError, match="prompt 0: .*needs image_grid_thw"):
        sampler.generate(model, [dict(two[0], image_grid_thw=None)], max_new_tokens=2, stop_token_ids=[1])
    counts = [model.num_image_tokens(p["image_grid_thw"]) for p in two]
    with pytest.raises(ValueError, match=f"prompt 0: input_ids hold {counts[0]} image tokens .* give {counts[1]} "):
        sampler.generate(model, [dict(two[0], pixel_values=two[1]["pixel_values"],
                                      image_grid_thw=two[1]["image_grid_thw"])], max_new_tokens=2, stop_token_ids=[1])


def test_labeler_shared_prefix_equals_full_forwards(setup):
    ref, model, tok, images, _, enc = setup
    px, grid = enc(images[1])
    questions = ["w1 w2", "w3", "the image w4 w5 w6"]
    labeler = Labeler(model, tok, template="chat", batch_size=2)
    assert labeler.answer_ids == {w: tiny_qwen.VOCAB[w] for w in YES_WORDS + NO_WORDS}
    got = labeler.score([{"questions": questions, "pixel_values": px, "image_grid_thw": grid}])[0]
    n = model.num_image_tokens(grid)
    for q, (p_yes, p_no) in zip(questions, got):
        ids = chat.encode_prompt(tok, chat.labeler_question(q), n, image_token_id=tiny_qwen.IMAGE, template="chat")
        probs = torch.softmax(_hf_logits(ref, ids, px, grid)[-1], -1).numpy()
        assert p_yes == pytest.approx(sum(probs[tiny_qwen.VOCAB[w]] for w in YES_WORDS), abs=1e-6)
        assert p_no == pytest.approx(sum(probs[tiny_qwen.VOCAB[w]] for w in NO_WORDS), abs=1e-6)


def _pairs(setup, length=96):
    """Two encoded pairs (images of different sizes) through the stages' batch builder."""
    _, model, tok, images, path, enc = setup
    b = bundle.Bundle(bundle.ModelSettings(path, template="chat"), model, tok, prompts_lib.QwenImageEncoder(path))
    records = []
    for i, (question, chosen, rejected) in enumerate([(QUESTIONS[0], "w1 w2 w3 .", "w4 ."),
                                                       (QUESTIONS[1], "w5 .", "w6 w7 w8 w9 w10 .")]):
        grid = enc(images[i])[1]
        pa = [chat.encode_prompt_answer(tok, question, a, model.num_image_tokens(grid), image_token_id=tiny_qwen.IMAGE,
                                        template="chat") for a in (chosen, rejected)]
        records.append({"key": str(i), "image_key": i, "prompt_ids": pa[0].prompt_ids.tolist(),
                        "chosen_ids": pa[0].answer_ids.tolist(), "rejected_ids": pa[1].answer_ids.tolist()})
    examples = [bundle.pair_example_fn(lambda k: images[k], b, length)(r) for r in records]
    return records, {k: np.stack([e[k] for e in examples]) for k in examples[0]}


def _hf_answer_logps(setup, records):
    """``{name: [pairs]}`` summed answer log-probs from transformers' logits on each full sequence."""
    ref, _, _, images, _, enc = setup
    out = {"chosen": [], "rejected": []}
    for i, rec in enumerate(records):
        px, grid = enc(images[i])
        for name in out:
            ids = rec["prompt_ids"] + rec[f"{name}_ids"]
            logp = torch.log_softmax(_hf_logits(ref, ids, px, grid), -1)
            start = len(rec["prompt_ids"])
            out[name].append(sum(float(logp[start + j - 1, ids[start + j]]) for j in range(len(rec[f"{name}_ids"]))))
    return {k: np.array(v) for k, v in out.items()}


def test_pair_logps_equal_transformers(setup):
    model = setup[1]
    records, batch = _pairs(setup)
    vc = model.config.vision  # padded to the processor's largest image: 160 patches
    assert batch["pixel_values"].shape == (2, -(-160 // vc.window_slots) * vc.window_slots, vc.patch_dim)
    assert batch["positions"].shape == (2, 3, 96)
    got = reference_logps(model, [batch])
    want = _hf_answer_logps(setup, records)
    for name in ("chosen", "rejected"):
        np.testing.assert_allclose(got[f"ref_{name}_logps"], want[name], atol=TOL)


def test_one_dpo_step_loss_equals_the_formula_on_torch_log_probs(setup):
    """The step's loss on a batch with given reference log-probs = mean of
    −log σ(β·((πc − rc) − (πr − rr))) with the policy log-probs πc, πr from transformers."""
    records, batch = _pairs(setup)
    ref_logps = {"ref_chosen_logps": np.array([-20.0, -9.5], np.float32),
                 "ref_rejected_logps": np.array([-12.0, -30.0], np.float32)}
    step = DPOStep(hf.load_pretrained(setup[4]), OptimSettings(total_steps=2), LossSettings(beta=0.1))
    _, metrics = step(step.init_state(), {**batch, **ref_logps, "weights": np.ones(2, np.float32)})
    pi = _hf_answer_logps(setup, records)
    margin = 0.1 * ((t(pi["chosen"]) - t(ref_logps["ref_chosen_logps"]).double())
                    - (t(pi["rejected"]) - t(ref_logps["ref_rejected_logps"]).double()))
    want = float(-torch.nn.functional.logsigmoid(margin).mean())
    assert abs(want - np.log(2)) > 0.05  # a margin far from zero: the formula is exercised
    assert float(metrics["loss"]) == pytest.approx(want, abs=1e-5)


def test_dpo_freezes_the_tower_and_lora_wraps_the_language_model(setup):
    path = setup[4]
    _, batch = _pairs(setup)
    model = hf.load_pretrained(path)
    step = DPOStep(model, OptimSettings(total_steps=2))
    heads = {p[0] for p, _ in nnx.to_flat_state(step.trainable_template)}
    assert heads == {"multi_modal_projector", "language_model"}  # the merger trains, the tower does not
    batch = {**batch, **reference_logps(model, [batch]), "weights": np.ones(2, np.float32)}
    lora.apply_lora(model, rank=4, alpha=8.0, dropout=0.0, seed=1)
    assert len(lora.lora_modules(model)) == 7 * model.config.text.num_hidden_layers
    step = DPOStep(model, OptimSettings(learning_rate=1e-2, total_steps=2, warmup_ratio=0.0), LossSettings(remat="full"),
                   trainable=lora.lora_trainable, prepare=lora.prepare)  # remat: Qwen's decoder loop honours it
    state, metrics = step(step.init_state(), batch)
    assert float(metrics["loss"]) == pytest.approx(np.log(2), abs=1e-5)  # B = 0: the policy starts as the reference
    b_norm = sum(float(np.abs(np.asarray(v)).sum()) for k, v in state["params"].items() if k.endswith("lora_b"))
    _, metrics = step(state, batch)
    assert b_norm > 0 and abs(float(metrics["loss"]) - np.log(2)) > 1e-4  # the adapters moved the policy
