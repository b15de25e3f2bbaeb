"""AMBER (Wang et al. 2023): generative descriptions and discriminative yes/no questions.

``--data`` is one of AMBER's query files (``data/query/query_*.json``: ``[{"id", "image", "query"}]``)
or its ``data`` directory (then ``query/query_all.json``); ``annotations.json``, ``relation.json``
and ``safe_words.txt`` are read from the query file's directory or the ones above it. Metrics
follow AMBER's ``inference.py``:

* Discriminative (ids ≥ 1005): the answer is read exactly as written, as ``inference.py`` reads it:
  only ``"Yes"`` and ``"No"`` count (``" No"``, ``"No."`` and ``"yes"`` are neither; a model must
  answer with the bare word, so ask for it in the prompt); a truth other than ``"yes"`` is a "no".
  Accuracy, and precision/recall/F1 with "No" as the positive class, per dimension — existence
  (``discriminative-hallucination``), attribute (state, number, action) and relation (every other
  type) — and overall. F1 is exact; ``printed`` repeats every figure as ``inference.py`` prints it
  (percent, one decimal, F1 from the rounded P and R with 1e-4 in the denominator, 1e-3 for
  existence).
* Generative: the answer's tokens (NLTK's tokenizer, original casing) lemmatized as nouns that are
  in AMBER's object vocabulary (``relation.json``'s keys and values, as written: ``"TV"`` matches
  ``TV`` only, ``"Dogs"`` at a sentence start is no mention, exactly as WordNet's lower-case index
  makes it officially) are its mentions. A mention is *safe* when it is a global safe word, a
  ground-truth object or an object associated with one; otherwise it is hallucinated. CHAIR =
  hallucinated / all mentions; Cover = share of ground-truth objects mentioned (directly or through
  an associated word); Hal = share of answers with ≥ 1 hallucinated mention; Cog = share of the
  annotated hallucination-prone objects (``hallu``) that are mentioned.

How our generative numbers can differ from ``inference.py``: AMBER keeps only the tokens NLTK's POS
tagger tags as nouns and lemmatizes them with WordNet; it also calls a mention safe (or a
hallucination-prone object covered) when spaCy ``en_core_web_lg`` word vectors give a similarity
> 0.8 with one of the words. The tagger model, WordNet and the spaCy vectors are package data that
cannot be installed here. We lemmatize every token as a noun (``eval.text``), so a vocabulary word
used as a verb or adjective (e.g. "the dog *sits*" if "sit" were listed) counts as a mention, and
match only through AMBER's own annotations, association lists and safe words — no word-vector
similarity — so near-synonyms absent from ``relation.json`` count as hallucinated here and
CHAIR/Hal can be higher, Cover/Cog lower.
"""
from __future__ import annotations

import collections
import os
from typing import Any

from rlaifv_jax.eval import text
from rlaifv_jax.eval.questions import Question, check_unique, image_path, read_json, require

NAME = "amber"
DECODING = {"num_beams": 1, "max_new_tokens": 512}

DIMENSIONS = {"discriminative-hallucination": "existence", "discriminative-attribute-state": "attribute",
              "discriminative-attribute-number": "attribute", "discriminative-attribute-action": "attribute"}


def _find(start: str, name: str) -> str:
    d = start
    for _ in range(3):
        if os.path.exists(os.path.join(d, name)):
            return os.path.join(d, name)
        d = os.path.dirname(d)
    raise FileNotFoundError(f"{name}: not found in {start} or the two directories above it (AMBER's data/)")


def load(path: str, images: str | None = None) -> tuple[list[Question], dict[str, Any]]:
    """AMBER's questions (with their annotation as ``meta``) and the vocabulary files."""
    query_file = os.path.join(path, "query", "query_all.json") if os.path.isdir(path) else path
    queries = read_json(query_file, "an AMBER query file")
    base = os.path.dirname(os.path.abspath(query_file))
    annotations = read_json(_find(base, "annotations.json"), "AMBER annotations")
    relation = read_json(_find(base, "relation.json"), "AMBER's relation.json")
    with open(_find(base, "safe_words.txt"), encoding="utf-8") as f:
        safe_words = {line.split("\n")[0] for line in f}  # as inference.py reads it (no stripping)
    if not isinstance(queries, list) or not isinstance(annotations, list) or not isinstance(relation, dict):
        raise ValueError(f"{query_file}: expected AMBER's query list, annotation list and relation dict")
    by_id = {a.get("id"): a for a in annotations if isinstance(a, dict)}
    questions = []
    for i, rec in enumerate(queries):
        where = f"{query_file}[{i}]"
        require(rec if isinstance(rec, dict) else {}, {"id": int, "image": str, "query": str}, where)
        ann = by_id.get(rec["id"])
        if ann is None or "type" not in ann or "truth" not in ann:
            raise ValueError(f"{where}: id {rec['id']} has no annotation with 'type' and 'truth'")
        questions.append(Question(str(rec["id"]), rec["query"], image_path(images, rec["image"]), dict(ann)))
    if not questions:
        raise ValueError(f"{query_file}: no questions")
    check_unique(questions, query_file)
    vocab = {"relation": relation, "safe_words": safe_words,
             "objects": set(relation) | {w for words in relation.values() for w in words}}
    return questions, vocab


