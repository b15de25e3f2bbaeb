"""Prefill: one forward over a padded batch of prompts that fills a fresh KV cache.

The sampler prefills left-padded prompt batches (every row then decodes at one cache index); the
labeler prefills one right-padded image prefix that all its questions attend to. Both are this
function: positions count real tokens only (``cumsum(mask) - 1``), padding is masked as keys.
Qwen2.5-VL's multimodal positions are computed on the host (``model.position_ids``, see
``engine.vision.uses_mrope``) and passed in. ``left_padded`` lays out the host side of a
left-padded batch (ids, mask, image features, multimodal positions) for the sampler and beam search.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rlaifv_jax.engine.prompt_checks import image_features
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


@dataclasses.dataclass(frozen=True)
class PaddedBatch:
    """Prompts left-padded into ``[batch, length]`` (rows past the prompts are inactive): host arrays,
    and the image features on the device (they never cross to the host)."""

    ids: np.ndarray  # [B, T] int32
    mask: np.ndarray  # [B, T] bool, real tokens
    active: np.ndarray  # [B] bool, rows holding a prompt
    features: jax.Array | None  # [B * T, D] image features, row-major, zero-padded (None: no images)
    positions: np.ndarray | None  # [3, B, T] int32 multimodal positions (Qwen2.5-VL), else None
    rope_deltas: np.ndarray | None  # [B] int32: decode token t at (real prompt tokens + t + delta)


def left_padded(model: nnx.Module, graphdef, state, prompts: Sequence[dict], batch: int, length: int) -> PaddedBatch:
    """Left-pad sampler ``prompts`` (checked by ``prompt_checks.check_prompts``) into one batch, encode
    their images (``prompt_checks.image_features``) and, for Qwen2.5-VL, compute their positions
    (``model.position_ids``, images in row order)."""
    pad_id = 1 if getattr(model.config, "image_token_id", None) == 0 else 0
    ids = np.full((batch, length), pad_id, np.int32)
    mask = np.zeros((batch, length), bool)
    active = np.zeros((batch,), bool)
    feats, grids = [], []
    for r, prompt in enumerate(prompts):
        p = np.asarray(prompt["input_ids"], np.int32)
        ids[r, length - len(p):], mask[r, length - len(p):], active[r] = p, True, True
        f = image_features(model, graphdef, state, prompt)
        if f is not None:
            feats.append(f)
            if uses_mrope(model):
                grids.append(np.asarray(prompt["image_grid_thw"]).reshape(-1, 3))
    features = None
    if feats:  # on the device: the tower's programs run while the host pads the next prompts
        stacked = jnp.concatenate(feats) if len(feats) > 1 else feats[0]
        features = jnp.pad(stacked, ((0, batch * length - stacked.shape[0]), (0, 0)))
    positions = deltas = None
    if uses_mrope(model):
        positions, deltas = model.position_ids(ids, mask, np.concatenate(grids) if grids else None)
        positions, deltas = positions.astype(np.int32), deltas.astype(np.int32)
    return PaddedBatch(ids, mask, active, features, positions, deltas)
