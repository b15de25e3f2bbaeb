"""Atomic resumable stages: interruption and resume, leftover temp files, two processes, markers;
host work one chunk ahead (``Prefetched``) and the device time each marker records."""
import json
import os
import threading
import time

import pytest

from rlaifv_jax.core import device_time, records
from rlaifv_jax.core.records import read_marker, read_stage, run_stage, stage_done

INPUTS = [{"id": f"x{i:03d}", "v": i} for i in range(23)]


def key_fn(x):
    return x["id"]


def square(batch):
    return [{"sq": x["v"] ** 2, **({"warnings": ["odd"]} if x["v"] % 2 else {})} for x in batch]


def run(stage_dir, fn=square, **kw):
    kw = {"key_fn": key_fn, "chunk_size": 4, "progress": False, **kw}
    return run_stage(str(stage_dir), INPUTS, fn, **kw)


def expected_records():
    return [{"key": x["id"], "sq": x["v"] ** 2, **({"warnings": ["odd"]} if x["v"] % 2 else {})} for x in INPUTS]


def test_uninterrupted_run_and_marker(tmp_path):
    summary = run(tmp_path / "s")
    assert read_stage(tmp_path / "s") == expected_records()
    assert sorted(os.listdir(tmp_path / "s")) == ["_DONE.00000"] + [f"part-00000-{c:06d}.jsonl" for c in range(6)]
    assert summary["share"] == 23 and summary["processed_this_run"] == 23
    assert summary["warnings"] == {"odd": 11}  # odd v in 0..22
    assert read_marker(tmp_path / "s") == summary and stage_done(tmp_path / "s")


def test_kill_and_resume_equals_uninterrupted(tmp_path):
    seen = []

    def crashing(batch):
        if len(seen) == 3:
            raise RuntimeError("killed")
        seen.append([x["id"] for x in batch])
        return square(batch)

    with pytest.raises(RuntimeError, match="killed"):
        run(tmp_path / "s", crashing)
    assert not stage_done(tmp_path / "s")
    assert len(read_stage(tmp_path / "s")) == 12  # three chunks of 4 were written
    resumed = []
    summary = run(tmp_path / "s", lambda b: (resumed.extend(x["id"] for x in b), square(b))[1])
    assert resumed == [x["id"] for x in INPUTS[12:]]  # only the missing inputs were processed
    assert summary["processed_this_run"] == 11 and summary["share"] == 23
    assert summary["warnings"] == {"odd": 11}  # counted over earlier and resumed records
    assert read_stage(tmp_path / "s") == expected_records()
    # Rerun with the marker present: skipped entirely.
    assert run(tmp_path / "s", lambda b: pytest.fail("stage should be skipped")) == summary


def test_crash_after_last_chunk_before_marker(tmp_path):
    run(tmp_path / "s")
    os.remove(tmp_path / "s" / "_DONE.00000")
    summary = run(tmp_path / "s", lambda b: pytest.fail("nothing left to do"))
    assert summary["processed_this_run"] == 0 and stage_done(tmp_path / "s")


def test_leftover_temp_file_ignored_and_cleaned(tmp_path):
    stage = tmp_path / "s"
    stage.mkdir()
    partial = '{"key": "x000", "sq": 0}\n{"key": "x0'  # half-written shard from a killed process
    (stage / ".tmp-part-00000-000000.jsonl.4242").write_text(partial)
    (stage / ".tmp-part-00001-000000.jsonl.4243").write_text(partial)  # another process's: not ours
    assert read_stage(stage) == []
    run(stage)
    assert not (stage / ".tmp-part-00000-000000.jsonl.4242").exists()
    assert (stage / ".tmp-part-00001-000000.jsonl.4243").exists()
    assert read_stage(stage) == expected_records()


def test_two_processes_split_the_work(tmp_path):
    stage = tmp_path / "s"
    calls = {0: [], 1: []}
    for p in (0, 1):
        def fn(batch, p=p):
            calls[p].extend(x["v"] for x in batch)
            return square(batch)
        run(stage, fn, process_index=p, process_count=2)
        assert stage_done(stage) == (p == 1)
    assert calls[0] == list(range(0, 23, 2)) and calls[1] == list(range(1, 23, 2))
    assert read_marker(stage, 1)["warnings"] == {"odd": 11} and read_marker(stage, 0)["warnings"] == {}
    assert read_stage(stage) == expected_records()
    # Markers present: skipped. Without them, a rerun as one process finds every key written.
    assert run(stage, lambda b: pytest.fail("skipped"), process_index=1, process_count=2)["share"] == 11
    for p in (0, 1):
        os.remove(stage / f"_DONE.{p:05d}")
    s = run(stage, lambda b: pytest.fail("all keys exist"), process_index=0, process_count=1)
    assert s["processed_this_run"] == 0 and s["warnings"] == {"odd": 11}  # counted over both processes' shards
    assert stage_done(stage) and read_stage(stage) == expected_records()


