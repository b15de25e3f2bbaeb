"""A Pallas TPU kernel for the ragged part of a decode step's attention: each row's own generated-
token cache, read only up to that row's filled length (``layers.decode_attention`` calls it on TPU).

The pure-JAX walk in ``layers.decode_attention`` reads every row's blocks up to the *deepest* row,
so under continuous batching a step reads ``slots × deepest fill`` own-cache slots. This kernel's
grid is ``(rows, blocks)``; a row's block index stops at its own last filled block, so the pipeline
issues no new copy for the blocks past it (the index does not change) and the body skips them: a
step reads ``Σ_rows ⌈fill / block⌉`` blocks. It continues the online softmax from the prefix
attention's partial results ``(m, l, acc)``, so the caller merges nothing.

Layouts are the cache's as ``generate`` holds it (no copy): ``k, v [R, K, S, D]`` (heads-major,
``layers.heads_major``), a program reading ``[K, block, D]`` (every KV head of ``block`` slots);
queries and partials ``[R, K, G, D]`` (float32; ``m`` and ``l`` broadcast along ``D``). TPU tiling
needs ``D % 128 == 0`` and ``block % 8 == 0`` (:func:`supported`). ``interpret=True`` runs the
same kernel on any backend (the tests compare it with the pure-JAX walk on CPU); the planner compiles
it for TPU slices through libtpu.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu


def supported(head_dim: int, block: int) -> bool:
    """Whether the kernel's blocks tile a TPU's vector registers at this head size and block."""
    return head_dim % 128 == 0 and block % 8 == 0


def _kernel(lens_ref, q_ref, k_ref, v_ref, m0_ref, l0_ref, acc0_ref, m_ref, l_ref, acc_ref, *, block: int,
            heads: int, scale: float):
    r, b = pl.program_id(0), pl.program_id(1)
    length = lens_ref[r]

    @pl.when(b == 0)
    def _start():  # continue from the prefix attention's partials
        m_ref[...], l_ref[...], acc_ref[...] = m0_ref[...], l0_ref[...], acc0_ref[...]

    @pl.when(b * block < length)
    def _block():
        valid = b * block + jax.lax.broadcasted_iota(jnp.int32, (1, block), 1) < length  # [1, block]
        valid_rows = b * block + jax.lax.broadcasted_iota(jnp.int32, (block, 1), 0) < length
        for h in range(heads):
            q = q_ref[h]  # [G, D] float32
            k = k_ref[h].astype(jnp.float32)  # [block, D]
            v = jnp.where(valid_rows, v_ref[h].astype(jnp.float32), 0.0)  # past the end: garbage
            s = jnp.einsum("gd,td->gt", q, k, preferred_element_type=jnp.float32) * scale
            s = jnp.where(valid, s, -jnp.inf)
            m_prev, l_prev = m_ref[h][:, :1], l_ref[h][:, :1]  # [G, 1]
            m_new = jnp.maximum(m_prev, s.max(axis=-1, keepdims=True))
            p = jnp.where(valid, jnp.exp(s - m_new), 0.0)
            alpha = jnp.exp(m_prev - m_new)
            pv = jnp.einsum("gt,td->gd", p, v, preferred_element_type=jnp.float32)
            shape = acc_ref.shape[1:]
            m_ref[h] = jnp.broadcast_to(m_new, shape)
            l_ref[h] = jnp.broadcast_to(alpha * l_prev + p.sum(axis=-1, keepdims=True), shape)
            acc_ref[h] = alpha * acc_ref[h] + pv


def own_cache_attention(q: jax.Array, k: jax.Array, v: jax.Array, own_len: jax.Array, m: jax.Array, l: jax.Array,
                        acc: jax.Array, *, block: int, interpret: bool = False
                        ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Continue the online softmax ``(m [R, K, G], l [R, K, G], acc [R, K, G, D])`` of queries ``q
    [R, K, G, D]`` over each row's own cache ``k, v [R, K, S, D]``, slots ``< own_len [R]`` only;
    returns the updated ``(m, l, acc)`` (float32)."""
    r, kv, g, d = q.shape
    s = k.shape[2]
    f32 = jnp.float32
    wide = lambda x: jnp.broadcast_to(x.astype(f32)[..., None], (r, kv, g, d))  # noqa: E731  m, l along D

    def cache_block(row, b, lens):  # a row's last filled block repeats: no new copy past it
        last = jax.lax.div(jnp.maximum(lens[row] - 1, 0), block)
        return row, 0, jnp.minimum(b, last), 0

    per_row = pl.BlockSpec((None, kv, g, d), lambda row, b, lens: (row, 0, 0, 0))
    cache = pl.BlockSpec((None, kv, block, d), cache_block)
    out = pl.pallas_call(
        functools.partial(_kernel, block=block, heads=kv, scale=1.0 / math.sqrt(d)),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1, grid=(r, -(-s // block)),
            in_specs=[per_row, cache, cache, per_row, per_row, per_row],
            out_specs=[per_row, per_row, per_row]),
        out_shape=[jax.ShapeDtypeStruct((r, kv, g, d), f32)] * 3,
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
        interpret=interpret,
    )(own_len.astype(jnp.int32), q.astype(f32), k, v, wide(m), wide(l), acc.astype(f32))
    m_out, l_out, acc_out = out
    return m_out[..., 0], l_out[..., 0], acc_out
