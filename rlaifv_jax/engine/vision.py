"""The one compiled image-feature program: vision tiles → projected features, then packing.

Every inference path (sampler, labeler, evaluation) turns pixels into placeholder features here;
training calls the same model methods inside its own jitted step
(``model.image_features(..., frozen_tower=True)``). LLaVA: one program per pixel shape; the anyres
packing of LLaVA-NeXT is a gather with host-computed indices (``models.anyres``). Qwen2.5-VL: the
host lays the patches out (``model.vision_inputs``, padded to a chunk bucket) and one program is
compiled per bucket (``models.qwen_vision``); packing keeps the images' tokens.

Next to ``pixel_values`` a prompt carries its images' layout under ``layout_key(model)``:
``image_sizes`` (LLaVA-NeXT's (height, width) rows; unused by LLaVA-1.5) or ``image_grid_thw``
(Qwen2.5-VL's patch grid, one (t, h, w) row per image).
"""
from __future__ import annotations

import collections
import functools
import threading
from typing import Any, Callable

import jax
import numpy as np
from flax import nnx

TRACES: collections.Counter = collections.Counter()


def layout_key(model: nnx.Module) -> str:
    """The prompt / labeler-item key of the images' layout beside ``pixel_values``."""
    return getattr(model, "IMAGE_LAYOUT_KEY", "image_sizes")


def uses_mrope(model: nnx.Module) -> bool:
    """Whether ``model`` takes host-computed multimodal positions (``model.position_ids``: Qwen2.5-VL)
    instead of counting real tokens."""
    return hasattr(model, "position_ids")


def feature_size(model: nnx.Module) -> int:
    """Width of an image-feature row: the decoder width, or (Qwen3-VL) the decoder width times
    1 + its DeepStack layers (the features the decoder adds after its first layers ride along)."""
    text = getattr(model.config, "text", model.config)
    return getattr(model, "feature_size", text.hidden_size)


def _tile_features(graphdef: nnx.GraphDef, state: nnx.State, pixel_values: Any) -> jax.Array:
    TRACES["vision"] += 1
    return nnx.merge(graphdef, state).tile_features(pixel_values)


@functools.lru_cache(maxsize=16)
def _program_of(graphdef: nnx.GraphDef) -> Callable:
    return jax.jit(functools.partial(_tile_features, graphdef))


_RECENT: collections.OrderedDict = collections.OrderedDict()  # id(graphdef) -> (graphdef, program)
_RECENT_LOCK = threading.Lock()


def _program(graphdef: nnx.GraphDef) -> Callable:
    """The jitted ``(state, pixels)`` tile-feature program of ``graphdef``'s structure (one per equal
    graphdef): found by identity for the graphdef objects of recent calls, as a caller encodes image
    after image with one split of its model (hashing the graphdef of a jit static argument took
    about 0.5 ms a call for the toy model), else by equality."""
    with _RECENT_LOCK:
        hit = _RECENT.get(id(graphdef))
        if hit is not None and hit[0] is graphdef:
            _RECENT.move_to_end(id(graphdef))
            return hit[1]
        program = _program_of(graphdef)
        _RECENT[id(graphdef)] = (graphdef, program)
        if len(_RECENT) > 8:
            _RECENT.popitem(last=False)
        return program


def lower_features(model: nnx.Module, state: nnx.State, inputs: Any, mesh: Any) -> Any:
    """The compiled tile-feature program ``image_features`` runs, for ``inputs`` (pixels, or Qwen2.5-VL's
    ``model.vision_inputs``) given abstractly (``jax.ShapeDtypeStruct``s with shardings); ``mesh`` may hold
    compile-only TPU devices (the planner)."""
    with jax.set_mesh(mesh):
        return _program(nnx.graphdef(model)).lower(state, inputs).compile()


def image_features(graphdef: nnx.GraphDef, state: nnx.State, pixel_values: Any, layout: Any = None, *,
                   model: nnx.Module | None = None) -> jax.Array:
    """``[image_tokens, D]`` features of ``pixel_values`` in transformers' layout, in placeholder
    order, on device: ``[images, C, H, W]`` for LLaVA-1.5, ``[images, tiles, C, H, W]`` with
    ``layout = image_sizes`` for LLaVA-NeXT, the processor's ``[patches, patch_dim]`` with ``layout =
    image_grid_thw`` for Qwen2.5-VL.

    ``model``: the module ``graphdef`` and ``state`` were split from, if the caller holds it; its
    host-side methods (Qwen2.5-VL's patch layout, the packing) then serve, instead of a module merged
    from ``state`` at every call (about 1 ms of Python for the toy model, per image)."""
    model = nnx.merge(graphdef, state) if model is None else model
    if hasattr(model, "vision_inputs"):
        inputs = model.vision_inputs(np.asarray(pixel_values, np.float32), layout)
        return model.pack_tile_features(_program(graphdef)(state, inputs), None, layout)
    px = jax.numpy.asarray(np.asarray(pixel_values, np.float32)) if not isinstance(pixel_values, jax.Array) else pixel_values
    feats = _program(graphdef)(state, px)
    return model.pack_tile_features(feats, tuple(px.shape), layout)
