"""Attention over the filled own cache (``layers.decode_attention``, blocked online softmax) equals the
dense masked attention over all slots (``layers.shared_prefix_attention``)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlaifv_jax.models.layers import decode_attention, shared_prefix_attention

B, N, P, S, H, K, D, BLOCK = 2, 3, 7, 20, 4, 2, 8, 8


def _inputs(seed=0):
    ks = jax.random.split(jax.random.key(seed), 5)
    q = jax.random.normal(ks[0], (B * N, 1, H, D))
    k, v = (jax.random.normal(x, (B * N, S, K, D)) for x in ks[1:3])
    pk, pv = (jax.random.normal(x, (B, P, K, D)) for x in ks[3:5])
    prefix_mask = jnp.arange(P)[None, :] >= jnp.array([[2], [0]])  # left padding on prompt 0
    return q, k, v, pk, pv, prefix_mask


@pytest.mark.parametrize("filled", [1, BLOCK, BLOCK + 1, S])  # first step, block boundary, last slot
def test_blocked_equals_dense(filled):
    q, k, v, pk, pv, prefix_mask = _inputs()
    own_len = jnp.full((B * N,), filled)
    dense = shared_prefix_attention(q, k, v, (jnp.arange(S) < own_len[:, None])[:, None, :], pk, pv, prefix_mask)
    blocked = decode_attention(q, k, v, own_len, pk, pv, prefix_mask, block=BLOCK)
    np.testing.assert_allclose(blocked, dense, rtol=1e-5, atol=1e-5)


def test_ragged_rows_and_prefix_rows():
    """Rows at different fills, each reading any prompt's prefix (continuous batching), equal the dense
    attention over the same prefix copied per row; stale values past a row's fill do not matter."""
    q, k, v, pk, pv, prefix_mask = _inputs(1)
    own_len = jnp.array([1, 5, BLOCK, BLOCK + 3, S, 2])
    rows = jnp.array([1, 0, 1, 1, 0, 0])
    garbage = jnp.where((jnp.arange(S) < own_len[:, None])[..., None, None], 1.0, 1e6)
    blocked = decode_attention(q, k * garbage, v * garbage, own_len, pk, pv, prefix_mask, rows, block=BLOCK)
    dense = jnp.concatenate([
        shared_prefix_attention(q[r:r + 1], k[r:r + 1], v[r:r + 1],
                                (jnp.arange(S) < own_len[r])[None, None, :], pk[rows[r]][None], pv[rows[r]][None],
                                prefix_mask[rows[r]][None]) for r in range(B * N)])
    np.testing.assert_allclose(blocked, dense, rtol=1e-5, atol=1e-5)
