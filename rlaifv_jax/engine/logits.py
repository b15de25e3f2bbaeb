"""Logits processors, in transformers' order: repetition penalty; then, when sampling,
temperature, top-k and top-p; and the token choice with per-row PRNG streams."""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class DecodeSettings:
    """Decoding options (static: compiled into the decode program)."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float | None = None

    def __post_init__(self):
        t, k, p, r = self.temperature, self.top_k, self.top_p, self.repetition_penalty
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


def top_k_top_p_filter(logits: jax.Array, k: int, p: float) -> jax.Array:
    """``top_p_filter(top_k_filter(logits, k), p)`` computed on the k candidates only (no sort of
    the vocabulary); equal to it except for exact ties at a cut-off."""
    values = jax.lax.top_k(logits, min(k, logits.shape[-1]))[0]
    ascending = jnp.sort(values, axis=-1)
    cumulative = jnp.cumsum(jax.nn.softmax(ascending, axis=-1), axis=-1)
    remove = (cumulative <= 1 - p).at[..., -1].set(False)
    lowest_kept = jnp.min(jnp.where(remove, jnp.inf, ascending), axis=-1, keepdims=True)
    return jnp.where(logits < lowest_kept, -jnp.inf, logits)


def process_logits(logits: jax.Array, seen: jax.Array | None, cfg: DecodeSettings) -> jax.Array:
    """The scores tokens are chosen from, in transformers' order: penalty; then (sampling only)
    temperature, top-k, top-p."""
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


def choose_tokens(logits: jax.Array, seen: jax.Array | None, keys: jax.Array | None, step: jax.Array,
                  cfg: DecodeSettings) -> tuple[jax.Array, jax.Array]:
    """Next tokens ``[R]`` (argmax, or a categorical draw with each row's key folded with ``step``)
    and their raw-model log-probs ``[R]``."""
    scores = process_logits(logits, seen, cfg)
    if cfg.greedy:
        tokens = jnp.argmax(scores, axis=-1)
    else:
        step_keys = jax.vmap(jax.random.fold_in, (0, None))(keys, step)
        tokens = jax.vmap(jax.random.categorical)(step_keys, scores)
    logp = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), tokens[:, None], axis=-1)[:, 0]
    return tokens.astype(jnp.int32), logp
