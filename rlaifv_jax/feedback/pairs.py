"""Scores, preference pairs, per-prompt pair sampling and dataset-level length balancing (METHOD.md §4).

A response scores −(#rejected claims); responses without usable claims have no score and are never
candidates. Every unordered pair of a prompt's scored responses whose scores differ by at least
``min_diff`` is a candidate (higher score chosen); at most ``k`` candidates per prompt are kept, drawn
with a generator seeded by (seed, prompt id) only. Length balancing then drops pairs whose chosen answer
is much shorter than the rejected one, with the threshold searched to equalise mean lengths.

Differences from the official ``utils/get_pairs_filter_shorten.py``: the threshold test is exact integer
arithmetic on r = i/50 (the official compares floats against ``np.arange(0, 1, 0.02)``); a threshold that
keeps no pair is skipped instead of dividing by zero; a rejected answer of zero words is never dropped
for length (the official divides by zero).
"""
from __future__ import annotations

import hashlib
import itertools
from typing import Any, Mapping, Sequence

import numpy as np

from rlaifv_jax.feedback.claims import ClaimResult
from rlaifv_jax.feedback.verdicts import accept_claim, response_score

RATIO_STEPS = 50  # r in {0, 1/50, ..., 49/50} = {0, 0.02, ..., 0.98}


def candidate_pairs(scores: Sequence[int | None], *, min_diff: int = 1) -> list[tuple[int, int]]:
    """(chosen, rejected) index pairs over unordered pairs whose scores differ by >= ``min_diff``.

    ``None`` marks a response without claims (excluded). Pairs come in ``itertools.combinations`` order.
    """
    pairs = []
    for i, j in itertools.combinations(range(len(scores)), 2):
        si, sj = scores[i], scores[j]
        if si is None or sj is None or abs(si - sj) < min_diff:
            continue
        pairs.append((i, j) if si > sj else (j, i))
    return pairs


