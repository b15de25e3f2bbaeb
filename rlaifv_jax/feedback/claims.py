"""Divide step of RLAIF-V: split a response into atomic facts, convert each fact into a yes/no question.

The prompts are the input format of the official fine-tuned split/convert Llama-3-8B models and are
reproduced byte for byte from METHOD.md §3, which matches the official ``utils/llama3_8b_inference.py``:

* split: template + ``question`` + ``"\\nAnswer: "`` + ``answer`` with no trailing newline, then the
  whole string is cut to its first 300 ``' '``-separated words and re-joined with ``' '`` (so newlines
  do not separate words and runs of spaces are kept inside the limit);
* convert: template ending in ``"### Declarative sentences:"``, then ``"\\n- {fact}\\n"`` per fact.

The parser follows the official ``get_facts`` (strip the text, split on ``\\n``, drop empty lines and
lines containing ``###``, drop each line's first character, strip). Two deliberate differences, both
without effect on well-formed outputs: whitespace-only lines and items that are empty after the bullet
is dropped are discarded (the official code kept them as ``''`` facts and filtered them out later).

:class:`LLMClaimExtractor` runs both LLM calls for a batch of (question, answer) items and returns a
:class:`ClaimResult` per item. ``ClaimResult.questions`` are the bare converted yes/no questions, like
the rule-based twin in ``toy_claims.py``; the labeler stage turns each into its prompt with
:func:`labeler_question`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Literal, Protocol

ClaimStatus = Literal["ok", "no_claims", "count_mismatch", "unparseable"]

SPLIT_MAX_WORDS = 300
BULLET = "-"

_SPLIT_HEAD = (
    "You are an expert in extracting facts from the given question-answer pair for an image. "
    "Your task is to extract and rewrite the facts mentioned in the question-answer pair into "
    "self-contained sentences. Exclude opinions or subjective statements.\n"
    "\n"
    "You should present your result in the following format:\n"
    "### Facts:\n"
    "- {Extracted fact 1}\n"
    "- {Extracted fact 2}\n"
    "- ...\n"
    "\n"
    "### Question-answer pair:\n"
    "Question: "
)
_SPLIT_ANSWER = "\nAnswer: "

CONVERT_TEMPLATE = (
    "You are an expert at modifying a given declarative sentence into a general question sentence. "
    "Your task is to modify the given declarative sentences one by one into a general question form. "
    "Do not change tenses or add extra content.\n"
    "    If the given declarative sentence contains not, no or negative meaning words, you need to "
    "check the modified general interrogative sentence to make sure that the generated general "
    "question sentence retains words with not , no or negative meaning words.\n"
    "\n"
    "You should present your result in the following format:\n"
    "### Modified sentences:\n"
    "- {Modified sentence 1}\n"
    "- {Modified sentence 2}\n"
    "- ...\n"
    "\n"
    "### Declarative sentences:"
)


@dataclasses.dataclass(frozen=True)
class ClaimDecodeSettings:
    """Decoding settings of the split/convert LLM calls (official: sampled, T 0.2, top-p 0.9, 256 tokens;
    top-k 50 was transformers 4's default, in effect in the official pipeline)."""

    temperature: float = 0.2
    top_k: int = 50
    top_p: float = 0.9
    max_new_tokens: int = 256


CLAIM_LLM_DECODING = ClaimDecodeSettings()


def split_prompt(question: str, answer: str) -> str:
    """User message asking the split LLM for the atomic facts of (question, answer), cut to 300 words."""
    content = _SPLIT_HEAD + question + _SPLIT_ANSWER + answer
    return " ".join(content.split(" ")[:SPLIT_MAX_WORDS])


def convert_prompt(facts: list[str]) -> str:
    """User message asking the convert LLM to turn each fact into a general (yes/no) question."""
    return CONVERT_TEMPLATE + "".join(f"\n- {fact}\n" for fact in facts)


def _content_lines(text: str) -> list[str]:
    return [line for line in text.strip().split("\n") if line.strip() and "###" not in line]


def parse_bullets(text: str) -> list[str]:
    """Items of a bulleted LLM output: content lines without their first character, stripped."""
    return [item for item in (line[1:].strip() for line in _content_lines(text)) if item]


def is_bulleted(text: str) -> bool:
    """Whether every content line of an LLM output starts with the ``-`` bullet (the trained format)."""
    return all(line.startswith(BULLET) for line in _content_lines(text))


@dataclasses.dataclass(frozen=True)
class ClaimResult:
    """Claims of one response: facts zipped with their yes/no questions, a status, the raw LLM outputs.

    ``status`` is 'ok' (at least one claim, counts equal), 'no_claims' (empty answer or no facts),
    'count_mismatch' (fact and question counts differ: no claims kept) or 'unparseable' (an output line
    without the bullet: no claims kept). Only 'ok' responses are pair candidates.
    """

    facts: list[str]
    questions: list[str]
    status: ClaimStatus
    raw_split: str = ""
    raw_convert: str = ""

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ClaimResult":
        """Inverse of :meth:`to_dict`."""
        return cls(**d)


class ClaimExtractor(Protocol):
    """Turns (question, answer) items into one :class:`ClaimResult` each, in order."""

    def extract(self, items: list[tuple[str, str]]) -> list[ClaimResult]:
        """Claims of each (question, answer) item."""
        ...


GenerateText = Callable[[list[str]], list[str]]


def _generate(fn: GenerateText, prompts: list[str]) -> list[str]:
    if not prompts:
        return []
    outputs = list(fn(prompts))
    if len(outputs) != len(prompts):
        raise ValueError(f"generate_text returned {len(outputs)} completions for {len(prompts)} prompts")
    return outputs


class LLMClaimExtractor:
    """Split + convert with chat LLMs (the official pipeline: two fine-tuned Llama-3-8B-Instruct models).

    ``generate_text`` maps a batch of user-message strings to completions (chat template and decoding,
    :data:`CLAIM_LLM_DECODING`, are its business); ``convert_generate_text`` is the convert model when it
    differs from the split model. Empty answers give 'no_claims' without an LLM call; the convert call is
    made only for responses whose split output gave facts.
    """

    def __init__(self, generate_text: GenerateText, convert_generate_text: GenerateText | None = None):
        self.split_generate = generate_text
        self.convert_generate = convert_generate_text or generate_text

    @staticmethod
    def split_messages(items: list[tuple[str, str]]) -> list[str]:
        """The split LLM's message for each item with a non-empty answer, in order."""
        return [split_prompt(question, answer) for question, answer in items if answer.strip()]

    def prepare(self, items: list[tuple[str, str]]) -> None:
        """Host work ahead of ``extract(items)``, safe on another thread: the split messages handed to the
        split LLM's ``prepare`` (tokenizing them), when it has one."""
        ahead = getattr(self.split_generate, "prepare", None)
        if ahead is not None:
            ahead(self.split_messages(items))

    def extract(self, items: list[tuple[str, str]]) -> list[ClaimResult]:
        """Claims of each (question, answer) item, two batched LLM calls in all."""
        todo = [i for i, (_, answer) in enumerate(items) if answer.strip()]
        raw_split = dict(zip(todo, _generate(self.split_generate, self.split_messages(items))))
        facts = {i: parse_bullets(raw) for i, raw in raw_split.items()}
        to_convert = [i for i in todo if facts[i] and is_bulleted(raw_split[i])]
        raw_convert = dict(zip(to_convert, _generate(self.convert_generate,
                                                     [convert_prompt(facts[i]) for i in to_convert])))
        results = []
        for i in range(len(items)):
            split_out, convert_out = raw_split.get(i, ""), raw_convert.get(i, "")
            if i not in raw_split or not facts[i]:
                results.append(ClaimResult([], [], "no_claims", split_out))
                continue
            questions = parse_bullets(convert_out)
            if not (is_bulleted(split_out) and is_bulleted(convert_out)):
                status: ClaimStatus = "unparseable"
            elif len(questions) != len(facts[i]):
                status = "count_mismatch"
            else:
                results.append(ClaimResult(facts[i], questions, "ok", split_out, convert_out))
                continue
            results.append(ClaimResult([], [], status, split_out, convert_out))
        return results
