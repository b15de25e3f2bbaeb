"""Logits processors, in transformers' order: reserved ids banned (the image placeholder and the
model's other vision ids can never be emitted), repetition penalty; then, when sampling,
temperature, top-k and top-p; and the token choice with per-row PRNG streams."""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.random import threefry2x32_p


@dataclasses.dataclass(frozen=True)
class DecodeSettings:
    """Decoding options (static: compiled into the decode program)."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float | None = None
    banned_ids: tuple[int, ...] = ()  # ids never chosen (``reserved_ids``: image/vision placeholders)

    def __post_init__(self):
        t, k, p, r = self.temperature, self.top_k, self.top_p, self.repetition_penalty
        if any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in self.banned_ids):
            raise ValueError(f"banned_ids must be non-negative ints, got {self.banned_ids!r}")
        if not (isinstance(t, (int, float)) and math.isfinite(t) and t >= 0):
            raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {t!r}")
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
            raise ValueError(f"top_k must be an integer >= 1 or None, got {k!r}")
        if p is not None and not (isinstance(p, (int, float)) and 0 < p <= 1):
            raise ValueError(f"top_p must be in (0, 1] or None, got {p!r}")
        if r is not None and not (isinstance(r, (int, float)) and math.isfinite(r) and r > 0):
            raise ValueError(f"repetition_penalty must be a finite number > 0 or None, got {r!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalizes(self) -> bool:
        return self.repetition_penalty is not None and self.repetition_penalty != 1.0


def reserved_ids(model, allowed: Sequence[int] = ()) -> tuple[int, ...]:
    """Ids a model must never emit: every ``*token_id`` of its multimodal config (the image
    placeholder; Qwen's video and vision start/end ids), except ``allowed`` (the stop ids)."""
    cfg = getattr(model, "config", None)
    names = [f.name for f in dataclasses.fields(cfg)] if dataclasses.is_dataclass(cfg) else []
    ids = {getattr(cfg, n) for n in names if n.endswith("token_id")}
    return tuple(sorted(int(i) for i in ids if isinstance(i, int) and i >= 0 and i not in set(allowed)))


def ban_ids(scores: jax.Array, banned: Sequence[int] | jax.Array) -> jax.Array:
    """``scores [..., V]`` with the ``banned`` ids set to -inf (ids outside the vocabulary ignored)."""
    banned = jnp.asarray(banned, jnp.int32)
    if banned.size == 0:
        return scores
    return scores.at[..., banned].set(-jnp.inf, mode="drop")


def presence_mask(ids: jax.Array, vocab: int) -> jax.Array:
    """``[..., V]`` bool: which token ids occur in ``ids [..., L]`` (ids < 0 or >= V are padding)."""
    safe = jnp.where((ids >= 0) & (ids < vocab), ids, vocab)
    flat = safe.reshape(-1, safe.shape[-1])
    rows = jnp.arange(flat.shape[0])[:, None]
    present = jnp.zeros((flat.shape[0], vocab), bool).at[rows, flat].set(True, mode="drop")
    return present.reshape(*ids.shape[:-1], vocab)


def apply_repetition_penalty(logits: jax.Array, seen: jax.Array, penalty: float) -> jax.Array:
    """transformers' ``RepetitionPenaltyLogitsProcessor``: seen tokens' logits ×penalty if < 0, else ÷penalty."""
    penalized = jnp.where(logits < 0, logits * penalty, logits / penalty)
    return jnp.where(seen, penalized, logits)


def top_k_filter(logits: jax.Array, k: int) -> jax.Array:
    """transformers' ``TopKLogitsWarper`` on ``[R, V]``: logits below the k-th largest become -inf."""
    # min, not [..., -1]: XLA:CPU rewrites a slice of TopK into a full sort (100x slower).
    kth = jax.lax.top_k(logits, min(k, logits.shape[-1]))[0].min(axis=-1, keepdims=True)
    return jnp.where(logits < kth, -jnp.inf, logits)


def top_p_filter(logits: jax.Array, p: float) -> jax.Array:
    """transformers' ``TopPLogitsWarper`` on ``[R, V]``: drop tokens whose ascending cumulative
    probability is ``<= 1 - p``, always keeping the most likely one."""
    order = jnp.argsort(logits, axis=-1)
    ascending = jnp.take_along_axis(logits, order, axis=-1)
    cumulative = jnp.cumsum(jax.nn.softmax(ascending, axis=-1), axis=-1)
    remove_sorted = (cumulative <= 1 - p).at[..., -1].set(False)
    rows = jnp.arange(logits.shape[0])[:, None]
    remove = jnp.zeros_like(remove_sorted).at[rows, order].set(remove_sorted)
    return jnp.where(remove, -jnp.inf, logits)


def _top_p_lowest_kept(ascending: jax.Array, p: float) -> jax.Array:
    """The smallest score top-p keeps among candidates sorted ascending (``[R, k]`` → ``[R, 1]``)."""
    cumulative = jnp.cumsum(jax.nn.softmax(ascending, axis=-1), axis=-1)
    remove = (cumulative <= 1 - p).at[..., -1].set(False)
    return jnp.min(jnp.where(remove, jnp.inf, ascending), axis=-1, keepdims=True)


def top_k_top_p_filter(logits: jax.Array, k: int, p: float) -> jax.Array:
    """``top_p_filter(top_k_filter(logits, k), p)`` computed on the k candidates only (no sort of
    the vocabulary); equal to it except for exact ties at a cut-off."""
    values = jax.lax.top_k(logits, min(k, logits.shape[-1]))[0]
    return jnp.where(logits < _top_p_lowest_kept(jnp.sort(values, axis=-1), p), -jnp.inf, logits)


def process_logits(logits: jax.Array, seen: jax.Array | None, cfg: DecodeSettings) -> jax.Array:
    """The scores tokens are chosen from, in transformers' order: banned ids, penalty; then
    (sampling only) temperature, top-k, top-p."""
    if cfg.banned_ids:
        logits = ban_ids(logits, cfg.banned_ids)
    if cfg.penalizes:
        logits = apply_repetition_penalty(logits, seen, cfg.repetition_penalty)
    if cfg.greedy:
        return logits
    if cfg.temperature != 1.0:
        logits = logits / cfg.temperature
    top_p = cfg.top_p is not None and cfg.top_p < 1.0
    if cfg.top_k is not None and top_p:
        return top_k_top_p_filter(logits, cfg.top_k, cfg.top_p)
    if cfg.top_k is not None:
        return top_k_filter(logits, cfg.top_k)
    return top_p_filter(logits, cfg.top_p) if top_p else logits


def row_keys(seed: jax.Array, prompt_ids: jax.Array, sample_ids: jax.Array) -> jax.Array:
    """One key per row: ``fold_in(fold_in(key(seed), prompt_id), sample_index)``."""
    base = jax.random.key(seed)
    return jax.vmap(lambda p, j: jax.random.fold_in(jax.random.fold_in(base, p), j))(prompt_ids, sample_ids)


def candidate_scores(logits: jax.Array, seen: jax.Array | None, cfg: DecodeSettings) -> tuple[jax.Array, jax.Array]:
    """``process_logits`` on the ``cfg.top_k`` candidates only (sampling with top-k): their scores
    ``[R, k]`` (``-inf`` where top-p drops them) and vocabulary ids ``[R, k]``, with no mask or sort
    over the vocabulary. Equal to ``process_logits`` at those ids; a token tied with the k-th
    largest logit, which ``top_k_filter`` keeps, is not a candidate."""
    if cfg.banned_ids:
        logits = ban_ids(logits, cfg.banned_ids)
    if cfg.penalizes:
        logits = apply_repetition_penalty(logits, seen, cfg.repetition_penalty)
    if cfg.temperature != 1.0:
        logits = logits / cfg.temperature
    values, ids = jax.lax.top_k(logits, min(cfg.top_k, logits.shape[-1]))
    if cfg.top_p is not None and cfg.top_p < 1.0:  # top_k_top_p_filter's cut (top_k sorts descending)
        values = jnp.where(values < _top_p_lowest_kept(values[..., ::-1], cfg.top_p), -jnp.inf, values)
    return values, ids


def _gumbel_matches_categorical(keys: jax.Array, logits: jax.Array) -> bool:
    """Whether ``gumbel_at`` reproduces the noise ``jax.random.categorical`` adds to ``logits``: float32
    scores, threefry keys with partitionable bits (each element's bits depend on its index only) and
    the default low-range Gumbel."""
    return (logits.dtype == jnp.float32 and str(jax.random.key_impl(keys)) == "threefry2x32"
            and jax.config.jax_threefry_partitionable and not jax.config.jax_high_dynamic_range_gumbel)


def gumbel_at(keys: jax.Array, ids: jax.Array) -> jax.Array:
    """``jax.random.gumbel(keys[r], (V,), float32)[ids[r]]`` for every row ``r`` (ids ``[R, k]``),
    computed for those ``k`` ids only: element ``i`` of a partitionable threefry draw hashes the
    counter ``(0, i)``, and the Gumbel is ``-log(-log(u))`` of the uniform its bits make."""
    data = jax.random.key_data(keys).astype(jnp.uint32)  # [R, 2]
    k1, k2 = (jnp.broadcast_to(data[:, i:i + 1], ids.shape) for i in (0, 1))
    hi, lo = threefry2x32_p.bind(k1, k2, jnp.zeros(ids.shape, jnp.uint32), ids.astype(jnp.uint32))
    mantissa = jax.lax.shift_right_logical(hi ^ lo, jnp.uint32(32 - 23)) | np.array(1.0, np.float32).view(np.uint32)
    tiny = jnp.float32(np.finfo(np.float32).tiny)
    u = jnp.maximum(tiny, (jax.lax.bitcast_convert_type(mantissa, jnp.float32) - 1.0) * (1.0 - tiny) + tiny)
    return -jnp.log(-jnp.log(u))


def choose_tokens(logits: jax.Array, seen: jax.Array | None, keys: jax.Array | None, step: jax.Array,
                  cfg: DecodeSettings) -> tuple[jax.Array, jax.Array]:
    """Next tokens ``[R]`` (argmax, or a categorical draw with each row's key folded with ``step``,
    a scalar or one per row)
    and their raw-model log-probs ``[R]``.

    With top-k the draw is the Gumbel-max over the k candidates (``candidate_scores``), with the
    Gumbel noise ``jax.random.categorical`` would add at those ids (``gumbel_at``): the same tokens
    as the draw over the whole filtered vocabulary, for k random numbers per row, not V."""
    if cfg.greedy:
        tokens = jnp.argmax(process_logits(logits, seen, cfg), axis=-1)
    else:
        step_keys = jax.vmap(jax.random.fold_in)(keys, jnp.broadcast_to(step, keys.shape))
        if cfg.top_k is not None and _gumbel_matches_categorical(step_keys, logits):
            values, ids = candidate_scores(logits, seen, cfg)
            pick = jnp.argmax(values + gumbel_at(step_keys, ids), axis=-1)
            tokens = jnp.take_along_axis(ids, pick[:, None], axis=-1)[:, 0]
        else:
            tokens = jax.vmap(jax.random.categorical)(step_keys, process_logits(logits, seen, cfg))
    logp = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), tokens[:, None], axis=-1)[:, 0]
    return tokens.astype(jnp.int32), logp
