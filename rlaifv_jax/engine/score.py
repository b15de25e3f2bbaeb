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
  packing is a host-computed gather; Qwen2.5-VL: one per chunk bucket, ``models.qwen_vision``);
* prefill: one per (prefix-length bucket, with/without image) (LLaVA-1.5: one per model);
* question scoring: one per (prefix bucket, row bucket, continuation bucket); rows are 1, 2, 4, 8,
  then multiples of 8 up to ``batch_size``; continuations round up to a multiple of ``continuation_multiple``.

Qwen2.5-VL: the prefix runs at its multimodal positions (``model.position_ids``) and question token
``j`` at ``prefix length + j + rope_delta`` (the delta of the prefix), as transformers positions the
same tokens in the full prompt.

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

from rlaifv_jax.core import device_time
from rlaifv_jax.data import chat
from rlaifv_jax.data.yesno import AUTO, NO_WORDS, YES_WORDS, assistant_prompt, resolve_answer_ids, split_prompts
from rlaifv_jax.engine import vision
from rlaifv_jax.engine.logits import apply_repetition_penalty, presence_mask
from rlaifv_jax.engine.prefill import prefill
from rlaifv_jax.models import qwen_vision
from rlaifv_jax.models.llava import check_image_tokens

log = logging.getLogger(__name__)


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
        seen = presence_mask(jnp.asarray(prompt_token_ids), logits.shape[-1])
        logits = apply_repetition_penalty(logits, seen, repetition_penalty)
    probs = jax.nn.softmax(logits, axis=-1)

    def mass(words: Sequence[str]) -> jax.Array:
        token_ids = jnp.asarray(sorted({int(ids[w]) for w in words}))
        return jnp.take(probs, token_ids, axis=-1).sum(-1)

    return mass(YES_WORDS), mass(NO_WORDS)


@dataclasses.dataclass(frozen=True)
class ImageQuestions:
    """One image and the yes/no questions asked about it (bare converted questions, no suffix).

    ``pixel_values`` in transformers layout for one image: ``[1, C, H, W]`` (LLaVA-1.5),
    ``[1, tiles, C, H, W]`` (LLaVA-NeXT, with ``image_sizes [1, 2]`` as (height, width)) or
    ``[patches, patch_dim]`` (Qwen2.5-VL, with ``image_grid_thw [1, 3]``); ``None`` asks the questions
    without an image.
    """

    questions: Sequence[str]
    pixel_values: Any = None
    image_sizes: Any = None
    image_grid_thw: Any = None


def _as_item(item: Any) -> ImageQuestions:
    if isinstance(item, ImageQuestions):
        return item
    if isinstance(item, Mapping):
        return ImageQuestions(list(item["questions"]), item.get("pixel_values"), item.get("image_sizes"),
                              item.get("image_grid_thw"))
    raise TypeError(f"labeler items are ImageQuestions or mappings with 'questions', got {type(item)}")


PREFIX_MULTIPLE = 64  # image prefixes pad to a multiple of this many tokens (one program per bucket)
CONTINUATION_MULTIPLE = 16  # questions pad to a multiple of this many tokens


