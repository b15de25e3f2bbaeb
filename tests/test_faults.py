"""Faults end in one line with exit code 3 (issue 20): a full disk in the middle of a stage, a
read-only workdir; the rerun after the fault continues and finishes; ``--debug`` keeps the traceback."""
import errno
import json
import os
import subprocess
import sys

from rlaifv_jax.core import records
from rlaifv_jax.core.errors import fault_message
from offline_data import setup  # noqa: F401  (the tiny policy + parquet fixture)
from smoke_runs import ROOT, child_env



def _main(fault, setup, work, *extra):  # noqa: F811
    root, model_dir = setup
    flags = ["--config", "configs/offline_dpo.py", "--workdir", str(work), f"--config.data.path={root}/train-0.parquet",
             f"--config.policy.path={model_dir}", "--config.data.max_length=80", "--config.policy.compute_dtype=float32",
             "--config.train.max_steps=2", "--config.train.num_epochs=1", "--config.export.checkpoints=last",
             "--config.progress=False", *extra]
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "fault_driver.py"), fault, *flags], cwd=ROOT,
                          env=child_env(), capture_output=True, text=True, timeout=600)
    return proc, [line for line in proc.stderr.splitlines() if line.startswith("error:")], proc.stderr.splitlines()


def test_fault_messages_name_the_cause():
    assert fault_message(OSError(errno.ENOSPC, "No space left on device", "/w/x")).startswith(
        "the disk is full (No space left on device) writing /w/x; free space")
    wrapped = RuntimeError("RESOURCE_EXHAUSTED: tensorstore write failed: No space left on device")
    assert fault_message(ValueError("save failed").with_traceback(None)) is None
    try:
        try:
            raise wrapped
        except RuntimeError as e:
            raise ValueError("Orbax save failed") from e
    except ValueError as e:
        assert fault_message(e).startswith("the disk is full")
    assert fault_message(PermissionError(errno.EACCES, "Permission denied", "/w")).startswith("permission denied")
    assert fault_message(RuntimeError("Gloo connection closed by peer")) is None  # one process: a bug
    assert "lost contact with another process" in fault_message(RuntimeError("Connection closed by peer"), True)


def test_full_disk_mid_stage_then_rerun_finishes(setup, tmp_path):  # noqa: F811
    work = tmp_path / "work"
    proc, errors, lines = _main("enospc:ref_logps/part-", setup, work)
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert errors == [lines[-1]] and "the disk is full (No space left on device)" in errors[0]
    assert "Traceback" not in proc.stderr and len([ln for ln in lines if ln.startswith(("error", "Trace"))]) == 1
    assert records.stage_done(str(work / "encoded")) and not records.existing_keys(str(work / "ref_logps"))
    assert not [n for n in os.listdir(work / "ref_logps") if n.startswith(".tmp-")]  # nothing half-written
    proc, errors, _ = _main("none", setup, work)
    assert proc.returncode == 0 and not errors, proc.stderr[-2000:]
    summary = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert summary["steps"] == 2 and summary["pairs"] == 24


def test_read_only_workdir_one_line_and_debug_traceback(tmp_path):
    unused = (tmp_path / "data", tmp_path / "policy")  # the first write fails before inputs are read
    proc, errors, lines = _main("erofs", unused, tmp_path / "ro")
    assert proc.returncode == 3 and errors == [lines[-1]] and "read-only" in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    proc, errors, _ = _main("erofs", unused, tmp_path / "ro", "--debug")
    assert proc.returncode == 3 and "Traceback" in proc.stderr and "read-only" in errors[0]


def test_killed_peer_survivor_exits_3_within_30s_naming_it():
    from multiproc import free_port
    port = free_port()
    procs = [subprocess.Popen([sys.executable, os.path.join(ROOT, "tests", "peer_worker.py"), str(port), str(i)],
                              env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in (1, 0)]
    try:
        out, err = procs[1].communicate(timeout=120)  # process 0, the survivor
        done = __import__("time").time()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    assert procs[0].returncode == -9
    joined = float(next(line for line in out.splitlines() if line.startswith("joined")).split()[1])
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    print(f"survivor exit {procs[1].returncode} after {done - joined:.1f} s: {errors}\nstdout: {out!r}")
    assert procs[1].returncode == 3 and len(errors) == 1 and "process 1" in errors[0], err[-2000:]
    assert done - joined < 30
    assert "Traceback" not in err
