"""Object extraction for Object HalBench, two ways behind one interface.

An extractor maps ``(question, answer)`` pairs to the COCO objects each answer mentions, as
``(word, category)`` pairs (``coco.CocoVocabulary``):

* ``RuleExtractor``: the original CHAIR rule path over the whole answer (tokenize, lemmatize,
  double words, synonyms); every occurrence counts, as in CHAIR.
* ``LLMExtractor``: RLAIF-V's extraction prompt (verbatim, package data) answered by a local chat
  LLM; the JSON list it returns is parsed as the official scorer parses it, each listed object goes
  through the same rule path, and each word counts once per answer (the official scorer keeps unique
  extracted objects). Answers of at most 3 words get no objects, as in the official scorer. A reply
  that is not a JSON list of strings is asked again when the judge samples (an endpoint at
  temperature > 0, as the official scorer re-asks GPT, there up to 100 times, here ``REASKS``);
  one still unparseable is flagged (``failed``), counted by the suite, and that answer falls back
  to the rule path.

Difference from the official LLM path: it splits each extracted object into noun runs with spaCy's
tagger and keeps a run only if it is a listed name as a whole (``tennis player`` stays unmatched);
without a tagger we look up every word, so ``tennis player`` counts as ``person``.
"""
from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Sequence

from rlaifv_jax.eval.coco import DATA_DIR, CocoVocabulary

Complete = Callable[[list[str]], list[str]]  # prompts → the judge's replies
REASKS = 9  # re-asks of an unparseable extraction reply from a sampling judge (the official scorer: 99)


def _prompt_template() -> str:
    with open(os.path.join(DATA_DIR, "objhal_extraction_prompt.txt"), encoding="utf-8") as f:
        return f.read()


EXTRACTION_PROMPT = _prompt_template()


@dataclasses.dataclass
class Extraction:
    """The COCO objects an answer mentions (``(word, category)``), and for the LLM path its raw
    reply and whether that reply could not be parsed."""

    objects: list[tuple[str, str]]
    reply: str | None = None
    failed: bool = False


def extraction_prompt(question: str, answer: str) -> str:
    """The official extraction prompt for one question-answer pair."""
    return EXTRACTION_PROMPT.replace("{question}", question).replace("{answer}", answer)


def parse_object_list(reply: str) -> list[str] | None:
    """The official parser: the whole reply as JSON, else (when it contains ``["``) its last line;
    ``None`` unless that gives a list of strings. ``()`` (the prompt's own "empty JSON list") is
    read as empty."""
    reply = reply.strip()
    if reply == "()":
        return []
    try:
        value = json.loads(reply)
    except ValueError:
        if '["' not in reply:
            return None
        try:
            value = json.loads(reply.split("\n")[-1])
        except ValueError:
            return None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        return None
    return value


class RuleExtractor:
    """CHAIR's rule path over the whole answer."""

    name = "rule"

    def __init__(self, vocab: CocoVocabulary | None = None):
        self.vocab = vocab or CocoVocabulary.load()

    def __call__(self, items: Sequence[tuple[str, str]]) -> list[Extraction]:
        return [Extraction(self.vocab.objects(answer)) for _, answer in items]


class LLMExtractor:
    """The official extraction prompt answered by ``complete`` (a local chat LLM)."""

    name = "llm"

    def __init__(self, complete: Complete, vocab: CocoVocabulary | None = None):
        self.complete = complete
        self.vocab = vocab or CocoVocabulary.load()

    def objects(self, names: Sequence[str]) -> list[tuple[str, str]]:
        """COCO objects of the extracted object names: each through the rule path, each word once."""
        words = [w for name in names for w in self.vocab.phrase_words(name)]
        return self.vocab.to_objects(dict.fromkeys(words))

    def __call__(self, items: Sequence[tuple[str, str]]) -> list[Extraction]:
        asked = [i for i, (_, answer) in enumerate(items) if len(answer.strip().split()) > 3]
        prompts = [extraction_prompt(*items[i]) for i in asked]
        replies = self.complete(prompts) if asked else []
        for attempt in range(1, REASKS + 1 if getattr(self.complete, "samples", False) else 1):
            bad = [k for k, reply in enumerate(replies) if parse_object_list(reply) is None]
            if not bad:
                break
            for k, reply in zip(bad, self.complete([prompts[k] for k in bad], attempt=attempt)):
                replies[k] = reply
        out = [Extraction([]) for _ in items]
        for i, reply in zip(asked, replies):
            names = parse_object_list(reply)
            if names is None:
                out[i] = Extraction(self.vocab.objects(items[i][1]), reply, failed=True)
            else:
                out[i] = Extraction(self.objects(names), reply)
        return out
