"""Stage inputs keyed by content online (issue 20): editing the prompts between runs is refused in
one line saying what changed, or recomputes exactly the affected records of every stage."""
import os

import numpy as np
import pytest

from rlaifv_jax.core import records
from rlaifv_jax.core.errors import InputError
from rlaifv_jax.stages import provenance, runner


def _prompts(questions):
    return [{"id": f"p{i}", "question": q, "image": np.full((4, 4, 3), i, np.uint8)} for i, q in enumerate(questions)]


def _run_iteration(it, prompts, calls):
    """The prompt-keyed and pair-keyed stages of one iteration, as the online loop chains them."""
    fps = provenance.fingerprints_of(prompts, step=0)

    def sample_fn(chunk):
        calls["samples"] += len(chunk)
        return [{"question": p["question"], "responses": [p["question"] + " r"], "fingerprint": fps[p["id"]]}
                for p in chunk]

    samples = runner.run(os.path.join(it, "samples"), prompts, runner.plain(sample_fn), chunk_size=2,
                         desc="samples", progress=False, key_fn=lambda p: p["id"])

    def stage(name, make):
        def fn(chunk):
            calls[name] += len(chunk)
            return [make(r) for r in chunk]
        return fn

    claims = runner.run(os.path.join(it, "claims"), samples, runner.plain(stage("claims", lambda r: {"claims": []})),
                        chunk_size=2, desc="claims", progress=False)
    pairs = runner.run(os.path.join(it, "pairs"), claims, runner.plain(stage(
        "pairs", lambda r: {"pairs": [{"pair_id": r["key"] + "-0", "prompt_id": r["key"]}]})),
        chunk_size=2, desc="pairs", progress=False)
    flat = [{"key": p["pair_id"]} for r in pairs for p in r["pairs"]]
    runner.run(os.path.join(it, "encoded"), flat, runner.plain(stage("encoded", lambda r: {"ids": [1]})),
               chunk_size=2, desc="encoded", progress=False)
    return fps


def test_edited_prompts_are_refused_or_exactly_recomputed(tmp_path):
    it = str(tmp_path / "iter_00")
    questions = [f"question {i}" for i in range(7)]
    calls = {k: 0 for k in ("samples", "claims", "pairs", "encoded")}
    fps = _run_iteration(it, _prompts(questions), calls)
    assert calls == {"samples": 7, "claims": 7, "pairs": 7, "encoded": 7}
    assert not provenance.reconcile(it, fps, "refuse")  # unchanged inputs: every record reused

    # the user edits the file in place: 5 of 7 prompts removed, one of the 2 left has a new question
    edited = _prompts(questions)[:2]
    edited[1]["question"] = "another question"
    fps = provenance.fingerprints_of(edited, step=0)
    with pytest.raises(InputError) as refused:
        provenance.reconcile(it, fps, "refuse")
    message = str(refused.value)
    assert "\n" not in message and "1 changed (p1)" in message and "5 removed (p2, p3, p4, p5, p6)" in message
    assert "on_input_change=recompute" in message
    assert len(records.read_stage(os.path.join(it, "samples"))) == 7  # refusing touched nothing

    changes = provenance.reconcile(it, fps, "recompute")
    assert changes.changed == ("p1",) and len(changes.removed) == 5
    assert sorted(r["key"] for r in records.read_stage(os.path.join(it, "encoded"))) == ["p0-0"]
    calls = {k: 0 for k in calls}
    _run_iteration(it, edited, calls)
    assert calls == {"samples": 1, "claims": 1, "pairs": 1, "encoded": 1}  # exactly the changed prompt redone
    samples = {r["key"]: r for r in records.read_stage(os.path.join(it, "samples"))}
    assert sorted(samples) == ["p0", "p1"] and samples["p1"]["question"] == "another question"
    assert not provenance.reconcile(it, fps, "refuse")


def test_new_image_or_policy_step_changes_the_fingerprint():
    p = _prompts(["q"])[0]
    base = provenance.prompt_fingerprint(p, 0)
    assert provenance.prompt_fingerprint(dict(p, image=p["image"] + 1), 0) != base
    assert provenance.prompt_fingerprint(p, 1) != base
    assert provenance.prompt_fingerprint(dict(p), 0) == base


def test_added_prompts_after_a_finished_stage_are_a_change_but_resume_is_not(tmp_path):
    it = str(tmp_path / "iter_00")
    calls = {k: 0 for k in ("samples", "claims", "pairs", "encoded")}
    _run_iteration(it, _prompts(["a", "b"]), calls)
    fps = provenance.fingerprints_of(_prompts(["a", "b", "c"]), step=0)
    with pytest.raises(InputError, match="1 new"):
        provenance.reconcile(it, fps, "refuse")
    provenance.reconcile(it, fps, "recompute")
    calls = {k: 0 for k in calls}
    _run_iteration(it, _prompts(["a", "b", "c"]), calls)
    assert calls == {"samples": 1, "claims": 1, "pairs": 1, "encoded": 1}
    with pytest.raises(Exception, match="on_input_change"):
        provenance.reconcile(it, fps, "sometimes")
