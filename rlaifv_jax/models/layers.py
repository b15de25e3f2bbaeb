"""Basic NNX layers whose parameters carry logical axis names (``Param(..., axes=(...))``).

Every parameter of every model is created by one of these layers (or with the same ``axes``
metadata), so `rlaifv_jax.core.sharding` can map any model onto a mesh with one rules table.
Parameters are stored in ``param_dtype``; computation runs in ``dtype``.
"""
from __future__ import annotations

import contextlib
import functools
import math
import threading
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rlaifv_jax.core.sharding import SERVE_RULES, logical_to_spec
from rlaifv_jax.models import ragged_kernel

Axes = tuple[str | None, ...]


def normal(rngs: nnx.Rngs, shape: Sequence[int], std: float, dtype) -> jax.Array:
    """``std`` · N(0, 1) of ``shape`` in ``dtype`` from the next ``rngs.params()`` key. Traced
    (``nnx.eval_shape``, ``jit``) it is ``jax.random.normal``; built eagerly (toy and test models) it
    is drawn on the host, seeded by that key, so building a model compiles no random program per
    parameter shape (each took 0.3–1 s on a 2-core CPU)."""
    key = rngs.params()
    if isinstance(key, jax.core.Tracer):
        return (std * jax.random.normal(key, tuple(shape), jnp.float32)).astype(dtype)
    draw = np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel()).standard_normal(tuple(shape), np.float32)
    return jnp.asarray((std * draw).astype(jnp.dtype(dtype)))


def filled(shape: Sequence[int], value: float, dtype) -> jax.Array:
    """A constant parameter (norm scales, biases), made on the host: no compiled fill per shape."""
    return jnp.asarray(np.full(tuple(shape), value, jnp.dtype(dtype)))


class Linear(nnx.Module):
    """y = x · W (+ b) contracting the trailing ``in_shape`` dims of x into ``out_shape``.

    The kernel has shape ``in_shape + out_shape`` (e.g. q-projection ``(embed, heads, head_dim)``),
    which keeps head structure visible to the sharding rules.
    """

    def __init__(self, in_shape: Sequence[int], out_shape: Sequence[int], *, in_axes: Axes,
                 out_axes: Axes, use_bias: bool = False, dtype=jnp.float32,
                 param_dtype=jnp.float32, std: float | None = None, rngs: nnx.Rngs):
        in_shape, out_shape = tuple(in_shape), tuple(out_shape)
        fan_in = math.prod(in_shape)
        std = 1.0 / math.sqrt(fan_in) if std is None else std
        self.kernel = nnx.Param(normal(rngs, in_shape + out_shape, std, param_dtype),
                                axes=tuple(in_axes) + tuple(out_axes))
        self.bias = (nnx.Param(filled(out_shape, 0.0, param_dtype), axes=tuple(out_axes))
                     if use_bias else None)
        self.n_in = len(in_shape)
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.kernel[...].astype(self.dtype)
        y = jnp.tensordot(x.astype(self.dtype), kernel,
                          axes=(tuple(range(x.ndim - self.n_in, x.ndim)), tuple(range(self.n_in))))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


class Embed(nnx.Module):
    """Token embedding table ``[vocab, embed]``; ``attend`` gives tied output logits."""

    def __init__(self, num_embeddings: int, features: int, *, dtype=jnp.float32,
                 param_dtype=jnp.float32, std: float = 0.02, rngs: nnx.Rngs,
                 axes: Axes = ("vocab", "embed")):
        self.embedding = nnx.Param(normal(rngs, (num_embeddings, features), std, param_dtype),
                                   axes=axes)
        self.dtype = dtype

    def __call__(self, ids: jax.Array) -> jax.Array:
        return jnp.take(self.embedding[...], ids, axis=0).astype(self.dtype)

    def attend(self, x: jax.Array) -> jax.Array:
        return jnp.einsum("...d,vd->...v", x, self.embedding[...].astype(self.dtype))


class RMSNorm(nnx.Module):
    """Llama RMSNorm: normalise in float32, cast back, then scale (as transformers does)."""

    def __init__(self, features: int, *, eps: float, dtype=jnp.float32, param_dtype=jnp.float32):
        self.weight = nnx.Param(filled((features,), 1.0, param_dtype), axes=("norm",))
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.weight[...].astype(self.dtype) * y.astype(self.dtype)


