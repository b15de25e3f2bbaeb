"""Llama-family decoder LM (Llama-2/3/3.1, Vicuna, Mistral, Yi; Qwen2 via ``attention_bias``; Qwen3 via
``qk_norm``: RMSNorm over each head's query and key before the rotary).

One forward serves training, prefill and decode: ``forward_embeds`` takes embeddings, per-row
positions, a key-validity mask and an optional KV cache (a tuple of per-layer ``(k, v)`` arrays
``[batch, cache_len, kv_heads, head_dim]``) written at ``cache_index``. Batches are left-padded
so every row writes its cache at the same index; padding is masked through ``key_mask``. Decode
steps (``prefix`` with ``own_len``) read and write heads-major caches ``[batch, kv_heads, cache_len,
head_dim]`` instead (``layers.heads_major``).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from rlaifv_jax.models.layers import (Embed, Linear, RMSNorm, activation, dot_product_attention,
                                      decode_attention, shared_prefix_attention)

Cache = tuple[tuple[jax.Array, jax.Array], ...]


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """The fields of a transformers Llama/Mistral/Qwen2 ``config.json`` this module uses."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: tuple[tuple[str, Any], ...] | None = None  # sorted items of the rope dict
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    hidden_act: str = "silu"
    sliding_window: int | None = None
    model_type: str = "llama"
    qk_norm: bool = False  # Qwen3: q_norm / k_norm (RMSNorm over head_dim) before the rotary

    @classmethod
    def from_hf(cls, cfg: Mapping[str, Any], *, tie_word_embeddings: bool | None = None) -> "LlamaConfig":
        """Build from a transformers config dict (v4 ``rope_scaling``/``rope_theta`` or v5 ``rope_parameters``)."""
        model_type = cfg.get("model_type", "llama")
        if model_type not in ("llama", "mistral", "qwen2", "qwen3"):
            raise ValueError(f"unsupported text model_type {model_type!r} (llama, mistral, qwen2, qwen3)")
        rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
        theta = float(rope.pop("rope_theta", cfg.get("rope_theta", 10000.0)))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "linear", "llama3"):
            raise ValueError(f"unsupported rope type {rope_type!r} (default, linear, llama3)")
        rope["rope_type"] = rope_type
        rope.pop("type", None)
        heads = cfg["num_attention_heads"]
        sliding = cfg.get("sliding_window") if cfg.get("use_sliding_window", True) else None
        tie = cfg.get("tie_word_embeddings", False) if tie_word_embeddings is None else tie_word_embeddings
        return cls(
            vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"], num_hidden_layers=cfg["num_hidden_layers"],
            num_attention_heads=heads, num_key_value_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6), rope_theta=theta,
            rope_scaling=tuple(sorted(rope.items())),
            max_position_embeddings=cfg.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(tie),
            attention_bias=bool(cfg.get("attention_bias", model_type == "qwen2")),
            mlp_bias=bool(cfg.get("mlp_bias", False)), hidden_act=cfg.get("hidden_act", "silu"),
            sliding_window=sliding, model_type=model_type, qk_norm=model_type == "qwen3")

    def to_hf(self) -> dict[str, Any]:
        """The transformers (v5) config dict for this model."""
        rope = dict(self.rope_scaling or (("rope_type", "default"),))
        rope["rope_theta"] = self.rope_theta
        out = dict(
            model_type=self.model_type, vocab_size=self.vocab_size, hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size, num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads, head_dim=self.head_dim,
            rms_norm_eps=self.rms_norm_eps, rope_parameters=rope,
            max_position_embeddings=self.max_position_embeddings,
            tie_word_embeddings=self.tie_word_embeddings, attention_bias=self.attention_bias,
            hidden_act=self.hidden_act, sliding_window=self.sliding_window)
        if self.model_type not in ("qwen2", "qwen3"):
            out["mlp_bias"] = self.mlp_bias
        return out