def _prompt_rng(seed: int, key: str) -> np.random.Generator:
    digest = hashlib.sha256(f"{seed}\x00{key}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:16], "little"))


def sample_pairs(pairs: Sequence[tuple[int, int]], k: int = 2, *, seed: int, key: str) -> list[tuple[int, int]]:
    """At most ``k`` of a prompt's pairs, drawn without replacement; depends only on (seed, key, pairs).

    ``key`` is the prompt id. The kept pairs stay in their input order; all are kept when there are <= k.
    """
    if len(pairs) <= k:
        return list(pairs)
    keep = np.sort(_prompt_rng(seed, key).choice(len(pairs), size=k, replace=False))
    return [tuple(pairs[i]) for i in keep]


def _words(text: str) -> int:
    return len(text.split())


def _keep(chosen: str, rejected: str, step: int) -> bool:
    """Pair survives threshold r = step / RATIO_STEPS: (w_rej - w_cho) / w_rej <= r and texts differ."""
    if chosen.strip() == rejected.strip():
        return False
    wc, wr = _words(chosen), _words(rejected)
    return wr == 0 or (wr - wc) * RATIO_STEPS <= step * wr


def balance_lengths(
    pairs_with_texts: Sequence[Mapping[str, Any]],
    *,
    chosen_key: str = "chosen",
    rejected_key: str = "rejected",
    ratio: float | None = None,
) -> tuple[list[Mapping[str, Any]], float]:
    """Dataset-level length filter: (kept pairs in input order, chosen r).

    For r in {0, 0.02, ..., 0.98} a pair is dropped if (words(rejected) − words(chosen)) / words(rejected)
    > r or chosen == rejected after strip; r minimises |mean words(chosen) − mean words(rejected)| /
    mean words(rejected) over the kept pairs (first minimum; thresholds keeping nothing are skipped, and
    r = 0 is returned with no pairs when every threshold keeps nothing). A given ``ratio`` (a multiple
    of 0.02) replaces the search.
    """
    texts = [(p[chosen_key], p[rejected_key]) for p in pairs_with_texts]
    if ratio is not None:
        step = round(ratio * RATIO_STEPS)
        if not 0 <= step < RATIO_STEPS or abs(step - ratio * RATIO_STEPS) > 1e-6:
            raise ValueError(f"length ratio {ratio} must be one of 0, 0.02, ..., 0.98")
        return [p for p, (c, r) in zip(pairs_with_texts, texts) if _keep(c, r, step)], step / RATIO_STEPS
    best_step, best_obj = 0, np.inf
    for step in range(RATIO_STEPS):
        kept = [(c, r) for c, r in texts if _keep(c, r, step)]
        sum_c, sum_r = sum(_words(c) for c, _ in kept), sum(_words(r) for _, r in kept)
        if not kept or sum_r == 0:
            continue
        obj = abs(sum_c - sum_r) / sum_r  # the means share the denominator len(kept)
        if obj < best_obj:
            best_step, best_obj = step, obj
    kept_pairs = [p for p, (c, r) in zip(pairs_with_texts, texts) if _keep(c, r, best_step)]
    return kept_pairs, best_step / RATIO_STEPS


def _audit(index: int, text: str, claims: ClaimResult, labels: Sequence[tuple[float, float]],
           score: int | None) -> dict[str, Any]:
    return {
        "index": index,
        "text": text,
        "status": claims.status,
        "facts": list(claims.facts),
        "questions": list(claims.questions),
        "p_yes": [float(py) for py, _ in labels],
        "p_no": [float(pn) for _, pn in labels],
        "accepted": [accept_claim(py, pn) for py, pn in labels],
        "score": score,
        "raw_split": claims.raw_split,
        "raw_convert": claims.raw_convert,
    }


def build_pair_records(
    prompt_record: Mapping[str, Any],
    responses: Sequence[str],
    claim_results: Sequence[ClaimResult],
    label_results: Sequence[Sequence[tuple[float, float]]],
    *,
    seed: int,
    k: int = 2,
    min_diff: int = 1,
    id_field: str = "id",
    question_field: str = "question",
) -> list[dict[str, Any]]:
    """Preference-pair records of one prompt, each a JSON-serialisable dict with the full audit trail.

    ``label_results[i]`` holds (p_yes, p_no) per question of ``claim_results[i]`` (empty for responses
    that are not 'ok'). Each record: ``pair_id``, ``prompt_id``, ``prompt`` (the prompt record), ``question``,
    ``chosen``/``rejected`` texts, ``chosen_audit``/``rejected_audit`` (facts, questions, p_yes, p_no,
    accepted, score, status, raw LLM outputs), ``scores`` of all responses and ``n_candidates``.
    """
    if not len(responses) == len(claim_results) == len(label_results):
        raise ValueError(f"{len(responses)} responses, {len(claim_results)} claim results, "
                         f"{len(label_results)} label results")
    prompt_id = str(prompt_record[id_field])
    scores: list[int | None] = []
    for i, (claims, labels) in enumerate(zip(claim_results, label_results)):
        if claims.status == "ok" and len(labels) != len(claims.questions):
            raise ValueError(f"prompt {prompt_id} response {i}: {len(labels)} labels for "
                             f"{len(claims.questions)} questions")
        if claims.status == "ok" and not claims.questions:
            raise ValueError(f"prompt {prompt_id} response {i}: status 'ok' without claims")
        scores.append(response_score([accept_claim(py, pn) for py, pn in labels])
                      if claims.status == "ok" else None)
    candidates = candidate_pairs(scores, min_diff=min_diff)
    records = []
    for c, r in sample_pairs(candidates, k, seed=seed, key=prompt_id):
        records.append({
            "pair_id": f"{prompt_id}/{c}-{r}",
            "prompt_id": prompt_id,
            "prompt": dict(prompt_record),
            "question": prompt_record[question_field],
            "chosen": responses[c],
            "rejected": responses[r],
            "chosen_audit": _audit(c, responses[c], claim_results[c], label_results[c], scores[c]),
            "rejected_audit": _audit(r, responses[r], claim_results[r], label_results[r], scores[r]),
            "scores": scores,
            "n_candidates": len(candidates),
        })
    return records
