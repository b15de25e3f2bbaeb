"""One run per workdir: an exclusive lock file, ``<workdir>/run.lock``.

The file is created complete by ``link`` (atomic on local and NFS filesystems) and holds the holder's
host, pid, start time and a heartbeat (rewritten every ``HEARTBEAT_S`` seconds by a daemon
thread). A second run on the same workdir is refused (``WorkdirLocked``, exit 2, one line naming the
holder). A lock left by a dead run is taken over with a notice: on the same host when its pid no
longer exists, on another host when its heartbeat is older than ``STALE_S``. Multi-host runs lock
once, from process 0 (``main``). Cloud workdirs (``gs://``) are not locked (no exclusive create).
"""
from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import socket
import threading
import time
from typing import Any, Iterator

from rlaifv_jax.core import paths
from rlaifv_jax.core.errors import UserError

log = logging.getLogger(__name__)
LOCK_NAME = "run.lock"
HEARTBEAT_S = 30.0  # how often the holder rewrites its heartbeat
STALE_S = 300.0  # a lock from another host whose heartbeat is older than this is taken over


class WorkdirLocked(UserError):
    """Another run holds the workdir."""


def _now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def _read(path: str) -> dict[str, Any] | None:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # unreadable or half-written: judged by the file's age below


def stale_reason(info: dict[str, Any], path: str, stale_s: float = STALE_S) -> str | None:
    """Why the lock described by ``info`` (read from ``path``) is stale, or None if it is live."""
    host, pid = info.get("host"), info.get("pid")
    if host == socket.gethostname() and isinstance(pid, int):
        return None if _alive(pid) else f"process {pid} on {host} is gone"
    try:
        age = time.time() - max(float(info.get("heartbeat_unix", 0)), os.path.getmtime(path))
    except OSError:
        return "the lock file vanished"
    return f"no heartbeat from {host or 'an unknown host'} for {age:.0f} s" if age > stale_s else None


class WorkdirLock:
    """The lock of one workdir; ``acquire`` / ``release``, or ``with hold(workdir):``."""

    def __init__(self, workdir: str, heartbeat_s: float = HEARTBEAT_S, stale_s: float = STALE_S):
        self.workdir, self.path = workdir, os.path.join(workdir, LOCK_NAME)
        self.heartbeat_s, self.stale_s = heartbeat_s, stale_s
        self.info = {"host": socket.gethostname(), "pid": os.getpid(), "started": _now()}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._created_dir = False

    def _write_new(self) -> bool:
        """Create the lock file complete or not at all: its content goes to a temp file first, which
        is then hard-linked into place (``link`` fails when the lock exists, also on NFS)."""
        tmp = os.path.join(self.workdir, f"{paths.TMP_PREFIX}{LOCK_NAME}.{os.getpid()}")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump({**self.info, "heartbeat": _now(), "heartbeat_unix": time.time()}, f)
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        finally:
            os.remove(tmp)

    def acquire(self) -> None:
        """Take the lock, or raise ``WorkdirLocked`` naming its holder."""
        if not os.path.isdir(self.workdir):
            os.makedirs(self.workdir)
            self._created_dir = True
        for _ in range(3):
            if self._write_new():
                break
            holder = _read(self.path)
            if holder is None:
                continue  # released meanwhile: try again
            reason = stale_reason(holder, self.path, self.stale_s)
            if reason is None:
                self._cleanup_dir()
                raise WorkdirLocked(
                    f"{self.workdir} is in use by another run (pid {holder.get('pid')} on {holder.get('host')}, "
                    f"started {holder.get('started')}); wait for it to end or use another --workdir")
            log.warning("taking over the stale lock of %s (%s)", self.workdir, reason)
            with contextlib.suppress(FileNotFoundError):
                os.replace(self.path, f"{self.path}.stale-{os.getpid()}")
                os.remove(f"{self.path}.stale-{os.getpid()}")
        else:
            raise WorkdirLocked(f"{self.workdir}: could not take {LOCK_NAME} (another run keeps taking it)")
        self._thread = threading.Thread(target=self._beat, name="workdir-lock-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            holder = _read(self.path)
            if not holder or holder.get("pid") != self.info["pid"] or holder.get("host") != self.info["host"]:
                log.warning("the lock of %s was taken by another run", self.workdir)
                return
            with contextlib.suppress(OSError):
                paths.atomic_write_text(self.path, json.dumps(
                    {**self.info, "heartbeat": _now(), "heartbeat_unix": time.time()}))

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        holder = _read(self.path)
        if holder and holder.get("pid") == self.info["pid"] and holder.get("host") == self.info["host"]:
            with contextlib.suppress(OSError):
                os.remove(self.path)
        self._cleanup_dir()

    def _cleanup_dir(self) -> None:
        """A workdir this lock created and nothing else used is removed again (a refused run writes nothing)."""
        if self._created_dir:
            with contextlib.suppress(OSError):
                os.rmdir(self.workdir)  # only if empty


@contextlib.contextmanager
def hold(workdir: str, enabled: bool = True) -> Iterator[WorkdirLock | None]:
    """The workdir's lock for a ``with`` block (nothing when ``enabled`` is false or the workdir is remote)."""
    if not enabled or paths.is_remote(workdir):
        yield None
        return
    lock = WorkdirLock(workdir)
    lock.acquire()
    try:
        yield lock
    finally:
        lock.release()


@contextlib.contextmanager
def hold_once(workdir: str) -> Iterator[WorkdirLock | None]:
    """``hold`` taken by process 0 alone; every process learns the outcome (a refused multi-host run
    exits on every process with the same one line)."""
    import jax
    if jax.process_count() == 1:
        with hold(workdir) as lock:
            yield lock
        return
    import numpy as np
    from jax.experimental import multihost_utils
    lock, error = None, None
    if jax.process_index() == 0 and not paths.is_remote(workdir):
        lock = WorkdirLock(workdir)
        try:
            lock.acquire()
        except WorkdirLocked as e:
            lock, error = None, e
    if not int(multihost_utils.broadcast_one_to_all(np.int32(error is None))):
        raise error or WorkdirLocked(f"{workdir} is in use by another run (process 0 could not take its lock)")
    try:
        yield lock
    finally:
        if lock is not None:
            lock.release()
