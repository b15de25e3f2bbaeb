"""CHAIR object-hallucination metrics (METHOD.md §7) and yes/no accuracy.

Definitions, over a set of responses with their ground-truth object sets:

* ``chair_response`` (Object HalBench "Resp.") = responses with ≥ 1 hallucinated object / responses
  that mention ≥ 1 object;
* ``chair_s`` (plain CHAIRs) = responses with ≥ 1 hallucinated object / all responses;
* ``chair_mention`` (Object HalBench "Ment.", CHAIRi) = hallucinated mentions / all mentions;
* ``recall`` = ground-truth objects mentioned / all ground-truth objects (pooled over responses).

Repeated mentions: by default an object mentioned several times in one response counts once
(``unique=True``), so repeating a true (or false) object cannot move the mention rate. The original
CHAIR code (Rohrbach et al., 2018) counts every occurrence; ``unique=False`` reproduces that.
A rate whose denominator is 0 is reported as 0.0; the counts are returned alongside.
"""
from __future__ import annotations

import re
from collections.abc import Hashable, Sequence

from rlaifv_jax.data.toy_world import WorldSettings

_WORD = re.compile(r"\w+")


def _rate(num: int, den: int) -> float:
    return num / den if den else 0.0


def chair_metrics(mentions: Sequence[Sequence[Hashable]], truths: Sequence[set], unique: bool = True) -> dict[str, float]:
    """CHAIR rates and counts for per-response mentioned objects against ground-truth sets."""
    if len(mentions) != len(truths):
        raise ValueError(f"{len(mentions)} responses but {len(truths)} ground-truth sets")
    n_mentioning = n_hal_resp = n_ment = n_hal_ment = n_truth = n_found = 0
    for mentioned, truth in zip(mentions, truths):
        mentioned = list(dict.fromkeys(mentioned)) if unique else list(mentioned)
        hallucinated = sum(1 for m in mentioned if m not in truth)
        n_mentioning += bool(mentioned)
        n_hal_resp += bool(hallucinated)
        n_ment += len(mentioned)
        n_hal_ment += hallucinated
        n_truth += len(truth)
        n_found += len(set(truth) & set(mentioned))
    return {
        "chair_response": _rate(n_hal_resp, n_mentioning),
        "chair_mention": _rate(n_hal_ment, n_ment),
        "chair_s": _rate(n_hal_resp, len(mentions)),
        "recall": _rate(n_found, n_truth),
        "n_responses": len(mentions),
        "n_responses_mentioning": n_mentioning,
        "n_responses_hallucinating": n_hal_resp,
        "n_mentions": n_ment,
        "n_hallucinated_mentions": n_hal_ment,
        "n_truth_objects": n_truth,
        "n_truth_mentioned": n_found,
    }


def toy_mentions(caption: str, cfg: WorldSettings = WorldSettings()) -> list[tuple[str, str]]:
    """Objects mentioned in a toy-language text: every ``{colour} {shape}`` word bigram, in order.

    Deliberately looser than the claim parser: an object named inside a malformed sentence
    ("there is a red red circle") is still a mention, so garbage text cannot hide hallucinations.
    """
    words = _WORD.findall(caption.lower())
    return [(a, b) for a, b in zip(words, words[1:]) if a in cfg.colours and b in cfg.shapes]


def _yes_no(answer: str | bool) -> bool | None:
    """True for yes, False for no, None for anything else (first word, case-insensitive)."""
    if isinstance(answer, bool):
        return answer
    words = _WORD.findall(answer.lower())
    if words and words[0] in ("yes", "no"):
        return words[0] == "yes"
    return None


def yesno_metrics(predictions: Sequence[str | bool], labels: Sequence[str | bool]) -> dict[str, float]:
    """Accuracy, and precision/recall/F1 of "yes", for yes/no answers (strings or bools).

    A prediction that starts with neither "yes" nor "no" is wrong and counted as ``n_invalid``.
    """
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions but {len(labels)} labels")
    preds = [_yes_no(p) for p in predictions]
    golds = [_yes_no(g) for g in labels]
    if any(g is None for g in golds):
        raise ValueError("every label must be yes or no")
    tp = sum(1 for p, g in zip(preds, golds) if p is True and g)
    fp = sum(1 for p, g in zip(preds, golds) if p is True and not g)
    fn = sum(1 for p, g in zip(preds, golds) if p is not True and g)
    correct = sum(1 for p, g in zip(preds, golds) if p == g)
    precision, recall = _rate(tp, tp + fp), _rate(tp, tp + fn)
    return {
        "accuracy": _rate(correct, len(golds)),
        "precision": precision,
        "recall": recall,
        "f1": _rate(2 * precision * recall, precision + recall),
        "yes_rate": _rate(sum(1 for p in preds if p is True), len(preds)),
        "n": len(golds),
        "n_invalid": sum(1 for p in preds if p is None),
    }
