"""Multi-process start-up: ``jax.distributed`` from explicit coordinates or from the cluster.

``initialize(coordinator_address="host:port", num_processes=N, process_id=I)`` joins N processes
anywhere (also several on one machine); ``initialize(auto=True)`` lets JAX read the cluster
(Cloud TPU slice metadata, Slurm, Open MPI). With neither, the run stays one process. Call it
before anything touches a device.

Lost peers: every process runs a ``PeerWatch`` thread that bumps its own counter in the coordination
service's key-value store every ``BEAT_S`` seconds and reads the others'. A peer whose counter stops
for ``peer_timeout_s`` (or the coordinator itself, when the store stops answering) ends this process
at once with one line naming it and exit code 3, even while its main thread waits inside a
collective (``exit_now``: no shutdown barrier, which would wait for the dead peer). JAX's own
heartbeat timeout is set to twice that, so this one-line report comes first. A process that ends
normally marks itself ``done``; one that fails marks ``failed``, and its peers stop as well.
"""
from __future__ import annotations

import atexit
import logging
import os
import sys
import threading
import time

import jax

from rlaifv_jax.core.errors import FAULT_EXIT

PEER_TIMEOUT_S = 15.0  # a peer silent this long is lost
BEAT_S = 1.0  # how often each process bumps its counter and reads the others'
FAILED_GRACE_S = 5.0  # after a peer failed, time for this process to meet its own error first
_PREFIX = "rlaifv_alive/"


def _may_run_on_cpu() -> bool:
    platforms = jax.config.jax_platforms or os.environ.get("JAX_PLATFORMS") or ""
    return not platforms or "cpu" in platforms.split(",")


def exit_now(message: str, code: int = FAULT_EXIT) -> None:
    """Print ``error: message`` and end this process at once (no atexit, no shutdown barrier)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001
            pass
    os.write(2, f"error: {message}\n".encode())
    os._exit(code)


class PeerWatch(threading.Thread):
    """Detects a lost peer process (see the module docstring); a daemon thread."""

    def __init__(self, client, index: int, count: int, timeout_s: float = PEER_TIMEOUT_S, beat_s: float = BEAT_S):
        super().__init__(name="peer-watch", daemon=True)
        self.client, self.index, self.count = client, index, count
        self.timeout_s, self.beat_s = timeout_s, beat_s
        self.stopped = threading.Event()

    def _lost(self, who: str, why: str) -> None:
        exit_now(f"lost {who} ({why}); this process stops too. Check that host, then rerun the same "
                 "command on every host: finished stages are kept")

    def run(self) -> None:
        beat, start = 0, time.monotonic()
        seen: dict[int, tuple[str | None, float]] = {p: (None, start) for p in range(self.count) if p != self.index}
        failing_since, failed = None, {}
        while not self.stopped.is_set():
            beat += 1
            now = time.monotonic()
            try:
                self.client.key_value_set(f"{_PREFIX}{self.index}", str(beat), allow_overwrite=True)
                values = {k.rsplit("/", 1)[-1]: v for k, v in self.client.key_value_dir_get(_PREFIX)}
                failing_since = None
            except Exception as e:  # noqa: BLE001 - the coordinator (process 0) is unreachable
                if self.stopped.is_set():
                    return
                failing_since = failing_since or now
                if now - failing_since > self.timeout_s:
                    self._lost("process 0 (the coordinator)", f"no answer for {now - failing_since:.0f} s: "
                               f"{str(e).splitlines()[0][:100] if str(e) else type(e).__name__}")
                self.stopped.wait(self.beat_s)
                continue
            for p, (last, since) in list(seen.items()):
                value = values.get(str(p))
                if value == "done":
                    del seen[p]
                elif value is not None and value.startswith("failed"):
                    failed.setdefault(p, now)
                    if now - failed[p] > min(FAILED_GRACE_S, self.timeout_s):
                        self._lost(f"process {p}", f"it stopped with an error{value[len('failed'):]}")
                elif value != last:
                    seen[p] = (value, now)
                elif now - since > self.timeout_s:
                    self._lost(f"process {p}", f"no heartbeat for {now - since:.0f} s")
            self.stopped.wait(self.beat_s)


_watch: PeerWatch | None = None


def mark_exit(ok: bool, detail: str = "") -> None:
    """Tell the peers this process is ending (``done``, or ``failed``: they stop too); stops the watch."""
    global _watch
    watch, _watch = _watch, None
    if watch is None:
        return
    watch.stopped.set()
    try:
        watch.client.key_value_set(f"{_PREFIX}{watch.index}", "done" if ok else f"failed{detail}",
                                   allow_overwrite=True)
    except Exception:  # noqa: BLE001 - the coordinator may be gone already
        pass


def exit_after_fault(message: str, code: int = FAULT_EXIT) -> None:
    """End a multi-process run's process after a fault: first give the ``PeerWatch`` time to name a
    lost peer (a collective fails at once when a peer dies; the watch names it within its timeout),
    else tell the peers this process failed and exit with ``message``."""
    watch = _watch
    if watch is not None and watch.is_alive():
        watch.join(timeout=watch.timeout_s + 3 * watch.beat_s)  # the watch ends the process if a peer is lost
    mark_exit(False, f" (exit {code})")
    exit_now(message, code)


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, auto: bool = False, peer_timeout_s: float = PEER_TIMEOUT_S) -> bool:
    """Join the processes of a multi-process run; returns whether ``jax.distributed`` was started.

    Explicit mode needs all three of ``coordinator_address``, ``num_processes`` and ``process_id``;
    ``auto`` uses JAX's cluster auto-detection. On the CPU platform, cross-process collectives go
    through gloo (so 2 processes × 4 fake CPU devices run the real multi-host code paths).
    """
    given = {"coordinator_address": coordinator_address, "num_processes": num_processes,
             "process_id": process_id}
    explicit = any(v is not None for v in given.values())
    if explicit and auto:
        raise ValueError("give either --distributed (auto-detection) or --coordinator_address/"
                         "--num_processes/--process_id, not both")
    if explicit:
        missing = [k for k, v in given.items() if v is None]
        if missing:
            raise ValueError(f"--coordinator_address, --num_processes and --process_id go together; "
                             f"missing: {', '.join('--' + m for m in missing)}")
        if not 0 <= process_id < num_processes:
            raise ValueError(f"--process_id={process_id} outside [0, --num_processes={num_processes})")
    elif not auto:
        return False
    if _may_run_on_cpu():
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    timeouts = dict(heartbeat_timeout_seconds=int(2 * peer_timeout_s) + 1)
    if explicit:
        jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                                   process_id=process_id, **timeouts)
    else:
        jax.distributed.initialize(**timeouts)
    global _watch
    from jax._src import distributed as jax_distributed  # the client (no public getter)
    _watch = PeerWatch(jax_distributed.global_state.client, jax.process_index(), jax.process_count(), peer_timeout_s)
    _watch.start()
    atexit.register(mark_exit, True)
    logging.info("jax.distributed: process %d of %d on %s, %d local / %d global devices",
                 jax.process_index(), jax.process_count(), jax.default_backend(),
                 jax.local_device_count(), jax.device_count())
    return True


def barrier(name: str) -> None:
    """Every process waits here until all have arrived (a no-op in a one-process run)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def writer_first(fn, name: str):
    """``fn()`` on process 0 (the one writer), a barrier, then ``fn()`` on the others, which find
    process 0's output in place (e.g. a finished warm start) and only read it."""
    out = fn() if jax.process_index() == 0 else None
    barrier(name)
    return out if jax.process_index() == 0 else fn()
