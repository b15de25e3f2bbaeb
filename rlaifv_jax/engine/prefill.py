"""Prefill: one forward over a padded batch of prompts that fills a fresh KV cache.

The sampler prefills left-padded prompt batches (every row then decodes at one cache index); the
labeler prefills one right-padded image prefix that all its questions attend to. Both are this
function: positions count real tokens only (``cumsum(mask) - 1``), padding is masked as keys.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


def prefill(model: nnx.Module, ids: jax.Array, features: jax.Array | None, mask: jax.Array):
    """``(hidden [B, T, D], cache)`` of ``ids [B, T]`` (``mask`` marks real tokens; image features
    ``[N, D]`` written at the placeholders in order). Call inside ``jit``."""
    batch, length = ids.shape
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
    return model.forward_embeds(model.embed(ids, features), positions=positions, key_mask=mask,
                                cache=model.init_cache(batch, length), cache_index=0)
