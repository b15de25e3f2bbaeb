"""The four hallucination suites behind one interface: load questions, then score answers.

``load(name, data, images)`` reads a suite's official files into a ``Benchmark``: its questions,
the official decoding settings, and ``score(answers, judge)`` → ``(metrics, per-question items)``.
The evaluation CLI (``rlaifv_jax.evaluate``) and training jobs share this path.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from rlaifv_jax.eval import amber, mmhal, object_halbench, pope
from rlaifv_jax.eval.objects import Complete
from rlaifv_jax.eval.questions import Question

MODULES = {m.NAME: m for m in (object_halbench, mmhal, amber, pope)}
NAMES: tuple[str, ...] = tuple(MODULES)

Scorer = Callable[[dict[str, str], Complete | None], tuple[dict[str, Any], dict[str, dict]]]


@dataclasses.dataclass
class Benchmark:
    """A loaded suite."""

    name: str
    questions: list[Question]
    decoding: dict[str, int]  # the official num_beams and max_new_tokens
    score: Scorer
    judge: str  # what a judge LLM does for this suite: "required", "optional" or "unused"
    paper_judge: dict | None = None  # the published numbers' judge: model, message role, temperature, max_tokens
    scoring: str = ""  # how the answers are scored without a judge ("" when a judge is required)


def load(name: str, data: str, images: str | None = None, labels: str | None = None) -> Benchmark:
    """Read suite ``name``'s files (see each suite module for the layout ``data`` names); ``labels``
    is POPE's label directory for LLaVA's question file."""
    if name not in MODULES:
        raise ValueError(f"unknown suite {name!r}; choose one of {list(NAMES)}")
    if labels and name != "pope":
        raise ValueError(f"--labels is for POPE (LLaVA's question file), not {name}")
    if name == "object_halbench":
        questions, root = object_halbench.load(data, images)
        return Benchmark(name, questions, object_halbench.DECODING,
                         lambda answers, judge: object_halbench.score(questions, root, answers, judge), "optional",
                         object_halbench.PAPER_JUDGE,
                         "rule: CHAIR over the whole answer (no judge, no keys); the paper uses the judge extraction")
    if name == "amber":
        questions, vocab = amber.load(data, images)
        return Benchmark(name, questions, amber.DECODING,
                         lambda answers, judge: amber.score(questions, vocab, answers), "unused", None,
                         "rule: inference.py without spaCy word-vector similarity (no keys)")
    if name == "mmhal":
        questions = mmhal.load(data, images)
        return Benchmark(name, questions, mmhal.DECODING,
                         lambda answers, judge: mmhal.score(questions, answers, judge), "required", mmhal.PAPER_JUDGE)
    questions = pope.load(data, images, labels)
    return Benchmark(name, questions, pope.DECODING, lambda answers, judge: pope.score(questions, answers), "unused",
                     None, "rule: the official yes/no reading (no keys)")
