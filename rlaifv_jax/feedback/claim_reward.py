"""Claim-verification reward for best-of-N at inference (``evaluate --best_of N --reward labeler``).

Each sampled answer is scored as training scores responses (METHOD.md §3–4): a ``ClaimExtractor``
splits it into claims and turns each into a yes/no question (the split/convert LLMs, or the toy
world's rules), the labeler (``engine.score.Labeler.score``, all of a question's claims against
one cached image prefix) gives each claim ``p_yes``/``p_no``, and the reward is
``feedback.verdicts.response_score``: minus the number of rejected claims. An answer without usable
claims (status other than ``ok``) has no reward (None) and is not a candidate, as in pair building.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np

from rlaifv_jax.feedback.claims import ClaimExtractor
from rlaifv_jax.feedback.verdicts import accept_claim, response_score

ImageEncoder = Callable[[np.ndarray], tuple[np.ndarray, Any]]
ScoreQuestions = Callable[[list[dict[str, Any]]], Sequence[Sequence[tuple[float, float]]]]


class ClaimReward:
    """``Reward`` of ``eval.policy.best_of_n``: −(rejected claims) per sample.

    ``label`` is the labeler's ``Labeler.score`` (items ``{"questions", "pixel_values", layout_key:
    layout}`` → ``(p_yes, p_no)`` per question); ``encode_image`` its image preprocessing, applied to
    each prompt's ``image`` and giving ``(pixel_values, layout)``. The labeler may be the policy itself
    (self-feedback) or another multimodal model."""

    def __init__(self, extractor: ClaimExtractor, label: ScoreQuestions, encode_image: ImageEncoder,
                 layout_key: str = "image_sizes"):
        self.extractor, self.label, self.encode_image, self.layout_key = extractor, label, encode_image, layout_key

    def __call__(self, questions: Sequence[Any], prompts: Sequence[dict],
                 samples: Sequence[dict]) -> list[list[dict[str, Any]]]:
        """Per question, one ``{"reward", "status", "claims", "questions", "p_yes", "p_no",
        "accepted"}`` per sample (``questions[i].question`` is the text the claims are split against)."""
        results = self.extractor.extract([(q.question, t) for q, s in zip(questions, samples) for t in s["texts"]])
        items, start = [], 0
        for prompt, sample in zip(prompts, samples):
            mine = results[start:start + len(sample["texts"])]
            start += len(mine)
            pixel_values, layout = self.encode_image(prompt["image"])
            items.append({"questions": [q for c in mine for q in c.questions], "pixel_values": pixel_values,
                          self.layout_key: layout})
        labels = self.label(items)
        out, start = [], 0
        for sample, per_question in zip(samples, labels):
            scored, offset = [], 0
            for claims in results[start:start + len(sample["texts"])]:
                probs = [(float(py), float(pn)) for py, pn in per_question[offset:offset + len(claims.questions)]]
                offset += len(claims.questions)
                accepted = [accept_claim(py, pn) for py, pn in probs]
                scored.append({"reward": float(response_score(accepted)) if claims.status == "ok" else None,
                               "status": claims.status, "claims": list(claims.facts),
                               "questions": list(claims.questions), "p_yes": [py for py, _ in probs],
                               "p_no": [pn for _, pn in probs], "accepted": accepted})
            start += len(sample["texts"])
            out.append(scored)
        return out
