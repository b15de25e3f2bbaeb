"""One run per workdir (issue 20): a second run exits 2 in one line naming the holder and touches
nothing; a lock left by a dead process is taken over with a notice; release cleans up."""
import json
import logging
import os
import socket
import subprocess
import sys
import time

import pytest

from rlaifv_jax.core import lock
from smoke_runs import ROOT, child_env, smoke_command



def test_second_run_exits_2_in_one_line_and_touches_nothing(tmp_path):
    work = tmp_path / "work"
    first = lock.WorkdirLock(str(work))
    first.acquire()  # the first run (this process) holds the workdir
    try:
        (work / "marker").write_text("first run's file")
        before = sorted(os.listdir(work))
        proc = subprocess.run(smoke_command(work), cwd=ROOT, env=child_env(), capture_output=True, text=True,
                              timeout=300)
        lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
        assert proc.returncode == 2 and len(lines) <= 3, (proc.returncode, lines)
        assert f"pid {os.getpid()} on {socket.gethostname()}" in lines[-1] and "in use by another run" in lines[-1]
        assert sorted(os.listdir(work)) == before
    finally:
        first.release()
    assert not (work / lock.LOCK_NAME).exists() and (work / "marker").exists()


def test_lock_of_a_dead_process_is_taken_over_with_a_notice(tmp_path, caplog):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    work = tmp_path / "w"
    work.mkdir()
    (work / lock.LOCK_NAME).write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid, "started": "x"}))
    with caplog.at_level(logging.WARNING, logger="rlaifv_jax.core.lock"):
        with lock.hold(str(work)) as held:
            assert json.loads((work / lock.LOCK_NAME).read_text())["pid"] == os.getpid()
            with pytest.raises(lock.WorkdirLocked, match="in use by another run"):
                lock.WorkdirLock(str(work)).acquire()  # held by a live process now
    assert f"process {dead.pid} on {socket.gethostname()} is gone" in caplog.text and held is not None
    assert os.listdir(work) == []


def test_other_hosts_lock_is_stale_only_without_heartbeat(tmp_path):
    work = tmp_path / "w"
    work.mkdir()
    path = work / lock.LOCK_NAME
    path.write_text(json.dumps({"host": "other-host", "pid": 1, "heartbeat_unix": time.time()}))
    with pytest.raises(lock.WorkdirLocked, match="pid 1 on other-host"):
        lock.WorkdirLock(str(work)).acquire()
    old = time.time() - 2 * lock.STALE_S
    path.write_text(json.dumps({"host": "other-host", "pid": 1, "heartbeat_unix": old}))
    os.utime(path, (old, old))
    taken = lock.WorkdirLock(str(work))
    taken.acquire()
    taken.release()


def test_refused_run_leaves_no_new_workdir(tmp_path):
    work = tmp_path / "new"
    held = lock.WorkdirLock(str(work))
    held.acquire()
    held.release()
    assert not work.exists()  # a lock that created the workdir and used nothing removes it again