class LayerNorm(nnx.Module):
    """LayerNorm with scale and bias, statistics in float32."""

    def __init__(self, features: int, *, eps: float, dtype=jnp.float32, param_dtype=jnp.float32):
        self.weight = nnx.Param(filled((features,), 1.0, param_dtype), axes=("norm",))
        self.bias = nnx.Param(filled((features,), 0.0, param_dtype), axes=("norm",))
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * self.weight[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(self.dtype)


def _gelu(x: jax.Array) -> jax.Array:
    return jax.nn.gelu(x, approximate=False)


def _gelu_tanh(x: jax.Array) -> jax.Array:
    return jax.nn.gelu(x, approximate=True)


def _quick_gelu(x: jax.Array) -> jax.Array:
    return x * jax.nn.sigmoid(1.702 * x)


# Module-level functions (never fresh lambdas): they are static attributes of the modules, so two
# loads of one checkpoint have equal graph definitions and share every compiled program.
_ACTIVATIONS = {"silu": jax.nn.silu, "swish": jax.nn.silu, "gelu": _gelu, "gelu_pytorch_tanh": _gelu_tanh,
                "gelu_new": _gelu_tanh, "quick_gelu": _quick_gelu, "relu": jax.nn.relu}


def activation(name: str):
    """The activation functions transformers configs name (exact, not tanh-approximated, GELU)."""
    if name not in _ACTIVATIONS:
        raise ValueError(f"unsupported activation {name!r}; supported: {sorted(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None) -> jax.Array:
    """Grouped-query attention with a boolean mask; softmax in float32.

    q: ``[B, T, H, D]``; k, v: ``[B, S, K, D]`` with H a multiple of K; mask: ``[B, T, S]`` (True = attend).
    Rows with no allowed key (padding queries) produce finite garbage, never NaN.
    """
    b, t, h, d = q.shape
    kv = k.shape[2]
    q = q.reshape(b, t, kv, h // kv, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k).astype(jnp.float32) / math.sqrt(d)
    if mask is not None:
        scores = jnp.where(mask[:, None, None, :, :], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    return out.reshape(b, t, h, d)


def shared_prefix_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
                            prefix_k: jax.Array, prefix_v: jax.Array, prefix_mask: jax.Array) -> jax.Array:
    """Attention of ``R = B * n`` rows over their prompt's shared prefix plus their own keys.

    q: ``[R, T, H, D]``; k, v: ``[R, S, K, D]`` (each row's own slots, ``mask [R, T, S]``);
    prefix_k, prefix_v: ``[B, P, K, D]`` shared by rows ``b * n .. b * n + n - 1``
    (``prefix_mask [B, P]``). One softmax over prefix and own keys: the same result as attending
    over a cache holding n copies of the prefix, while reading the prefix once per prompt.
    """
    r, t, h, d = q.shape
    b, kv = prefix_k.shape[0], prefix_k.shape[2]
    n, g, s = r // b, h // kv, k.shape[1]
    q6 = q.reshape(b, n, t, kv, g, d)
    low = jnp.finfo(jnp.float32).min
    scale = 1.0 / math.sqrt(d)
    f32 = jnp.float32
    # Scores in the dot's own output order (batch dims b, k first): no relayout of the large [.., P] arrays.
    pre = jnp.einsum("bntkgd,bpkd->bkntgp", q6, prefix_k, preferred_element_type=f32) * scale
    pre = jnp.where(prefix_mask[:, None, None, None, None, :], pre, low)
    own = jnp.einsum("bntkgd,bnskd->bkntgs", q6, k.reshape(b, n, s, kv, d), preferred_element_type=f32) * scale
    own = jnp.where(mask.reshape(b, 1, n, t, 1, s), own, low)
    # One softmax over both key sets without joining them.
    m = jnp.maximum(pre.max(axis=-1, keepdims=True), own.max(axis=-1, keepdims=True))
    w_pre, w_own = jnp.exp(pre - m), jnp.exp(own - m)
    norm = w_pre.sum(axis=-1, keepdims=True) + w_own.sum(axis=-1, keepdims=True)
    out = (jnp.einsum("bkntgp,bpkd->bkntgd", w_pre.astype(v.dtype), prefix_v, preferred_element_type=f32)
           + jnp.einsum("bkntgs,bnskd->bkntgd", w_own.astype(v.dtype), v.reshape(b, n, s, kv, d),
                        preferred_element_type=f32)) / norm
    return jnp.transpose(out, (0, 2, 3, 1, 4, 5)).astype(q.dtype).reshape(r, t, h, d)


def heads_major(cache: tuple) -> tuple:
    """A KV cache (a tree of ``[B, S, K, D]`` arrays, as prefill writes it) in the ``[B, K, S, D]``
    layout ``decode_attention`` reads."""
    return jax.tree.map(lambda a: jnp.swapaxes(a, 1, 2), cache)


DECODE_BLOCK = 128  # own-cache slots one step of ``decode_attention`` reads at a time
OWN_CACHE_PATHS = ("xla", "pallas", "interpret")  # how decode_attention reads the own cache
_own_cache = threading.local()


@contextlib.contextmanager
def own_cache_path(path: str) -> Iterator[None]:
    """While tracing inside: ``decode_attention`` reads the own cache by the pure-JAX block walk
    (``"xla"``), the Pallas TPU kernel ``models.ragged_kernel`` (``"pallas"``), or that kernel
    interpreted (``"interpret"``, any backend: for tests)."""
    if path not in OWN_CACHE_PATHS:
        raise ValueError(f"own-cache path must be one of {OWN_CACHE_PATHS}, got {path!r}")
    before = getattr(_own_cache, "path", "xla")
    _own_cache.path = path
    try:
        yield
    finally:
        _own_cache.path = before


def _ragged_own_cache(q4, k, v, own_len, m, l, acc, block: int, interpret: bool):
    """``ragged_kernel.own_cache_attention`` per shard of the context mesh (rows over data/fsdp, KV
    heads over tensor, as ``SERVE_RULES`` lay out the caches): a Pallas call is not partitioned by XLA."""
    call = functools.partial(ragged_kernel.own_cache_attention, block=block, interpret=interpret)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return call(q4, k, v, own_len, m, l, acc)
    def spec(axes, x):
        return logical_to_spec(axes, SERVE_RULES, x.shape, mesh)

    heads4 = ("batch", "kv_heads", None, None)  # queries, partials and the heads-major caches alike
    stats = spec(("batch", "kv_heads", None), m)
    specs = (spec(heads4, q4), spec(heads4, k), spec(heads4, v), spec(("batch",), own_len), stats, stats,
             spec(heads4, acc))
    return jax.shard_map(call, mesh=mesh, in_specs=specs, out_specs=(stats, stats, specs[-1]),
                         check_vma=False)(q4, k, v, own_len, m, l, acc)


def decode_attention(q: jax.Array, k: jax.Array, v: jax.Array, own_len: jax.Array, prefix_k: jax.Array,
                     prefix_v: jax.Array, prefix_mask: jax.Array, prefix_rows: jax.Array | None = None,
                     block: int = DECODE_BLOCK) -> jax.Array:
    """One decode step's attention over each row's prompt prefix plus the *filled* part of its own cache.

    The caches are *heads-major* (``heads_major``), the layout whose batch axes (row, KV head) lead, so
    that the score and value contractions read them in place (the ``[R, S, K, D]`` layout of the
    prefill made XLA:CPU copy every row's whole own cache twice a layer and step).
    q: ``[R, 1, H, D]``; k, v: ``[R, K, S, D]`` (each row's own generated-token slots, slot i valid
    iff ``i < own_len[r]``); prefix_k, prefix_v: ``[B, K, P, D]`` with ``prefix_mask [B, P]``. Rows
    read prefix ``prefix_rows[r]`` (any prompt of the pool, for continuous batching), or, when
    ``prefix_rows`` is None, the shared layout of ``shared_prefix_attention`` (rows ``b * n .. b * n
    + n - 1`` read prefix ``b``, each prefix read once). The own cache is walked in blocks of
    ``block`` slots with an online softmax, for ``ceil(max(own_len) / block)`` blocks only (a
    dynamic trip count), so a step costs the filled length, not ``S``; inside
    ``own_cache_path("pallas")`` each row reads only its own filled blocks (``models.ragged_kernel``).
    Equal to ``shared_prefix_attention`` over the ``[R, S, K, D]`` caches with the own mask
    ``slot < own_len`` up to float rounding. Pure JAX (CPU, GPU, TPU); every row needs at least one
    valid prefix key.
    """
    r, t, h, d = q.shape
    if t != 1:
        raise ValueError(f"decode_attention takes one query per row, got {t}")
    kv, s = k.shape[1], k.shape[2]
    g = h // kv
    scale = 1.0 / math.sqrt(d)
    low = jnp.finfo(jnp.float32).min
    f32 = jnp.float32
    q4 = q.reshape(r, kv, g, d)
    if prefix_rows is None:
        b = prefix_k.shape[0]
        q5 = q4.reshape(b, r // b, kv, g, d)
        pre = jnp.einsum("bnkgd,bkpd->bnkgp", q5, prefix_k, preferred_element_type=f32) * scale
        pre = jnp.where(prefix_mask[:, None, None, None, :], pre, low)
        m = pre.max(axis=-1)
        w = jnp.exp(pre - m[..., None]) * prefix_mask[:, None, None, None, :]
        acc = jnp.einsum("bnkgp,bkpd->bnkgd", w.astype(v.dtype), prefix_v, preferred_element_type=f32)
        m, l, acc = m.reshape(r, kv, g), w.sum(-1).reshape(r, kv, g), acc.reshape(r, kv, g, d)
    else:
        # Every row scores the whole pool and keeps its own prompt: each prefix is read once per
        # step (as in the shared layout), for pool-size times the (small) prefix FLOPs of a gather.
        pm = (jnp.arange(prefix_k.shape[0])[None, :, None] == prefix_rows[:, None, None]) & prefix_mask[None]
        pre = jnp.einsum("rkgd,bkpd->rkgbp", q4, prefix_k, preferred_element_type=f32) * scale
        pre = jnp.where(pm[:, None, None], pre, low)
        m = pre.max(axis=(-2, -1))
        w = jnp.exp(pre - m[..., None, None]) * pm[:, None, None]
        l = w.sum((-2, -1))
        acc = jnp.einsum("rkgbp,bkpd->rkgd", w.astype(v.dtype), prefix_v, preferred_element_type=f32)
    blk = min(block, s)
    own_len = jnp.broadcast_to(own_len, (r,)).astype(jnp.int32)

    def step(i, carry):
        m, l, acc = carry
        first = i * blk
        start = jnp.minimum(first, s - blk)  # the last block may overlap the previous one
        slots = start + jnp.arange(blk)
        valid = (slots[None, :] >= first) & (slots[None, :] < own_len[:, None])  # [R, blk]
        kb = jax.lax.dynamic_slice_in_dim(k, start, blk, axis=2)
        vb = jax.lax.dynamic_slice_in_dim(v, start, blk, axis=2)
        sc = jnp.einsum("rkgd,rksd->rkgs", q4, kb, preferred_element_type=f32) * scale
        sc = jnp.where(valid[:, None, None, :], sc, low)
        m_new = jnp.maximum(m, sc.max(axis=-1))
        w = jnp.exp(sc - m_new[..., None]) * valid[:, None, None, :]
        rescale = jnp.exp(m - m_new)
        acc = acc * rescale[..., None] + jnp.einsum("rkgs,rksd->rkgd", w.astype(v.dtype), vb,
                                                    preferred_element_type=f32)
        return m_new, l * rescale + w.sum(-1), acc

    path = getattr(_own_cache, "path", "xla")
    if path == "xla" or (path == "pallas" and not ragged_kernel.supported(d, blk)):
        blocks = (jnp.minimum(own_len.max(), s) + blk - 1) // blk
        m, l, acc = jax.lax.fori_loop(0, blocks, step, (m, l, acc))
    else:  # each row's own blocks only (Pallas)
        m, l, acc = _ragged_own_cache(q4, k, v, own_len, m, l, acc, blk, interpret=path == "interpret")
    return (acc / l[..., None]).astype(q.dtype).reshape(r, 1, h, d)
