"""Orbax checkpoints: cross-mesh restore, retention, and exact kill-and-resume of the train loop."""
import json
import os
import signal
import subprocess
import sys
import textwrap

import jax
import numpy as np

from rlaifv_jax.training import step as dpo_step
from rlaifv_jax.core import sharding
from rlaifv_jax.core.checkpoint import Checkpointer
from rlaifv_jax.models import hf
from smoke_runs import child_env



def test_save_restore_across_meshes_and_retention(tiny, tmp_path):
    mesh = sharding.make_mesh(2, 2, 2)
    with jax.set_mesh(mesh):
        model = hf.load_pretrained(tiny, shardings=lambda s: sharding.state_shardings(s, mesh))
    opt = dpo_step.OptimSettings(learning_rate=1e-3, total_steps=10)
    step = dpo_step.DPOStep(model, opt, mesh=mesh)
    state = step.init_state(3)
    ck = Checkpointer(str(tmp_path / "ck"), max_to_keep=2, save_every=2)
    assert not ck.save(1, state) and ck.should_save(4)
    for s in (2, 4, 6):
        assert ck.save(s, state, {"data": {"next_index": s}, "note": "x"})
    assert ck.save(7, state, {"data": {"next_index": 7}}, force=True)
    ck.wait()
    assert ck.all_steps() == [6, 7] and ck.latest_step() == 7
    ck.close()

    want = jax.device_get(state)
    for shape in [(1, 8, 1), (1, 1, 1)]:
        other_mesh = sharding.make_mesh(*shape, devices=jax.devices()[: int(np.prod(shape))])
        with jax.set_mesh(other_mesh):
            other = dpo_step.DPOStep(hf.load_pretrained(tiny, shardings=lambda s: sharding.state_shardings(s, other_mesh)), opt, mesh=other_mesh)
        ck2 = Checkpointer(str(tmp_path / "ck"), max_to_keep=2)
        got, extra = ck2.restore(None, other.abstract_state())
        ck2.close()
        assert extra == {"data": {"next_index": 7}}
        kernel = got["params"]["language_model/layers/0/mlp/up_proj/kernel"]
        assert kernel.sharding == other.state_shardings["params"]["language_model/layers/0/mlp/up_proj/kernel"]
        jax.tree.map(np.testing.assert_array_equal, jax.device_get(got), want)


WORKER = textwrap.dedent('''
    import os, signal, sys
    import numpy as np, grain, jax
    jax.config.update("jax_default_matmul_precision", "highest")
    from rlaifv_jax.core import compile_cache
    compile_cache.enable()  # the session's cache: the reruns compile nothing
    from rlaifv_jax.training import loop as train
    from rlaifv_jax.training import step as dpo_step
    from rlaifv_jax.models import hf
    from dpo_examples import examples

    model_dir, workdir, out = sys.argv[1:4]
    kill_at, kill_mode = int(os.environ.get("KILL_AT", "0")), os.environ.get("KILL_MODE", "step")
    ds = grain.MapDataset.source(examples(n=10)).shuffle(seed=1).repeat(3).batch(2)  # 15 steps
    cfg = train.TrainSettings(optim=dpo_step.OptimSettings(learning_rate=1e-3, total_steps=0, warmup_ratio=0.1),
                            save_every=3, max_to_keep=2, progress=False)

    def hook(step, metrics, saved):
        if step == kill_at and (kill_mode == "step" or saved):
            os.kill(os.getpid(), signal.SIGKILL)  # mid-write when saved (the write is asynchronous)

    res = train.train(hf.load_pretrained(model_dir), ds, cfg, workdir, hook=hook)
    np.savez(out, **{k: np.asarray(v) for k, v in res.state["params"].items()})
    print("resumed_from", res.resumed_from)
''')


def _run(script, tiny, workdir, out, **env):
    e = dict(child_env(), **{k: str(v) for k, v in env.items()})
    return subprocess.run([sys.executable, str(script), tiny, str(workdir), str(out)], env=e,
                          capture_output=True, text=True, timeout=120)


def test_kill_and_resume_gives_identical_params(tiny, tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    full = _run(script, tiny, tmp_path / "full", tmp_path / "full.npz")
    assert full.returncode == 0, full.stderr[-3000:]
    # three kills at random points, one of them right after a checkpoint write started
    rng = np.random.default_rng(int.from_bytes(os.urandom(4), "little"))
    points = sorted(rng.choice(np.arange(1, 15), size=2, replace=False).tolist())
    kills = [(points[0], "step"), (int(rng.choice([6, 9, 12])), "save"), (points[1], "step")]
    work = tmp_path / "killed"
    for at, mode in kills:
        r = _run(script, tiny, work, tmp_path / "killed.npz", KILL_AT=at, KILL_MODE=mode)
        if r.returncode == 0:  # the kill point was already behind the last checkpoint: the run ended
            continue
        assert r.returncode == -signal.SIGKILL, (at, mode, r.stderr[-3000:])
    r = _run(script, tiny, work, tmp_path / "killed.npz")
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = np.load(tmp_path / "full.npz"), np.load(tmp_path / "killed.npz")
    assert sorted(a) == sorted(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=f"{k} (kills {kills})")
    steps = [json.loads(line)["step"] for line in open(work / "metrics.jsonl")]
    assert steps == list(range(1, 16)), (steps, kills)
