"""Preemption: SIGTERM during DPO (a subprocess) finishes the step, saves, exits with a message to
rerun the same command, and the rerun ends with the same parameters and metrics as a run that was
never interrupted."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np

from smoke_runs import child_env




WORKER = textwrap.dedent('''
    import os, sys, time
    import numpy as np, grain, jax
    jax.config.update("jax_default_matmul_precision", "highest")
    from rlaifv_jax.core import compile_cache
    compile_cache.enable()  # the session's cache: the reruns compile nothing
    from rlaifv_jax.core.errors import Preempted
    from rlaifv_jax.models import hf
    from rlaifv_jax.training import loop, step as dpo_step
    from dpo_examples import examples
    model_dir, workdir, out, delay = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
    ds = grain.MapDataset.source(examples()).shuffle(seed=1).repeat(2).batch(2)  # 12 steps
    cfg = loop.TrainSettings(optim=dpo_step.OptimSettings(learning_rate=1e-3, total_steps=0, warmup_ratio=0.1),
                           save_every=4, max_to_keep=2, progress=False)
    try:
        res = loop.train(hf.load_pretrained(model_dir), ds, cfg, workdir, hook=lambda *a: time.sleep(delay))
    except Preempted as e:
        print(e, flush=True)
        sys.exit(e.exit_code)
    np.savez(out, **{k: np.asarray(v) for k, v in res.state["params"].items()})
''')


def _worker(script, tiny, workdir, out, delay=0.0):
    return subprocess.Popen([sys.executable, str(script), tiny, str(workdir), str(out), str(delay)], env=child_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_sigterm_saves_then_resumes_to_identical_results(tiny, tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    full = _worker(script, tiny, tmp_path / "full", tmp_path / "full.npz")  # the reference, alongside
    work = tmp_path / "stopped"
    proc = _worker(script, tiny, work, tmp_path / "stopped.npz", delay=0.3)
    deadline = time.time() + 240
    while not (work / "metrics.jsonl").exists() or len((work / "metrics.jsonl").read_text().splitlines()) < 2:
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)  # mid-run: the current step finishes, is saved, the run stops
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    _, full_err = full.communicate(timeout=240)
    assert full.returncode == 0, full_err[-3000:]
    assert "stopped by SIGTERM after step" in out and "Rerun the same command to resume" in out
    stopped_at = int(out.split("after step ")[1].split()[0])
    assert 2 <= stopped_at < 12
    saved = sorted(int(d) for d in os.listdir(work / "checkpoints") if d.isdigit())
    assert saved[-1] == stopped_at  # saved off the every-4-steps schedule

    again = _worker(script, tiny, work, tmp_path / "stopped.npz")
    out, err = again.communicate(timeout=240)
    assert again.returncode == 0, err[-3000:]
    a, b = np.load(tmp_path / "full.npz"), np.load(tmp_path / "stopped.npz")
    assert sorted(a) == sorted(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    rows = lambda d: [json.loads(line) for line in open(d / "metrics.jsonl")]  # noqa: E731
    assert rows(work) == rows(tmp_path / "full")  # every metric of every step, bit for bit
