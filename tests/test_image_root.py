"""Image paths confined to an image root, bad bytes named by line (issue 20)."""
import json
import os

import numpy as np
from PIL import Image

from rlaifv_jax.data import prompts
from rlaifv_jax.pipelines import offline


def _png(path):
    Image.fromarray(np.full((8, 8, 3), 120, np.uint8)).save(path)
    return str(path)


def _layout(tmp_path):
    data = tmp_path / "data"
    (data / "img").mkdir(parents=True)
    _png(data / "img" / "ok.png")
    outside = _png(tmp_path / "secret.png")
    os.symlink(outside, data / "img" / "link.png")  # a symlink inside the root that leads out of it
    return data, outside


def test_prompt_image_paths_outside_the_root_are_counted_skips(tmp_path):
    data, outside = _layout(tmp_path)
    rows = [{"id": "a", "image_path": "img/ok.png", "question": "q ?"},
            {"id": "b", "image_path": "../secret.png", "question": "q ?"},
            {"id": "c", "image_path": outside, "question": "q ?"},
            {"id": "d", "image_path": "img/link.png", "question": "q ?"},
            {"id": "e", "image_path": "img/../img/ok.png", "question": "q ?"}]
    lines = [json.dumps(r).encode() for r in rows]
    lines.insert(2, '{"id": "f", "image_path": "img/ok.png", "question": "caf\u00e9 ?"}'.encode("latin-1"))
    path = data / "prompts.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    good, report = prompts.read_prompt_file(str(path))
    assert [r["id"] for r in good] == ["a", "e"]
    assert report.skipped == {"outside_image_root": 3, "not_utf8": 1}
    assert any(p.startswith("line 3: not_utf8") for p in report.problems), report.problems
    assert any(p.startswith("line 2: outside_image_root") and "../secret.png" in p for p in report.problems)
    good, report = prompts.read_prompt_file(str(path), allow_outside_root=True)
    assert [r["id"] for r in good] == ["a", "b", "c", "d", "e"]
    good, report = prompts.read_prompt_file(str(path), image_root=str(tmp_path))  # a configured root
    assert [r["id"] for r in good] == ["c"] and report.skipped["missing_image"] == 3  # data/../ is outside data


def test_offline_image_paths_outside_the_root_are_counted_skips(tmp_path):
    data, outside = _layout(tmp_path)
    base = {"question": "q ?", "chosen": "a", "rejected": "b"}
    rows = [dict(base, image_path="img/ok.png"), dict(base, image_path="../secret.png"),
            dict(base, image_path=outside), dict(base, image={"path": "img/link.png"})]
    (data / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    pairs, skipped, named = offline.read_pairs([str(data / "pairs.jsonl")])
    assert len(pairs) == 1 and skipped == {"image_outside_root": 3}
    assert named[0].endswith("pairs.jsonl:1: image_outside_root")
    pairs, skipped, _ = offline.read_pairs([str(data / "pairs.jsonl")], allow_outside_root=True)
    assert len(pairs) == 4 and not skipped
