"""Conquer step of RLAIF-V: the labeler's yes/no verdict on each claim (METHOD.md §3).

The labeler answers ``"{question} Please answer yes or no."`` about the image; at the answer position we
take a softmax over the full vocabulary (float32) and compare ``P("yes") + P("Yes")`` with
``P("no") + P("No")``. The token ids are those of each word as generated right after the assistant
prompt. The official code applied the decoding repetition penalty to these logits first; here it is
optional and reproduces ``transformers``' ``RepetitionPenaltyLogitsProcessor``.

:class:`Labeler` scores many questions about one image with a shared prefix. Every labeler prompt of
an image is ``prefix + continuation`` where (``llava_v1``)::

    <s>{SYSTEM} USER: <image>\\n | {question} Please answer yes or no. ASSISTANT:
    (chat template: everything up to and including "<image>\\n" | the rest of the rendered template)

The prefix (image placeholders expanded) runs once through the decoder and leaves a KV cache; the
questions then run in batches, each row being that cache (broadcast) plus one continuation, and only
the hidden state at each row's last real token (the answer position) goes through the LM head.

Token boundary: every prompt is first encoded whole with :func:`rlaifv_jax.data.chat.encode_prompt`
(the canonical ids a full forward would see) and the continuation is the suffix of those ids after
the prefix, so ``prefix + continuation`` equals the full-prompt ids by construction. The prefix is the
encoding of the text before the question (``... USER: <image>\\n``); for each image it is verified to be
a prefix of every question's full ids and, should a tokenizer merge a token across that boundary, it
is shortened to the longest common prefix (logged at debug level; the scores stay exact, only less is
shared). With the WordLevel and SentencePiece-style BPE (Metaspace) tokenizers of the tests the image block and
its newline end on a token boundary and the split is exactly there (tested).

Compiled programs (all shapes bucketed, so no recompiles in a loop):

* image features: one per pixel shape (LLaVA-1.5: one; LLaVA-NeXT: one per tile count, the anyres
  packing is a host-computed gather);
* prefill: one per (prefix-length bucket, with/without image) (LLaVA-1.5: one per model);
* question scoring: one per (prefix bucket, row bucket, continuation bucket); rows are 1, 2, 4, 8,
  then multiples of 8 up to ``batch_size``; continuations round up to a multiple of ``continuation_multiple``.

:meth:`Labeler.programs` lists the shape keys compiled so far.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rlaifv_jax import sampling
from rlaifv_jax.data import chat
from rlaifv_jax.feedback.claims import labeler_question
from rlaifv_jax.models import anyres
from rlaifv_jax.models.llava import check_image_tokens

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
    """``RepetitionPenaltyLogitsProcessor`` for the tokens in the prompt (the sampler's penalty, applied
    to a presence mask built from ids). ``logits`` [..., V], ``prompt_token_ids`` [..., L] with the same
    leading shape; ids < 0 are padding."""
    vocab = logits.shape[-1]
    ids = jnp.where(prompt_token_ids >= 0, prompt_token_ids, vocab)
    flat_ids = ids.reshape(-1, ids.shape[-1])
    rows = jnp.arange(flat_ids.shape[0])[:, None]
    present = jnp.zeros((flat_ids.shape[0], vocab), bool).at[rows, flat_ids].set(True, mode="drop")
    return sampling.apply_repetition_penalty(logits, present.reshape(*logits.shape[:-1], vocab), penalty)


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


# ----------------------------------------------------------------------------------------------------
# Shared-prefix labeler
# ----------------------------------------------------------------------------------------------------

_SENTINEL = "\x00QUESTION\x00"
log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ImageQuestions:
    """One image and the yes/no questions asked about it (bare converted questions, no suffix).

    ``pixel_values`` in transformers layout for one image: ``[1, C, H, W]`` (LLaVA-1.5) or
    ``[1, tiles, C, H, W]`` (LLaVA-NeXT, with ``image_sizes [1, 2]`` as (height, width)); ``None`` asks
    the questions without an image.
    """

    questions: Sequence[str]
    pixel_values: Any = None
    image_sizes: Any = None


def _as_item(item: Any) -> ImageQuestions:
    if isinstance(item, ImageQuestions):
        return item
    if isinstance(item, Mapping):
        return ImageQuestions(list(item["questions"]), item.get("pixel_values"), item.get("image_sizes"))
    raise TypeError(f"labeler items are ImageQuestions or mappings with 'questions', got {type(item)}")


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
    full = [chat.encode_prompt(tokenizer, labeler_question(q), image_token_count,
                               image_token_id=image_token_id, template=template) for q in questions]
    head = prompt_head(tokenizer, template, image_token_count > 0)
    # The head is tokenized with the same chunk rule as encode_prompt (split at <image>, BOS for llava_v1).
    head_ids, _ = chat.chunks_to_ids(tokenizer, head, image_token_count, image_token_id, template)
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


def _round_up(n: int, multiple: int) -> int:
    return max(multiple, -(-n // multiple) * multiple)


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _row_bucket(n: int) -> int:
    """Rows of a question batch: 1, 2, 4, 8, then multiples of 8."""
    return _pow2_at_least(n) if n <= 8 else _round_up(n, 8)


def _tile(x: jax.Array, rows: int) -> jax.Array:
    return jnp.broadcast_to(x, (rows,) + x.shape[1:])


def _prefill(graphdef, state, ids, length, features):
    """KV cache ``[1, Pb, ...]`` of the prefix ``ids [1, Pb]`` (right-padded; ``length`` real tokens)."""
    model = nnx.merge(graphdef, state)
    pb = ids.shape[1]
    x = model.embed(ids, features)
    slots = jnp.arange(pb)[None]
    cache = model.init_cache(1, pb)
    _, cache = model.forward_embeds(x, positions=slots, key_mask=slots < length, cache=cache, cache_index=0)
    return cache


def _score(graphdef, answer_ids, repetition_penalty, state, cache, prefix_len, prefix_ids, cont_ids, cont_len):
    """(p_yes, p_no) ``[Q]`` for continuations ``cont_ids [Q, Cb]`` (``cont_len`` real tokens each) after
    the cached prefix (``prefix_len`` real tokens of ``Pb`` slots; ``prefix_ids [Pb]``, -1 padded)."""
    model = nnx.merge(graphdef, state)
    q, cb = cont_ids.shape
    pb = cache[0][0].shape[1]
    x = model.embed(cont_ids)
    steps = jnp.arange(cb)
    positions = _tile((prefix_len + steps)[None], q)
    cont_valid = steps[None] < cont_len[:, None]
    # Every question row attends to the one cached prefix (read once, never copied) plus its own tokens.
    prefix = (cache, (jnp.arange(pb) < prefix_len)[None])
    hidden, _ = model.forward_embeds(x, positions=positions, key_mask=cont_valid,
                                     cache=model.init_cache(q, cb, cache[0][0].dtype), cache_index=0,
                                     prefix=prefix)
    last = hidden[jnp.arange(q), jnp.maximum(cont_len - 1, 0)]  # the answer position of each row
    logits = model.logits(last)
    prompt_ids = None
    if repetition_penalty is not None:
        prompt_ids = jnp.concatenate([_tile(prefix_ids[None], q), jnp.where(cont_valid, cont_ids, -1)], axis=1)
    return yes_no_probs(logits, dict(answer_ids), repetition_penalty=repetition_penalty,
                        prompt_token_ids=prompt_ids)


class Labeler:
    """Yes/no claim scoring with a shared image prefix (see the module docstring).

    ``model``: any model of ``rlaifv_jax.models`` (LLaVA-1.5, LLaVA-NeXT, or a text-only Llama for
    ``pixel_values=None`` items). ``template``: ``'llava_v1'`` or ``'chat'`` (the tokenizer's chat
    template). ``yes_no_ids`` overrides derived token ids per word; ``word_prefix`` is the text emitted
    before the answer word (default ``" "`` for llava_v1, ``""`` for chat). ``repetition_penalty``
    (default off) penalises the prompt's tokens before the softmax, as the official code did.
    ``batch_size`` questions (max) run per scoring call.

    The weights are read from ``model`` at every :meth:`score` call, so a labeler built on the policy
    (self-feedback) follows its updates without recompiling.
    """

    def __init__(
        self,
        model: nnx.Module,
        tokenizer: Any,
        *,
        template: str = "llava_v1",
        yes_no_ids: Mapping[str, int] | None = None,
        word_prefix: str | None = None,
        repetition_penalty: float | None = None,
        batch_size: int = 16,
        continuation_multiple: int = 16,
        prefix_multiple: int = 64,
    ):
        if template not in chat.TEMPLATES:
            raise ValueError(f"template must be one of {chat.TEMPLATES}, got {template!r}")
        if batch_size < 1 or continuation_multiple < 1 or prefix_multiple < 1:
            raise ValueError("batch_size, continuation_multiple and prefix_multiple must be positive")
        self.model = model
        self.tokenizer = tokenizer
        self.template = template
        self.repetition_penalty = None if repetition_penalty in (None, 1.0) else float(repetition_penalty)
        self.batch_size = int(batch_size)
        self.continuation_multiple = int(continuation_multiple)
        self.prefix_multiple = int(prefix_multiple)
        prompt, default_prefix = assistant_prompt(tokenizer, template)
        self.answer_ids = yes_no_token_ids(
            tokenizer, prompt, word_prefix=default_prefix if word_prefix is None else word_prefix,
            overrides=yes_no_ids)
        log.info("labeler yes/no token ids: %s (%s%s)", self.answer_ids, template,
                 ", overrides " + str(dict(yes_no_ids)) if yes_no_ids else "")
        self.image_token_id = getattr(model.config, "image_token_id", None)
        graphdef, self._state = nnx.split(model)
        self._prefill = jax.jit(functools.partial(_prefill, graphdef))
        self._score = jax.jit(functools.partial(
            _score, graphdef, tuple(sorted(self.answer_ids.items())), self.repetition_penalty))
        self._tiles = jax.jit(lambda state, px: nnx.merge(graphdef, state).tile_features(px))
        self._features = jax.jit(lambda state, px: nnx.merge(graphdef, state).image_features(px))
        self._programs: set[tuple] = set()

    # -- bookkeeping -------------------------------------------------------------------------------
    def _note(self, key: tuple) -> None:
        if key not in self._programs:
            self._programs.add(key)
            log.debug("labeler compiles %s", key)

    def programs(self) -> list[tuple]:
        """Shape keys of the programs compiled so far: ``('features', shape)``, ``('prefill', Pb, image)``,
        ``('score', Pb, rows, Cb)``."""
        return sorted(self._programs, key=repr)

    # -- image side --------------------------------------------------------------------------------
    def image_features(self, pixel_values: Any, image_sizes: Any = None) -> jax.Array:
        """``[image_tokens, D]`` for one image in transformers layout (see :class:`ImageQuestions`)."""
        px = jnp.asarray(pixel_values)
        if hasattr(self.model, "image_newline"):  # LLaVA-NeXT: jit the tower per tile count, pack on host
            if image_sizes is None:
                raise ValueError("LLaVA-NeXT needs image_sizes with pixel_values")
            if px.ndim == 4:
                px = px[None]
            sizes = [tuple(int(s) for s in hw) for hw in np.asarray(image_sizes).reshape(-1, 2)]
            indices, counts, _ = anyres.batch_pack_indices(sizes, **self.model.anyres_kwargs())
            tiles = jnp.concatenate([px[i, :n] for i, n in enumerate(counts)], axis=0)
            self._note(("features", tuple(tiles.shape)))
            feats = self._tiles(self._state, tiles)
            return anyres.pack_features(feats, self.model.image_newline[...], indices)
        if px.ndim == 3:
            px = px[None]
        self._note(("features", tuple(px.shape)))
        return self._features(self._state, px)

    def _image_token_count(self, image_sizes: Any) -> int:
        size = None if image_sizes is None else tuple(int(s) for s in np.asarray(image_sizes).reshape(-1, 2)[0])
        return int(self.model.num_image_tokens(size))

    # -- scoring -----------------------------------------------------------------------------------
    def prefill(self, item: ImageQuestions, prefix: np.ndarray):
        """KV cache of ``prefix`` (image merged) padded to its bucket, and the bucket's id row."""
        features = None
        if item.pixel_values is not None:
            features = self.image_features(item.pixel_values, item.image_sizes)
            check_image_tokens(prefix, self.image_token_id, int(features.shape[0]))
        pb = _round_up(len(prefix), self.prefix_multiple)
        ids = np.full((1, pb), -1, np.int32)
        ids[0, : len(prefix)] = prefix
        if features is not None and features.shape[0] < pb:  # pad to a bucket: one program per Pb
            features = jnp.pad(features, ((0, pb - features.shape[0]), (0, 0)))
        self._note(("prefill", pb, features is not None))
        cache = self._prefill(self._state, jnp.asarray(np.maximum(ids, 0)), jnp.int32(len(prefix)), features)
        return cache, ids[0]

    def score_async(self, item: Any) -> list[tuple[np.ndarray, jax.Array, jax.Array]]:
        """Dispatch the scoring of one image's questions; returns (question indices, p_yes, p_no) chunks."""
        item = _as_item(item)
        questions = list(item.questions)
        if not questions:
            return []
        n_img = 0 if item.pixel_values is None else self._image_token_count(item.image_sizes)
        if n_img and self.image_token_id is None:
            raise ValueError("pixel_values were given to a labeler model without images")
        prefix, conts = split_prompts(self.tokenizer, questions, n_img, image_token_id=self.image_token_id,
                                      template=self.template)
        cache, prefix_row = self.prefill(item, prefix)
        pb = prefix_row.shape[0]
        order = sorted(range(len(questions)), key=lambda i: len(conts[i]))
        chunks = []
        for start in range(0, len(order), self.batch_size):
            idx = np.asarray(order[start: start + self.batch_size])
            rows = min(self.batch_size, _row_bucket(len(idx)))
            cb = _round_up(max(len(conts[i]) for i in idx), self.continuation_multiple)
            ids = np.zeros((rows, cb), np.int32)
            lens = np.ones((rows,), np.int32)  # padding rows: one pad token, result dropped
            for r, i in enumerate(idx):
                ids[r, : len(conts[i])] = conts[i]
                lens[r] = len(conts[i])
            self._note(("score", pb, rows, cb))
            p_yes, p_no = self._score(self._state, cache, jnp.int32(len(prefix)), jnp.asarray(prefix_row),
                                      jnp.asarray(ids), jnp.asarray(lens))
            chunks.append((idx, p_yes, p_no))
        return chunks

    def score(self, items: Sequence[Any]) -> list[list[tuple[float, float]]]:
        """``(p_yes, p_no)`` per question per item, in input order; items without questions give ``[]``.

        Items are :class:`ImageQuestions` or mappings with ``questions`` and optional ``pixel_values``,
        ``image_sizes``. Decide each claim with :func:`accept_claim`.
        """
        self._state = nnx.state(self.model)  # current weights (same structure: no recompile)
        pending = [(len(_as_item(it).questions), self.score_async(it)) for it in items]
        out = []
        for n, chunks in pending:
            scores: list[tuple[float, float] | None] = [None] * n
            for idx, p_yes, p_no in chunks:
                y, nn = np.asarray(p_yes), np.asarray(p_no)
                for r, i in enumerate(idx):
                    scores[int(i)] = (float(y[r]), float(nn[r]))
            out.append(scores)
        return out
