"""Rule-based split + convert for the toy-world language (stands in for the split/convert LLMs).

Same interface as the LLM extractor: ``extract([(question, answer), ...]) -> [ClaimResult, ...]``.
The answer is cut into sentences at ``.``, ``?``, ``!`` and newlines; each sentence must read
``there is a|an {colour} {shape}`` (case and spacing free). A parsed sentence gives the fact
``"there is a red circle"`` and the question ``"is there a red circle in the image ?"`` (the labeler
appends " Please answer yes or no."). A fact stated twice in one answer is one claim.

Status per answer (the contract of :class:`~rlaifv_jax.feedback.claims.ClaimResult`): ``"no_claims"``
when it has no sentence at all; ``"unparseable"`` when any sentence does not follow the grammar (no
claims kept, the response is not a pair candidate); ``"ok"`` otherwise. Nothing is dropped silently:
``raw_split`` holds every sentence as split (bulleted, like an LLM split output), so rejected ones stay
in the saved record, and :func:`parse_answer` returns them. The question of the pair is not needed:
answers in this language are self-contained. Only the answer text is read, never ground truth.
"""
from __future__ import annotations

import dataclasses
import re

from rlaifv_jax.data.toy_world import WorldSettings, claim_sentence, yesno_question
from rlaifv_jax.feedback.claims import ClaimResult

_SENTENCE_END = re.compile(r"[.?!\n]+")
_WORD = re.compile(r"\w+|[^\w\s]")


@dataclasses.dataclass(frozen=True)
class ParsedAnswer:
    """One answer: its sentences, the objects they state (in order, repeats kept), the rejected ones."""

    sentences: list[str]
    objects: list[tuple[str, str]]
    unparsed: list[str]


def parse_answer(answer: str, cfg: WorldSettings = WorldSettings()) -> ParsedAnswer:
    """Split ``answer`` into sentences and parse each as ``there is a|an {colour} {shape}``."""
    sentences, objects, unparsed = [], [], []
    for sentence in _SENTENCE_END.split(answer):
        words = _WORD.findall(sentence.lower())
        if not words:
            continue
        sentences.append(sentence.strip())
        if (len(words) == 5 and words[:2] == ["there", "is"] and words[2] in ("a", "an")
                and words[3] in cfg.colours and words[4] in cfg.shapes):
            objects.append((words[3], words[4]))
        else:
            unparsed.append(sentence.strip())
    return ParsedAnswer(sentences, objects, unparsed)


@dataclasses.dataclass(frozen=True)
class RuleClaimExtractor:
    """Split + convert by rule for the toy language; see the module docstring for the rules."""

    cfg: WorldSettings = WorldSettings()

    def extract_one(self, answer: str) -> ClaimResult:
        """Claims of one answer."""
        parsed = parse_answer(answer, self.cfg)
        raw_split = "\n".join(f"- {sentence}" for sentence in parsed.sentences)
        if parsed.unparsed:
            return ClaimResult([], [], "unparseable", raw_split=raw_split)
        if not parsed.objects:
            return ClaimResult([], [], "no_claims", raw_split=raw_split)
        objects = list(dict.fromkeys(parsed.objects))
        questions = [yesno_question(o) for o in objects]
        return ClaimResult([claim_sentence(o) for o in objects], questions, "ok", raw_split=raw_split,
                           raw_convert="\n".join(f"- {q}" for q in questions))

    def extract(self, items: list[tuple[str, str]]) -> list[ClaimResult]:
        """Claims of each (question, answer) pair, in order."""
        return [self.extract_one(answer) for _, answer in items]
