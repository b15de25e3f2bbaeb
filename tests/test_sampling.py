"""The sampler: greedy parity with transformers' generate, logits processors, sampling statistics,
deconfounded PRNG streams, sharding, compile counts, and errors raised before compiling."""
import numpy as np
import pytest
import torch
from transformers.generation.logits_process import (LogitsProcessorList, RepetitionPenaltyLogitsProcessor,
                                                    TemperatureLogitsWarper, TopKLogitsWarper,
                                                    TopPLogitsWarper)

import jax
import jax.numpy as jnp
import tiny_hf
from rlaifv_jax.engine import generate
from rlaifv_jax.engine import logits as logits_lib
from rlaifv_jax.core import sharding
from rlaifv_jax.models import hf

IMG = tiny_hf.IMAGE_TOKEN
NEXT_SIZES = [(28, 28), (30, 50), (50, 30)]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """name → (transformers reference, our model, checkpoint dir) for tiny LLaVA, LLaVA-NeXT, Llama."""
    out = {}
    for name, build in [("llava", tiny_hf.llava), ("llava_next", tiny_hf.llava_next), ("llama", tiny_hf.llama)]:
        path = tmp_path_factory.mktemp(name)
        out[name] = (build(path), hf.load_pretrained(str(path)), str(path))
    return out


def _prompts(name, model, lengths, seed=0):
    """Prompts with random text of ``lengths`` (+ one image, placeholders expanded, for LLaVA models)."""
    rng = np.random.RandomState(seed)
    prompts = []
    for i, n in enumerate(lengths):
        ids = [1] + rng.randint(3, 90, n - 1).tolist()
        p = {"input_ids": ids, "pixel_values": None}
        if name == "llava":
            p["pixel_values"] = rng.randn(1, 3, 28, 28).astype(np.float32)
            ids[2:2] = [IMG] * model.num_image_tokens()
        elif name == "llava_next":
            size = NEXT_SIZES[i % len(NEXT_SIZES)]
            p["pixel_values"] = rng.randn(1, 5, 3, 28, 28).astype(np.float32)
            p["image_sizes"] = np.asarray([size])
            ids[2:2] = [IMG] * model.num_image_tokens(size)
        prompts.append(p)
    return prompts


def _image_kwargs(prompt):
    kw = {}
    if prompt["pixel_values"] is not None:
        kw["pixel_values"] = torch.tensor(prompt["pixel_values"])
    if "image_sizes" in prompt:
        kw["image_sizes"] = torch.tensor(prompt["image_sizes"])
    return kw


def _hf_greedy(ref, prompt, max_new_tokens, stop, penalty=None):
    """transformers' greedy continuation of one unpadded prompt, cut before the first stop token."""
    out = ref.generate(input_ids=torch.tensor([prompt["input_ids"]]), max_new_tokens=max_new_tokens,
                       do_sample=False, eos_token_id=list(stop), pad_token_id=0,
                       repetition_penalty=penalty, **_image_kwargs(prompt))[0, len(prompt["input_ids"]):].tolist()
    cut = [k for k, t in enumerate(out) if t in stop]
    return out[:cut[0]] if cut else out


@pytest.mark.parametrize("name,penalty", [("llava", None), ("llava", 1.5), ("llava_next", None), ("llama", None)])
def test_greedy_equals_transformers(models, name, penalty):
    ref, model, _ = models[name]
    prompts = _prompts(name, model, [4, 9, 15])
    first = _hf_greedy(ref, prompts[0], 10, [2], penalty)
    stop = [2] + first[3:4]  # prompt 0 stops early, after 3 tokens (or sooner)
    got = generate.generate(model, prompts, max_new_tokens=10, stop_token_ids=stop, batch_size=4,
                            buckets=[64], repetition_penalty=penalty, progress=False)
    for prompt, out in zip(prompts, got):
        want = _hf_greedy(ref, prompt, 10, stop, penalty)
        assert out["tokens"] == [want]
        assert out["stopped"] == [len(want) < 10]
        # log-probs are the raw model's, as a teacher-forced forward gives them
        n = len(prompt["input_ids"])
        logits = ref(input_ids=torch.tensor([prompt["input_ids"] + want]), **_image_kwargs(prompt)).logits
        logp = torch.log_softmax(logits[0, n - 1:-1].float(), -1)[torch.arange(len(want)), torch.tensor(want)]
        np.testing.assert_allclose(out["logprobs"][0], logp.detach().numpy(), atol=1e-4)
    assert len(got[0]["tokens"][0]) <= 3 and got[0]["stopped"] == [True]


