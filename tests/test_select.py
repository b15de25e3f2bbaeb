"""Checkpoint selection inside DPO: the pure selection math, the config checks and offline
DPO selecting by a POPE metric (the online loop with ``eval.every_epochs=0.25`` is in
tests/test_online.py, on its smoke run)."""
import numpy as np
import pytest

from configs import default
from rlaifv_jax.pipelines import validate
from rlaifv_jax.stages import select
from configs import offline_dpo
from offline_data import setup  # noqa: F401  (the tiny policy + parquet fixture)


def test_best_step_is_the_argmin_and_never_worse_than_the_last():
    rows = [{"step": s, "chair_mention": v} for s, v in [(3, 0.08), (5, 0.05), (8, 0.07), (10, 0.06)]]
    assert select.best_step(rows, "chair_mention") == 5
    assert select.best_step(rows, "chair_mention", "max") == 3
    rows.append({"step": 12, "chair_mention": 0.05})  # a tie goes to the later checkpoint
    assert select.best_step(rows, "chair_mention") == 12
    rng = np.random.default_rng(0)
    for _ in range(50):
        values = rng.random(rng.integers(1, 9))
        rows = [{"step": i + 1, "m": float(v)} for i, v in enumerate(values)]
        best = select.best_step(rows, "m")
        assert rows[best - 1]["m"] == values.min() <= rows[-1]["m"]
    missing = [{"step": 1, "m": None}, {"step": 2, "m": float("nan")}, {"step": 3}]
    assert select.best_step(missing, "m") == 3  # nothing to compare: the last one
    assert select.best_step(missing[:2] + [{"step": 3, "m": 0.5}] + missing[2:], "m") == 3


def test_candidate_steps_are_the_quarter_epochs_and_the_last():
    assert select.candidate_steps(10, 4, 0.25, 40) == [3, 5, 8, 10, 13, 15, 18, 20, 23, 25, 28, 30, 33, 35, 38, 40]
    assert select.candidate_steps(3, 1, 0.25, 3) == [1, 2, 3]  # fractions closer than a step merge
    assert select.candidate_steps(8, 2, 0.5, 11) == [4, 8, 11]  # dpo.max_steps caps training
    assert select.per_epoch(0.25) == 4 and select.per_epoch(1.0) == 1


def test_selection_config_is_checked():
    c = default.get_config("smoke")
    c.eval.every_epochs, c.eval.select_metric, c.eval.select_mode = 0.3, "nope", "up"
    with pytest.raises(ValueError) as e:
        validate.validate(c)
    for field in ("eval.every_epochs", "eval.select_metric", "eval.select_mode"):
        assert field in str(e.value)
    c = default.get_config("smoke")
    c.eval.every_epochs = 0.25
    validate.validate(c)
    c.source = "files"
    with pytest.raises(ValueError, match="eval.every_epochs=0.25: checkpoint selection"):
        validate.validate(c)


FIX = __import__("os").path.join(__import__("os").path.dirname(__file__), "fixtures", "eval", "pope")


def test_offline_selects_by_a_suite_metric_and_exports_it(setup, tmp_path):  # noqa: F811
    """Offline DPO of the tiny LLaVA with POPE scoring a checkpoint every half epoch."""
    import json
    import os
    from flax import nnx
    from rlaifv_jax.core.errors import InputError
    from rlaifv_jax.core.tree import flat_values
    from rlaifv_jax.models import hf
    from rlaifv_jax.pipelines import offline
    root, model_dir = setup
    c = offline_dpo.get_config()
    c.data.path, c.dpo.max_length, c.progress = str(root / "*.parquet"), 80, False
    c.policy.path, c.policy.dtype, c.export.dtype = str(model_dir), "float32", ""
    c.dpo.learning_rate, c.dpo.epochs = 2e-3, 1  # 24 pairs / batch 8: 3 steps
    c.eval.every_epochs, c.eval.suite = 0.5, "pope"
    c.eval.data, c.eval.images = os.path.join(FIX, "coco_pope_random.json"), os.path.join(FIX, "images")
    c.eval.max_new_tokens, c.eval.limit, c.eval.batch_size = 2, 4, 4
    c.eval.select_metric, c.eval.select_mode = "random.nope", "max"
    with pytest.raises(InputError, match="random.accuracy"):  # checked before anything trains
        offline.run(c, str(tmp_path))
    assert not os.path.exists(tmp_path / "train")
    c.eval.select_metric = "random.accuracy"
    summary = offline.run(c, str(tmp_path))
    chosen = json.load(open(tmp_path / "train" / "select" / "selection.json"))
    assert [r["step"] for r in chosen["checkpoints"]] == [2, 3] and chosen["last_step"] == 3
    values = {r["step"]: r["random.accuracy"] for r in chosen["checkpoints"]}
    assert values[chosen["selected_step"]] == max(values.values()) >= values[3]
    assert summary["exported_step"] == summary["selected_step"] == chosen["selected_step"]
    exported = flat_values(nnx.state(hf.load_pretrained(str(tmp_path / "export")), nnx.Param))
    from offline_data import policy_params
    theirs = policy_params(tmp_path / "train" / "select" / "candidates", chosen["selected_step"])
    for k, v in theirs.items():
        np.testing.assert_array_equal(np.asarray(exported[k]), v, err_msg=k)
