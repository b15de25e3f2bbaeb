"""MMHal-Bench (Sun et al. 2023): 96 questions over 8 question types, rated 0–6 by a judge.

``--data`` is its template JSON (``response_template.json`` / RLAIF-V's
``mmhal-bench_answer_template.json``: a list of ``{"question_type", "image_src", "image_content",
"question", "gt_answer", ...}``); a question's id is its 0-based index in that list (the file has
no id field). Images are ``--images DIR`` (default ``images/`` beside the template), named by the
last part of ``image_src``, as MMHal-Bench ships them.

Scoring follows RLAIF-V's ``eval_gpt_mmhal.py``: the standard judge prompt (verbatim, package data:
image contents, question, the human answer and the response) goes to a local judge LLM in place of
GPT-4; the rating is the one ``s`` in 0..6 for which ``"rating: s"`` occurs in the lower-cased
reply. A reply with no or several ratings is *unparseable*: it is flagged, counted, and (as in the
official script) scored 0. ``score`` = mean rating, ``hallucination_rate`` = share of ratings < 3,
``informativeness`` = mean of (rating − 3 if rating ≥ 3 else rating) / 3 × 100 (RLAIF-V's
``summarize_gpt_mmhal_review.py``), and the mean rating per question type; ``score_parsed`` is the
mean over parseable replies only.

The official summary requires exactly 96 answers and takes question *i*'s type to be ``i % 8``
(the template cycles through the 8 types). We group by each question's own ``question_type`` and
check that layout: ``layout`` is ``"official"`` when all 96 questions are answered and the types
cycle with period 8 (then our per-type means are the official ones), otherwise it says what differs
and a warning is logged (the official script would stop or mis-assign types).
"""
from __future__ import annotations

import collections
import logging
import os
from typing import Any

from rlaifv_jax.eval.coco import DATA_DIR
from rlaifv_jax.eval.objects import Complete
from rlaifv_jax.eval.questions import Question, read_json, require

NAME = "mmhal"
DECODING = {"num_beams": 3, "max_new_tokens": 1024}  # RLAIF-V's eval_rlaifv_mmhal.sh
# eval_gpt_mmhal.py as eval_rlaifv_mmhal.sh runs it: a user message to gpt-4-1106-preview, temperature 0, 512 tokens
PAPER_JUDGE = {"model": "gpt-4-1106-preview", "role": "user", "temperature": 0.0, "max_tokens": 512}

with open(os.path.join(DATA_DIR, "mmhal_judge_prompt.txt"), encoding="utf-8") as _f:
    JUDGE_PROMPT = _f.read()


def load(path: str, images: str | None = None) -> list[Question]:
    """The 96 questions of an MMHal-Bench template file."""
    records = read_json(path, "the MMHal-Bench template JSON")
    if not isinstance(records, list) or not records:
        raise ValueError(f"{path}: expected a non-empty JSON list of MMHal-Bench questions")
    image_dir = images or os.path.join(os.path.dirname(os.path.abspath(path)), "images")
    questions = []
    for i, rec in enumerate(records):
        where = f"{path}[{i}]"
        require(rec if isinstance(rec, dict) else {}, {"question_type": str, "image_src": str, "image_content": list,
                                                      "question": str, "gt_answer": str}, where)
        meta = {k: rec[k] for k in ("question_type", "image_content", "gt_answer")}
        questions.append(Question(str(i), rec["question"], os.path.join(image_dir, rec["image_src"].split("/")[-1]),
                                  meta))
    return questions


def judge_prompt(q: Question, answer: str) -> str:
    return JUDGE_PROMPT.format(", ".join(q.meta["image_content"]), q.question, q.meta["gt_answer"], answer)


def parse_rating(reply: str) -> int | None:
    """The rating 0..6 in a judge reply (``None`` when there is none or more than one)."""
    found = [s for s in range(7) if f"rating: {s}" in reply.lower()]
    return found[0] if len(found) == 1 else None


def _mean(xs: list[int]) -> float:
    return sum(xs) / len(xs) if xs else 0.0


def informativeness(ratings: list[int]) -> float:
    """The official informativeness: mean of (r − 3 if r ≥ 3 else r), over 3, in percent."""
    return _mean([r - 3 if r >= 3 else r for r in ratings]) / 3 * 100


def layout(questions: list[Question], answered: set[str]) -> str:
    """``"official"`` when the 96 questions are all answered and question i has question i % 8's type."""
    types = [q.meta["question_type"] for q in questions]
    if len(questions) != 96:
        return f"{len(questions)} questions, not the official 96"
    if len(answered) != 96:
        return f"{96 - len(answered)} of the 96 questions unanswered"
    wrong = [i for i, t in enumerate(types) if t != types[i % 8]]
    if wrong:
        return f"question {wrong[0]} has type {types[wrong[0]]!r}, not {types[wrong[0] % 8]!r} (types by i % 8)"
    return "official"


def score(questions: list[Question], answers: dict[str, str], judge: Complete) -> tuple[dict[str, Any], dict]:
    """Judge every answered question; the metrics and each reply with its rating."""
    if judge is None:
        raise ValueError("MMHal-Bench is scored by a judge LLM: pass --judge_url URL --judge_model NAME or "
                         "--judge HF_DIR")
    asked = [q for q in questions if q.id in answers]
    replies = judge([judge_prompt(q, answers[q.id].replace("Assistant:", "").strip()) for q in asked])
    items, ratings, by_type, unparseable = {}, [], collections.defaultdict(list), []
    for q, reply in zip(asked, replies):
        rating = parse_rating(reply)
        if rating is None:
            unparseable.append(q.id)
        ratings.append(0 if rating is None else rating)
        by_type[q.meta["question_type"]].append(ratings[-1])
        items[q.id] = {"judge_reply": reply, "rating": rating, "question_type": q.meta["question_type"]}
    bad = set(unparseable)
    parsed = [r for q, r in zip(asked, ratings) if q.id not in bad]
    metrics = {"score": _mean(ratings), "hallucination_rate": _mean([int(r < 3) for r in ratings]),
               "informativeness": informativeness(ratings), "score_parsed": _mean(parsed), "n": len(ratings),
               "n_unparseable": len(unparseable), "unparseable_ids": unparseable,
               "per_type": {t: _mean(rs) for t, rs in sorted(by_type.items())},
               "layout": layout(questions, {q.id for q in asked})}
    if metrics["layout"] != "official":
        logging.warning("MMHal-Bench layout: %s; the official summary needs all 96 questions in their order",
                        metrics["layout"])
    return metrics, items
