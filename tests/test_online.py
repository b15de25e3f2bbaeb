"""The online loop end to end: the smoke config, SIGKILL at many moments then resume, a prompt file
full of bad records on tiny Hugging Face models, and refused configs."""
import base64
import io
import json
import os
import random
import signal
import subprocess
import time

import numpy as np
import pytest
from PIL import Image

import tiny_hf
from smoke_runs import ROOT, child_env, run_to_end, smoke_command
from configs import default
from offline_data import policy_params
from rlaifv_jax.pipelines import online
from rlaifv_jax.core import records
from rlaifv_jax.core.workdir import check_or_save_config

STAGES = ("samples", "claims", "labels", "pairs", "ref_logps")


def _metrics(workdir):
    with open(os.path.join(workdir, "summary.json")) as f:
        return [{k: v for k, v in e.items() if k != "wall_s"} for e in json.load(f)]


def test_smoke_run_contract(smoke_reference):
    workdir, stdout = smoke_reference
    summary = json.load(open(workdir / "summary.json"))
    assert [e["iteration"] for e in summary] == [0, 1, 2]
    for e in summary:
        for key in ("chair_response", "chair_mention", "recall"):
            assert 0.0 <= e[key] <= 1.0
        assert e["pairs"] >= 0 and e["wall_s"] > 0
    assert "RLAIF-V summary" in stdout and "CHAIR ment" in stdout
    assert (workdir / "hallucination.png").stat().st_size > 1000
    lines = (workdir / "summary.jsonl").read_text().splitlines()
    assert [json.loads(line)["iteration"] for line in lines] == [0, 1, 2]
    assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))
    for k in range(2):
        for stage in STAGES:
            assert records.stage_done(str(workdir / f"iter_{k:02d}" / stage))
        samples = records.read_stage(str(workdir / f"iter_{k:02d}" / "samples"))
        assert len(samples) == default.get_config("smoke").world.n_prompts
    cfg = json.load(open(workdir / "export" / "config.json"))
    assert cfg["architectures"] == ["LlavaForConditionalGeneration"]
    for name in ("tokenizer.json", "preprocessor_config.json", "model.safetensors"):
        assert (workdir / "export" / name).exists(), name
    assert not (workdir / "iter_00" / "train" / "checkpoints").exists()  # superseded by checkpoints/1


def _wait_and_kill(proc, path, delay):
    deadline = time.time() + 600
    while not os.path.exists(path):
        if proc.poll() is not None or time.time() > deadline:
            return False
        time.sleep(0.05)
    time.sleep(delay)
    if proc.poll() is not None:
        return False
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return True


def test_measure_through_continuous_slots_gives_the_same_metrics(smoke_reference):
    """``eval.decode_rows``: the held-out captions decoded through 5 continuous-batching slots give
    the same CHAIR, recall, yes/no accuracy and example captions as static batches."""
    from rlaifv_jax.core.sharding import serve_mesh
    from rlaifv_jax.data import toy_world
    from rlaifv_jax.stages import bundle, measure
    workdir, _ = smoke_reference
    world = toy_world.WorldSettings(caption_partner_rate=default.get_config("smoke").world.caption_partner_rate)
    records = toy_world.eval_split(world, 24, 0)
    mesh = serve_mesh()
    with bundle.loaded(bundle.ModelSettings(os.path.join(workdir, "warmstart"), toy=True), mesh) as b:
        static, slots = (measure.measure_toy(b, records, world, measure.MeasureSettings(batch_size=16, decode_rows=rows),
                                             mesh) for rows in (None, 5))
    assert static == slots
    assert static["recall"] > 0.1  # the warm-started policy names objects in the images: equal captions mean something