def _mark(word: str, objects: list[str], relation: dict[str, list[str]], marks: list[int]) -> bool:
    """AMBER's cover bookkeeping: if ``word`` is one of ``objects`` or associated with one, mark the
    object (associations are searched first, then the objects, first match wins, as in AMBER)."""
    for k, obj in enumerate(objects):
        if word in relation.get(obj, []):
            marks[k] = 1
            return True
    if word in objects:
        marks[objects.index(word)] = 1
        return True
    return False


def generative_item(answer: str, truth: list[str], hallu: list[str], vocab: dict[str, Any]) -> dict[str, Any]:
    """One description's mentions, hallucinated mentions and covered objects."""
    relation = vocab["relation"]
    mentions = [w for w in map(text.noun_lemma, text.word_tokenize(answer)) if w in vocab["objects"]]
    safe_marks, hallu_marks, hallucinated = [0] * len(truth), [0] * len(hallu), []
    for w in mentions:
        if w in vocab["safe_words"]:
            continue
        if _mark(w, truth, relation, safe_marks):
            continue
        _mark(w, hallu, relation, hallu_marks)
        hallucinated.append(w)
    return {"mentions": mentions, "hallucinated": hallucinated,
            "covered": [o for o, m in zip(truth, safe_marks) if m],
            "hallu_covered": [o for o, m in zip(hallu, hallu_marks) if m]}


def _rate(num: float, den: float) -> float:
    return num / den if den else 0.0


def _printed(p: float, r: float, eps: float) -> float:
    """F1 as ``inference.py`` prints it: from P and R already rounded to 0.1 %, ``eps`` in the denominator."""
    p, r = round(p * 100, 1) / 100, round(r * 100, 1) / 100
    return round(2 * p * r / (p + r + eps) * 100, 1)


def _discriminative(rows: list[tuple[str, str]], eps: float = 1e-4) -> dict[str, Any]:
    """``rows``: (truth, answer) → AMBER's accuracy and "No"-positive P/R/F1. As in ``inference.py``,
    a truth other than ``"yes"`` is a "no" and only the exact strings ``"Yes"``/``"No"`` are answers."""
    correct = sum(1 for t, a in rows if (t == "yes" and a == "Yes") or (t != "yes" and a == "No"))
    said_no = sum(1 for _, a in rows if a == "No")
    truth_no = sum(1 for t, _ in rows if t != "yes")
    true_no = sum(1 for t, a in rows if t != "yes" and a == "No")
    acc, p, r = _rate(correct, len(rows)), _rate(true_no, said_no), _rate(true_no, truth_no)
    return {"accuracy": acc, "precision": p, "recall": r, "f1": _rate(2 * p * r, p + r),
            "printed": {"accuracy": round(acc * 100, 1), "precision": round(p * 100, 1),
                        "recall": round(r * 100, 1), "f1": _printed(p, r, eps)},
            "n": len(rows), "n_not_yes_no": sum(1 for _, a in rows if a not in ("Yes", "No"))}


def score(questions: list[Question], vocab: dict[str, Any], answers: dict[str, str]) -> tuple[dict, dict]:
    """Generative and discriminative metrics over the answered questions, and per-answer details."""
    groups: dict[str, list[tuple[str, str]]] = collections.defaultdict(list)
    gen = collections.Counter()
    items = {}
    for q in questions:
        if q.id not in answers:
            continue
        answer, kind = answers[q.id], q.meta["type"]  # read exactly as written, as inference.py does
        if kind == "generative":
            item = generative_item(answer, list(q.meta["truth"]), list(q.meta.get("hallu", [])), vocab)
            gen.update(mentions=len(item["mentions"]), hallucinated=len(item["hallucinated"]),
                       truth=len(q.meta["truth"]), covered=len(item["covered"]),
                       hallu=len(q.meta.get("hallu", [])), hallu_covered=len(item["hallu_covered"]),
                       responses=1, hallucinating=bool(item["hallucinated"]))
            items[q.id] = item
            continue
        truth = str(q.meta["truth"])
        dimension = DIMENSIONS.get(kind, "relation")
        for group in ("discriminative", dimension, kind.replace("discriminative-", "") if dimension == "attribute" else None):
            if group:
                groups[group].append((truth, answer))
        items[q.id] = {"truth": truth, "answer": answer, "dimension": dimension}
    metrics: dict[str, Any] = {}
    if gen["responses"]:
        rates = {"chair": _rate(gen["hallucinated"], gen["mentions"]), "cover": _rate(gen["covered"], gen["truth"]),
                 "hal": _rate(gen["hallucinating"], gen["responses"]), "cog": _rate(gen["hallu_covered"], gen["hallu"])}
        metrics["generative"] = {**rates, "printed": {k: round(v * 100, 1) for k, v in rates.items()},
                                 "n": gen["responses"], "n_mentions": gen["mentions"],
                                 "n_hallucinated": gen["hallucinated"]}
    for group in ("discriminative", "existence", "attribute", "attribute-state", "attribute-number",
                  "attribute-action", "relation"):
        if groups.get(group):
            metrics[group] = _discriminative(groups[group], 1e-3 if group == "existence" else 1e-4)
    return metrics, items
