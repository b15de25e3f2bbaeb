"""Checkpoint selection inside DPO: the DPO stage checkpoints every ``every_epochs`` of an
epoch, each checkpoint's policy is evaluated with the run's evaluation (toy world: exact CHAIR on the
held-out images, ``stages/measure.py``), and the best by a named metric becomes the stage's policy.

Layout under the stage's ``select/`` directory:

* ``candidates/``  Orbax, params only (LoRA merged): the policy of every candidate step, written
  collectively by ``stages/dpo.run`` while the training state is loaded; deleted
  (``discard_candidates``) once the selected policy is saved elsewhere;
* ``step_NNNNNN/`` one evaluation record stage per candidate (atomic; a finished one is reused on
  rerun without loading a model);
* ``selection.json`` every candidate's metrics and the selected step (process 0 writes it atomically).

The selection math (``candidate_steps``, ``best_step``) is pure; ``write_candidates``, ``score_candidates``
and ``run`` (evaluate, pick, save: called by the online and offline loops after DPO) are the thin
stateful shells.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
from typing import Any, Callable, Sequence

import jax
from flax import nnx

from rlaifv_jax.core import paths
from rlaifv_jax.stages import bundle

log = logging.getLogger(__name__)
SELECTION = "selection.json"
Measure = Callable[[bundle.ModelSettings, str], dict[str, Any]]  # (policy spec, stage dir) -> metrics


@dataclasses.dataclass(frozen=True)
class SelectSettings:
    every_epochs: float  # evaluate a checkpoint every this fraction of an epoch (1/N)
    metric: str = "chair_mention"  # the metric that picks the checkpoint
    mode: str = "min"  # "min" (lower is better) or "max"


def per_epoch(every_epochs: float) -> int:
    """Checkpoints per epoch for ``every_epochs`` = 1/N."""
    return max(1, round(1 / every_epochs))


def candidate_steps(steps_per_epoch: int, epochs: int, every_epochs: float, total: int) -> list[int]:
    """The optimizer steps that end each ``every_epochs`` fraction of training (rounded half up to
    whole steps, duplicates merged, capped at ``total``), always including ``total`` (the last)."""
    n = per_epoch(every_epochs)
    steps = {min(total, max(1, math.floor(j * steps_per_epoch / n + 0.5))) for j in range(1, n * epochs + 1)}
    return sorted(steps | {total})


def best_step(rows: Sequence[dict[str, Any]], metric: str, mode: str = "min") -> int:
    """The ``step`` of the row with the best ``metric`` (``mode`` "min" or "max"); ties go to the later
    step; rows without a finite value never win; with none at all, the last step."""
    if mode not in ("min", "max"):
        raise ValueError(f"mode={mode!r}: expected 'min' or 'max'")
    if not rows:
        raise ValueError("no checkpoints to select from")
    sign = 1.0 if mode == "min" else -1.0
    scored = [(sign * float(r[metric]), -r["step"]) for r in rows
              if isinstance(r.get(metric), (int, float)) and math.isfinite(r[metric])]
    return -min(scored)[1] if scored else max(r["step"] for r in rows)


def candidates_dir(select_dir: str) -> str:
    return os.path.join(select_dir, "candidates")


def eval_dir(select_dir: str, step: int) -> str:
    return os.path.join(select_dir, f"step_{step:06d}")


def write_candidates(select_dir: str, steps: Sequence[int], model_at: Callable[[int], nnx.Module]) -> None:
    """Save the policy of every step of ``steps`` not saved yet (every process calls it: collective)."""
    directory = candidates_dir(select_dir)
    have = set(bundle.saved_steps(directory))
    for s in steps:
        if s not in have:
            bundle.save_params(model_at(s), directory, s, {"dpo_step": s})


def score_candidates(select_dir: str, steps: Sequence[int], policy: bundle.ModelSettings, measure: Measure,
             settings: SelectSettings, steps_per_epoch: int, desc: str = "dpo") -> dict[str, Any]:
    """Evaluate every candidate (finished evaluations are reused), select the best, write and return
    ``{"metric", "mode", "selected_step", "last_step", "checkpoints": [{"step", "epoch", metrics...}]}``."""
    rows = []
    for s in steps:
        spec = dataclasses.replace(policy, checkpoint=candidates_dir(select_dir), step=s)
        metrics = measure(spec, eval_dir(select_dir, s))
        rows.append({"step": s, "epoch": round(s / max(steps_per_epoch, 1), 4),
                     **{k: v if v is None or math.isfinite(v) else None for k, v in metrics.items()
                        if v is None or isinstance(v, (int, float))}})
        value = rows[-1].get(settings.metric)
        log.info("%s: checkpoint step %d (epoch %.2f): %s=%s", desc, s, rows[-1]["epoch"], settings.metric,
                 "n/a" if value is None else f"{value:.4f}")
    chosen = best_step(rows, settings.metric, settings.mode)
    out = {"metric": settings.metric, "mode": settings.mode, "selected_step": chosen, "last_step": max(steps),
           "checkpoints": rows}
    log.info("%s: selected checkpoint step %d of %d by %s (%s)", desc, chosen, max(steps), settings.metric,
             settings.mode)
    if jax.process_index() == 0:
        paths.atomic_write_text(os.path.join(select_dir, SELECTION), json.dumps(out, indent=1, allow_nan=False))
    return out


def run(select_dir: str, trained: dict[str, Any], policy: bundle.ModelSettings, measure: Measure,
        settings: SelectSettings, *, mesh, save: Callable[[nnx.Module], None], desc: str = "dpo") -> dict[str, Any]:
    """Checkpoint selection after ``stages.dpo.run`` (``trained``: its result, with ``candidate_steps``):
    score every candidate (``score_candidates`` with ``measure``), load the best one's master weights
    and hand them to ``save``; returns ``trained`` with ``exported_step`` / ``best_step`` / ``selection``. Without trained
    steps (no pairs: DPO saved the policy unchanged) ``trained`` comes back as is."""
    if not trained["steps"]:
        return trained
    chosen = score_candidates(select_dir, trained["candidate_steps"], policy, measure, settings,
                              trained["steps_per_epoch"], desc=desc)
    step = chosen["selected_step"]
    spec = dataclasses.replace(policy, checkpoint=candidates_dir(select_dir), step=step)
    with bundle.loaded(spec, mesh, training=True) as b:  # master weights of the selected checkpoint
        save(b.model)
    return {**trained, "exported_step": step, "best_step": step, "selection": chosen}


def discard_candidates(select_dir: str) -> None:
    """Delete the candidates' policies (process 0), once the selected one is saved elsewhere; their
    evaluations and ``selection.json`` stay."""
    if jax.process_index() == 0:
        shutil.rmtree(candidates_dir(select_dir), ignore_errors=True)


def summary(select_dir: str) -> dict[str, Any]:
    """The summary fields of a finished selection (empty when selection was off)."""
    path = os.path.join(select_dir, SELECTION)
    if not paths.exists(path):
        return {}
    s = json.loads(paths.read_text(path))
    return {"select_metric": s["metric"], "select_mode": s["mode"], "selected_step": s["selected_step"],
            "last_step": s["last_step"], "checkpoint_evals": s["checkpoints"]}
