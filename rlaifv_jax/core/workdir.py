"""The workdir's resolved ``config.json``: written on the first run, compared on every rerun.

Fields split in two. Fields that change results (model, data, seeds, hyper-parameters, ...) must
match the saved config: a rerun that changes one is refused with a field-by-field diff. Fields that
only change how the run executes (``RUN_FIELDS``: mesh, per-call batch sizes of the inference
stages, progress bars, logging) may change between runs of one workdir: the rerun is accepted,
``config.json`` is updated to the new values and ``config_history.jsonl`` gets one line per start
with the run fields that changed.
"""
from __future__ import annotations

import datetime
import json
import logging
import os
from typing import Any

import jax
import ml_collections

from rlaifv_jax.core import jsonl, paths, vocabulary
from rlaifv_jax.core.errors import ConfigError, InputError

log = logging.getLogger(__name__)

# Field prefixes that may change between runs of one workdir without changing any result.
RUN_FIELDS = (
    "progress",  # progress bars
    "log",  # logging, TensorBoard / Weights & Biases
    "mesh",  # device layout (sharded and unsharded results agree to float rounding)
    "slice",  # the TPU slice the decode batches and mesh are tuned for (configs/slices.py)
    "sampling.batch_size", "claims.batch_size", "claims.llm_batch_size", "labeler.batch_size",  # per-call batches
    "sampling.decode_rows", "claims.decode_rows", "eval.decode_rows",  # continuous batching (the same tokens per row)
    "eval.batch_size",
    "policy.arch", "labeler.arch", "claims.split_arch", "claims.convert_arch",  # read by the planner only
    "dpo.ref_batch_size", "dpo.log_every",  # offline: reference-pass batch, metric interval
    "dpo.max_to_keep", "export.checkpoints",  # which checkpoints are kept / exported
    "resume",  # what a rerun does with records whose inputs changed (they are never silently reused)
)
# Fields added after workdirs were saved without them, with the value the code used before they existed:
# such a workdir resumes as if it had saved that value.
ADDED_FIELDS = {"dpo.remat": "none", "dpo.master_dtype": "float32", "dpo.optimizer_state_dtype": "float32",
                "labeler.answer_prefix": "auto", "sampling.decode_rows": 0, "claims.decode_rows": 0,
                "eval.decode_rows": 0, "slice": "", "dpo.sft_weight": 0.0, "dpo.checkpoints_per_epoch": 4}
HISTORY = "config_history.jsonl"


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def is_run_field(field: str) -> bool:
    """Whether ``field`` (dotted) only changes how a run executes, never its results."""
    return any(field == p or field.startswith(p + ".") for p in RUN_FIELDS)


def config_diff(saved: dict[str, Any], current: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``{field: (saved value, current value)}`` of every differing leaf field (dotted names)."""
    a, b = _flatten(saved), _flatten(current)
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def check_or_save_config(config: ml_collections.ConfigDict, workdir: str) -> dict[str, tuple[Any, Any]]:
    """Save ``config`` as ``workdir/config.json`` or check it against the saved one.

    Returns the run fields that changed (``{field: (old, new)}``); raises ``ConfigError`` naming
    every result field that differs, with both values. Every start appends a line to
    ``config_history.jsonl``.
    """
    path = os.path.join(workdir, "config.json")
    if paths.exists(workdir) and not paths.isdir(workdir):
        raise InputError(f"workdir {workdir} is a file, not a directory")
    current = json.loads(config.to_json())
    saved = json.loads(paths.read_text(path)) if paths.exists(path) else None
    if saved is not None:  # a workdir saved with deprecated names resumes under the canonical ones
        added = ADDED_FIELDS.keys() & _flatten(current).keys()  # those this config has
        saved = vocabulary.nest({**{k: ADDED_FIELDS[k] for k in added},
                                 **vocabulary.canonical_fields(_flatten(saved))})
    diff = config_diff(saved, current) if saved is not None else {}
    refused = {k: v for k, v in diff.items() if not is_run_field(k)}
    if refused:
        raise ConfigError([f"{k}: workdir has {a!r}, this run has {b!r}" for k, (a, b) in refused.items()],
                          header=f"{workdir} was started with a different config (use a new --workdir or "
                                 "the original values)")
    paths.makedirs(workdir)
    if saved is None or diff:
        paths.atomic_write_text(path, json.dumps(current, indent=2, sort_keys=True))
    if diff:
        log.info("resuming %s with changed run settings: %s", workdir,
                 ", ".join(f"{k}={b!r} (was {a!r})" for k, (a, b) in diff.items()))
    if jax.process_index() != 0:
        return diff
    history = os.path.join(workdir, HISTORY)
    jsonl.read(history, repair=True)
    jsonl.append(history, {"time": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                           "event": "start" if saved is None else "resume",
                           "changed": {k: {"was": a, "now": b} for k, (a, b) in diff.items()}})
    return diff
