"""Conquer step of RLAIF-V: the labeler's yes/no verdict on each claim (METHOD.md §3).

The labeler answers ``"{question} Please answer yes or no."`` about the image; at the answer position we
take a softmax over the full vocabulary (float32) and compare ``P("yes") + P("Yes")`` with
``P("no") + P("No")``. The token ids are those of each word as generated right after the assistant
prompt. The official code applied the decoding repetition penalty to these logits first; here it is
optional and reproduces ``transformers``' ``RepetitionPenaltyLogitsProcessor``.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp

YES_WORDS: tuple[str, ...] = ("yes", "Yes")
NO_WORDS: tuple[str, ...] = ("no", "No")
ANSWER_WORDS: tuple[str, ...] = YES_WORDS + NO_WORDS


def accept_claim(p_yes: float, p_no: float) -> bool:
    """A claim is accepted iff the labeler puts more mass on yes than on no (ties reject)."""
    return bool(p_yes > p_no)


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
                f"pass its token id explicitly (overrides={{{word!r}: id}}, config labeler.yes_no_token_ids) "
                f"or set the text emitted before the word (word_prefix, config labeler.word_prefix)"
            )
        ids[word] = new[0]
    return {w: ids[w] for w in ANSWER_WORDS}


def apply_repetition_penalty(logits: jax.Array, prompt_token_ids: jax.Array, penalty: float) -> jax.Array:
    """``RepetitionPenaltyLogitsProcessor``: for tokens in the prompt, positive logits / penalty, negative * penalty.

    ``logits`` is [..., V], ``prompt_token_ids`` [..., L] with the same leading shape; ids < 0 are padding.
    """
    vocab = logits.shape[-1]
    ids = jnp.where(prompt_token_ids >= 0, prompt_token_ids, vocab)
    lead = logits.shape[:-1]
    flat_ids = ids.reshape(-1, ids.shape[-1])
    rows = jnp.arange(flat_ids.shape[0])[:, None]
    present = jnp.zeros((flat_ids.shape[0], vocab), bool).at[rows, flat_ids].set(True, mode="drop")
    present = present.reshape(*lead, vocab)
    penalised = jnp.where(logits < 0, logits * penalty, logits / penalty)
    return jnp.where(present, penalised, logits)


def yes_no_probs(
    logits: jax.Array,
    ids: Mapping[str, int],
    *,
    repetition_penalty: float | None = None,
    prompt_token_ids: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """(p_yes, p_no) from answer-position logits [..., V]: full-vocabulary float32 softmax.

    p_yes = P(yes) + P(Yes), p_no = P(no) + P(No), each distinct token counted once (a tokenizer that
    maps both spellings to one id). With ``repetition_penalty`` the logits of tokens in
    ``prompt_token_ids`` are penalised first.
    """
    logits = jnp.asarray(logits, jnp.float32)
    if repetition_penalty is not None:
        if prompt_token_ids is None:
            raise ValueError("repetition_penalty needs prompt_token_ids")
        logits = apply_repetition_penalty(logits, jnp.asarray(prompt_token_ids), repetition_penalty)
    probs = jax.nn.softmax(logits, axis=-1)

    def mass(words: Sequence[str]) -> jax.Array:
        token_ids = jnp.asarray(sorted({int(ids[w]) for w in words}))
        return jnp.take(probs, token_ids, axis=-1).sum(-1)

    return mass(YES_WORDS), mass(NO_WORDS)