def rope_inv_freq(config: LlamaConfig) -> jax.Array:
    """Inverse RoPE frequencies for the ``default``, ``linear`` and ``llama3`` rope types."""
    d = config.head_dim
    inv = 1.0 / (config.rope_theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
    rope = dict(config.rope_scaling or ())
    kind = rope.get("rope_type", "default")
    if kind == "linear":
        inv = inv / rope["factor"]
    elif kind == "llama3":
        factor, lo, hi = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
        old = rope["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        scaled = jnp.where(wavelen > old / lo, inv / factor, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old / hi) & (wavelen <= old / lo)
        inv = jnp.where(medium, smoothed, scaled)
    return inv


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """Rotate ``x [B, T, H, D]`` by ``positions [B, T]`` (transformers' rotate-half convention)."""
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, D/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    cos, sin = jnp.cos(emb).astype(x.dtype)[:, :, None], jnp.sin(emb).astype(x.dtype)[:, :, None]
    x1, x2 = jnp.split(x, 2, axis=-1)
    return x * cos + jnp.concatenate([-x2, x1], axis=-1) * sin


class Attention(nnx.Module):
    """Grouped-query self-attention with RoPE and an optional KV cache."""

    def __init__(self, config: LlamaConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        d, h, k, hd = config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q_proj = Linear((d,), (h, hd), in_axes=("embed",), out_axes=("heads", "head_dim"),
                             use_bias=config.attention_bias, **kw)
        self.k_proj = Linear((d,), (k, hd), in_axes=("embed",), out_axes=("kv_heads", "head_dim"),
                             use_bias=config.attention_bias, **kw)
        self.v_proj = Linear((d,), (k, hd), in_axes=("embed",), out_axes=("kv_heads", "head_dim"),
                             use_bias=config.attention_bias, **kw)
        self.o_proj = Linear((h, hd), (d,), in_axes=("heads", "head_dim"), out_axes=("embed",), **kw)
        norm = dict(eps=config.rms_norm_eps, dtype=dtype, param_dtype=param_dtype)
        self.q_norm = RMSNorm(hd, **norm) if config.qk_norm else None
        self.k_norm = RMSNorm(hd, **norm) if config.qk_norm else None

    def __call__(self, x, positions, inv_freq, mask, kv=None, cache_index=None, prefix=None):
        q, k = self.q_proj(x), self.k_proj(x)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rope(q, positions, inv_freq)
        k = apply_rope(k, positions, inv_freq)
        v = self.v_proj(x)
        decoding = prefix is not None and len(prefix) == 4  # heads-major caches (layers.heads_major)
        if kv is not None:
            if decoding:  # k, v [B, 1, K, D] -> [B, K, 1, D]
                k, v = k.swapaxes(1, 2), v.swapaxes(1, 2)
            k, v = kv = write_cache(kv, k, v, cache_index, axis=-2 if decoding else -3)
        if prefix is None:
            out = dot_product_attention(q, k.astype(q.dtype), v.astype(q.dtype), mask)
        elif not decoding:
            (pk, pv), prefix_mask = prefix
            out = shared_prefix_attention(q, k.astype(q.dtype), v.astype(q.dtype), mask, pk.astype(q.dtype),
                                          pv.astype(q.dtype), prefix_mask)
        else:  # decoding: attend over the filled own slots only
            (pk, pv), prefix_mask, own_len, prefix_rows = prefix
            out = decode_attention(q, k.astype(q.dtype), v.astype(q.dtype), own_len, pk.astype(q.dtype),
                                   pv.astype(q.dtype), prefix_mask, prefix_rows)
        return self.o_proj(out), kv


class MLP(nnx.Module):
    """SwiGLU feed-forward: down(act(gate(x)) * up(x))."""

    def __init__(self, config: LlamaConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        d, i = config.hidden_size, config.intermediate_size
        kw = dict(use_bias=config.mlp_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.gate_proj = Linear((d,), (i,), in_axes=("embed",), out_axes=("mlp",), **kw)
        self.up_proj = Linear((d,), (i,), in_axes=("embed",), out_axes=("mlp",), **kw)
        self.down_proj = Linear((i,), (d,), in_axes=("mlp",), out_axes=("embed",), **kw)
        self.act = activation(config.hidden_act)

    def __call__(self, x):
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
    """Pre-norm transformer block."""

    def __init__(self, config: LlamaConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        norm = dict(eps=config.rms_norm_eps, dtype=dtype, param_dtype=param_dtype)
        self.input_layernorm = RMSNorm(config.hidden_size, **norm)
        self.self_attn = Attention(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, **norm)
        self.mlp = MLP(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x, positions, inv_freq, mask, kv=None, cache_index=None, prefix=None):
        h, kv = self.self_attn(self.input_layernorm(x), positions, inv_freq, mask, kv, cache_index, prefix)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x)), kv


def write_cache(kv: tuple[jax.Array, jax.Array], k: jax.Array, v: jax.Array,
                cache_index: jax.Array | int, axis: int = -3) -> tuple[jax.Array, jax.Array]:
    """The cache ``kv`` (``[B, S, K, D]`` each) with ``k, v [B, T, K, D]`` written at slot ``cache_index``
    (a scalar: every row at the same slot; ``[B]``: each row at its own slot, as continuous batching needs).
    ``axis=-2``: the heads-major layout, ``kv [B, K, S, D]`` and ``k, v [B, K, T, D]``."""
    def put(c, x, i):
        return jax.lax.dynamic_update_slice_in_dim(c, x.astype(c.dtype), i, axis=axis)

    if jnp.ndim(cache_index) != 0:
        put = jax.vmap(put)
    return tuple(put(c, x, cache_index) for c, x in zip(kv, (k, v)))


def attention_mask(key_mask: jax.Array, num_queries: int, cache_index: jax.Array | int) -> jax.Array:
    """``[B, T, S]`` boolean: query t (at cache slot ``cache_index + t``, a scalar or one per row ``[B]``)
    sees valid keys at slots ≤ its own."""
    slots = jnp.arange(key_mask.shape[1])
    query_slots = jnp.asarray(cache_index)[..., None, None] + jnp.arange(num_queries)[:, None]
    causal = slots <= query_slots  # [T, S] or [B, T, S]
    shape = (key_mask.shape[0], num_queries, key_mask.shape[1])
    return jnp.broadcast_to(causal, shape) & key_mask[:, None, :].astype(bool)


class Llama(nnx.Module):
    """``LlamaForCausalLM``: token embedding, decoder layers, final norm, LM head (tied or not)."""

    def __init__(self, config: LlamaConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        self.config = config
        self.dtype = dtype
        self.embed_tokens = Embed(config.vocab_size, config.hidden_size, dtype=dtype,
                                  param_dtype=param_dtype, rngs=rngs)
        self.layers = nnx.List([DecoderLayer(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
                                for _ in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, dtype=dtype,
                            param_dtype=param_dtype)
        self.lm_head = (None if config.tie_word_embeddings else
                        Linear((config.hidden_size,), (config.vocab_size,), in_axes=("embed",),
                               out_axes=("vocab",), dtype=dtype, param_dtype=param_dtype, rngs=rngs))

    def embed(self, input_ids: jax.Array, image_features: jax.Array | None = None) -> jax.Array:
        """Token embeddings ``[B, T, D]`` (the shared model interface; a text model takes no images)."""
        if image_features is not None:
            raise ValueError("a text-only Llama model was given image features")
        return self.embed_tokens(input_ids)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """Vocabulary logits for final hidden states."""
        return self.embed_tokens.attend(hidden) if self.lm_head is None else self.lm_head(hidden)

    def init_cache(self, batch: int, length: int, dtype=None, heads_major: bool = False) -> Cache:
        """An empty KV cache for ``batch`` rows of ``length`` slots: ``[batch, length, kv_heads, head_dim]``
        per layer and key/value, or with ``heads_major`` ``[batch, kv_heads, length, head_dim]`` (the
        own cache of decode steps)."""
        c = self.config
        shape = (batch, length, c.num_key_value_heads, c.head_dim)
        if heads_major:
            shape = (batch, c.num_key_value_heads, length, c.head_dim)
        dtype = dtype or self.dtype
        return tuple((jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(c.num_hidden_layers))

    def forward_embeds(self, x: jax.Array, *, positions: jax.Array | None = None, key_mask: jax.Array,
                       cache: Cache | None = None, cache_index: jax.Array | int = 0,
                       prefix: tuple[Cache, jax.Array] | None = None,
                       angles: jax.Array | None = None, deepstack: jax.Array | None = None,
                       remat: str = "none", mask: jax.Array | None = None) -> tuple[jax.Array, Cache | None]:
        """Run the decoder on embeddings ``x [B, T, D]``.

        ``positions [B, T]``: RoPE positions; or, instead, ``angles [B, T, head_dim / 2]``: the
        rotary angles themselves (Qwen2.5-VL's M-RoPE). ``key_mask [B, S]``: which key slots hold real tokens,
        where S = T without a cache, else the cache length (the new tokens' slots included).
        ``prefix = (prefix_cache, prefix_mask [Bp, P])``: a cache of ``Bp`` prompts shared by
        ``B / Bp`` consecutive rows each, attended before the rows' own ``cache`` (n samples of one
        prompt read its prefix once). Decoding (``T = 1``) may pass ``prefix = (prefix_cache,
        prefix_mask, own_len [B], prefix_rows [B] or None)``: each row then attends over its first
        ``own_len`` own slots only (``layers.decode_attention``, walked in blocks; ``key_mask`` is not
        read; ``prefix_cache`` and ``cache`` heads-major, ``layers.heads_major``) and, given
        ``prefix_rows``, over prefix ``prefix_rows[b]``. ``cache_index`` may be one
        slot per row ``[B]``. ``deepstack [K, B, T, D]`` (Qwen3-VL): added to the hidden states after
        layer k, for k < K (zero away from the image tokens). Returns final-normed hidden states
        ``[B, T, D]`` and the updated cache. ``remat`` (teacher-forced passes without a cache only):
        "none", "full" (recompute each decoder layer in the backward pass) or "dots" (keep its matmul outputs).
        ``mask [B, T, S]`` (no decoding): which key slots each query sees, in place of the causal mask
        built from ``key_mask`` (rows that pack several sequences, as the toy warm start's do).
        """
        window = self.config.sliding_window
        seen = key_mask.shape[1] + (0 if prefix is None else prefix[1].shape[1])
        if window is not None and seen > window:
            raise ValueError(f"sequence of {seen} tokens exceeds the model's sliding window "
                             f"({window}); sliding-window attention is not implemented")
        if (positions is None) == (angles is None):
            raise ValueError("give exactly one of positions and angles")
        if mask is None:
            mask = attention_mask(key_mask, x.shape[1], cache_index)
        # The layers rotate by ``positions[..., None] * inv_freq``: given angles, unit positions.
        if angles is None:
            inv_freq = rope_inv_freq(self.config)
        else:
            positions, inv_freq = jnp.ones(x.shape[:2], jnp.float32), angles
        new_cache = []
        for i, layer in enumerate(self.layers):
            if remat != "none" and cache is None and prefix is None:  # teacher-forced passes only
                policy = None if remat == "full" else jax.checkpoint_policies.dots_with_no_batch_dims_saveable
                layer_def, layer_state = nnx.split(layer)
                x, kv = jax.checkpoint(lambda st, *a: nnx.merge(layer_def, st)(*a), policy=policy)(
                    layer_state, x, positions, inv_freq, mask)
            else:
                x, kv = layer(x, positions, inv_freq, mask, None if cache is None else cache[i], cache_index,
                              None if prefix is None else (prefix[0][i], *prefix[1:]))
            if deepstack is not None and i < deepstack.shape[0]:
                x = x + deepstack[i].astype(x.dtype)
            new_cache.append(kv)
        return self.norm(x), (None if cache is None else tuple(new_cache))

    def __call__(self, input_ids: jax.Array, *, pixel_values=None, image_sizes=None,
                 attention_mask: jax.Array | None = None) -> jax.Array:
        """Logits ``[B, T, V]`` for (left-padded) ``input_ids``; ``attention_mask`` marks real tokens."""
        if pixel_values is not None:
            raise ValueError("a text-only Llama model was given pixel_values")
        key_mask = jnp.ones(input_ids.shape, bool) if attention_mask is None else attention_mask.astype(bool)
        positions = jnp.maximum(jnp.cumsum(key_mask, axis=1) - 1, 0)
        hidden, _ = self.forward_embeds(self.embed(input_ids), positions=positions, key_mask=key_mask)
        return self.logits(hidden)