def test_logits_processors_equal_transformers():
    rng = np.random.RandomState(0)
    logits = rng.randn(4, 97).astype(np.float32) * 3
    history = rng.randint(0, 97, (4, 12))
    seen = np.zeros((4, 97), bool)
    np.put_along_axis(seen, history, True, axis=1)
    scores, hist = torch.tensor(logits), torch.tensor(history)

    def same(ours, theirs):
        ours, theirs = np.asarray(ours), theirs.numpy()
        assert np.array_equal(np.isneginf(ours), np.isneginf(theirs))
        np.testing.assert_allclose(ours[np.isfinite(ours)], theirs[np.isfinite(theirs)], rtol=1e-6)

    same(logits_lib.apply_repetition_penalty(jnp.asarray(logits), jnp.asarray(seen), 1.3),
         RepetitionPenaltyLogitsProcessor(1.3)(hist, scores.clone()))
    for k in (1, 5, 50):
        same(logits_lib.top_k_filter(jnp.asarray(logits), k), TopKLogitsWarper(k)(hist, scores.clone()))
    for p in (0.05, 0.5, 0.9):
        kept = logits_lib.top_p_filter(jnp.asarray(logits), p)
        same(kept, TopPLogitsWarper(p)(hist, scores.clone()))
        assert 1 <= np.isfinite(np.asarray(kept)).sum(axis=1).min() and np.isneginf(np.asarray(kept)).any()
    chain = LogitsProcessorList([RepetitionPenaltyLogitsProcessor(1.2), TemperatureLogitsWarper(0.7),
                                 TopKLogitsWarper(20), TopPLogitsWarper(0.8)])
    cfg = logits_lib.DecodeSettings(temperature=0.7, top_k=20, top_p=0.8, repetition_penalty=1.2)
    same(logits_lib.process_logits(jnp.asarray(logits), jnp.asarray(seen), cfg), chain(hist, scores.clone()))


@pytest.mark.parametrize("cfg", [
    logits_lib.DecodeSettings(temperature=0.7, top_k=50),
    logits_lib.DecodeSettings(temperature=1.3, top_k=20, top_p=0.8, repetition_penalty=1.2),
    logits_lib.DecodeSettings(temperature=1.0, top_k=3, banned_ids=(5, 7)),
])
def test_top_k_draw_over_candidates_equals_the_draw_over_the_vocabulary(cfg):
    """The top-k draw looks at k candidates, not V: same tokens as ``jax.random.categorical`` over the
    whole filtered vocabulary, row by row and step by step (so deconfounded streams are unchanged)."""
    rows, vocab = 64, 3000
    logits = jax.random.normal(jax.random.key(0), (rows, vocab)) * 3
    seen = jax.random.bernoulli(jax.random.key(1), 0.01, (rows, vocab))
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(5), i))(jnp.arange(rows))
    values, ids = logits_lib.candidate_scores(logits, seen, cfg)
    full = logits_lib.process_logits(logits, seen, cfg)
    np.testing.assert_array_equal(np.asarray(values), np.take_along_axis(np.asarray(full), np.asarray(ids), 1))
    assert np.isfinite(np.asarray(full)).sum() == np.isfinite(np.asarray(values)).sum()  # no other token kept
    step_keys = jax.vmap(jax.random.fold_in)(keys, jnp.full((rows,), 0))
    np.testing.assert_array_equal(  # the noise at the candidates is the noise the full draw adds there
        np.asarray(logits_lib.gumbel_at(step_keys, ids)),
        np.take_along_axis(np.asarray(jax.vmap(lambda k: jax.random.gumbel(k, (vocab,)))(step_keys)), np.asarray(ids), 1))
    for step in range(12):
        got, logp = logits_lib.choose_tokens(logits, seen, keys, jnp.int32(step), cfg)
        step_keys = jax.vmap(jax.random.fold_in)(keys, jnp.full((rows,), step))
        want = jax.vmap(jax.random.categorical)(step_keys, full)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    np.testing.assert_allclose(np.asarray(logp), np.take_along_axis(
        np.asarray(jax.nn.log_softmax(logits)), np.asarray(got)[:, None], 1)[:, 0], rtol=1e-6)


