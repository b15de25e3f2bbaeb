"""How every record stage runs: this host's share through ``core.records``, models loaded only
when work remains, then a barrier across hosts and all of the stage's records. Each stage logs the
share of its time in which the device waited on the host (``core.device_time``)."""
from __future__ import annotations

import collections
import contextlib
import logging
import os
from typing import Any, Callable, ContextManager, Sequence

import jax
from jax.experimental import multihost_utils

from rlaifv_jax.core import memory, records

log = logging.getLogger(__name__)
ChunkFn = records.ChunkFn | records.Prefetched


def run(stage_dir: str, inputs: Sequence[Any], open_fn: Callable[[], ContextManager[ChunkFn]], *,
        chunk_size: int, desc: str, progress: bool, key_fn: Callable[[Any], str] = lambda r: r["key"]
        ) -> list[dict[str, Any]]:
    """Run one stage over this host's missing share and return all of its records.

    ``open_fn()`` is entered only when this host's share has work left (so a finished stage, or a
    host with an empty share, loads no model);
    it yields the function that maps a chunk of inputs to one record each (or a ``records.Prefetched``
    pair), and frees what it loaded on exit. Every host then waits at a barrier named after the stage.
    """
    index, count = jax.process_index(), jax.process_count()
    if not records.finished(stage_dir, index, count):
        share = {key_fn(x) for x in inputs[index::count]}
        missing = share - records.existing_keys(stage_dir)
        with (open_fn() if missing else contextlib.nullcontext(_nothing)) as fn:
            summary = records.run_stage(stage_dir, inputs, fn, key_fn=key_fn, chunk_size=chunk_size,
                                        process_index=index, process_count=count, desc=desc, progress=progress)
        if summary.get("warnings"):
            log.warning("%s: %s", desc, summary["warnings"])
        idle = records.device_idle(summary)
        if idle is not None:
            log.info("%s: %d records in %.1f s, device busy %.1f s, idle %.0f %% (waiting on the host)", desc,
                     summary["processed_this_run"], summary["seconds_this_run"], summary["device_seconds_this_run"],
                     100 * idle)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(stage_dir)
    log.info("%s done; resident after it: %s", desc, memory.describe())
    return records.read_stage(stage_dir)


def _nothing(chunk: list[Any]) -> list[dict[str, Any]]:
    raise AssertionError("called with work although this host's share is complete")


def plain(fn: ChunkFn) -> Callable[[], ContextManager[ChunkFn]]:
    """``open_fn`` for a stage that loads nothing."""
    return lambda: contextlib.nullcontext(fn)


def stage_device_idle(stage_dirs: Sequence[str]) -> dict[str, float]:
    """This process's device idle fraction of each stage it ran work in this run, by stage name
    (stages with no device work, or finished by an earlier run, are left out)."""
    out = {}
    for d in stage_dirs:
        idle = records.device_idle(records.read_marker(d, jax.process_index()) if os.path.isdir(d) else None)
        if idle is not None:
            out[os.path.basename(d)] = round(idle, 3)
    return out


def stage_warnings(stage_dirs: Sequence[str]) -> dict[str, dict[str, int]]:
    """The warning counts of every finished stage, by stage name."""
    out = {}
    for d in stage_dirs:
        counts: collections.Counter = collections.Counter()
        if os.path.isdir(d):
            counts.update(records.warning_counts(records.read_stage(d)))
        out[os.path.basename(d)] = dict(counts)
    return out
