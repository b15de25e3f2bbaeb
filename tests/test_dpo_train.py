"""Model-facing DPO: pair log-probs vs transformers, reference pass, jitted sharded train step."""
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import tiny_hf
from rlaifv_jax.engine import logps
from rlaifv_jax.training import loss
from rlaifv_jax.training import step as dpo_step
from rlaifv_jax.core import sharding
from rlaifv_jax.models import hf

N_IMG = 4  # tiny LLaVA: 28 px / 14 px patches, CLS dropped


def make_batch(rng, batch=4, length=24):
    """Right-padded pairs: BOS, 2 text ids, 4 image tokens, prompt text, then answers of varying length."""
    out = {k: [] for k in ("chosen_tokens", "rejected_tokens", "answer_start", "chosen_len", "rejected_len")}
    for _ in range(batch):
        prompt = [1, *rng.randint(4, 90, 2), *[tiny_hf.IMAGE_TOKEN] * N_IMG, *rng.randint(4, 90, rng.randint(1, 5))]
        out["answer_start"].append(len(prompt))
        for name in ("chosen", "rejected"):
            n = rng.randint(2, length - len(prompt) + 1)
            ans = [*rng.randint(4, 90, n - 1), 2]  # EOS ends the answer; pad id is also 2 below
            row = np.full(length, 2, np.int32)
            row[: len(prompt) + n] = prompt + ans
            out[f"{name}_tokens"].append(row)
            out[f"{name}_len"].append(n)
    out = {k: np.asarray(v, np.int32) for k, v in out.items()}
    out["pixel_values"] = rng.randn(batch, 3, 28, 28).astype(np.float32)
    return out


def torch_answer_logps(ref, tokens, px, start, lens):
    mask = np.arange(tokens.shape[1])[None] < (start + lens)[:, None]
    with torch.no_grad():
        logits = ref(input_ids=torch.tensor(tokens), pixel_values=torch.tensor(px),
                     attention_mask=torch.tensor(mask.astype(np.int64))).logits
        logp = torch.log_softmax(logits.double(), -1)[:, :-1].gather(-1, torch.tensor(tokens[:, 1:], dtype=torch.long)[..., None])[..., 0]
    pos = np.arange(1, tokens.shape[1])[None]
    amask = (pos >= start[:, None]) & (pos < (start + lens)[:, None])
    return (logp.numpy() * amask).sum(-1)


def test_pair_logps_match_transformers(tiny_llava):
    path, ref = tiny_llava
    model = hf.load_pretrained(path)
    batch = make_batch(np.random.RandomState(0))
    got = jax.jit(lambda b: logps.pair_logps(model, b))(batch)
    for name in ("chosen", "rejected"):
        want = torch_answer_logps(ref, batch[f"{name}_tokens"], batch["pixel_values"], batch["answer_start"], batch[f"{name}_len"])
        np.testing.assert_allclose(np.asarray(got[name]), want, atol=1e-4, rtol=0)
        np.testing.assert_array_equal(np.asarray(got[f"{name}_len"]), batch[f"{name}_len"])
    # reference pass: same numbers, a short last batch padded and dropped
    refs = logps.reference_logps(model, [{k: v[:3] for k, v in batch.items()}, {k: v[3:] for k, v in batch.items()}])
    np.testing.assert_allclose(refs["ref_chosen_logps"], np.asarray(got["chosen"]), atol=1e-5)
    np.testing.assert_allclose(refs["ref_rejected_logps"], np.asarray(got["rejected"]), atol=1e-5)


def test_answer_window_equals_full_head_and_checks_lengths(tiny_llava):
    path, _ = tiny_llava
    model = hf.load_pretrained(path)
    batch = make_batch(np.random.RandomState(1))
    window = int(max(batch["chosen_len"].max(), batch["rejected_len"].max()))
    full = jax.jit(lambda b: logps.pair_logps(model, b))(batch)
    windowed = jax.jit(lambda b: logps.pair_logps(model, b, answer_window=window))(batch)
    for key in ("chosen", "rejected", "chosen_len", "rejected_len"):
        np.testing.assert_allclose(np.asarray(windowed[key]), np.asarray(full[key]), atol=1e-5, rtol=0)
    step = dpo_step.DPOStep(model, OPT, dpo_step.LossSettings(answer_window=window - 1))
    with pytest.raises(ValueError, match=f"exceeds loss.answer_window={window - 1}"):
        step(step.init_state(), _with_refs(model, batch))


def _with_refs(model, batch):
    return batch | logps.reference_logps(model, [batch])


OPT = dpo_step.OptimSettings(learning_rate=1e-3, total_steps=10, warmup_ratio=0.0, weight_decay=0.01)


