"""Reading ``--answers``: a JSONL file of ``{"id": ..., "answer": "..."}``, one per question.

``id`` is the question's own id (``image_id`` for Object HalBench, ``question_id`` for POPE, AMBER
and MMHal-Bench; ints and their decimal strings are the same id). Nothing is dropped silently:
malformed lines, ids the suite does not have, repeated ids (the first answer is kept) and questions
without an answer are counted and named in the report.
"""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from typing import Any


@dataclasses.dataclass
class AnswerReport:
    """What happened to every line of an answers file."""

    path: str
    answered: int = 0
    missing: list[str] = dataclasses.field(default_factory=list)
    duplicate: list[str] = dataclasses.field(default_factory=list)
    unknown: list[str] = dataclasses.field(default_factory=list)
    malformed: list[str] = dataclasses.field(default_factory=list)  # "line N: reason"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def summary(self) -> str:
        """One line: counts, with up to 5 names of each problem."""
        parts = [f"{self.answered} answered"]
        for name in ("missing", "duplicate", "unknown", "malformed"):
            items = getattr(self, name)
            if items:
                more = f", … {len(items) - 5} more" if len(items) > 5 else ""
                parts.append(f"{len(items)} {name} ({', '.join(items[:5])}{more})")
        return f"{self.path}: " + "; ".join(parts)


def _id(value: Any) -> str | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str) and value.strip():
        return value.strip()
    return None


def read_answers(path: str, question_ids: Sequence[str]) -> tuple[dict[str, str], AnswerReport]:
    """Answers by question id, and the report. Raises a one-line ``ValueError`` when the file cannot
    be read or no line answers a known question."""
    report = AnswerReport(path)
    known = set(question_ids)
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.readlines()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: answers file missing") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot read the answers file ({e})") from None
    answers: dict[str, str] = {}
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as e:
            report.malformed.append(f"line {n}: not JSON ({str(e)[:60]})")
            continue
        if not isinstance(obj, dict) or _id(obj.get("id")) is None or not isinstance(obj.get("answer"), str):
            report.malformed.append(f'line {n}: expected {{"id": int or str, "answer": str}}')
            continue
        qid = _id(obj["id"])
        if qid not in known:
            report.unknown.append(qid)
        elif qid in answers:
            report.duplicate.append(qid)
        else:
            answers[qid] = obj["answer"]
    report.answered = len(answers)
    report.missing = [q for q in question_ids if q not in answers]
    if not answers:
        raise ValueError(report.summary() + ": no line answers a question of this suite")
    return answers, report
