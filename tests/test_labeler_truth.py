"""The labeler audit counts right and wrong yes/no decisions on the policy's claims against ground truth."""
import pytest

from rlaifv_jax.feedback.labeler_truth import audit
from rlaifv_jax.feedback.toy_claims import RuleClaimExtractor


def test_audit_counts_decisions_against_ground_truth():
    prompts = [{"id": "a", "objects": [("red", "circle")]}, {"id": "b", "objects": [("blue", "square"), ("green", "cross")]}]
    ext = RuleClaimExtractor()
    claims = [{"key": "a", "claims": [ext.extract_one("there is a red circle . there is a blue square .").to_dict(),
                                      ext.extract_one("there is a red circle .").to_dict()]},
              {"key": "b", "claims": [ext.extract_one("there is a blue square . there is a red cross .").to_dict(),
                                      ext.extract_one("there is a what .").to_dict()]}]  # unparseable: no claims
    labels = [{"key": "a", "labels": [[[0.9, 0.1], [0.7, 0.3]], [[0.2, 0.8]]]},  # real ok, fake accepted; real rejected
              {"key": "b", "labels": [[[0.6, 0.4], [0.1, 0.9]], []]}]  # real ok, fake rejected
    got = audit(prompts, claims, labels, [{"key": "a", "pairs": [{}]}, {"key": "b", "pairs": []}])
    assert got["labeler_claims"] == {"real": 3, "hallucinated": 2}
    assert got["labeler_real_accepted"] == pytest.approx(2 / 3)
    assert got["labeler_hallucinated_rejected"] == pytest.approx(1 / 2)
    assert got["labeler_accuracy"] == pytest.approx(3 / 5)
    assert got["prompts_without_pair"] == 1
