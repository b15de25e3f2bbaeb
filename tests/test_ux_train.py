"""The train loop under bad input and interruptions: a non-finite step stops before anything of it is
saved, retention keeps the last K + the best checkpoint, a torn metrics line and another mesh are
fine on resume (SIGTERM: test_ux_preempt.py)."""
import logging
import os

import grain
import jax
import numpy as np
import pytest

import tiny_hf
from rlaifv_jax.core import jsonl, sharding
from rlaifv_jax.core.checkpoint import Checkpointer
from rlaifv_jax.core.errors import InputError, NonFiniteError
from rlaifv_jax.models import hf
from dpo_examples import examples  # the same pairs here and in test_ux_preempt's worker
from rlaifv_jax.training import loop, step as dpo_step


def dataset(exs, batch=2):
    return grain.MapDataset.source(exs).batch(batch)  # no shuffle: step i sees pairs 2i-2, 2i-1


def config(**kw):
    base = dict(optim=dpo_step.OptimSettings(learning_rate=1e-3, total_steps=0, warmup_ratio=0.0), save_every=1,
                max_to_keep=2, progress=False, async_checkpoint=False)
    return loop.TrainSettings(**{**base, **kw})


def one_device():
    return sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("llava")
    tiny_hf.llava(path)
    return str(path)


def test_non_finite_step_stops_before_saving_it(tiny, tmp_path):
    exs = examples()
    for ex in exs[4:6]:  # the pairs of step 3
        ex["ref_chosen_logps"] = np.float32("nan")
    with pytest.raises(NonFiniteError, match=r"non-finite loss=nan.* at step 3 of 6.*last good checkpoint: step 2"):
        loop.train(hf.load_pretrained(tiny), dataset(exs), config(), str(tmp_path), mesh=one_device())
    with Checkpointer(str(tmp_path / "checkpoints"), max_to_keep=None) as ck:
        assert ck.all_steps() == [1, 2]
    rows = jsonl.read(str(tmp_path / "metrics.jsonl"))
    assert [r["step"] for r in rows] == [1, 2] and all(np.isfinite(r["loss"]) for r in rows)
    assert "NaN" not in (tmp_path / "metrics.jsonl").read_text()


def test_retention_keeps_last_k_and_best(tiny, tmp_path, monkeypatch):
    exs = examples()
    for ex in exs[2:4]:  # step 2: a very low reference for the chosen answers -> by far the lowest loss
        ex["ref_chosen_logps"] = np.float32(-200.0)
    perf = []
    write = loop.MetricWriter.write
    monkeypatch.setattr(loop.MetricWriter, "write", lambda self, s, m, p=None: (perf.append(p), write(self, s, m, p)))
    res = loop.train(hf.load_pretrained(tiny), dataset(exs), config(best_metric="loss", best_mode="min"),
                     str(tmp_path), mesh=one_device())
    losses = {r["step"]: r["loss"] for r in res.history}
    assert min(losses, key=losses.get) == 2
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2", "5", "6"]
    assert res.kept_steps == [2, 5, 6] and res.best_step == 2
    tokens = sum(2 * int(e["answer_start"]) + int(e["chosen_len"]) + int(e["rejected_len"]) for e in exs[:2])
    assert len(perf) == 6 and set(perf[0]) == {"step_time_s", "pairs_per_s", "tokens_per_s"}  # no MFU on CPU
    assert perf[0]["tokens_per_s"] * perf[0]["step_time_s"] == pytest.approx(tokens)
    assert perf[0]["pairs_per_s"] * perf[0]["step_time_s"] == pytest.approx(2)
    best = res.model_at(2)  # the state of step 2 as a model (for export.checkpoints=best)
    with Checkpointer(str(tmp_path / "checkpoints"), max_to_keep=None) as ck:
        assert ck.manager.metrics(2) == {"loss": pytest.approx(losses[2])}
    kernel = "language_model/layers/0/mlp/up_proj/kernel"
    final = np.asarray(res.state["params"][kernel])
    assert not np.array_equal(np.asarray(best.language_model.layers[0].mlp.up_proj.kernel[...]), final)


def test_resume_on_another_mesh_after_a_torn_metrics_line(tiny, tmp_path, caplog):
    def crash(step, metrics, saved):
        if step == 3:
            raise KeyboardInterrupt  # a crash right after step 3's checkpoint
    with pytest.raises(KeyboardInterrupt):
        loop.train(hf.load_pretrained(tiny), dataset(examples()), config(), str(tmp_path), mesh=one_device(),
                   hook=crash)
    metrics = tmp_path / "metrics.jsonl"
    with open(metrics, "a") as f:
        f.write('{"step": 4, "loss": 0.6')  # a write cut by the kill
    mesh = sharding.make_mesh(2, 1, 1, devices=jax.devices()[:2])  # data-parallel over 2 devices now
    with jax.set_mesh(mesh):
        model = hf.load_pretrained(tiny, shardings=lambda s: sharding.state_shardings(s, mesh))
    with caplog.at_level(logging.WARNING, logger="rlaifv_jax"):
        res = loop.train(model, dataset(examples()), config(), str(tmp_path), mesh=mesh)
    assert res.resumed_from == 3 and res.step == 6
    assert any("metrics.jsonl" in r.getMessage() and "torn" in r.getMessage() for r in caplog.records)
    assert [r["step"] for r in jsonl.read(str(metrics))] == [1, 2, 3, 4, 5, 6]


def test_corrupt_middle_line_is_named(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2, "lo\n{"step": 3}\n')
    with pytest.raises(InputError, match=r"metrics.jsonl line 2"):
        jsonl.read(str(path))
