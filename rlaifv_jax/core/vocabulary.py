"""One config vocabulary for the online loop and offline DPO.

The canonical field names are the online loop's (``dpo.batch_size``, ``dpo.epochs``,
``policy.dtype``, ...). The names offline DPO used before (``train.global_batch_size``,
``train.num_epochs``, ``policy.compute_dtype``, ...) still work for one release: ``canonicalize``
moves their values to the canonical fields and logs one deprecation line, ``canonical_fields``
does the same for a workdir's saved ``config.json`` so existing workdirs resume.
"""
from __future__ import annotations

import logging
from typing import Any

import ml_collections

from rlaifv_jax.core.errors import ConfigError

log = logging.getLogger(__name__)

# deprecated field -> canonical field (removed in the release after next)
DEPRECATED = {
    "policy.compute_dtype": "policy.dtype",
    "data.template": "policy.template",
    "data.max_length": "dpo.max_length",
    "train.global_batch_size": "dpo.batch_size",
    "train.num_epochs": "dpo.epochs",
    "train.max_steps": "dpo.max_steps",
    **{f"train.{name}": f"dpo.{name}" for name in (
        "learning_rate", "schedule", "warmup_ratio", "weight_decay", "adam_b1", "adam_b2", "adam_eps",
        "max_grad_norm", "grad_accum", "checkpoints_per_epoch", "max_to_keep", "best_metric", "best_mode",
        "log_every", "ref_batch_size")},
}
# deprecated checkpoint-selection metric -> canonical (Object HalBench's names, online and offline)
DEPRECATED_METRICS = {"chair_mention": "mention_hall", "chair_response": "response_hall"}


def canonical_fields(flat: dict[str, Any]) -> dict[str, Any]:
    """A flat ``{dotted field: value}`` config with deprecated names (fields and selection metric)
    replaced by the canonical ones. ``ConfigError`` when both names of one field are given different
    values."""
    out = {k: v for k, v in flat.items() if k not in DEPRECATED}
    clashes = []
    for old, new in DEPRECATED.items():
        if old in flat:
            if new in out and out[new] != flat[old]:
                clashes.append(f"{old}={flat[old]!r} (deprecated) and {new}={out[new]!r} name one field; "
                               f"set only {new}")
            out[new] = flat[old]
    if clashes:
        raise ConfigError(clashes)
    metric = out.get("eval.select_metric")
    if metric in DEPRECATED_METRICS:
        out["eval.select_metric"] = DEPRECATED_METRICS[metric]
    return out


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        return {k: v for key, sub in d.items() for k, v in _flatten(sub, f"{prefix}{key}.").items()}
    return {prefix[:-1]: d}


def nest(flat: dict[str, Any]) -> dict[str, Any]:
    """``{"a.b": 1}`` → ``{"a": {"b": 1}}``."""
    out: dict[str, Any] = {}
    for field, value in flat.items():
        *groups, name = field.split(".")
        node = out
        for g in groups:
            node = node.setdefault(g, {})
        node[name] = value
    return out


def deprecated_in(flat: dict[str, Any]) -> list[str]:
    """``"old -> new"`` for every deprecated name in a flat config."""
    found = [f"{old} -> {new}" for old, new in DEPRECATED.items() if old in flat]
    metric = flat.get("eval.select_metric")
    if metric in DEPRECATED_METRICS:
        found.append(f"eval.select_metric={metric!r} -> {DEPRECATED_METRICS[metric]!r}")
    return found


def canonicalize(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """``config`` in the canonical vocabulary (itself when it uses no deprecated name; else a copy,
    with one deprecation line logged)."""
    flat = _flatten(config.to_dict())
    old = deprecated_in(flat)
    if not old:
        return config
    log.warning("deprecated config names (read for one more release): %s", ", ".join(old))
    return ml_collections.ConfigDict(nest(canonical_fields(flat)))


def rename_override(field: str, fields: set[str]) -> str:
    """The canonical name of a ``--config.FIELD`` override when ``FIELD`` is deprecated and the config
    has its canonical field; else ``field``."""
    new = DEPRECATED.get(field)
    return new if new is not None and field not in fields and new in fields else field
