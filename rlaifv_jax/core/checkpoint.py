"""Orbax checkpoints of a training state plus a JSON side-car (data-iterator state, loop state).

``Checkpointer(dir, max_to_keep=K, save_every=N)`` wraps ``ocp.CheckpointManager``:

* ``save(step, state, extra, force=False)`` writes ``state`` (any pytree of jax arrays: params,
  optimizer state, step, RNG key data) with ``StandardSave`` and ``extra`` (a JSON-able dict, e.g.
  ``{"data": iterator.get_state(), "iteration": 3}``) with ``JsonSave``, when ``step`` is a multiple
  of ``save_every`` or ``force``. Writes are asynchronous (the device→host copy is done before
  ``save`` returns, so the state may be donated right after); a step directory only appears,
  atomically, once complete — a process killed mid-write leaves a temporary directory that is
  ignored and cleaned up on the next start. Only the last ``max_to_keep`` checkpoints are kept, plus,
  with ``best_metric``, the best one by ``metrics[best_metric]`` (``best_mode`` "min" or "max";
  ``save(..., metrics={...})`` gives each checkpoint its metrics).
* ``latest_step()`` / ``all_steps()`` / ``best_step()`` list completed checkpoints.
* ``restore(step, target) -> (state, extra)``: ``target`` is a pytree like ``state`` of
  ``jax.ShapeDtypeStruct(shape, dtype, sharding=...)`` (or arrays); every leaf is restored directly
  onto the target sharding, so a run saved on one mesh resumes on another.

Call ``close()`` (or use as a context manager) to wait for the last write.
"""
from __future__ import annotations

from typing import Any

import jax
import orbax.checkpoint as ocp

from rlaifv_jax.core import paths


class Checkpointer:
    def __init__(self, directory: str, *, max_to_keep: int | None = 3, save_every: int | None = None,
                 async_save: bool = True, best_metric: str | None = None, best_mode: str = "min"):
        self.directory = paths.abspath(directory)
        self.save_every = save_every or 0
        self.best_metric = best_metric
        retention: dict[str, Any] = dict(max_to_keep=max_to_keep)
        if best_metric:
            if best_mode not in ("min", "max"):
                raise ValueError(f"best_mode={best_mode!r}: expected 'min' or 'max'")
            policy = ocp.checkpoint_managers
            best_fn = lambda m: float(m[best_metric])  # noqa: E731
            retention = dict(best_fn=best_fn, best_mode=best_mode, preservation_policy=policy.AnyPreservationPolicy([
                policy.LatestN(n=max_to_keep),
                policy.BestN(get_metric_fn=best_fn, reverse=best_mode == "min", n=1)]))
        options = ocp.CheckpointManagerOptions(create=True, enable_async_checkpointing=async_save,
                                               cleanup_tmp_directories=True, **retention)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def should_save(self, step: int) -> bool:
        return bool(self.save_every) and step > 0 and step % self.save_every == 0

    def save(self, step: int, state: Any, extra: dict[str, Any] | None = None, *, force: bool = False,
             metrics: dict[str, float] | None = None) -> bool:
        """Save at ``step`` if due (``should_save``) or ``force``; returns whether a save started.
        A step that is already saved is skipped. ``metrics`` rank the checkpoint for ``best_metric``."""
        if not (force or self.should_save(step)) or step in self.all_steps():
            return False
        if self.best_metric and (metrics is None or self.best_metric not in metrics):
            raise ValueError(f"checkpoint {step}: metrics must hold {self.best_metric!r} (the best_metric)")
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), extra=ocp.args.JsonSave(extra or {}))
        return bool(self.manager.save(step, args=args, force=True, metrics=metrics))

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def best_step(self) -> int | None:
        """The kept checkpoint with the best ``best_metric`` (without one: the latest)."""
        return self.manager.best_step()

    def restore(self, step: int | None, target: Any) -> tuple[Any, dict[str, Any]]:
        """``(state, extra)`` of checkpoint ``step`` (default: latest), placed as ``target`` says."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        abstract = jax.tree.map(
            lambda x: x if isinstance(x, jax.ShapeDtypeStruct) else
            jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), target)
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), extra=ocp.args.JsonRestore()))
        return out["state"], dict(out["extra"] or {})

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
