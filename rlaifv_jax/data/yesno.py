"""The labeler's prompts, host side: yes/no answer token ids and the shared-prefix split of one
image's question prompts (METHOD.md §3). No JAX here; ``engine.score`` runs the model."""
from __future__ import annotations

import functools
import logging
from typing import Any, Mapping, Sequence

import numpy as np

from rlaifv_jax.data import chat
from rlaifv_jax.data.chat import labeler_question

YES_WORDS: tuple[str, ...] = ("yes", "Yes")
NO_WORDS: tuple[str, ...] = ("no", "No")
ANSWER_WORDS: tuple[str, ...] = YES_WORDS + NO_WORDS
# The automatic answer prefix: the template's (" " after llava_v1's "ASSISTANT:", "" after a chat
# template's generation prompt), else the other.
AUTO = "auto"
_SENTINEL = "\x00QUESTION\x00"
log = logging.getLogger(__name__)


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


def yes_no_token_ids(
    tokenizer: Any,
    assistant_prompt: str,
    *,
    word_prefix: str = "",
    overrides: Mapping[str, int] | None = None,
) -> dict[str, int]:
    """Token ids of "yes", "Yes", "no", "No" as generated right after ``assistant_prompt``.

    Each id is the single token by which ``encode(assistant_prompt + word_prefix + word)`` extends
    ``encode(assistant_prompt)`` (``tokenizer.encode(text, add_special_tokens=False)``, the Hugging Face
    tokenizer API). ``word_prefix`` is text the model emits before the word (e.g. ``" "`` after
    ``"ASSISTANT:"``). Words in ``overrides`` take the given id and are not derived. Raises ValueError
    when a word is not exactly one new token or maps to the unknown token.
    """
    overrides = dict(overrides or {})
    unknown = set(overrides) - set(ANSWER_WORDS)
    if unknown:
        raise ValueError(f"yes/no override ids for unknown words {sorted(unknown)}; expected {ANSWER_WORDS}")
    ids = {w: int(overrides[w]) for w in ANSWER_WORDS if w in overrides}
    missing = [w for w in ANSWER_WORDS if w not in ids]
    if not missing:
        return ids
    prompt_ids = _encode(tokenizer, assistant_prompt)
    unk_id = getattr(tokenizer, "unk_token_id", None)
    for word in missing:
        full = _encode(tokenizer, assistant_prompt + word_prefix + word)
        new = full[len(prompt_ids):]
        problem = None
        if full[: len(prompt_ids)] != prompt_ids:
            problem = "merges with the end of the assistant prompt"
        elif len(new) != 1:
            problem = f"is {len(new)} tokens {new}, not one"
        elif unk_id is not None and new[0] == unk_id:
            problem = "is the unknown token"
        if problem:
            raise ValueError(
                f"labeler answer word {word_prefix + word!r} after the assistant prompt {problem}; "
                f"pass its token id explicitly (overrides={{{word!r}: id}}, engine.score.Labeler(yes_no_ids=...)) "
                f"or the text emitted before the word (config labeler.answer_prefix, Labeler(word_prefix=...))"
            )
        ids[word] = new[0]
    return {w: ids[w] for w in ANSWER_WORDS}


def answer_forms(tokenizer: Any, assistant_prompt: str) -> dict[str, list[int] | None]:
    """The tokens each surface form of the answer words ("yes", " yes", "Yes", " Yes", "no", …) adds
    after ``assistant_prompt`` in ``tokenizer`` (None: the form merges with the prompt's end)."""
    head = _encode(tokenizer, assistant_prompt)
    out: dict[str, list[int] | None] = {}
    for prefix in ("", " "):
        for word in ANSWER_WORDS:
            full = _encode(tokenizer, assistant_prompt + prefix + word)
            out[prefix + word] = full[len(head):] if full[: len(head)] == head else None
    return out


def resolve_answer_ids(
    tokenizer: Any,
    assistant_prompt: str,
    *,
    template_prefix: str,
    answer_prefix: str = AUTO,
    overrides: Mapping[str, int] | None = None,
) -> tuple[dict[str, int], str]:
    """``(yes/no token ids, the answer prefix used)`` of a labeler's own tokenizer and template.

    The answer words' surface forms are ``answer_prefix + word`` for "yes", "Yes", "no", "No".
    ``answer_prefix = "auto"``: the template's ``template_prefix`` (``assistant_prompt``'s), else the
    other of ``""`` / ``" "``, whichever makes every word one token of its own. Raises a one-line
    ValueError naming the tokenizer and what each surface form gave when none does.
    """
    if answer_prefix != AUTO:
        ids = yes_no_token_ids(tokenizer, assistant_prompt, word_prefix=answer_prefix, overrides=overrides)
        return ids, answer_prefix
    for prefix in (template_prefix, "" if template_prefix else " "):
        try:
            return yes_no_token_ids(tokenizer, assistant_prompt, word_prefix=prefix, overrides=overrides), prefix
        except ValueError:
            continue
    name = getattr(tokenizer, "name_or_path", "") or "?"
    forms = ", ".join(f"{f!r} -> {'merges with the prompt' if ids is None else ids}"
                      for f, ids in answer_forms(tokenizer, assistant_prompt).items())
    raise ValueError(f"labeler tokenizer {name!r} ({type(tokenizer).__name__}) gives no single-token yes/no answer "
                     f"after its assistant prompt: {forms}; set labeler.answer_prefix or pass yes_no_ids")


