"""DPO loss, metrics and answer log-probs against independent NumPy formulas."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlaifv_jax.engine.logps import answer_logps
from rlaifv_jax.training.loss import dpo_loss, dpo_loss_sums, metrics_from_sums


def np_logsigmoid(x):
    return -np.logaddexp(0.0, -x)


def np_dpo(pc, pr, rc, rr, beta, loss_type, eps):
    """Reference per-pair losses written from TRL's formulas."""
    l = (pc - pr) - (rc - rr)
    if loss_type == "sigmoid":
        return -np_logsigmoid(beta * l) * (1 - eps) - np_logsigmoid(-beta * l) * eps
    if loss_type == "robust":
        return (-np_logsigmoid(beta * l) * (1 - eps) + np_logsigmoid(-beta * l) * eps) / (1 - 2 * eps)
    if loss_type == "hinge":
        return np.maximum(0.0, 1 - beta * l)
    if loss_type == "ipo":
        return (l - 1 / (2 * beta)) ** 2
    raise AssertionError(loss_type)


def _batch(seed, b=7, scale=20.0):
    rng = np.random.default_rng(seed)
    return [(-rng.uniform(1, scale, size=b)).astype(np.float32) for _ in range(4)]


@pytest.mark.parametrize("loss_type", ["sigmoid", "robust", "hinge", "ipo"])
@pytest.mark.parametrize("beta", [0.05, 0.1, 0.5])
@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
def test_loss_types_match_numpy(loss_type, beta, eps):
    if eps and loss_type in ("hinge", "ipo"):
        with pytest.raises(ValueError):
            dpo_loss(*map(jnp.asarray, _batch(0)), beta=beta, loss_type=loss_type, label_smoothing=eps)
        return
    pc, pr, rc, rr = _batch(int(beta * 100) + int(eps * 10))
    loss, m = dpo_loss(*map(jnp.asarray, (pc, pr, rc, rr)), beta=beta, loss_type=loss_type, label_smoothing=eps)
    ref = np_dpo(pc.astype(np.float64), pr, rc, rr, beta, loss_type, eps)
    np.testing.assert_allclose(float(loss), ref.mean(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(m["loss"]), ref.mean(), rtol=1e-5, atol=1e-6)


def test_policy_equals_reference_gives_log2():
    pc, pr, _, _ = _batch(1)
    loss, m = dpo_loss(*map(jnp.asarray, (pc, pr, pc, pr)))
    np.testing.assert_allclose(float(loss), math.log(2.0), rtol=1e-6)
    assert float(m["rewards/accuracies"]) == 0.0  # strict '>' as in TRL
    assert float(m["rewards/margins"]) == 0.0


def test_metrics_values():
    pc, pr, rc, rr = _batch(2)
    beta = 0.2
    _, m = dpo_loss(*map(jnp.asarray, (pc, pr, rc, rr)), beta=beta)
    c, r = beta * (pc - rc), beta * (pr - rr)
    np.testing.assert_allclose(float(m["rewards/chosen"]), c.mean(), rtol=1e-5)
    np.testing.assert_allclose(float(m["rewards/rejected"]), r.mean(), rtol=1e-5)
    np.testing.assert_allclose(float(m["rewards/margins"]), (c - r).mean(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(m["rewards/accuracies"]), (c > r).mean(), rtol=1e-6)
    assert 0 < (c > r).mean() < 1  # the batch exercises both outcomes
    for name, x in [("logps/chosen", pc), ("logps/rejected", pr), ("logps/ref_chosen", rc), ("logps/ref_rejected", rr)]:
        np.testing.assert_allclose(float(m[name]), x.mean(), rtol=1e-6)


def test_average_and_sft_term():
    pc, pr, rc, rr = _batch(3)
    lc = np.array([3, 5, 8, 1, 2, 9, 4], np.float32)
    lr = np.array([2, 7, 1, 6, 3, 4, 5], np.float32)
    beta, w = 0.1, 0.7
    loss, m = dpo_loss(
        *map(jnp.asarray, (pc, pr, rc, rr)), beta=beta, sft_weight=w, average=True,
        chosen_lengths=jnp.asarray(lc), rejected_lengths=jnp.asarray(lr),
    )
    ref = np_dpo(pc / lc, pr / lr, rc / lc, rr / lr, beta, "sigmoid", 0.0) - w * pc / lc
    np.testing.assert_allclose(float(loss), ref.mean(), rtol=1e-5)
    np.testing.assert_allclose(float(m["logps/chosen"]), (pc / lc).mean(), rtol=1e-5)
    with pytest.raises(ValueError):
        dpo_loss(*map(jnp.asarray, (pc, pr, rc, rr)), average=True)
    loss_sum_only, _ = dpo_loss(*map(jnp.asarray, (pc, pr, rc, rr)), sft_weight=w)
    ref_sum = np_dpo(pc, pr, rc, rr, 0.1, "sigmoid", 0.0) - w * pc
    np.testing.assert_allclose(float(loss_sum_only), ref_sum.mean(), rtol=1e-5)


def test_padded_pairs_ignored_and_gradient_clean():
    pc, pr, rc, rr = _batch(4)
    weights = np.array([1, 1, 0, 1, 0, 1, 1], np.float32)
    garbage = [x.copy() for x in (pc, pr, rc, rr)]
    for x in garbage:
        x[weights == 0] = np.nan
    keep = weights == 1
    loss, m = dpo_loss(*map(jnp.asarray, garbage), weights=jnp.asarray(weights))
    ref_loss, ref_m = dpo_loss(*(jnp.asarray(x[keep]) for x in (pc, pr, rc, rr)))
    np.testing.assert_allclose(float(loss), np_dpo(pc[keep], pr[keep], rc[keep], rr[keep], 0.1, "sigmoid", 0).mean(), rtol=1e-5)
    for k in ref_m:
        np.testing.assert_allclose(float(m[k]), float(ref_m[k]), rtol=1e-5, atol=1e-7)
    g = jax.grad(lambda a: dpo_loss(a, *map(jnp.asarray, garbage[1:]), weights=jnp.asarray(weights))[0])(
        jnp.asarray(garbage[0])
    )
    assert np.all(np.isfinite(np.asarray(g)))
    assert np.all(np.asarray(g)[~keep] == 0)


def test_sums_accumulate_exactly():
    pc, pr, rc, rr = _batch(5, b=8)
    weights = np.array([1, 1, 1, 0, 1, 1, 0, 1], np.float32)
    args = [jnp.asarray(x) for x in (pc, pr, rc, rr)]
    _, big = dpo_loss(*args, weights=jnp.asarray(weights), beta=0.3)
    parts = [
        dpo_loss_sums(*(a[s] for a in args), weights=jnp.asarray(weights[s]), beta=0.3)[1]
        for s in (slice(0, 3), slice(3, 8))
    ]
    acc = metrics_from_sums(jax.tree.map(jnp.add, *parts))
    assert float(parts[0]["count"] + parts[1]["count"]) == 6
    for k in big:
        np.testing.assert_allclose(float(acc[k]), float(big[k]), rtol=1e-6, atol=1e-7)


def np_answer_logps(logits, tokens, start, length):
    logits = logits.astype(np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    sums, counts = [], []
    for b in range(tokens.shape[0]):
        s = 0.0
        for t in range(start[b], start[b] + length[b]):
            s += logp[b, t - 1, tokens[b, t]]
        sums.append(s)
        counts.append(length[b])
    return np.array(sums), np.array(counts)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_answer_logps_matches_numpy(dtype):
    rng = np.random.default_rng(0)
    b, t, v = 3, 12, 11
    pad = eos = 2  # pad id == eos id: the final EOS must still count
    tokens = rng.integers(3, v, size=(b, t))
    start = np.array([4, 2, 6])
    length = np.array([5, 9, 3])
    for i in range(b):
        tokens[i, start[i] + length[i] - 1] = eos
        tokens[i, start[i] + length[i]:] = pad
    tokens[1, 5] = eos  # an EOS-valued token inside the answer counts too
    logits = (rng.normal(size=(b, t, v)) * 3).astype(np.float32)
    logits_in = jnp.asarray(logits, dtype)
    got_sum, got_cnt = answer_logps(logits_in, jnp.asarray(tokens), jnp.asarray(start), jnp.asarray(length))
    ref_sum, ref_cnt = np_answer_logps(np.asarray(logits_in.astype(jnp.float32)), tokens, start, length)
    assert got_sum.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(got_cnt), ref_cnt)
    np.testing.assert_allclose(np.asarray(got_sum), ref_sum, rtol=1e-5, atol=1e-4)
    # A mask from `token != pad` would drop the EOS terms: make sure they are non-zero contributions.
    eos_only = np_answer_logps(np.asarray(logits_in.astype(jnp.float32)), tokens, start + length - 1, np.ones(b, int))[0]
    assert np.all(np.abs(eos_only) > 1e-3)


def test_answer_logps_gradient_matches_softmax():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(1, 4, 5)).astype(np.float32)
    tokens = np.array([[0, 3, 1, 4]])
    g = jax.grad(lambda x: answer_logps(x, jnp.asarray(tokens), jnp.array([2]), jnp.array([2]))[0].sum())(
        jnp.asarray(logits)
    )
    p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    ref = np.zeros_like(logits)
    for t in (1, 2):  # positions predicting tokens 2 and 3
        ref[0, t] = -p[0, t]
        ref[0, t, tokens[0, t + 1]] += 1
    np.testing.assert_allclose(np.asarray(g), ref, atol=1e-6)