def test_duplicates_and_bad_fn_outputs_raise(tmp_path):
    stage = tmp_path / "s"
    run(stage)
    dup = json.dumps({"key": "x005", "sq": 25}) + "\n"
    (stage / "part-00001-000000.jsonl").write_text(dup)
    with pytest.raises(ValueError, match="duplicate record keys.*x005"):
        read_stage(stage)
    with pytest.raises(ValueError, match="duplicate input keys"):
        run_stage(str(tmp_path / "d"), [{"id": "a"}, {"id": "a"}], square, key_fn=key_fn, chunk_size=2)
    with pytest.raises(ValueError, match="returned 1 records for 4"):
        run(tmp_path / "e", lambda b: square(b)[:1])
    with pytest.raises(ValueError, match="record key"):
        run(tmp_path / "f", lambda b: [{"key": "other"} for _ in b])


def test_resume_under_another_process_count_ignores_stale_markers(tmp_path):
    stage = tmp_path / "s"
    run(stage, square, process_index=0, process_count=2)  # process 1 of 2 never finished
    assert not stage_done(stage)
    seen = []
    s = run(stage, lambda b: seen.extend(x["v"] for x in b) or square(b), process_index=0, process_count=1)
    assert seen == list(range(1, 23, 2))  # exactly the missing share: nothing lost, nothing twice
    assert s["process_count"] == 1 and stage_done(stage) and read_stage(stage) == expected_records()
    # Back to 2 processes: the 1-process marker covers neither share, but every key is written.
    for p in (0, 1):
        assert run(stage, lambda b: pytest.fail("all keys exist"), process_index=p, process_count=2)["processed_this_run"] == 0
    assert stage_done(stage) and read_stage(stage) == expected_records()


def test_prefetched_prepares_the_next_chunk_while_the_current_one_runs(tmp_path):
    """A ``Prefetched`` chunk function writes what the plain one writes, in the same shards, and its
    prepare of chunk k + 1 runs while chunk k runs (chunk k waits for it: no clock involved)."""
    prepared = {}  # chunk index -> event set when its prepare has run

    def prepare(batch):
        k = batch[0]["v"] // 4
        prepared.setdefault(k, threading.Event()).set()
        return k, batch

    def run_chunk(item):
        k, batch = item
        if k + 1 <= (len(INPUTS) - 1) // 4:  # the next chunk's prepare runs meanwhile, on another thread
            assert prepared.setdefault(k + 1, threading.Event()).wait(timeout=60), f"chunk {k + 1} not prepared"
        return square(batch)

    summary = run(tmp_path / "s", records.Prefetched(prepare, run_chunk))
    assert read_stage(tmp_path / "s") == expected_records()
    assert sorted(os.listdir(tmp_path / "s")) == ["_DONE.00000"] + [f"part-00000-{c:06d}.jsonl" for c in range(6)]
    assert summary["processed_this_run"] == 23 and summary["device_seconds_this_run"] == 0
    assert records.device_idle(read_marker(tmp_path / "s")) is None  # no device program ran


@pytest.mark.parametrize("where", ["prepare", "run"])
def test_prefetched_errors_reach_the_caller_and_the_run_resumes(tmp_path, where):
    def prepare(batch):
        if where == "prepare" and batch[0]["v"] == 12:
            raise RuntimeError("bad image")
        return batch

    def run_chunk(batch):
        if where == "run" and batch[0]["v"] == 12:
            raise RuntimeError("device failed")
        return square(batch)

    with pytest.raises(RuntimeError, match="bad image" if where == "prepare" else "device failed"):
        run(tmp_path / "s", records.Prefetched(prepare, run_chunk))
    assert len(read_stage(tmp_path / "s")) == 12 and not stage_done(tmp_path / "s")
    summary = run(tmp_path / "s", records.Prefetched(lambda b: b, square))
    assert summary["processed_this_run"] == 11 and read_stage(tmp_path / "s") == expected_records()


def test_device_time_counts_nested_regions_once_and_gives_the_idle_fraction(tmp_path):
    def busy(batch):
        with device_time.device_work():
            with device_time.device_work():  # nested: counted once
                time.sleep(0.05)
        return square(batch)

    before = device_time.seconds()
    summary = run(tmp_path / "s", busy)
    counted = device_time.seconds() - before
    assert 6 * 0.05 <= counted <= summary["seconds_this_run"] + 1e-3
    assert summary["device_seconds_this_run"] == pytest.approx(counted, abs=2e-3)
    idle = records.device_idle(read_marker(tmp_path / "s"))
    assert idle == records.device_idle(summary)
    assert idle == pytest.approx(device_time.idle_fraction(summary["device_seconds_this_run"],
                                                           summary["seconds_this_run"]))
    assert 0.0 <= idle < 1.0
    assert device_time.idle_fraction(3.0, 4.0) == 0.25 and device_time.idle_fraction(5.0, 4.0) == 0.0
    assert device_time.idle_fraction(0.0, 0.0) == 0.0
    assert run(tmp_path / "s", square) == summary  # finished: nothing ran this time