def prompt_head(tokenizer: Any, template: str, with_image: bool) -> str:
    """The prompt text before the question: ``"{SYSTEM} USER: <image>\\n"`` for ``llava_v1``."""
    if template == "llava_v1":
        text = chat.llava_v1_prompt(_SENTINEL, with_image)
    elif template == "chat":
        text = chat.chat_template_prompt(tokenizer, _SENTINEL, with_image)
    else:
        raise ValueError(f"template must be one of {chat.TEMPLATES}, got {template!r}")
    if text.count(_SENTINEL) != 1:
        raise ValueError(f"the {template} prompt does not contain the question exactly once: {text!r}")
    return text[: text.index(_SENTINEL)]


def assistant_prompt(tokenizer: Any, template: str) -> tuple[str, str]:
    """(a text-only prompt ending with the assistant turn's opening, the text emitted before the answer
    word): ``("... ASSISTANT:", " ")`` for ``llava_v1``, the generation prompt and ``""`` for ``chat``."""
    question = labeler_question("Is there a cat?")
    if template == "llava_v1":
        return chat.llava_v1_prompt(question, with_image=False), " "
    if template == "chat":
        return chat.chat_template_prompt(tokenizer, question), ""
    raise ValueError(f"template must be one of {chat.TEMPLATES}, got {template!r}")


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


# A labeler is asked the same few hundred questions about image after image (the claims of one world,
# one policy): their ids are encoded once per tokenizer, image-token count and template.
@functools.lru_cache(maxsize=4096)
def _prompt_ids(tokenizer: Any, question: str, image_token_count: int, image_token_id: int | None,
                template: str) -> tuple[int, ...]:
    return tuple(chat.encode_prompt(tokenizer, labeler_question(question), image_token_count,
                                    image_token_id=image_token_id, template=template).tolist())


@functools.lru_cache(maxsize=64)
def _head_ids(tokenizer: Any, image_token_count: int, image_token_id: int | None, template: str) -> tuple[int, ...]:
    head = prompt_head(tokenizer, template, image_token_count > 0)
    # The head is tokenized with the same chunk rule as encode_prompt (split at <image>, BOS for llava_v1).
    ids, _ = chat.chunks_to_ids(tokenizer, head, image_token_count, image_token_id, template)
    return tuple(ids)


def split_prompts(
    tokenizer: Any,
    questions: Sequence[str],
    image_token_count: int,
    *,
    image_token_id: int | None = None,
    template: str = "llava_v1",
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Shared prefix ids and per-question continuation ids of the labeler prompts of one image.

    ``questions`` are bare yes/no questions (the labeler suffix is added here). Each full prompt is
    ``encode_prompt(tokenizer, labeler_question(q), image_token_count, ...)`` and equals
    ``concat(prefix, continuation)`` exactly. The prefix is the encoding of :func:`prompt_head`
    (through ``<image>\\n``), shortened only if a tokenizer merges across that boundary; every
    continuation keeps at least one token.
    """
    if not questions:
        raise ValueError("split_prompts needs at least one question")
    full = [_prompt_ids(tokenizer, q, image_token_count, image_token_id, template) for q in questions]
    head_ids = _head_ids(tokenizer, image_token_count, image_token_id, template)
    k = len(head_ids)
    for ids in full:
        k = min(k, _common_prefix(head_ids, ids), len(ids) - 1)
    if k < len(head_ids):
        log.debug("labeler prefix shortened from %d to %d tokens (tokenizer merges across the question "
                  "boundary)", len(head_ids), k)
    if k < 1:
        raise ValueError("the labeler prompts share no prefix token; a shared prefix needs at least one "
                         "(e.g. BOS or the system prompt)")
    prefix = np.asarray(head_ids[:k], np.int32)
    if image_token_count and np.sum(prefix == image_token_id) != image_token_count:
        raise ValueError("the image placeholder block is not inside the shared labeler prefix")
    return prefix, [np.asarray(ids[k:], np.int32) for ids in full]
