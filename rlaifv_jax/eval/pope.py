"""POPE (Li et al. 2023): yes/no object-existence questions, one file per split.

``--data`` is either

* one of POPE's label files (``output/coco/coco_pope_{random,popular,adversarial}.json``: one
  ``{"question_id", "image", "text", "label"}`` per line), the split being the file name's last
  ``_`` part, or a merged file of that shape with a ``category`` per line; or
* LLaVA's question file (``llava_pope_test.jsonl``: ``{"question_id", "image", "text",
  "category"}``, no label). Its labels come from POPE's ``coco_pope_{category}.json`` files in
  ``--labels DIR`` (default: ``coco/`` beside the question file, LLaVA's layout), joined as LLaVA's
  ``eval_pope.py`` joins them: by position, the k-th question of a category taking the k-th line of
  that category's label file. We check that both have as many lines and the same image at each
  position (``eval_pope.py`` would silently pair a shorter list).

Labels are read as the official scripts read them, except that a label other than ``yes``/``no``
(which they would count as "yes") is an error. Answers are read as POPE's ``evaluate.py`` and
LLaVA's ``eval_pope.py`` read them: keep the text before the first ``.``, remove commas, split on
spaces; ``No``, ``no`` or ``not`` among the words means "no", anything else "yes". Per split (and
over all splits when there are several): accuracy, precision, recall and F1 of "yes", and the share
of "yes" answers.
"""
from __future__ import annotations

import collections
import os
from typing import Any

from rlaifv_jax.eval.questions import Question, check_unique, image_path, read_jsonl, require

NAME = "pope"
DECODING = {"num_beams": 1, "max_new_tokens": 128}  # LLaVA's model_vqa_loader: greedy, 128 tokens


def _label(rec: dict, where: str) -> str:
    require(rec, {"label": str}, where)
    if rec["label"] not in ("yes", "no"):
        raise ValueError(f"{where}: label must be 'yes' or 'no', got {rec['label']!r}")
    return rec["label"]


def _join_labels(path: str, records: list[tuple[int, dict]], labels: str) -> list[str]:
    """Labels for LLaVA's question ``records``, positionally from ``labels/coco_pope_{category}.json``."""
    by_category: dict[str, list[int]] = collections.defaultdict(list)
    for k, (n, rec) in enumerate(records):
        require(rec, {"category": str}, f"{path}:{n} (a question file without labels)")
        by_category[rec["category"]].append(k)
    out = [""] * len(records)
    for category, positions in by_category.items():
        label_file = os.path.join(labels, f"coco_pope_{category}.json")
        rows = read_jsonl(label_file, f"POPE's label file for category {category!r}")
        if len(rows) != len(positions):
            raise ValueError(f"{label_file}: {len(rows)} labels but {path} has {len(positions)} {category!r} "
                             "questions; they are joined by position, as LLaVA's eval_pope.py does")
        for k, (n, row) in zip(positions, rows):
            if row.get("image") != records[k][1]["image"]:
                raise ValueError(f"{label_file}:{n}: image {row.get('image')!r} but {path}:{records[k][0]} asks about "
                                 f"{records[k][1]['image']!r}: the files are not in the same order")
            out[k] = _label(row, f"{label_file}:{n}")
    return out


def load(path: str, images: str | None = None, labels: str | None = None) -> list[Question]:
    """The questions of a POPE label file, or of LLaVA's question file labelled from ``labels``
    (default ``coco/`` beside it); ``images`` is the directory of their COCO images."""
    if os.path.isdir(path):
        raise ValueError(f"{path}: POPE --data is one of its JSONL files, not a directory")
    default_split = os.path.splitext(os.path.basename(path))[0].split("_")[-1]
    records = read_jsonl(path, "a POPE question file")
    for n, rec in records:
        require(rec, {"question_id": (int, str), "image": str, "text": str}, f"{path}:{n}")
    if records and all("label" not in rec for _, rec in records):
        if labels and not os.path.isdir(labels):
            raise ValueError(f"--labels {labels}: not a directory")
        label_dir = labels or os.path.join(os.path.dirname(os.path.abspath(path)), "coco")
        if not os.path.isdir(label_dir):
            raise ValueError(f"{path} has no labels (LLaVA's question file): pass --labels DIR holding POPE's "
                             "coco_pope_{adversarial,popular,random}.json")
        gold = _join_labels(path, records, label_dir)
    else:
        if labels:
            raise ValueError(f"{path} has its own labels; --labels is for LLaVA's question file only")
        gold = [_label(rec, f"{path}:{n}") for n, rec in records]
    questions = [Question(str(rec["question_id"]), rec["text"], image_path(images, rec["image"]),
                          {"label": label, "split": str(rec.get("category") or default_split)})
                 for (_, rec), label in zip(records, gold)]
    if not questions:
        raise ValueError(f"{path}: no questions")
    check_unique(questions, path)
    return questions


def parse_answer(text: str) -> str:
    """``"yes"`` or ``"no"`` by the POPE/LLaVA rule (see the module docstring)."""
    if "." in text:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if ("No" in words or "no" in words or "not" in words) else "yes"


def _rates(tp: int, fp: int, tn: int, fn: int) -> dict[str, Any]:
    n = tp + fp + tn + fn
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    return {"accuracy": (tp + tn) / n if n else 0.0, "precision": precision, "recall": recall,
            "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
            "yes_ratio": (tp + fp) / n if n else 0.0, "n": n, "tp": tp, "fp": fp, "tn": tn, "fn": fn}


def score(questions: list[Question], answers: dict[str, str]) -> tuple[dict[str, Any], dict[str, dict]]:
    """Metrics per split over the answered questions, and each answer's parsed reading."""
    counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    items = {}
    for q in questions:
        if q.id not in answers:
            continue
        pred = parse_answer(answers[q.id])
        gold = q.meta["label"]
        key = ("t" if pred == gold else "f") + ("p" if pred == "yes" else "n")
        for split in (q.meta["split"], "all"):
            counts[split][key] += 1
        items[q.id] = {"prediction": pred, "label": gold, "split": q.meta["split"]}
    metrics = {split: _rates(c["tp"], c["fp"], c["tn"], c["fn"]) for split, c in sorted(counts.items())}
    if len(metrics) == 2:  # one split: "all" repeats it
        metrics.pop("all")
    return metrics, items
