"""The workdir's resolved ``config.json``: written on the first run, compared on every rerun."""
from __future__ import annotations

import json
import os
from typing import Any

import ml_collections

from rlaifv_jax.core import paths

# Fields that may change between runs of one workdir without changing any result.
RESUMABLE_FIELDS = ("progress",)


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def check_or_save_config(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Save ``config`` as ``workdir/config.json``, or refuse a workdir started with another config.

    The error names every field that differs, with both values.
    """
    paths.makedirs(workdir)
    path = os.path.join(workdir, "config.json")
    current = json.loads(config.to_json())
    if not paths.exists(path):
        paths.atomic_write_text(path, json.dumps(current, indent=2, sort_keys=True))
        return
    saved = json.loads(paths.read_text(path))
    a, b = _flatten(saved), _flatten(current)
    diff = [k for k in sorted(set(a) | set(b))
            if a.get(k) != b.get(k) and k.split(".")[0] not in RESUMABLE_FIELDS]
    if diff:
        details = "; ".join(f"{k}: workdir has {a.get(k)!r}, this run has {b.get(k)!r}" for k in diff)
        raise ValueError(f"{workdir} was started with a different config ({details}); use a new --workdir "
                         "or the original settings")
