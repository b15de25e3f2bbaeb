"""Continuous batching (``generate(decode_rows=...)``): a slot whose row stops takes the next waiting
(prompt, sample) row, and every row's tokens are those of one-prompt-at-a-time decoding."""
import numpy as np
import pytest

import tiny_hf
from rlaifv_jax.engine import generate
from rlaifv_jax.models import hf

MAX_NEW = 24


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    tiny_hf.llama(path)
    return hf.load_pretrained(str(path))


def _prompts(lengths, seed=0):
    rng = np.random.RandomState(seed)
    return [{"input_ids": [1] + rng.randint(3, 90, n - 1).tolist(), "pixel_values": None, "id": f"p{i}"}
            for i, n in enumerate(lengths)]


def _one_at_a_time(model, prompts, **kw):
    return [generate.generate(model, [p], batch_size=1, **kw)[0] for p in prompts]


def _check(model, prompts, decode_rows, **kw):
    want = _one_at_a_time(model, prompts, **kw)
    got = generate.generate(model, prompts, batch_size=len(prompts), decode_rows=decode_rows, **kw)
    lengths = [len(t) for o in want for t in o["tokens"]]
    assert min(lengths) <= 3 and max(lengths) >= 16  # rows stop at very different steps
    for a, b in zip(got, want):
        assert a["tokens"] == b["tokens"] and a["stopped"] == b["stopped"]
        np.testing.assert_allclose(np.concatenate(a["logprobs"]), np.concatenate(b["logprobs"]), atol=1e-5)


def test_greedy_continuous_equals_one_prompt_at_a_time(model):
    prompts = _prompts([5, 9, 14, 7, 11, 3])
    free = generate.generate(model, prompts, num_samples=1, max_new_tokens=MAX_NEW, stop_token_ids=[0],
                             batch_size=8, buckets=[32], progress=False)
    # stop tokens that end some rows at once and leave others running to max_new_tokens
    stop = sorted({o["tokens"][0][1] for o in free[:2]} | {o["tokens"][0][0] for o in free[2:3]})
    _check(model, prompts, 2, num_samples=1, max_new_tokens=MAX_NEW, stop_token_ids=stop, buckets=[32],
           progress=False)


@pytest.mark.parametrize("penalty", [None, 1.3])
def test_sampled_continuous_equals_one_prompt_at_a_time(model, penalty):
    prompts = _prompts([4, 12, 8, 6], seed=1)
    _check(model, prompts, 3, num_samples=3, max_new_tokens=MAX_NEW, temperature=1.0, top_k=40,
           repetition_penalty=penalty, stop_token_ids=list(range(3, 13)), seed=5, buckets=[32], progress=False)


def test_generate_logs_where_its_time_went(model, caplog):
    """The sampler logs how much of its wall time the prefill/decode programs ran and what the rest was
    (batch preparation, results): the decode programs' idle fraction, per call."""
    import logging
    import re
    with caplog.at_level(logging.DEBUG, logger=generate.__name__):
        generate.generate(model, _prompts([5, 9, 4]), num_samples=2, max_new_tokens=4, stop_token_ids=[0],
                          batch_size=2, buckets=[32], progress=False)
    (line,) = [r.getMessage() for r in caplog.records if "programs busy" in r.getMessage()]
    busy, idle, prepare, results = map(float, re.search(
        r"busy (\d+) % of the time, idle (\d+) % \(batch preparation with image features (\d+) %, results (\d+) %\)",
        line).groups())
    assert busy + idle == 100 and 0 < busy <= 100 and prepare + results <= idle + 1


@pytest.mark.parametrize("decode_rows", [None, 3])
def test_the_ragged_kernel_samples_the_same_tokens(model, decode_rows):
    """The Pallas own-cache kernel (interpreted on CPU), static and continuous: every (prompt, sample)
    row's tokens equal the pure-JAX walk's."""
    prompts = _prompts([4, 12, 8], seed=2)
    kw = dict(num_samples=2, max_new_tokens=MAX_NEW, temperature=1.0, top_k=40, stop_token_ids=list(range(3, 13)),
              seed=3, buckets=[32], batch_size=3, decode_rows=decode_rows, progress=False)
    want = generate.generate(model, prompts, own_cache="xla", **kw)
    got = generate.generate(model, prompts, own_cache="interpret", **kw)
    lengths = [len(t) for o in want for t in o["tokens"]]
    assert min(lengths) <= 3 and max(lengths) >= 10  # rows at very different fills
    for a, b in zip(got, want):
        assert a["tokens"] == b["tokens"] and a["stopped"] == b["stopped"]
        np.testing.assert_allclose(np.concatenate(a["logprobs"]), np.concatenate(b["logprobs"]), atol=1e-5)
    assert generate.own_cache_for(model, None, 300) == "xla"  # CPU: the pure-JAX walk
    with pytest.raises(ValueError, match="own_cache"):
        generate.generate(model, prompts, own_cache="cuda", **kw)
