"""A new user's mistakes: one-line errors from the command line (exit 2, nothing written), every bad
field named by validation before the workdir is touched, a corrected command starting on the same
workdir, resume with changed run settings, strict-JSON summaries and honest reports."""
import base64
import importlib.util
import io
import json
import os
import subprocess

import jax
import numpy as np
import pytest
from PIL import Image
from transformers import CLIPImageProcessor

import tiny_hf
from smoke_runs import ROOT, child_env, smoke_command
from configs import default
from rlaifv_jax.core import workdir as workdir_lib
from rlaifv_jax.core.errors import ConfigError
from rlaifv_jax.pipelines import report, spec, summary, validate



def _cli(tmp_path, *args):
    work = tmp_path / "work"
    proc = subprocess.run(smoke_command(work, *args), cwd=ROOT, env=child_env(), capture_output=True, text=True,
                          timeout=300)
    return proc, work


@pytest.mark.parametrize("arg, expected", [
    ("--config.dpo.loss_typ=ipo", "no field 'dpo.loss_typ'; did you mean --config.dpo.loss_type"),
    ("--config.dpo.beta=abc", "--config.dpo.beta=abc: could not convert string to float: 'abc'; dpo.beta takes a "
                             "float (e.g. 0.2)"),
    ("--config.dpo.loss_type=sigmoidd", "dpo.loss_type='sigmoidd' must be one of 'sigmoid', 'ipo', 'hinge', 'robust'"),
])
def test_cli_mistakes_are_one_line_and_write_nothing(tmp_path, arg, expected):
    proc, work = _cli(tmp_path, arg)
    output = (proc.stdout + proc.stderr).strip().splitlines()
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(output) <= 8 and "Traceback" not in proc.stderr, output
    assert expected in proc.stderr, proc.stderr
    assert not work.exists() or not os.listdir(work)


def test_a_config_argument_it_does_not_know_is_one_line(tmp_path):
    """A paper config asked for a slice it has no decode batches for: the config's own error, one line."""
    work = tmp_path / "work"
    proc = subprocess.run([*smoke_command(work)[:3], "--config", "configs/llava15_7b_self.py:v9-8", "--workdir",
                           str(work)], cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1].startswith(
        "error: --config=configs/llava15_7b_self.py:v9-8: ValueError: no decode batches for slice 'v9-8'")
    assert not work.exists()


def test_cli_debug_shows_the_traceback(tmp_path):
    proc, work = _cli(tmp_path, "--config.mesh.fsdp=3", "--debug")
    assert proc.returncode == 2 and "Traceback" in proc.stderr
    assert "mesh (data, fsdp, tensor)=(1, 3, 1) does not fit the 1 devices" in proc.stderr.splitlines()[-1]
    assert not work.exists()


def test_validation_names_every_problem_in_one_line_each(tmp_path):
    c = default.get_config("smoke")
    c.mesh.fsdp, c.dpo.batch_size = 8, 12  # 8 fake devices: batch 12 does not split 8 ways
    c.dpo.max_length, c.sampling.top_p, c.pairs.length_ratio = 20, 1.5, 0.33
    c.dpo.checkpoints_per_epoch = 0
    with pytest.raises(ConfigError) as e:
        validate.validate(c, "online")
    lines = str(e.value).splitlines()
    assert lines[0] == "invalid config:"
    assert [ln.strip().split("=")[0].split(" ")[0] for ln in lines[1:]] == [
        "dpo.checkpoints_per_epoch", "sampling.top_p", "pairs.length_ratio", "dpo.batch_size", "dpo.max_length"], lines
    assert "dpo.batch_size=12 must be a multiple of the data-parallel size 8" in str(e.value)
    assert "the policy's image alone takes 16 tokens" in str(e.value)
    c = default.get_config("smoke")
    c.mesh.data = 3
    with pytest.raises(ConfigError, match=r"does not fit the 8 devices"):
        validate.validate(c, "online")
    assert not os.listdir(tmp_path)


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed")
def test_wandb_without_the_package_is_a_config_error():
    c = default.get_config("smoke")
    c.log.wandb = True
    with pytest.raises(ConfigError, match=r"log.wandb=True but the wandb package is not installed \(pip install"):
        validate.validate(c, "online")


def _files_setup(root):
    policy = root / "policy"
    tiny_hf.llava(policy)
    from offline_data import build_tokenizer
    build_tokenizer().save_pretrained(policy)
    CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}).save_pretrained(policy)
    split = root / "split"
    tiny_hf.llama(split)
    build_tokenizer().save_pretrained(split)
    buf = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(buf, format="PNG")
    image = base64.b64encode(buf.getvalue()).decode()
    good = json.dumps({"id": "a", "question": "what is in the image ?", "image": image})
    (root / "bad.jsonl").write_text('{"id": "x", "question": ""}\nnot json\n')
    (root / "good.jsonl").write_text(good + "\n")
    c = default.get_config("smoke")
    c.source, c.claims.kind, c.claims.split_path = "files", "llm", str(split)
    c.policy.path = str(policy)
    return c


