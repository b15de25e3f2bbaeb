"""One config vocabulary: offline DPO's former field names (``train.*``, ``policy.compute_dtype``, ...)
and the former online selection metric still work for one release, with one deprecation line, and a
workdir saved under them resumes."""
import json
import logging
import subprocess
import sys

import ml_collections
import pytest

from configs import default, offline_dpo
from rlaifv_jax.core import vocabulary, workdir as workdir_lib
from rlaifv_jax.core.errors import ConfigError
from smoke_runs import ROOT, child_env


def _old_offline() -> ml_collections.ConfigDict:
    """configs/offline_dpo.py as it was written before the rename."""
    flat = vocabulary._flatten(offline_dpo.get_config().to_dict())
    back = {new: old for old, new in vocabulary.DEPRECATED.items()}
    return ml_collections.ConfigDict(vocabulary.nest({back.get(k, k): v for k, v in flat.items()}))


def test_old_offline_names_map_to_the_canonical_config_with_one_line(caplog):
    old = _old_offline()
    assert "train" in old and "compute_dtype" in old.policy and "batch_size" not in old.dpo
    with caplog.at_level(logging.WARNING, logger=vocabulary.__name__):
        new = vocabulary.canonicalize(old)
    assert new.to_dict() == offline_dpo.get_config().to_dict()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "train.global_batch_size -> dpo.batch_size" in lines[0], lines


def test_canonical_config_is_returned_unchanged(caplog):
    c = default.get_config()
    with caplog.at_level(logging.WARNING, logger=vocabulary.__name__):
        assert vocabulary.canonicalize(c) is c
    assert not caplog.records


def test_old_selection_metric_name_maps_to_the_shared_one():
    c = default.get_config()
    c.eval.select_metric = "chair_mention"
    assert vocabulary.canonicalize(c).eval.select_metric == "mention_hall"


def test_both_names_of_one_field_with_different_values_are_refused():
    with pytest.raises(ConfigError, match="train.num_epochs=3 .deprecated. and dpo.epochs=4"):
        vocabulary.canonical_fields({"train.num_epochs": 3, "dpo.epochs": 4})


def test_workdir_saved_with_old_names_resumes_and_still_refuses_a_changed_result(tmp_path):
    work = str(tmp_path / "w")
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "config.json").write_text(json.dumps(_old_offline().to_dict()))
    assert workdir_lib.check_or_save_config(offline_dpo.get_config(), work) == {}
    c = offline_dpo.get_config()
    c.dpo.epochs = 1
    with pytest.raises(ConfigError, match="dpo.epochs: workdir has 4, this run has 1"):
        workdir_lib.check_or_save_config(c, work)


def test_old_override_name_is_renamed_on_the_command_line(tmp_path):
    """``--config.train.num_epochs=2`` reaches ml_collections as ``dpo.epochs`` (a subprocess: importing
    rlaifv_jax.main defines absl flags that other CLIs in the same process would then require)."""
    proc = subprocess.run([sys.executable, "-m", "rlaifv_jax.main", "--config", "configs/offline_dpo.py",
                           "--workdir", str(tmp_path / "w"), "--config.train.num_epochs=2", "--config.dpo.beta=0.2"],
                          cwd=ROOT, env=child_env(), capture_output=True,
                          text=True, timeout=300)
    assert "train.num_epochs -> dpo.epochs" in proc.stderr
    assert proc.returncode == 2 and "data.path is empty" in proc.stderr, proc.stderr  # parsed, then validated
    assert "bad --config override" not in proc.stderr


def test_workdir_saved_before_fields_were_added_resumes_at_their_former_behaviour(tmp_path):
    """A config.json without the fields added since (dpo.remat, the DPO dtypes, labeler.answer_prefix,
    the continuous-batching slots) resumes when they hold what the code did before; another value of
    a result field is still refused."""
    work = tmp_path / "w"
    work.mkdir()
    old = default.get_config().to_dict()
    for section, name in (("dpo", "remat"), ("dpo", "master_dtype"), ("dpo", "optimizer_state_dtype"),
                          ("labeler", "answer_prefix"), ("sampling", "decode_rows"), ("claims", "decode_rows")):
        del old[section][name]
    (work / "config.json").write_text(json.dumps(old))
    c = default.get_config()
    c.claims.decode_rows = 64  # a run setting: accepted as a change
    assert workdir_lib.check_or_save_config(c, str(work)) == {"claims.decode_rows": (0, 64)}
    c.dpo.master_dtype = "bfloat16"
    with pytest.raises(ConfigError, match="dpo.master_dtype: workdir has 'float32', this run has 'bfloat16'"):
        workdir_lib.check_or_save_config(c, str(work))