def test_sigkill_anywhere_then_resume_equals_uninterrupted(smoke_reference, tmp_path, smoke_warmstart):
    ref_dir, _ = smoke_reference
    smoke_warmstart(tmp_path)
    rng = random.Random(1234)
    # Each target path appears at a different moment; "checkpoints/1" lands between the policy
    # checkpoint and the summary write, "iter_00/train" inside DPO (a checkpoint every epoch).
    # Iteration 1 repeats iteration 0's stages, so its kills are in the stages not hit before.
    targets = ["eval/00", "iter_00/samples", "iter_00/labels", "iter_00/train", "checkpoints/1",
               "iter_01/claims", "iter_01/ref_logps"]
    kills = 0
    for target in targets:
        proc = subprocess.Popen(smoke_command(tmp_path), cwd=ROOT, env=child_env(), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        kills += _wait_and_kill(proc, tmp_path / target, rng.uniform(0.0, 1.5))
        if proc.poll() is None:
            proc.kill()
    assert kills >= 5
    run_to_end(tmp_path)
    got, want = _metrics(tmp_path), _metrics(ref_dir)
    assert [e["pairs"] for e in got] == [e["pairs"] for e in want]
    for a, b in zip(got, want):
        for key in ("chair_response", "chair_mention", "recall", "yesno_accuracy"):
            assert a[key] == pytest.approx(b[key], abs=1e-9), key
        for key in ("dpo_reward_accuracy", "dpo_reward_margin", "dpo_loss"):
            assert a.get(key) == pytest.approx(b.get(key), abs=1e-5), key
    for k in range(2):
        for stage in STAGES:
            mine = records.read_stage(str(tmp_path / f"iter_{k:02d}" / stage))  # raises on duplicates
            theirs = records.read_stage(str(ref_dir / f"iter_{k:02d}" / stage))
            assert [r["key"] for r in mine] == [r["key"] for r in theirs]  # no gaps
            if stage in ("samples", "pairs"):
                assert mine == theirs
        refs = records.read_stage(str(tmp_path / "iter_00" / "ref_logps"))
        want_refs = records.read_stage(str(ref_dir / "iter_00" / "ref_logps"))
        for a, b in zip(refs, want_refs):
            assert a.get("ref_chosen_logps", 0) == pytest.approx(b.get("ref_chosen_logps", 0), abs=1e-4)


def _png_b64(rgb):
    buf = io.BytesIO()
    Image.fromarray(np.full((40, 30, 3), rgb, np.uint8)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_prompt_file_with_bad_records_runs_and_reports(tmp_path):
    from transformers import CLIPImageProcessor
    policy, splitter = tmp_path / "policy", tmp_path / "splitter"
    tiny_hf.llava(policy)
    tiny_hf.llama(splitter, seed=1)
    for d in (policy, splitter):
        tiny_hf.word_tokenizer(d)
    CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}).save_pretrained(str(policy))
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(tmp_path / "ok.png")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    lines = [json.dumps({"id": "a", "image_path": "ok.png", "question": "describe the image ."}),
             json.dumps({"id": "b", "image": _png_b64((200, 10, 10)), "question": "describe the image ."}),
             json.dumps({"id": "c", "image_path": "missing.png", "question": "describe the image ."}),
             json.dumps({"id": "d", "image_path": "broken.png", "question": "describe the image ."}),
             json.dumps({"id": "e", "image_path": "ok.png", "question": "   "}),
             "{not json",
             json.dumps({"id": "f", "image": "%%%not-base64", "question": "describe the image ."}),
             json.dumps({"id": "g", "image_path": "ok.png", "question": "<image>\ndescribe the image ."}),  # LLaVA data
             json.dumps({"id": "h", "image_path": "ok.png", "question": "describe the <image> image ."})]
    (tmp_path / "prompts.jsonl").write_text("\n".join(lines) + "\n")
    c = default.get_config("smoke")
    c.source, c.prompts.path, c.policy.path = "files", str(tmp_path / "prompts.jsonl"), str(policy)
    c.claims.kind, c.claims.split_path = "llm", str(splitter)
    c.iterations, c.progress, c.sampling.max_new_tokens = 1, False, 6
    workdir = tmp_path / "run"
    summary = online.run(c, str(workdir))
    assert [e["iteration"] for e in summary] == [0, 1]
    report = json.load(open(workdir / "report.json"))["prompt_file"]
    assert report["kept"] == 4
    assert report["skipped"] == {"missing_image": 1, "corrupt_image": 2, "empty_question": 1, "malformed_line": 1}
    assert any(p.startswith("line 3: missing_image") for p in report["problems"])
    claims = records.read_stage(str(workdir / "iter_00" / "claims"))
    assert sorted(r["key"] for r in claims) == ["a", "b", "g", "h"]
    statuses = [c["status"] for r in claims for c in r["claims"]]
    assert len(statuses) == 3 * c.sampling.num_samples  # every response accounted for
    # this word-level vocabulary maps the text <image> to the image id: h is a named skip, not a crash
    samples = {r["key"]: r for r in records.read_stage(str(workdir / "iter_00" / "samples"))}
    assert samples["h"]["warnings"] == ["image_token_in_text"] and samples["h"]["responses"] == []
    assert len(samples["g"]["responses"]) == c.sampling.num_samples and samples["g"]["fingerprint"]
    marker = records.read_marker(str(workdir / "iter_00" / "claims"), 0)
    assert sum(marker["warnings"].values()) == sum(s != "ok" for s in statuses)


