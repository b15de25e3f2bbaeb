"""Offline DPO as a new user meets it: wrong paths leave the workdir empty and the corrected command
starts there; the export loads with AutoProcessor + AutoModelForImageTextToText and generates;
checkpoints are retained (last K + best) and exported on request; an edited data file never reuses
another row's reference log-probs, nor resumes training on other pairs."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from rlaifv_jax.core import records
from rlaifv_jax.core.errors import ConfigError, InputError
from rlaifv_jax.pipelines import offline
from offline_data import offline_config, read_rows, setup, write_rows  # noqa: F401  (setup: the tiny policy + parquet fixture)


@pytest.fixture(scope="module")
def trained(setup, tmp_path_factory):  # noqa: F811
    """A run that first gets wrong paths (refused, nothing written), then the right ones."""
    root, model_dir = setup
    work = tmp_path_factory.mktemp("work")
    data = tmp_path_factory.mktemp("data") / "train-0.parquet"
    write_rows(data, read_rows(root))
    c = offline_config(root, model_dir, data.parent / "missing-*.parquet")
    with pytest.raises(ConfigError, match=r"data.path: '.*missing-\*.parquet' matches no file"):
        offline.run(c, str(work))
    c = offline_config(root, root / "no-model", data.parent)  # a directory of parquet files is fine
    with pytest.raises(ConfigError, match=r"policy.path='.*no-model' is not a directory"):
        offline.run(c, str(work))
    assert os.listdir(work) == []
    c = offline_config(root, model_dir, data.parent)
    return c, work, data, offline.run(c, str(work))


def test_corrected_run_trains_retains_and_exports(trained, setup):  # noqa: F811
    c, work, _, summary = trained
    assert summary["steps"] == 3 and summary["pairs"] == 24
    assert summary["kept_checkpoints"] == sorted({2, 3, summary["best_checkpoint"]})
    assert sorted(os.listdir(work / "train" / "checkpoints")) == [str(s) for s in summary["kept_checkpoints"]]
    others = [s for s in summary["kept_checkpoints"] if s != 3]
    assert sorted(d for d in os.listdir(work / "export") if d.startswith("step_")) == [f"step_{s}" for s in others]
    report = json.load(open(work / "data_report.json"))
    assert report["skipped_rows"] == [f"{c.data.path}/train-0.parquet:24: chosen_equals_rejected"]

    export = str(work / "export")
    processor = AutoProcessor.from_pretrained(export)
    model = AutoModelForImageTextToText.from_pretrained(export)
    image = Image.fromarray(np.full((20, 24, 3), 128, np.uint8))
    inputs = processor(images=image, text="USER : <image> what is in the image ? ASSISTANT :", return_tensors="pt")
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 4  # 28 px / 14 px patches
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 4


def test_max_pairs_takes_the_first_usable_pairs(setup):  # noqa: F811
    root, _ = setup
    pairs, skipped, named = offline.read_pairs([str(root / "train-0.parquet")], max_pairs=5)
    assert [p.meta["idx"] for p in pairs] == [0, 1, 2, 3, 4] and not skipped and not named


def test_edited_data_never_reuses_another_rows_reference_logps(setup, tmp_path, monkeypatch):  # noqa: F811
    root, model_dir = setup
    captured = {}

    def stop_before_training(train_dir, examples, *args, **kwargs):  # a kill right after the ref stage
        captured[train_dir] = {e["key"]: (e["ref_chosen_logps"], e["ref_rejected_logps"]) for e in examples}
        raise KeyboardInterrupt

    monkeypatch.setattr(offline.dpo, "run", stop_before_training)
    rows = read_rows(root)
    data = tmp_path / "data" / "train-0.parquet"
    write_rows(data, rows)
    c = offline_config(root, model_dir, data)
    with pytest.raises(KeyboardInterrupt):
        offline.run(c, str(tmp_path / "a"))
    first = captured.pop(str(tmp_path / "a" / "train"))
    # the user edits the file: a row removed (every later row moves up), an answer changed
    edited = rows[1:]
    edited[4] = dict(edited[4], chosen=edited[4]["chosen"] + " there")
    write_rows(data, edited)
    with pytest.raises(KeyboardInterrupt):
        offline.run(c, str(tmp_path / "a"))
    resumed = captured.pop(str(tmp_path / "a" / "train"))
    with pytest.raises(KeyboardInterrupt):
        offline.run(c, str(tmp_path / "b"))  # a fresh workdir on the edited file: the truth
    fresh = captured.pop(str(tmp_path / "b" / "train"))
    assert resumed == fresh  # same keys, same log-probs: nothing taken from another row
    assert len(fresh) == 23 and len(set(fresh) & set(first)) == 22  # 22 reused, 1 new, 2 dropped
    ref_keys = {r["key"] for r in records.read_stage(str(tmp_path / "a" / "ref_logps"))}
    assert len(ref_keys) == 25  # the old rows' records stay, keyed by content, never by position


def test_changed_data_refuses_to_resume_training(trained):
    c, work, data, _ = trained
    write_rows(data, read_rows(data.parent)[2:])
    with pytest.raises(InputError, match=r"training started on other pairs \(24\) than this run has \(22\)"):
        offline.run(c, str(work))
