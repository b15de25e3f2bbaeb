"""Attention over the filled own cache (``layers.decode_attention``, blocked online softmax, heads-major
caches) equals the dense masked attention over all slots (``layers.shared_prefix_attention``, the
prefill's ``[R, S, K, D]`` caches); so does the Pallas
kernel that reads each row's own filled blocks only (``models.ragged_kernel``, interpreted here,
compiled for TPU in ``test_plan``)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlaifv_jax.models.layers import (decode_attention, dot_product_attention, heads_major, own_cache_path,
                                     shared_prefix_attention)

B, N, P, S, H, K, D, BLOCK = 2, 3, 7, 20, 4, 2, 8, 8


def _inputs(seed=0):
    ks = jax.random.split(jax.random.key(seed), 5)
    q = jax.random.normal(ks[0], (B * N, 1, H, D))
    k, v = (jax.random.normal(x, (B * N, S, K, D)) for x in ks[1:3])
    pk, pv = (jax.random.normal(x, (B, P, K, D)) for x in ks[3:5])
    prefix_mask = jnp.arange(P)[None, :] >= jnp.array([[2], [0]])  # left padding on prompt 0
    return q, k, v, pk, pv, prefix_mask


def test_shared_prefix_equals_attention_over_a_cache_holding_the_prefix_per_row():
    """The dense reference itself: several queries per row over the shared prefix plus causal own keys
    equal plain masked attention over each row's own copy of its prompt's prefix followed by its keys."""
    q0, k, v, pk, pv, prefix_mask = _inputs(3)
    t = 5
    q = jax.random.normal(jax.random.key(9), (B * N, t, H, D))
    own = (jnp.arange(S)[None, None, :] <= jnp.arange(t)[None, :, None] + jnp.array([0, 4, 9, 14, 3, 1])[:, None, None])
    got = shared_prefix_attention(q, k, v, own, pk, pv, prefix_mask)
    rows = jnp.arange(B * N) // N
    keys, values = jnp.concatenate([pk[rows], k], axis=1), jnp.concatenate([pv[rows], v], axis=1)
    mask = jnp.concatenate([jnp.broadcast_to(prefix_mask[rows][:, None, :], (B * N, t, P)), own], axis=-1)
    np.testing.assert_allclose(got, dot_product_attention(q, keys, values, mask), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("path", ["xla", "interpret"])
@pytest.mark.parametrize("filled", [1, BLOCK, BLOCK + 1, S])  # first step, block boundary, last slot
def test_blocked_equals_dense(filled, path):
    q, k, v, pk, pv, prefix_mask = _inputs()
    own_len = jnp.full((B * N,), filled)
    dense = shared_prefix_attention(q, k, v, (jnp.arange(S) < own_len[:, None])[:, None, :], pk, pv, prefix_mask)
    with own_cache_path(path):
        blocked = decode_attention(q, *heads_major((k, v)), own_len, *heads_major((pk, pv)), prefix_mask, block=BLOCK)
    np.testing.assert_allclose(blocked, dense, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("path", ["xla", "interpret"])
def test_ragged_rows_and_prefix_rows(path):
    """Rows at different fills, each reading any prompt's prefix (continuous batching), equal the dense
    attention over the same prefix copied per row; stale values past a row's fill do not matter."""
    q, k, v, pk, pv, prefix_mask = _inputs(1)
    own_len = jnp.array([1, 5, BLOCK, BLOCK + 3, S, 2])
    rows = jnp.array([1, 0, 1, 1, 0, 0])
    garbage = jnp.where((jnp.arange(S) < own_len[:, None])[..., None, None], 1.0, 1e6)
    with own_cache_path(path):
        blocked = decode_attention(q, *heads_major((k * garbage, v * garbage)), own_len, *heads_major((pk, pv)),
                                   prefix_mask, rows, block=BLOCK)
    dense = jnp.concatenate([
        shared_prefix_attention(q[r:r + 1], k[r:r + 1], v[r:r + 1],
                                (jnp.arange(S) < own_len[r])[None, None, :], pk[rows[r]][None], pv[rows[r]][None],
                                prefix_mask[rows[r]][None]) for r in range(B * N)])
    np.testing.assert_allclose(blocked, dense, rtol=1e-5, atol=1e-5)


def test_kernel_reads_nothing_past_a_rows_fill_and_the_array_end():
    """Rows of fill 0 (the prefix only), a partial last block (S = 20 is not a multiple of the 8-slot
    block) and NaN past every row's fill: the kernel equals the walk, and the path name is checked."""
    q, k, v, pk, pv, prefix_mask = _inputs(2)
    own_len = jnp.array([0, 3, BLOCK, S, BLOCK * 2 + 1, 0])
    poison = jnp.where((jnp.arange(S) < own_len[:, None])[..., None, None], 1.0, jnp.nan)
    pk, pv = heads_major((pk, pv))
    want = decode_attention(q, *heads_major((k, v)), own_len, pk, pv, prefix_mask, block=BLOCK)
    with own_cache_path("interpret"):
        got = decode_attention(q, *heads_major((k * poison, v * poison)), own_len, pk, pv, prefix_mask, block=BLOCK)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="own-cache path"):
        with own_cache_path("triton"):
            pass
