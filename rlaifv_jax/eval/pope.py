"""POPE (Li et al. 2023): yes/no object-existence questions, one file per split.

``--data`` is one of its JSONL files (``coco_pope_{random,popular,adversarial}.json``: one
``{"question_id", "image", "text", "label"}`` per line; LLaVA's merged file adds ``category``).
The split of a question is its ``category`` when present, else the file name's last ``_`` part.
Answers are read as POPE's and LLaVA's ``eval_pope.py`` read them: keep the text before the first
``.``, remove commas, split on spaces; ``No``, ``no`` or ``not`` among the words means "no",
anything else "yes". Per split (and over all splits when there are several): accuracy, precision,
recall and F1 of "yes", and the share of "yes" answers.
"""
from __future__ import annotations

import collections
import os
from typing import Any

from rlaifv_jax.eval.questions import Question, check_unique, image_path, read_jsonl, require

NAME = "pope"
DECODING = {"num_beams": 1, "max_new_tokens": 128}  # LLaVA's model_vqa_loader: greedy, 128 tokens


def load(path: str, images: str | None = None) -> list[Question]:
    """The questions of a POPE JSONL file; ``images`` is the directory of its COCO images."""
    if os.path.isdir(path):
        raise ValueError(f"{path}: POPE --data is one of its JSONL files, not a directory")
    default_split = os.path.splitext(os.path.basename(path))[0].split("_")[-1]
    questions = []
    for n, rec in read_jsonl(path, "a POPE question file"):
        where = f"{path}:{n}"
        require(rec, {"question_id": (int, str), "image": str, "text": str, "label": str}, where)
        label = rec["label"].strip().lower()
        if label not in ("yes", "no"):
            raise ValueError(f"{where}: label must be 'yes' or 'no', got {rec['label']!r}")
        questions.append(Question(str(rec["question_id"]), rec["text"], image_path(images, rec["image"]),
                                  {"label": label, "split": str(rec.get("category") or default_split)}))
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
