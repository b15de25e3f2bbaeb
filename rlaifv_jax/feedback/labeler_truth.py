"""How right the labeler was on the policy's own claims, against the toy world's ground truth.

Evaluation only: the RLAIF-V loop never reads it. Per iteration, every (response, claim) the labeler
judged (``p_yes > p_no`` accepts) is checked against the prompt image's true objects:

* ``labeler_real_accepted``: accepted claims / claims of objects in the image;
* ``labeler_hallucinated_rejected``: rejected claims / claims of objects not in the image (the
  hallucinations the pairs are meant to punish);
* ``labeler_accuracy``: right decisions / all claims;
* ``prompts_without_pair``: prompts of the iteration that gave no preference pair.
"""
from __future__ import annotations

from typing import Any

from rlaifv_jax.feedback.toy_claims import parse_answer


def audit(prompts: list[dict[str, Any]], claims: list[dict[str, Any]], labels: list[dict[str, Any]],
          pair_records: list[dict[str, Any]]) -> dict[str, Any]:
    """The figures above from an iteration's prompts (with ``objects``), claims, labels and pairs records."""
    truth = {str(p["id"]): {tuple(o) for o in p["objects"]} for p in prompts}
    label_of = {r["key"]: r["labels"] for r in labels}
    n = {(real, accepted): 0 for real in (True, False) for accepted in (True, False)}
    for rec in claims:
        objects = truth[rec["key"]]
        for result, judged in zip(rec["claims"], label_of[rec["key"]]):
            for fact, (p_yes, p_no) in zip(result["facts"], judged):
                stated = parse_answer(fact).objects
                if len(stated) == 1:
                    n[(stated[0] in objects, p_yes > p_no)] += 1
    real, fake = n[(True, True)] + n[(True, False)], n[(False, True)] + n[(False, False)]
    return {"labeler_real_accepted": n[(True, True)] / real if real else 0.0,
            "labeler_hallucinated_rejected": n[(False, False)] / fake if fake else 0.0,
            "labeler_accuracy": (n[(True, True)] + n[(False, False)]) / (real + fake) if real + fake else 0.0,
            "labeler_claims": {"real": real, "hallucinated": fake},
            "prompts_without_pair": sum(not r["pairs"] for r in pair_records)}