def test_workdir_refuses_another_config(tmp_path):
    c = default.get_config("smoke")
    check_or_save_config(c, str(tmp_path))
    check_or_save_config(c, str(tmp_path))  # same config: fine
    c.sampling.temperature = 1.3
    c.progress = False  # may change freely
    with pytest.raises(ValueError, match=r"sampling.temperature: workdir has 0.7, this run has 1.3"):
        check_or_save_config(c, str(tmp_path))


def test_invalid_config_names_every_field(tmp_path):
    c = default.get_config("smoke")
    c.sampling.num_samples, c.claims.kind, c.dpo.loss_type = 1, "llm", "nope"
    with pytest.raises(ValueError) as e:
        online.run(c, str(tmp_path))
    msg = str(e.value)
    for field in ("sampling.num_samples", "claims.kind", "dpo.loss_type"):
        assert field in msg
    assert not os.path.exists(tmp_path / "config.json")


def check_selection(ref_dir, workdir, monkeypatch):
    """Iteration 1 of the smoke run (stages up to the reference log-probs reused from ``ref_dir``)
    with ``eval.every_epochs=0.25`` (4 epochs of one step each: 4 candidates): a crash during the second
    candidate's evaluation,
    a rerun that evaluates only the rest, the argmin of CHAIR selected, and checkpoints/1 and the
    export holding exactly the selected candidate's weights."""
    import shutil
    from flax import nnx
    from rlaifv_jax.core.tree import flat_values
    from rlaifv_jax.models import hf
    from rlaifv_jax.stages import measure, select
    for d in ["warmstart", "eval/00"] + [f"iter_00/{s}" for s in STAGES + ("encoded",)]:
        shutil.copytree(os.path.join(ref_dir, d), os.path.join(workdir, d))
    c = default.get_config("smoke")
    c.iterations, c.progress, c.eval.every_epochs = 1, False, 0.25
    monkeypatch.setattr(select, "discard_candidates", lambda select_dir: None)  # keep candidates
    real, calls = measure.measure_toy, []

    def counted(*args, **kwargs):
        calls.append(1)
        if crash and len(calls) == 2:  # killed during the second candidate's evaluation
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(measure, "measure_toy", counted)
    crash = True
    with pytest.raises(KeyboardInterrupt):
        online.run(c, str(workdir))
    sel_dir = os.path.join(workdir, "iter_00", "train", "select")
    assert [n for n in sorted(os.listdir(sel_dir)) if records.stage_done(os.path.join(sel_dir, n))] == ["step_000001"]
    crash, calls[:] = False, []
    entries = online.run(c, str(workdir))
    chosen = json.load(open(os.path.join(sel_dir, "selection.json")))
    rows = {r["step"]: r for r in chosen["checkpoints"]}
    assert len(rows) >= 3 and max(rows) == chosen["last_step"]
    assert len(calls) == len(rows) - 1 + 1  # the other candidates, then eval/01; never the finished one
    best = rows[chosen["selected_step"]]
    assert best["chair_mention"] == min(r["chair_mention"] for r in rows.values()) <= \
        rows[chosen["last_step"]]["chair_mention"]
    assert entries[1]["selected_step"] == chosen["selected_step"]
    assert entries[1]["checkpoint_evals"] == chosen["checkpoints"]
    for key in ("chair_mention", "chair_response", "recall", "yesno_accuracy"):  # eval/01 is the selected one
        assert entries[1][key] == best[key], key
    ours = policy_params(os.path.join(workdir, "checkpoints"), 1)  # the next iteration's starting policy
    theirs = policy_params(os.path.join(sel_dir, "candidates"), chosen["selected_step"])
    assert ours.keys() == theirs.keys()
    for k in ours:
        np.testing.assert_array_equal(ours[k], theirs[k], err_msg=k)
    exported = flat_values(nnx.state(hf.load_pretrained(os.path.join(workdir, "export")), nnx.Param))
    for k in ours:
        np.testing.assert_array_equal(np.asarray(exported[k]), ours[k], err_msg=k)
    if chosen["selected_step"] != chosen["last_step"]:
        last = policy_params(os.path.join(sel_dir, "candidates"), chosen["last_step"])
        assert any(not np.array_equal(ours[k], last[k]) for k in ours)
    return chosen


def test_checkpoint_selection_resumes_and_keeps_the_selected_weights(smoke_reference, tmp_path, monkeypatch):
    check_selection(smoke_reference[0], tmp_path, monkeypatch)
