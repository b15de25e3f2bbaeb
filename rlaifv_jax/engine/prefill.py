"""Prefill: one forward over a padded batch of prompts that fills a fresh KV cache.

The sampler prefills left-padded prompt batches (every row then decodes at one cache index); the
labeler prefills one right-padded image prefix that all its questions attend to. Both are this
function: positions count real tokens only (``cumsum(mask) - 1``), padding is masked as keys.
Qwen2.5-VL's multimodal positions are computed on the host (``model.position_ids``, see
``engine.vision.uses_mrope``) and passed in.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from rlaifv_jax.engine.vision import uses_mrope


def prefill(model: nnx.Module, ids: jax.Array, features: jax.Array | None, mask: jax.Array,
            positions: jax.Array | None = None):
    """``(hidden [B, T, D], cache)`` of ``ids [B, T]`` (``mask`` marks real tokens; image features
    ``[N, D]`` written at the placeholders in order). ``positions``: ``[3, B, T]`` from
    ``model.position_ids`` (required for Qwen2.5-VL), default ``cumsum(mask) - 1``. Call inside ``jit``."""
    batch, length = ids.shape
    if positions is None:
        if uses_mrope(model):
            raise ValueError(f"{type(model).__name__} prefill needs positions from model.position_ids "
                             "(multimodal rotary positions)")
        positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
    return model.forward_embeds(model.embed(ids, features), positions=positions, key_mask=mask,
                                cache=model.init_cache(batch, length), cache_index=0)
