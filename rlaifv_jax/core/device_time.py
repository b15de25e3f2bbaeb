"""How long this process's device programs run, as the host sees them, and so how long the device
waits on Python.

Each region of :func:`device_work` spans one or more programs from their dispatch until their
outputs are on the host (the host blocks on them meanwhile), and adds its length to one
process-wide clock; nested regions count once. A stage reads the clock before and after
(``records.run_stage``): its *device idle fraction* is ``1 - device seconds / wall seconds``, the
time the device had no program of ours to run (tokenizing, image preprocessing, detokenizing,
record writing). A program's first call compiles it inside its region, so a cold compilation cache
counts as device time. Regions run on the main thread only; host work on other threads
(``records.Prefetched``) overlaps them and is not counted.
"""
from __future__ import annotations

import contextlib
import threading
import time
from typing import Iterator

_lock = threading.Lock()
_local = threading.local()
_total = 0.0


@contextlib.contextmanager
def device_work() -> Iterator[None]:
    """Count the enclosed time as device time (from dispatch until the outputs are on the host)."""
    global _total
    depth = getattr(_local, "depth", 0)
    _local.depth = depth + 1
    start = time.perf_counter()
    try:
        yield
    finally:
        _local.depth = depth
        if depth == 0:
            with _lock:
                _total += time.perf_counter() - start


def seconds() -> float:
    """Device seconds counted so far in this process."""
    with _lock:
        return _total


def idle_fraction(device_seconds: float, wall_seconds: float) -> float:
    """The share of ``wall_seconds`` in which no counted device program ran (0 when nothing elapsed)."""
    if wall_seconds <= 0:
        return 0.0
    return min(max(1.0 - device_seconds / wall_seconds, 0.0), 1.0)
