"""Atomic, resumable record stages: the storage every online-loop stage writes through.

A stage directory holds JSONL shards ``part-{process:05d}-{chunk:06d}.jsonl`` and one completion marker
per process, ``_DONE.{process:05d}`` (JSON: counts and the warning report). Every record carries a
unique string ``key``. Each shard is written to a hidden temp file, fsynced and ``os.replace``d into
place, so a shard is either complete or absent. :func:`run_stage` gives process ``p`` of ``n`` the
inputs ``p, p + n, p + 2n, ...``, skips inputs whose key is already in any shard (so an interrupted run
resumes without losing or duplicating records, even with another process count), runs ``fn`` on the
rest in chunks, and writes the marker when its share is complete; with the marker present it returns at
once. The stage is complete when all ``n`` markers exist (:func:`stage_done`). A marker records its run's
process count and only counts for a run with that count, so a stage interrupted under one process count
resumes correctly under another.

A stage may hand :func:`run_stage` a :class:`Prefetched` chunk function: its host-only part for the
next chunk runs on a helper thread while the device works on the current one. Every marker records
the run's wall seconds and its device seconds (``core.device_time``), so the device idle fraction of
each stage can be read back (``device_idle``).

Warnings: a record may carry ``"warnings": [name, ...]``; the marker stores their counts over the
records of the process's share (e.g. ``{"empty_response": 3, "count_mismatch": 1}``).
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import json
import os
import re
import time
from typing import Any, Callable, Iterable, Iterator, Sequence

from tqdm import tqdm

from rlaifv_jax.core import device_time, paths
from rlaifv_jax.core.paths import atomic_write_text  # noqa: F401  (re-exported: stages write through it)

KEY = "key"
WARNINGS = "warnings"
_PART_RE = re.compile(r"^part-(\d{5})-(\d{6})\.jsonl$")
_TMP_PREFIX = paths.TMP_PREFIX

Record = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Prefetched:
    """A chunk function in two parts: ``prepare`` (host work only: decode images, tokenize) runs on a
    helper thread one chunk ahead, while ``run`` (the device work and what follows it) handles the
    chunk before, so the device does not wait on Python between chunks."""

    prepare: Callable[[list[Any]], Any]
    run: Callable[[Any], list[Record]]


ChunkFn = Callable[[list[Any]], list[Record]]


def _outputs(fn: ChunkFn | Prefetched, chunks: list[list[Any]]) -> Iterator[list[Record]]:
    """``fn``'s records for each chunk, in order (a ``Prefetched`` one prepares the next chunk meanwhile)."""
    if not isinstance(fn, Prefetched):
        yield from map(fn, chunks)
        return
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="prepare") as pool:
        ahead = pool.submit(fn.prepare, chunks[0]) if chunks else None
        for k in range(len(chunks)):
            prepared = ahead.result()  # re-raises the helper's exception here, on the main thread
            ahead = pool.submit(fn.prepare, chunks[k + 1]) if k + 1 < len(chunks) else None
            try:
                yield fn.run(prepared)
            except BaseException:
                if ahead is not None:
                    ahead.cancel()
                raise


def _part_name(process_index: int, chunk: int) -> str:
    return f"part-{process_index:05d}-{chunk:06d}.jsonl"


def marker_name(process_index: int) -> str:
    """File name of process ``process_index``'s completion marker."""
    return f"_DONE.{process_index:05d}"