def test_top_k_draw_falls_back_to_the_vocabulary_draw_for_other_generators():
    """With the high-range Gumbel the candidates' noise is not what ``categorical`` would draw, so the
    draw runs over the vocabulary (the same tokens as ``categorical`` in that mode)."""
    cfg = logits_lib.DecodeSettings(temperature=0.7, top_k=10)
    logits = jax.random.normal(jax.random.key(0), (16, 500)) * 3
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(2), i))(jnp.arange(16))
    jax.config.update("jax_high_dynamic_range_gumbel", True)
    try:
        got = logits_lib.choose_tokens(logits, None, keys, jnp.int32(3), cfg)[0]
        step_keys = jax.vmap(jax.random.fold_in)(keys, jnp.full((16,), 3))
        want = jax.vmap(jax.random.categorical)(step_keys, logits_lib.process_logits(logits, None, cfg))
    finally:
        jax.config.update("jax_high_dynamic_range_gumbel", False)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_first_token_distribution_matches_filtered_softmax(models):
    ref, model, _ = models["llama"]
    prompt = _prompts("llama", model, [6])[0]
    n, temperature, top_k, top_p = 4000, 0.1, 20, 0.9
    out = generate.generate(model, [prompt], num_samples=n, max_new_tokens=1, temperature=temperature,
                            top_k=top_k, top_p=top_p, stop_token_ids=[0], seed=3, progress=False)[0]
    ids = torch.tensor([prompt["input_ids"]])
    raw = ref(ids).logits[:, -1].float()
    chain = LogitsProcessorList([TemperatureLogitsWarper(temperature), TopKLogitsWarper(top_k),
                                 TopPLogitsWarper(top_p)])
    want = torch.softmax(chain(ids, raw.clone()), -1)[0].detach().numpy()
    first = np.array([t[0] for t in out["tokens"]])
    freq = np.bincount(first, minlength=want.size) / n
    assert 3 <= (want > 0).sum() < top_k  # the filters bite
    assert freq[want == 0].sum() == 0  # filtered tokens are never drawn
    assert 0.5 * np.abs(freq - want).sum() < 0.04  # total variation; ~0.015 expected at n=4000
    # log-probs are the raw model's (temperature 1, no filtering)
    logp = torch.log_softmax(raw, -1)[0].detach().numpy()
    np.testing.assert_allclose([lp[0] for lp in out["logprobs"]], logp[first], atol=1e-5)