def round_up(n: int, multiple: int) -> int:
    """``n`` rounded up to a multiple of ``multiple`` (at least one): the prefix and continuation buckets."""
    return max(multiple, -(-n // multiple) * multiple)


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def row_bucket(n: int) -> int:
    """Rows of a question batch: 1, 2, 4, 8, then multiples of 8."""
    return _pow2_at_least(n) if n <= 8 else round_up(n, 8)


def question_batches(lengths: Sequence[int], batch_size: int, continuation_multiple: int
                     ) -> list[tuple[np.ndarray, int, int]]:
    """How the labeler batches one image's questions, given each continuation's token count: the
    questions in order of length, ``batch_size`` at a time → ``[(question indices, rows, continuation
    bucket)]`` (``row_bucket`` rows up to ``batch_size``; the longest continuation rounded up)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches = []
    for start in range(0, len(order), batch_size):
        idx = np.asarray(order[start: start + batch_size])
        batches.append((idx, min(batch_size, row_bucket(len(idx))),
                        round_up(max(lengths[i] for i in idx), continuation_multiple)))
    return batches


def _tile(x: jax.Array, rows: int) -> jax.Array:
    return jnp.broadcast_to(x, (rows,) + x.shape[1:])


def _prefill(graphdef, state, ids, length, features, positions=None):
    """KV cache ``[1, Pb, ...]`` of the prefix ``ids [1, Pb]`` (right-padded; ``length`` real tokens;
    ``positions [3, 1, Pb]`` for Qwen2.5-VL)."""
    _, cache = prefill(nnx.merge(graphdef, state), ids, features, jnp.arange(ids.shape[1])[None] < length, positions)
    return cache


def _score(graphdef, answer_ids, repetition_penalty, state, cache, prefix_len, prefix_ids, cont_ids, cont_len,
           rope_delta):
    """(p_yes, p_no) ``[Q]`` for continuations ``cont_ids [Q, Cb]`` (``cont_len`` real tokens each) after
    the cached prefix (``prefix_len`` real tokens of ``Pb`` slots; ``prefix_ids [Pb]``, -1 padded);
    continuation token ``j`` sits at position ``prefix_len + j + rope_delta``."""
    model = nnx.merge(graphdef, state)
    q, cb = cont_ids.shape
    pb = cache[0][0].shape[1]
    x = model.embed(cont_ids)
    steps = jnp.arange(cb)
    positions = _tile((prefix_len + rope_delta + steps)[None], q)
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
    before the answer word (default ``"auto"``: ``" "`` for llava_v1, ``""`` for chat, else the other
    one, whichever the labeler's tokenizer encodes as one token per word;
    ``data.yesno.resolve_answer_ids``). ``repetition_penalty``
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
        continuation_multiple: int = CONTINUATION_MULTIPLE,
        prefix_multiple: int = PREFIX_MULTIPLE,
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
        self.answer_ids, self.word_prefix = resolve_answer_ids(
            tokenizer, prompt, template_prefix=default_prefix,
            answer_prefix=AUTO if word_prefix is None else word_prefix, overrides=yes_no_ids)
        log.info("labeler yes/no token ids: %s (%s, answer prefix %r%s)", self.answer_ids, template, self.word_prefix,
                 ", overrides " + str(dict(yes_no_ids)) if yes_no_ids else "")
        self.image_token_id = getattr(model.config, "image_token_id", None)
        self.mrope = vision.uses_mrope(model)
        graphdef, self._state = nnx.split(model)
        self._prefill, self._score = make_programs(graphdef, self.answer_ids, self.repetition_penalty)
        self._graphdef = graphdef
        self._programs: set[tuple] = set()

    # -- bookkeeping -------------------------------------------------------------------------------
    def _note(self, key: tuple) -> None:
        if key not in self._programs:
            self._programs.add(key)
            log.debug("labeler program %s", key)

    def programs(self) -> list[tuple]:
        """Shape keys of the programs this labeler has run so far (each compiled once per process, by
        whichever labeler of the same architecture ran it first): ``('features', shape)``,
        ``('prefill', Pb, image)``, ``('score', Pb, rows, Cb)``."""
        return sorted(self._programs, key=repr)

    # -- image side --------------------------------------------------------------------------------
    def image_features(self, pixel_values: Any, layout: Any = None) -> jax.Array:
        """``[image_tokens, D]`` for one image in transformers layout (see :class:`ImageQuestions`;
        ``layout``: its ``image_sizes`` or ``image_grid_thw``)."""
        px = np.asarray(pixel_values, np.float32)
        if self.mrope:
            self._note(("features", qwen_vision.bucket(qwen_vision.num_chunks(layout, self.model.config.vision))))
            return vision.image_features(self._graphdef, self._state, px, layout, model=self.model)
        if px.ndim == (4 if hasattr(self.model, "image_newline") else 3):  # one image without its batch axis
            px = px[None]
        self._note(("features", tuple(px.shape)))
        return vision.image_features(self._graphdef, self._state, px, layout, model=self.model)

    def _layout(self, item: ImageQuestions) -> Any:
        layout = item.image_grid_thw if self.mrope else item.image_sizes
        if self.mrope and item.pixel_values is not None and layout is None:
            raise ValueError("Qwen2.5-VL labeler items need image_grid_thw with pixel_values")
        return layout

    def _image_token_count(self, layout: Any) -> int:
        if self.mrope:
            return int(self.model.num_image_tokens(layout))
        size = None if layout is None else tuple(int(s) for s in np.asarray(layout).reshape(-1, 2)[0])
        return int(self.model.num_image_tokens(size))

    # -- scoring -----------------------------------------------------------------------------------
    def prefill(self, item: ImageQuestions, prefix: np.ndarray):
        """KV cache of ``prefix`` (image merged) padded to its bucket, the bucket's id row and the
        prefix's rope delta (0 but for Qwen2.5-VL)."""
        features = None
        layout = self._layout(item)
        if item.pixel_values is not None:
            features = self.image_features(item.pixel_values, layout)
            check_image_tokens(prefix, self.image_token_id, int(features.shape[0]))
        pb = round_up(len(prefix), self.prefix_multiple)
        ids = np.full((1, pb), -1, np.int32)
        ids[0, : len(prefix)] = prefix
        if features is not None and features.shape[0] < pb:  # pad to a bucket: one program per Pb
            features = jnp.pad(features, ((0, pb - features.shape[0]), (0, 0)))
        positions, delta = None, 0
        if self.mrope:
            pos, deltas = self.model.position_ids(prefix[None], None, layout if features is not None else None)
            positions = np.zeros((3, 1, pb), np.int32)
            positions[:, :, : len(prefix)] = pos
            positions, delta = jnp.asarray(positions), int(deltas[0])
        self._note(("prefill", pb, features is not None))
        cache = self._prefill(self._state, jnp.asarray(np.maximum(ids, 0)), jnp.int32(len(prefix)), features,
                              positions)
        return cache, ids[0], delta

    def score_async(self, item: Any) -> tuple[np.ndarray, list[tuple[np.ndarray, jax.Array, jax.Array]]]:
        """Dispatch the scoring of one image's questions, each distinct question once (a prompt's
        responses repeat their claims: 27 questions a prompt, 3.5 distinct, in the toy's first
        iteration); returns ``(inverse, chunks)``: ``chunks`` of (distinct-question indices, p_yes,
        p_no), question ``i`` answered as distinct question ``inverse[i]``."""
        item = _as_item(item)
        distinct: dict[str, int] = {}
        inverse = np.asarray([distinct.setdefault(q, len(distinct)) for q in item.questions], np.int64)
        questions = list(distinct)
        if not questions:
            return inverse, []
        if item.pixel_values is not None and self.image_token_id is None:
            raise ValueError("pixel_values were given to a labeler model without images")
        n_img = 0 if item.pixel_values is None else self._image_token_count(self._layout(item))
        prefix, conts = split_prompts(self.tokenizer, questions, n_img, image_token_id=self.image_token_id,
                                      template=self.template)
        cache, prefix_row, delta = self.prefill(item, prefix)
        pb = prefix_row.shape[0]
        chunks = []
        for idx, rows, cb in question_batches([len(c) for c in conts], self.batch_size, self.continuation_multiple):
            ids = np.zeros((rows, cb), np.int32)
            lens = np.ones((rows,), np.int32)  # padding rows: one pad token, result dropped
            for r, i in enumerate(idx):
                ids[r, : len(conts[i])] = conts[i]
                lens[r] = len(conts[i])
            self._note(("score", pb, rows, cb))
            p_yes, p_no = self._score(self._state, cache, jnp.int32(len(prefix)), jnp.asarray(prefix_row),
                                      jnp.asarray(ids), jnp.asarray(lens), jnp.int32(delta))
            chunks.append((idx, p_yes, p_no))
        return inverse, chunks

    def score(self, items: Sequence[Any]) -> list[list[tuple[float, float]]]:
        """``(p_yes, p_no)`` per question per item, in input order; items without questions give ``[]``.

        Items are :class:`ImageQuestions` or mappings with ``questions`` and optional ``pixel_values``,
        ``image_sizes`` / ``image_grid_thw``. Decide each claim with :func:`accept_claim`.
        """
        self._state = nnx.state(self.model)  # current weights (same structure: no recompile)
        out = []
        # Device time: from the first dispatch to the last result (the questions of later images are
        # tokenized while earlier ones are scored).
        with device_time.device_work():
            pending = [self.score_async(it) for it in items]
            for inverse, chunks in pending:
                scores: dict[int, tuple[float, float]] = {}  # distinct question -> its answer
                for idx, p_yes, p_no in chunks:
                    y, nn = np.asarray(p_yes), np.asarray(p_no)
                    for r, i in enumerate(idx):
                        scores[int(i)] = (float(y[r]), float(nn[r]))
                out.append([scores[int(j)] for j in inverse])
        return out


# ----------------------------------------------------------------------------- ahead-of-time lowering
def make_programs(graphdef: nnx.GraphDef, answer_ids: Mapping[str, int], repetition_penalty: float | None):
    """The labeler's jitted ``(prefill, score)`` programs for a model's ``graphdef``: the same pair for
    an equal graphdef, answer ids and penalty within a process, so a labeler built again on the same
    architecture (each online iteration's labels and evaluation) traces and lowers nothing new."""
    return _programs(graphdef, tuple(sorted(answer_ids.items())), repetition_penalty)


@functools.lru_cache(maxsize=8)
def _programs(graphdef: nnx.GraphDef, answer_ids: tuple[tuple[str, int], ...], repetition_penalty: float | None):
    return (jax.jit(functools.partial(_prefill, graphdef)),
            jax.jit(functools.partial(_score, graphdef, answer_ids, repetition_penalty)))


def lower_programs(model: nnx.Module, state: nnx.State, mesh: Any, *, prefix_bucket: int, rows: int,
                   continuation_bucket: int, with_image: bool, answer_ids: Mapping[str, int] | None = None,
                   repetition_penalty: float | None = None) -> dict[str, Any]:
    """The prefix-prefill and question-scoring programs :class:`Labeler` runs for one image prefix of
    ``prefix_bucket`` slots and ``rows`` questions of ``continuation_bucket`` tokens, compiled from
    abstract arguments (``state``: ``jax.ShapeDtypeStruct``s with shardings; ``mesh`` may hold
    compile-only TPU devices). Token ids do not change the programs' shapes: ``answer_ids`` defaults
    to four distinct ids. Returns ``{"prefill", "score"}``."""
    from jax.sharding import NamedSharding, PartitionSpec
    answer_ids = answer_ids or {w: i for i, w in enumerate(YES_WORDS + NO_WORDS)}
    prefill_fn, score_fn = make_programs(nnx.graphdef(model), answer_ids, repetition_penalty)
    replicated = NamedSharding(mesh, PartitionSpec())

    def arg(shape, dtype):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=replicated)

    features = arg((prefix_bucket, vision.feature_size(model)), model.dtype) if with_image else None
    positions = arg((3, 1, prefix_bucket), jnp.int32) if vision.uses_mrope(model) else None
    with jax.set_mesh(mesh):
        prefill = prefill_fn.lower(state, arg((1, prefix_bucket), jnp.int32), arg((), jnp.int32), features,
                                   positions).compile()
        score = score_fn.lower(state, prefill.out_info, arg((), jnp.int32), arg((prefix_bucket,), jnp.int32),
                               arg((rows, continuation_bucket), jnp.int32), arg((rows,), jnp.int32),
                               arg((), jnp.int32)).compile()
    return {"prefill": prefill, "score": score}