def test_step0_loss_is_log2_and_vision_tower_has_no_state(tiny_llava):
    path, _ = tiny_llava
    model = hf.load_pretrained(path)
    batch = _with_refs(model, make_batch(np.random.RandomState(1)))
    step = dpo_step.DPOStep(model, OPT)
    state = step.init_state(0)
    assert not any(k.startswith("vision_tower") for k in state["params"])
    assert any(k.startswith("multi_modal_projector") for k in state["params"])
    mu_keys = [k for d in jax.tree.leaves(state["opt_state"], is_leaf=lambda x: isinstance(x, dict)) if isinstance(d, dict) for k in d]
    assert mu_keys and not any(k.startswith("vision_tower") for k in mu_keys)
    vt_before = np.asarray(step.frozen["vision_tower/layers/0/fc1/kernel"]).copy()
    state, m = step(state, batch)
    assert abs(float(m["loss"]) - math.log(2)) < 1e-6
    assert abs(float(m["rewards/margins"])) < 1e-6 and float(m["rewards/accuracies"]) == 0.0
    assert float(m["grad_norm"]) > 0 and int(state["step"]) == 1
    state, m2 = step(state, batch)
    assert float(m2["loss"]) < math.log(2) and float(m2["rewards/accuracies"]) > 0.5
    np.testing.assert_array_equal(np.asarray(step.frozen["vision_tower/layers/0/fc1/kernel"]), vt_before)
    assert step.compiles == 1 and len(step._jitted) == 1


@pytest.mark.parametrize("total,ratio,kind", [(10, 0.0, "cosine"), (17, 0.05, "cosine"), (40, 0.1, "cosine"),
                                              (5, 0.5, "constant"), (9, 0.0, "constant")])
def test_learning_rate_at_is_optax_schedule(total, ratio, kind):
    import optax
    cfg = dpo_step.OptimSettings(learning_rate=3e-4, total_steps=total, warmup_ratio=ratio, schedule=kind)
    warm = math.ceil(ratio * total)
    if kind == "cosine":
        ref = optax.warmup_cosine_decay_schedule(0.0, 3e-4, warm, max(total, warm + 1), 0.0)
    else:
        ref = optax.join_schedules([optax.linear_schedule(0.0, 3e-4, warm), optax.constant_schedule(3e-4)],
                                   [warm]) if warm else optax.constant_schedule(3e-4)
    counts = jnp.arange(total + 3)
    ours = jax.jit(lambda c, s: dpo_step.learning_rate_at(cfg, c, s))(counts, dpo_step.schedule_steps(cfg))
    np.testing.assert_allclose(np.asarray(ours), np.asarray(jax.vmap(ref)(counts)), rtol=1e-5, atol=1e-10)


def test_step_is_adamw_and_one_program_serves_every_length(tiny_llava):
    import optax
    path, _ = tiny_llava
    model = hf.load_pretrained(path)
    batch = _with_refs(model, make_batch(np.random.RandomState(3)))
    cfg = dpo_step.OptimSettings(learning_rate=1e-2, total_steps=6, warmup_ratio=0.2, weight_decay=0.1)
    step = dpo_step.DPOStep(model, cfg)
    state = step.init_state(0)
    params = {k: np.asarray(v) for k, v in state["params"].items()}
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(
        optax.warmup_cosine_decay_schedule(0.0, 1e-2, 2, 6, 0.0), weight_decay=0.1,
        mask=lambda p: jax.tree.map(lambda x: x.ndim >= 2, p)))
    opt = tx.init(params)

    @jax.jit  # one program: optax's update op by op would compile every op for every parameter shape
    def adamw(grads, opt, params):
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), opt

    for _ in range(3):  # warm-up steps 0 and 1 (rate 0, then 5e-3), then the cosine
        grads, _ = step.gradients(state, batch)
        params, opt = adamw(grads, opt, params)
        state, _ = step(state, batch)
    # The two programs' gradients agree to float rounding; AdamW divides by the gradient's running RMS,
    # so where a gradient is tiny its rounding moves the step: one projector element by 1.4e-6 (the rest
    # within 8e-8). A wrong schedule, mask or decay moves many elements by 1e-5 or more.
    for k, v in params.items():
        np.testing.assert_allclose(np.asarray(state["params"][k]), np.asarray(v), rtol=1e-5, atol=2e-6, err_msg=k)
    # each online iteration's DPO run has its own length: the schedule is an argument, not a constant
    other = dpo_step.DPOStep(model, dataclasses.replace(cfg, total_steps=17))
    assert other.lower(batch).as_text() == step.lower(batch).as_text()


def test_bf16_compute_keeps_float32_master_weights(tiny_llava):
    path, _ = tiny_llava
    model = hf.load_pretrained(path, dtype=jnp.bfloat16, param_dtype=jnp.float32)
    batch = _with_refs(model, make_batch(np.random.RandomState(1)))
    step = dpo_step.DPOStep(model, OPT)
    state = step.init_state(0)
    assert all(v.dtype == jnp.float32 for v in state["params"].values())
    state, m = step(state, batch)
    assert abs(float(m["loss"]) - math.log(2)) < 1e-6  # same bf16 forward as the reference pass