def test_wrong_inputs_then_corrected_command_starts_on_the_same_workdir(tmp_path):
    c = _files_setup(tmp_path)
    work = str(tmp_path / "work")
    c.prompts.path = str(tmp_path / "bad.jsonl")  # no usable line
    with pytest.raises(ConfigError, match=r"bad.jsonl: no usable prompt"):
        spec.online_spec(c, work)
    c.prompts.path, c.policy.path = str(tmp_path / "good.jsonl"), str(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match=r"policy.path='.*nowhere' is not a directory"):
        spec.online_spec(c, work)
    assert not os.path.exists(work)  # nothing written: the corrected command is not "a different config"
    c.policy.path = str(tmp_path / "policy")
    c.dpo.sft_weight, c.dpo.checkpoints_per_epoch = 0.25, 3
    built = spec.online_spec(c, work)
    assert built.policy.path == c.policy.path
    assert built.dpo.train.loss.sft_weight == 0.25  # the online loop's DPO gets the optional SFT term
    assert built.dpo.checkpoints_per_epoch == 3
    assert workdir_lib.check_or_save_config(c, work) == {}


def test_resume_accepts_run_settings_and_refuses_result_settings_with_a_diff(tmp_path):
    c = default.get_config("smoke")
    work = str(tmp_path)
    workdir_lib.check_or_save_config(c, work)
    c.mesh.data, c.mesh.fsdp = 2, 4
    c.sampling.batch_size, c.labeler.batch_size, c.eval.batch_size, c.progress = 4, 16, 8, False
    c.slice = "v6e-8"  # the same workdir resumed on another slice, with that slice's batches
    changed = workdir_lib.check_or_save_config(c, work)
    assert changed == {"mesh.data": (1, 2), "mesh.fsdp": (-1, 4), "sampling.batch_size": (8, 4),
                       "labeler.batch_size": (64, 16), "eval.batch_size": (64, 8), "progress": (True, False),
                       "slice": ("", "v6e-8")}
    history = [json.loads(line) for line in open(tmp_path / "config_history.jsonl")]
    assert [h["event"] for h in history] == ["start", "resume"]
    assert history[1]["changed"]["mesh.fsdp"] == {"was": -1, "now": 4}
    assert json.load(open(tmp_path / "config.json"))["mesh"]["fsdp"] == 4  # the latest run settings
    c.dpo.beta, c.seed = 0.3, 1
    with pytest.raises(ConfigError) as e:
        workdir_lib.check_or_save_config(c, work)
    assert str(e.value).splitlines()[1:] == ["  dpo.beta: workdir has 0.2, this run has 0.3",
                                             "  seed: workdir has 0, this run has 1"]
    assert len(open(tmp_path / "config_history.jsonl").readlines()) == 2  # a refused run records nothing


def test_workdir_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(Exception, match=r"is a file, not a directory"):
        workdir_lib.check_or_save_config(default.get_config("smoke"), str(tmp_path / "f"))


def _entry(iteration, chair, recall, mentions, responses=10):
    return {"iteration": iteration, "chair_response": chair, "chair_mention": chair, "recall": recall,
            "n_mentions": mentions, "n_responses": responses}


def test_report_flags_collapse_instead_of_claiming_a_reduction(tmp_path, capsys):
    silent = [_entry(0, 0.5, 0.4, 30), _entry(1, 0.0, 0.0, 0)]  # a policy that says nothing
    report.write_report(str(tmp_path), silent, None)
    out = capsys.readouterr().out
    assert "relative reduction" not in out and "no hallucination reduction is claimed" in out
    assert "3.00 -> 0.00 object mentions per caption" in out and "recall collapsed: 40.0% -> 0.0%" in out
    assert json.load(open(tmp_path / "report.json"))["verdict"]["reduction"] is None
    honest = [_entry(0, 0.5, 0.4, 30), _entry(1, 0.25, 0.38, 28)]
    report.write_report(str(tmp_path), honest, None)
    assert "mention-level CHAIR 50.0% -> 25.0% (50% relative reduction)" in capsys.readouterr().out
    assert json.load(open(tmp_path / "report.json"))["verdict"] == {"reduction": 0.5, "flags": []}


def test_summary_is_strict_json(tmp_path):
    s = summary.Summary(str(tmp_path))
    s.put({"iteration": 1, "dpo_loss": float("nan"), "recall": 0.5, "nested": {"x": float("inf")}})
    text = (tmp_path / "summary.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text)[0] == {"iteration": 1, "dpo_loss": None, "recall": 0.5, "nested": {"x": None}}
    assert jax.process_index() == 0