def _read_jsonl(path: str) -> list[Record]:
    with paths.open_file(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _parts(stage_dir: str) -> list[tuple[int, int, str]]:
    """(process, chunk, path) of every finished shard, sorted."""
    if not paths.isdir(stage_dir):
        return []
    found = []
    for name in paths.listdir(stage_dir):
        m = _PART_RE.match(name)
        if m:
            found.append((int(m.group(1)), int(m.group(2)), os.path.join(stage_dir, name)))
    return sorted(found)


class StageWriter:
    """Writes one process's shards of a stage directory atomically and its completion marker."""

    def __init__(self, stage_dir: str, process_index: int = 0):
        self.stage_dir = stage_dir
        self.process_index = process_index
        paths.makedirs(stage_dir)
        own = [chunk for proc, chunk, _ in _parts(stage_dir) if proc == process_index]
        self.next_chunk = max(own) + 1 if own else 0

    def clean_temp_files(self) -> list[str]:
        """Remove this process's leftover temp files (from an interrupted write); returns their names."""
        prefixes = (f"{_TMP_PREFIX}part-{self.process_index:05d}-", f"{_TMP_PREFIX}{marker_name(self.process_index)}")
        removed = [n for n in paths.listdir(self.stage_dir) if n.startswith(prefixes)]
        for name in removed:
            paths.remove(os.path.join(self.stage_dir, name))
        return removed

    def write_chunk(self, records: Sequence[Record]) -> str:
        """Write ``records`` as the next shard of this process; returns its path."""
        path = os.path.join(self.stage_dir, _part_name(self.process_index, self.next_chunk))
        atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        self.next_chunk += 1
        return path

    def marker_path(self) -> str:
        """Path of this process's completion marker."""
        return os.path.join(self.stage_dir, marker_name(self.process_index))

    def mark_done(self, summary: Record) -> None:
        """Write this process's completion marker holding ``summary``."""
        atomic_write_text(self.marker_path(), json.dumps(summary, indent=1, sort_keys=True) + "\n")


def _all_records(stage_dir: str) -> list[Record]:
    return [r for _, _, path in _parts(stage_dir) for r in _read_jsonl(path)]


def existing_keys(stage_dir: str) -> set[str]:
    """Keys of all records already written to ``stage_dir`` by any process."""
    return {r[KEY] for r in _all_records(stage_dir)}


def warning_counts(records: Iterable[Record]) -> dict[str, int]:
    """Counts of the warning names carried by ``records`` (``"warnings"`` lists)."""
    return dict(sorted(collections.Counter(w for r in records for w in r.get(WARNINGS, ())).items()))


def read_marker(stage_dir: str, process_index: int = 0) -> Record | None:
    """Process ``process_index``'s marker content, or None when it has not finished."""
    path = os.path.join(stage_dir, marker_name(process_index))
    if not paths.exists(path):
        return None
    with paths.open_file(path) as f:
        return json.load(f)


def finished(stage_dir: str, process_index: int, process_count: int) -> bool:
    """Whether process ``process_index`` of a ``process_count``-process run has finished its share (a
    marker left by a run with another process count covers another share: it does not count)."""
    marker = read_marker(stage_dir, process_index)
    return marker is not None and marker["process_count"] == process_count


def stage_done(stage_dir: str) -> bool:
    """Whether every process of the stage's last run has written its marker. The process count is
    process 0's (every run has a process 0); markers of other counts are leftovers of an earlier
    run with another process count and are ignored."""
    first = read_marker(stage_dir, 0) if paths.isdir(stage_dir) else None
    if first is None:
        return False
    return all(finished(stage_dir, p, first["process_count"]) for p in range(first["process_count"]))


def run_stage(
    stage_dir: str,
    inputs: Sequence[Any],
    fn: ChunkFn | Prefetched,
    *,
    key_fn: Callable[[Any], str],
    chunk_size: int,
    process_index: int = 0,
    process_count: int = 1,
    desc: str = "",
    progress: bool = True,
) -> Record:
    """Run ``fn`` over this process's missing share of ``inputs`` in chunks; returns the marker summary.

    ``fn`` maps a list of inputs to one JSON-serialisable record (dict) per input, in order; the record's
    ``key`` is set to ``key_fn(input)`` (a record may already carry the same key, never another).
    Keys must be unique across ``inputs``. Each chunk is one atomic shard. A :class:`Prefetched`
    ``fn`` prepares the next chunk on a helper thread while the current one runs.
    """
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} outside [0, {process_count})")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    writer = StageWriter(stage_dir, process_index)
    if finished(stage_dir, process_index, process_count):
        return read_marker(stage_dir, process_index)
    writer.clean_temp_files()
    keys = [key_fn(x) for x in inputs]
    if len(set(keys)) != len(keys):
        dup = [k for k, c in collections.Counter(keys).items() if c > 1][:5]
        raise ValueError(f"{stage_dir}: duplicate input keys, e.g. {dup}")
    share = list(range(process_index, len(inputs), process_count))
    written = existing_keys(stage_dir)
    todo = [i for i in share if keys[i] not in written]
    start, device_start = time.time(), device_time.seconds()
    chunks = [todo[lo:lo + chunk_size] for lo in range(0, len(todo), chunk_size)]
    with tqdm(total=len(share), initial=len(share) - len(todo), desc=desc or os.path.basename(stage_dir),
              unit="rec", disable=not progress, dynamic_ncols=True) as bar:
        for idx, out in zip(chunks, _outputs(fn, [[inputs[i] for i in idx] for idx in chunks])):
            if len(out) != len(idx):
                raise ValueError(f"{stage_dir}: fn returned {len(out)} records for {len(idx)} inputs")
            records = []
            for i, rec in zip(idx, out):
                if rec.get(KEY, keys[i]) != keys[i]:
                    raise ValueError(f"{stage_dir}: record key {rec[KEY]!r} != input key {keys[i]!r}")
                records.append({**rec, KEY: keys[i]})
            writer.write_chunk(records)
            bar.update(len(idx))
    share_keys = {keys[i] for i in share}
    mine = [r for r in _all_records(stage_dir) if r[KEY] in share_keys]
    if len(mine) != len(share_keys):
        raise RuntimeError(f"{stage_dir}: {len(mine)} records for a share of {len(share_keys)} inputs")
    summary = {
        "process_index": process_index,
        "process_count": process_count,
        "share": len(share),
        "processed_this_run": len(todo),
        "seconds_this_run": round(time.time() - start, 3),
        "device_seconds_this_run": round(device_time.seconds() - device_start, 3),
        "warnings": warning_counts(mine),
    }
    writer.mark_done(summary)
    return summary