def test_grad_accumulation_equals_full_batch(tiny_llava):
    path, _ = tiny_llava
    model = hf.load_pretrained(path)
    batch = _with_refs(model, make_batch(np.random.RandomState(2), batch=8))
    batch["ref_chosen_logps"] = batch["ref_chosen_logps"] + np.linspace(-3, 3, 8).astype(np.float32)  # non-trivial loss
    out = {}
    for k in (1, 4):
        step = dpo_step.DPOStep(model, OPT, dpo_step.LossSettings(grad_accum=k))
        out[k] = step.gradients(step.init_state(0), batch)
    (g1, m1), (g4, m4) = out[1], out[4]
    for key in g1:
        np.testing.assert_allclose(np.asarray(g4[key]), np.asarray(g1[key]), atol=2e-6, rtol=1e-4, err_msg=key)
    for name in loss.METRIC_NAMES:
        np.testing.assert_allclose(float(m4[name]), float(m1[name]), rtol=1e-5, atol=1e-6, err_msg=name)
    assert abs(float(m1["loss"]) - math.log(2)) > 1e-3  # the shifted references make the loss non-trivial


def test_sharded_step_equals_unsharded_and_compiles_once(tiny_llava):
    path, _ = tiny_llava
    plain_model = hf.load_pretrained(path)
    batches = [_with_refs(plain_model, make_batch(np.random.RandomState(10 + i), batch=8)) for i in range(2)]
    plain = dpo_step.DPOStep(plain_model, OPT)
    mesh = sharding.make_mesh(2, 2, 2)
    with jax.set_mesh(mesh):
        sharded_model = hf.load_pretrained(path, shardings=lambda s: sharding.state_shardings(s, mesh))
    sharded = dpo_step.DPOStep(sharded_model, OPT, dpo_step.LossSettings(grad_accum=2), mesh=mesh)
    s_plain, s_sh = plain.init_state(0), sharded.init_state(0)
    kernel = s_sh["params"]["language_model/layers/0/mlp/up_proj/kernel"]
    assert len(kernel.sharding.device_set) == 8
    for b in batches:
        s_plain, m_plain = plain(s_plain, b)
        s_sh, m_sh = sharded(s_sh, b)
        np.testing.assert_allclose(float(m_sh["loss"]), float(m_plain["loss"]), atol=1e-5)
        np.testing.assert_allclose(float(m_sh["grad_norm"]), float(m_plain["grad_norm"]), rtol=1e-4)
    # Two AdamW steps move a weight by at most 2 * lr = 2e-3; where a gradient is near zero, Adam's
    # normalisation turns the sharded sum's rounding into up to ~2e-5 of that (1 %; machine-dependent).
    for key, v in s_plain["params"].items():
        np.testing.assert_allclose(np.asarray(s_sh["params"][key]), np.asarray(v), atol=5e-5, err_msg=key)
    assert plain.compiles == 1 and sharded.compiles == 1
    assert all(fn._cache_size() == 1 for fn in sharded._jitted.values())
    # the state is donated: the old buffers are gone
    assert s_sh["step"].sharding == sharded.state_shardings["step"]


def test_lora_trains_adapters_only_and_merges(tiny_llava):
    from rlaifv_jax.training import lora
    path, _ = tiny_llava
    base = hf.load_pretrained(path)
    batch = make_batch(np.random.RandomState(5), batch=4)
    base_logps = logps.reference_logps(base, [batch])
    model = lora.apply_lora(hf.load_pretrained(path), rank=4, alpha=8.0, dropout=0.1, seed=1)
    assert len(lora.lora_modules(model)) == 7 * 2
    refs = logps.reference_logps(model, [batch])  # B = 0: the LoRA model is the frozen base
    np.testing.assert_allclose(refs["ref_chosen_logps"], base_logps["ref_chosen_logps"], atol=1e-6)
    step = dpo_step.DPOStep(model, OPT, trainable=lora.lora_trainable, prepare=lora.prepare)
    state = step.init_state(0)
    assert state["params"] and all(k.endswith(("lora_a", "lora_b")) for k in state["params"])
    batch = batch | refs
    losses = []
    for _ in range(4):
        state, m = step(state, batch)
        losses.append(float(m["loss"]))
    assert abs(losses[0] - math.log(2)) < 0.05 and losses[-1] < losses[0]  # dropout: not exactly log 2
    trained = step.model(state)
    base_kernel = "language_model/layers/0/mlp/up_proj/base/kernel"
    np.testing.assert_array_equal(np.asarray(step.frozen[base_kernel]),
                                  np.asarray(base.language_model.layers[0].mlp.up_proj.kernel[...]))
    want = logps.reference_logps(trained, [batch])  # deterministic (no dropout) outside training
    merged = lora.merge_lora(trained)
    assert not lora.lora_modules(merged)
    got = logps.reference_logps(merged, [batch])
    np.testing.assert_allclose(got["ref_chosen_logps"], want["ref_chosen_logps"], atol=1e-4)
    assert np.abs(got["ref_chosen_logps"] - base_logps["ref_chosen_logps"]).max() > 1e-3
