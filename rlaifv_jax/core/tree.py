"""Flat ``{path: array}`` views of NNX states: what optimizers, checkpoints and exports see."""
from __future__ import annotations

from typing import Any, Mapping

import jax
from flax import nnx


def path_key(path: tuple) -> str:
    """``('language_model', 'layers', 0, 'mlp', 'up_proj', 'kernel')`` → ``'language_model/layers/0/...'``."""
    return "/".join(str(p) for p in path)


def flat_values(state: nnx.State) -> dict[str, jax.Array]:
    """A flat ``{path_key: array}`` dict of an NNX state (what the optimizer and Orbax see)."""
    return {path_key(p): v.get_value() for p, v in nnx.to_flat_state(state)}


def unflat_values(template: nnx.State, values: Mapping[str, Any]) -> nnx.State:
    """Inverse of ``flat_values``: ``template``'s variables (metadata kept) holding ``values``."""
    return nnx.from_flat_state([(p, v.replace(values[path_key(p)])) for p, v in nnx.to_flat_state(template)])
