"""The one compiled image-feature program: vision tiles → projected features, then packing.

Every inference path (sampler, labeler, evaluation) turns pixels into placeholder features here;
training calls the same two model methods inside its own jitted step
(``model.image_features(..., frozen_tower=True)``). One program is compiled per pixel shape; the
anyres packing of LLaVA-NeXT is a gather with host-computed indices (``models.anyres``).
"""
from __future__ import annotations

import collections
import functools
from typing import Any

import jax
import numpy as np
from flax import nnx

TRACES: collections.Counter = collections.Counter()


@functools.partial(jax.jit, static_argnums=(0,))
def _tile_features(graphdef: nnx.GraphDef, state: nnx.State, pixel_values: jax.Array) -> jax.Array:
    TRACES["vision"] += 1
    return nnx.merge(graphdef, state).tile_features(pixel_values)


def image_features(graphdef: nnx.GraphDef, state: nnx.State, pixel_values: Any, image_sizes: Any = None) -> jax.Array:
    """``[image_tokens, D]`` features of ``pixel_values`` in transformers' layout (``[images, C, H, W]``
    for LLaVA-1.5, ``[images, tiles, C, H, W]`` with ``image_sizes`` for LLaVA-NeXT), in placeholder
    order, on device."""
    px = jax.numpy.asarray(np.asarray(pixel_values, np.float32)) if not isinstance(pixel_values, jax.Array) else pixel_values
    feats = _tile_features(graphdef, state, px)
    return nnx.merge(graphdef, state).pack_tile_features(feats, tuple(px.shape), image_sizes)
