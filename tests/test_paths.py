"""core.paths: a gs:// workdir that cannot work fails at once in one line and creates nothing; the
cloud code paths (write, list, read, download cache) work end to end against a stand-in bucket."""
import json
import os

import numpy as np
import pytest
from etils import epath
from flax import nnx

import tiny_hf
from rlaifv_jax.core import paths, records
from rlaifv_jax.models import hf


def test_gs_workdir_without_backend_fails_in_one_line_and_creates_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(paths, "_BACKENDS", ("no_such_gcs_backend_module",))
    with pytest.raises(ValueError, match=r"gs://no-such-bucket/x: no Google Cloud Storage backend") as e:
        paths.check_workdir("gs://no-such-bucket/x")
    assert "\n" not in str(e.value)
    assert os.listdir(tmp_path) == []


class _Bucket:
    """A stand-in for epath's GCS backend whose bucket probe fails or reports no bucket."""

    def __init__(self, error=None):
        self.error = error

    def exists(self):
        if self.error:
            raise self.error
        return False


@pytest.mark.parametrize("error,match", [
    (RuntimeError("Anonymous caller does not have storage.buckets.get access\nfull response: {...}"),
     r"cannot access gs://b \(RuntimeError: Anonymous caller .*\); check the credentials"),
    (None, "bucket gs://b does not exist or is not visible"),
])
def test_gs_workdir_credentials_and_missing_bucket(tmp_path, monkeypatch, error, match):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(paths, "_BACKENDS", ("json",))  # any importable module: "a backend is installed"
    monkeypatch.setattr(paths, "as_path", lambda p: _Bucket(error))
    with pytest.raises(ValueError, match=match) as e:
        paths.check_workdir("gs://b/run")
    assert "\n" not in str(e.value)
    assert os.listdir(tmp_path) == []


def test_other_schemes_and_local_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="unsupported scheme s3://"):
        paths.check_workdir("s3://b/x")
    with pytest.raises(ValueError, match="no bucket name"):
        paths.check_workdir("gs:///x")
    assert paths.check_workdir("run") == str(tmp_path / "run")
    assert os.listdir(tmp_path) == []
    assert paths.abspath("gs://b/x") == "gs://b/x"


@pytest.fixture
def fake_gcs(tmp_path, monkeypatch):
    """``gs://bucket/...`` served from ``tmp_path/bucket`` through the cloud branch of ``paths``."""
    root = tmp_path / "gcs"
    root.mkdir()
    monkeypatch.setattr(paths, "as_path", lambda p: epath.Path(str(p).replace("gs://", f"{root}/")))
    monkeypatch.setenv("RLAIFV_CACHE", str(tmp_path / "cache"))
    return root


def test_cloud_branch_records_and_atomic_writes(fake_gcs):
    stage = "gs://bucket/run/sample"
    out = records.run_stage(stage, ["a", "b", "c"], lambda xs: [{"x": x} for x in xs], key_fn=str,
                            chunk_size=2, progress=False)
    assert out["share"] == 3
    assert sorted(paths.listdir(stage)) == ["_DONE.00000", "part-00000-000000.jsonl", "part-00000-000001.jsonl"]
    assert [r["x"] for r in records.read_stage(stage)] == ["a", "b", "c"] and records.stage_done(stage)
    paths.atomic_write_text("gs://bucket/run/report.json", json.dumps({"ok": 1}))
    assert json.loads(paths.read_text("gs://bucket/run/report.json")) == {"ok": 1}
    assert not [n for n in os.listdir(fake_gcs / "bucket" / "run") if n.startswith(paths.TMP_PREFIX)]


def test_hf_export_and_load_through_gs(tmp_path, fake_gcs):
    tiny_hf.llama(tmp_path / "hf")
    model = hf.load_pretrained(str(tmp_path / "hf"))
    hf.save_pretrained(model, "gs://bucket/export", shard_bytes=10_000, assets_from=str(tmp_path / "hf"))
    names = sorted(os.listdir(fake_gcs / "bucket" / "export"))
    weights = [n for n in names if n.endswith(".safetensors")]
    assert len(weights) > 1 and hf.INDEX_FILE in names and "config.json" in names and "generation_config.json" in names
    back = hf.load_pretrained("gs://bucket/export")
    assert len(os.listdir(tmp_path / "cache")) == len(weights)  # each weight file downloaded once
    want = dict(nnx.to_flat_state(nnx.state(model)))
    for p, v in nnx.to_flat_state(nnx.state(back)):
        np.testing.assert_array_equal(np.asarray(v.get_value()), np.asarray(want[p].get_value()))
