"""Stage inputs keyed by content (online): every sample record carries the fingerprint of what
produced it — the prompt id, the sha256 of its image bytes and question, and the policy checkpoint
step — and a rerun reuses an iteration's records only when the fingerprints still match.

When the prompts changed since the records were written (edited, removed or added), the rerun is
refused in one line saying what changed (``resume.on_input_change="refuse"``, the default), or
(``"recompute"``) exactly the affected prompts' records are dropped from every stage of the
iteration (samples, claims, labels, pairs by prompt id; encoded, ref_logps by their pair ids) and
recomputed; a partly trained DPO stage of that iteration restarts on the new pairs.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import shutil
from typing import Any, Mapping, Sequence

import jax
import numpy as np

from rlaifv_jax.core import distributed, paths, records
from rlaifv_jax.core.errors import ConfigError, InputError

log = logging.getLogger(__name__)
FINGERPRINT = "fingerprint"
ON_CHANGE = ("refuse", "recompute")
PROMPT_STAGES = ("samples", "claims", "labels", "pairs")  # records keyed by prompt id
PAIR_STAGES = ("encoded", "ref_logps")  # records keyed by pair id


def prompt_fingerprint(prompt: Mapping[str, Any], step: int) -> str:
    """sha256 of the prompt id, its image bytes (encoded file bytes, or the pixel array), its
    question and the policy checkpoint step that samples it."""
    encoded = getattr(prompt, "encoded", None)
    if callable(encoded):
        image = encoded()
    else:
        pixels = np.ascontiguousarray(prompt["image"])
        image = repr(pixels.shape).encode() + pixels.tobytes()
    h = hashlib.sha256()
    for part in (str(prompt["id"]).encode(), hashlib.sha256(image).digest(), str(prompt["question"]).encode(),
                 str(step).encode()):
        h.update(hashlib.sha256(part).digest())
    return h.hexdigest()[:32]


@dataclasses.dataclass(frozen=True)
class InputChanges:
    """Prompt ids whose records no longer match the inputs."""

    changed: tuple[str, ...]  # same id, other image / question / policy step (or no fingerprint)
    removed: tuple[str, ...]  # records of prompts no longer among the inputs
    added: tuple[str, ...]  # new inputs of a finished samples stage (an unfinished one simply goes on)

    def __bool__(self) -> bool:
        return bool(self.changed or self.removed or self.added)

    def describe(self) -> str:
        def ids(xs):
            return ", ".join(xs[:5]) + (" ..." if len(xs) > 5 else "")
        parts = [f"{len(self.changed)} changed ({ids(self.changed)})" if self.changed else "",
                 f"{len(self.removed)} removed ({ids(self.removed)})" if self.removed else "",
                 f"{len(self.added)} new" if self.added else ""]
        return "prompts " + ", ".join(p for p in parts if p)


def input_changes(iteration_dir: str, fingerprints: Mapping[str, str]) -> InputChanges:
    """Compare the sample records of ``iteration_dir`` with the fingerprints of this run's prompts."""
    stage = os.path.join(iteration_dir, "samples")
    saved = {str(r[records.KEY]): r.get(FINGERPRINT) for r in records.read_stage(stage)} if paths.isdir(stage) else {}
    changed = tuple(sorted(k for k, fp in saved.items() if k in fingerprints and fp != fingerprints[k]))
    removed = tuple(sorted(k for k in saved if k not in fingerprints))
    done = bool(saved) and records.stage_done(stage)
    added = tuple(sorted(k for k in fingerprints if k not in saved)) if done else ()
    return InputChanges(changed, removed, added)


def _drop(iteration_dir: str, prompt_ids: set[str]) -> dict[str, int]:
    """Drop the records of ``prompt_ids`` from every stage of the iteration; counts per stage."""
    pairs_dir = os.path.join(iteration_dir, "pairs")
    pair_ids = {p["pair_id"] for r in (records.read_stage(pairs_dir) if paths.isdir(pairs_dir) else [])
                if str(r[records.KEY]) in prompt_ids for p in r.get("pairs", ())}
    counts = {}
    for name in PROMPT_STAGES + PAIR_STAGES:
        stage = os.path.join(iteration_dir, name)
        if paths.isdir(stage):
            counts[name] = records.drop_keys(stage, prompt_ids if name in PROMPT_STAGES else pair_ids)
    train = os.path.join(iteration_dir, "train")
    if paths.isdir(train):
        shutil.rmtree(train)  # its pairs changed: DPO of this iteration restarts on the new ones
    return counts


def reconcile(iteration_dir: str, fingerprints: Mapping[str, str], on_change: str) -> InputChanges:
    """Check the iteration's records against this run's prompt fingerprints before any stage runs:
    refuse (``InputError``, one line) or drop the affected records so they are recomputed. Every
    process computes the same answer; process 0 alone drops, the others wait for it."""
    if on_change not in ON_CHANGE:
        raise ConfigError(f"resume.on_input_change={on_change!r} must be one of {', '.join(map(repr, ON_CHANGE))}")
    changes = input_changes(iteration_dir, fingerprints)
    if not changes:
        return changes
    if on_change == "refuse":
        raise InputError(f"{iteration_dir}: the inputs changed since its records were written: {changes.describe()}; "
                         "rerun with --config.resume.on_input_change=recompute to redo exactly those, "
                         "or use a new --workdir")
    if jax.process_index() == 0:
        counts = _drop(iteration_dir, set(changes.changed) | set(changes.removed))
        log.warning("%s: %s; recomputing their records (dropped: %s)", iteration_dir, changes.describe(),
                    ", ".join(f"{k}={v}" for k, v in counts.items()))
    distributed.barrier(f"reconcile {iteration_dir}")
    return changes


def fingerprints_of(prompts: Sequence[Mapping[str, Any]], step: int) -> dict[str, str]:
    """``{prompt id: prompt_fingerprint}`` of this iteration's prompts."""
    return {str(p["id"]): prompt_fingerprint(p, step) for p in prompts}
