"""Scores, candidate pairs, seeded per-prompt sampling, length balancing and pair records (hand-worked)."""
import collections
import json

import pytest

from rlaifv_jax.feedback.claims import ClaimResult
from rlaifv_jax.feedback.verdicts import response_score
from rlaifv_jax.feedback.pairs import (
    balance_lengths,
    build_pair_records,
    candidate_pairs,
    sample_pairs,
)


def test_response_score():
    assert response_score([True, False, False]) == -2
    assert response_score([True, True]) == 0
    assert response_score([]) == 0


def test_candidate_pairs_hand_worked():
    # scores: r0=0, r1=-1, r2=0 (ties r0), r3 has no claims, r4=-3
    assert candidate_pairs([0, -1, 0, None, -3]) == [(0, 1), (0, 4), (2, 1), (1, 4), (2, 4)]
    assert candidate_pairs([0, -1, 0, None, -3], min_diff=2) == [(0, 4), (1, 4), (2, 4)]


@pytest.mark.parametrize("scores", [[-1, -1, -1], [0], [], [None, None], [None, -2]])
def test_candidate_pairs_none(scores):
    assert candidate_pairs(scores) == []


def test_sample_pairs_seeded_per_prompt():
    pairs = [(0, 1), (0, 2), (1, 2), (3, 1)]
    a = sample_pairs(pairs, 2, seed=5, key="p1")
    assert len(a) == 2 and len(set(a)) == 2 and set(a) <= set(pairs)
    assert a == sorted(a, key=pairs.index)  # input order kept
    # Independent of other prompts and call order: interleave other prompts' draws.
    for other in ("p0", "p2", "p9"):
        sample_pairs(pairs, 2, seed=5, key=other)
    assert sample_pairs(pairs, 2, seed=5, key="p1") == a
    # Few pairs: all kept.
    assert sample_pairs(pairs[:2], 2, seed=5, key="p1") == pairs[:2]
    assert sample_pairs([], 2, seed=5, key="p1") == []


def test_sample_pairs_varies_with_seed_and_key_and_is_uniform():
    pairs = [(0, 1), (0, 2), (1, 2)]
    draws = [tuple(sample_pairs(pairs, 2, seed=0, key=f"p{i}")) for i in range(600)]
    counts = collections.Counter(p for d in draws for p in d)
    for p in pairs:  # each pair is kept with probability 2/3
        assert abs(counts[p] / 600 - 2 / 3) < 0.07
    by_seed = {tuple(sample_pairs(pairs, 2, seed=s, key="p0")) for s in range(30)}
    assert len(by_seed) == 3


def words(n, tag):
    return " ".join(f"{tag}{i}" for i in range(n))


def test_balance_lengths_hand_worked_threshold():
    data = [
        {"id": 1, "chosen": words(10, "a"), "rejected": words(10, "b")},  # shortening 0
        {"id": 2, "chosen": words(5, "a"), "rejected": words(10, "b")},  # 0.5
        {"id": 3, "chosen": words(9, "a"), "rejected": words(10, "b")},  # 0.1 (exactly on r = 0.1)
        {"id": 4, "chosen": "same text", "rejected": "  same text "},  # equal after strip: always dropped
        {"id": 5, "chosen": words(12, "a"), "rejected": words(10, "b")},  # -0.2: always kept
    ]
    # r < 0.1: {1,5} -> |22-20|/20 = 0.1; 0.1 <= r < 0.5: {1,3,5} -> 1/30; r >= 0.5: {1,2,3,5} -> 4/40.
    kept, r = balance_lengths(data)
    assert r == pytest.approx(0.1)
    assert [p["id"] for p in kept] == [1, 3, 5]


def test_balance_lengths_first_minimum_and_edge_cases():
    data = [{"c": words(10, "a"), "r": words(10, "b")}, {"c": words(3, "a"), "r": ""}]
    kept, r = balance_lengths(data, chosen_key="c", rejected_key="r")
    assert r == 0.0 and kept == data  # same objective for every r: the smallest; empty rejected kept
    assert balance_lengths([]) == ([], 0.0)
    assert balance_lengths([{"chosen": "x", "rejected": "x"}]) == ([], 0.0)


def make_inputs():
    prompt = {"id": "p7", "question": "Describe the image.", "image": "img/7.png"}
    responses = ["r zero", "r one", "r two", "r three"]
    claims = [
        ClaimResult(["f0a", "f0b"], ["q0a?", "q0b?"], "ok", "- f0a\n- f0b", "- q0a?\n- q0b?"),
        ClaimResult(["f1"], ["q1?"], "ok"),
        ClaimResult([], [], "count_mismatch", "- x\n- y", "- x?"),
        ClaimResult(["f3a", "f3b"], ["q3a?", "q3b?"], "ok"),
    ]
    labels = [[(0.9, 0.1), (0.2, 0.8)], [(0.7, 0.3)], [], [(0.5, 0.5), (0.1, 0.9)]]
    return prompt, responses, claims, labels


def test_build_pair_records_audit_trail():
    prompt, responses, claims, labels = make_inputs()
    # scores: r0 = -1, r1 = 0, r2 = None (count mismatch), r3 = -2 (a tie rejects)
    recs = build_pair_records(prompt, responses, claims, labels, seed=0, k=3)
    assert [(r["chosen_audit"]["index"], r["rejected_audit"]["index"]) for r in recs] == [(1, 0), (0, 3), (1, 3)]
    r = recs[2]
    assert r["pair_id"] == "p7/1-3" and r["prompt_id"] == "p7" and r["question"] == "Describe the image."
    assert (r["chosen"], r["rejected"]) == ("r one", "r three")
    assert r["scores"] == [-1, 0, None, -2] and r["n_candidates"] == 3
    assert r["chosen_audit"]["accepted"] == [True] and r["chosen_audit"]["score"] == 0
    assert r["rejected_audit"]["accepted"] == [False, False] and r["rejected_audit"]["score"] == -2
    assert r["rejected_audit"]["p_yes"] == [0.5, 0.1] and r["rejected_audit"]["questions"] == ["q3a?", "q3b?"]
    assert recs[0]["rejected_audit"]["raw_split"] == "- f0a\n- f0b"
    assert json.loads(json.dumps(recs)) == recs


def test_build_pair_records_samples_two_like_sample_pairs():
    prompt, responses, claims, labels = make_inputs()
    recs = build_pair_records(prompt, responses, claims, labels, seed=3)
    expected = sample_pairs([(1, 0), (0, 3), (1, 3)], 2, seed=3, key="p7")
    assert [(r["chosen_audit"]["index"], r["rejected_audit"]["index"]) for r in recs] == expected
    assert build_pair_records(prompt, responses, claims, labels, seed=3) == recs


def test_build_pair_records_errors_and_single_response():
    prompt, responses, claims, labels = make_inputs()
    with pytest.raises(ValueError, match="labels for"):
        build_pair_records(prompt, responses, claims, [[(0.9, 0.1)]] + labels[1:], seed=0)
    with pytest.raises(ValueError, match="responses"):
        build_pair_records(prompt, responses[:3], claims, labels, seed=0)
    assert build_pair_records(prompt, responses[:1], claims[:1], labels[:1], seed=0) == []