def test_same_seed_same_samples_whatever_the_batch(models):
    _, model, _ = models["llama"]
    prompts = _prompts("llama", model, [3, 7, 12, 20, 5])
    for i, p in enumerate(prompts):
        p["id"] = f"prompt-{i}"
    kw = dict(num_samples=3, max_new_tokens=6, temperature=1.0, top_k=40, stop_token_ids=[2], seed=7,
              progress=False)
    together = generate.generate(model, prompts, batch_size=8, buckets=[32], **kw)
    before = generate.compiled_programs()
    split = generate.generate(model, prompts[::-1], batch_size=2, buckets=[8, 32], **kw)[::-1]
    after = generate.compiled_programs()
    compiled = {k: v - before.get(k, 0) for k, v in after.items() if v > before.get(k, 0)}
    assert compiled == {"prefill": 2, "decode": 2}  # 2 buckets used: one prefill + one decode each
    again = generate.generate(model, prompts[::-1], batch_size=2, buckets=[8, 32], **kw)[::-1]
    assert generate.compiled_programs() == after  # nothing new
    for a, b, c in zip(together, split, again):
        assert a["tokens"] == b["tokens"] == c["tokens"]
        np.testing.assert_allclose(np.concatenate(a["logprobs"]), np.concatenate(b["logprobs"]), atol=1e-5)
    for out in together:
        assert len({tuple(t) for t in out["tokens"]}) == 3  # sample indices draw different streams
    other = generate.generate(model, prompts, batch_size=8, buckets=[32], **{**kw, "seed": 8})
    assert [o["tokens"] for o in other] != [o["tokens"] for o in together]


@pytest.mark.parametrize("shape", [(2, 1, 4), (8, 1, 1)])
def test_sharded_equals_unsharded(models, shape):
    _, model, path = models["llava"]
    mesh = sharding.make_mesh(*shape)
    sharded = hf.load_pretrained(path, shardings=lambda s: sharding.state_shardings(s, mesh, sharding.SERVE_RULES))
    prompts = _prompts("llava", model, [4, 9, 15, 6])
    kw = dict(num_samples=2, max_new_tokens=5, temperature=0.8, top_p=0.95, repetition_penalty=1.1,
              stop_token_ids=[2], batch_size=4, buckets=[32], progress=False)
    want = generate.generate(model, prompts, **kw)
    got = generate.generate(sharded, prompts, mesh=mesh, **kw)
    for a, b in zip(got, want):
        assert a["tokens"] == b["tokens"]
        np.testing.assert_allclose(np.concatenate(a["logprobs"]), np.concatenate(b["logprobs"]), atol=1e-5)


def test_bad_input_fails_before_compiling(models):
    _, llava, _ = models["llava"]
    _, llama, _ = models["llama"]
    good = _prompts("llava", llava, [5])[0]
    base = dict(max_new_tokens=4, stop_token_ids=[2], buckets=[16, 32], progress=False)
    bad_tokens = {**good, "input_ids": good["input_ids"][:2] + good["input_ids"][3:]}
    cases = [
        (llava, [{"input_ids": [], "pixel_values": None}], {}, "empty"),
        (llama, [{"input_ids": [1] * 40}], {}, "exceed the largest bucket"),
        (llama, [{"input_ids": [1] * 10}], {"max_new_tokens": 2040, "buckets": [16]}, "max_position_embeddings"),
        (llava, [good], {"temperature": -1.0}, "temperature"),
        (llava, [good], {"top_p": 0.0}, "top_p"),
        (llava, [good], {"top_p": 1.5}, "top_p"),
        (llava, [good], {"top_k": 0}, "top_k"),
        (llava, [good], {"repetition_penalty": 0.0}, "repetition_penalty"),
        (llava, [good], {"stop_token_ids": []}, "stop_token_ids"),
        (llava, [good], {"stop_token_ids": [500]}, "stop_token_ids"),
        (llava, [good], {"max_new_tokens": 0}, "max_new_tokens"),
        (llava, [good], {"num_samples": 0}, "num_samples"),
        (llava, [bad_tokens], {}, "prompt 0: input_ids hold 3 image tokens .* give 4 features"),
        (llava, [{**good, "pixel_values": None}], {}, "hold 4 image tokens .* give 0 features"),
        (llama, [{"input_ids": [1, 5], "pixel_values": np.zeros((1, 3, 28, 28))}], {}, "text-only"),
        (llava, [{**good, "id": -1}], {}, "prompt id"),
    ]
    before = generate.compiled_programs()
    for model, prompts, kw, match in cases:
        with pytest.raises(ValueError, match=match):
            generate.generate(model, prompts, **{**base, **kw})
    assert generate.compiled_programs() == before