def device_idle(marker: Record | None) -> float | None:
    """The device idle fraction of the run a marker (``run_stage``'s summary) records: None for no
    marker (an unfinished stage), a run that had nothing left to do or ran no device program, or a
    marker written before device time was recorded."""
    if not marker or not marker.get("processed_this_run") or not marker.get("device_seconds_this_run"):
        return None
    return device_time.idle_fraction(marker["device_seconds_this_run"], marker["seconds_this_run"])


def read_stage(stage_dir: str) -> list[Record]:
    """All records of a stage sorted by key; raises ValueError on a duplicate key."""
    records = _all_records(stage_dir)
    records.sort(key=lambda r: r[KEY])
    dups = sorted({a[KEY] for a, b in zip(records, records[1:]) if a[KEY] == b[KEY]})
    if dups:
        raise ValueError(f"{stage_dir}: duplicate record keys {dups[:5]}{' ...' if len(dups) > 5 else ''}")
    return records


def drop_keys(stage_dir: str, keys: set[str]) -> int:
    """Remove the records of ``keys`` from ``stage_dir`` (each shard holding one is rewritten
    atomically, or removed when emptied) and every completion marker, so the stage computes them
    again on its next run. Returns how many records were dropped (one writer: process 0)."""
    dropped = 0
    for _, _, path in _parts(stage_dir):
        rows = _read_jsonl(path)
        kept = [r for r in rows if str(r[KEY]) not in keys]
        if len(kept) == len(rows):
            continue
        dropped += len(rows) - len(kept)
        if kept:
            atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))
        else:
            paths.remove(path)
    for name in paths.listdir(stage_dir):
        if name.startswith("_DONE."):
            paths.remove(os.path.join(stage_dir, name))
    return dropped
