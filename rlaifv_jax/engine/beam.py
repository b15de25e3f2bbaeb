"""Beam search with transformers' semantics (``generate(num_beams=k, do_sample=False)``), jitted.

One prefill per batch of left-padded prompts (the prompt cache is shared by a prompt's ``k`` beam
rows, as in the sampler), then one ``lax.while_loop`` over steps. Prompts are laid out as the sampler's
(``prefill.left_padded``); Qwen2.5-VL prefills at its multimodal positions and decodes token ``t`` at
``real prompt tokens + t + rope_delta``, as transformers does. Every step follows
transformers 5's ``_beam_search`` bookkeeping exactly, per prompt:

1. ``log_softmax`` of the next-token logits plus each running beam's score; the top
   ``K = max(2, 1 + len(stop_token_ids)) * k`` (beam, token) candidates over all ``k × V``;
2. a candidate *finishes* when its token is a stop token or it reaches ``max_new_tokens``; among
   the first ``k`` candidates, finished ones enter the prompt's ``k`` best finished hypotheses with
   score ``sum_logprob / length ** length_penalty`` (length counts the stop token);
3. the ``k`` best unfinished candidates become the running beams; each row's generated-token cache
   is gathered from its parent row;
4. a prompt is done once no running beam can beat its worst finished hypothesis
   (``best_running_score / generated ** length_penalty``, transformers' ``early_stopping=False``
   heuristic) or, with ``early_stopping=True``, once it holds ``k`` finished hypotheses.

Scores start at ``[0, -1e9, ...]`` and "impossible" entries get ``-1e9`` added, in float32, as in
transformers, so that ties are broken the same way. Returned per prompt: the best hypothesis's
tokens (stop token excluded), whether it ended at a stop token, and its score (transformers'
``sequences_scores``). No logits processors are applied (the evaluation suites use none).
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from rlaifv_jax.engine import generate as sampler, logits as logits_lib, prefill as prefill_lib, prompt_checks
from rlaifv_jax.models.layers import heads_major

NEG = -1.0e9  # transformers' "impossible" score offset


@dataclasses.dataclass(frozen=True)
class BeamSettings:
    """Static beam-search options (transformers' names and defaults)."""

    num_beams: int
    max_new_tokens: int
    length_penalty: float = 1.0
    early_stopping: bool = False

    def __post_init__(self):
        if isinstance(self.num_beams, bool) or not isinstance(self.num_beams, int) or self.num_beams < 1:
            raise ValueError(f"num_beams must be an integer >= 1, got {self.num_beams!r}")
        if not isinstance(self.early_stopping, bool):
            raise ValueError(f"early_stopping must be True or False, got {self.early_stopping!r}")
        if not np.isfinite(self.length_penalty):
            raise ValueError(f"length_penalty must be a finite number, got {self.length_penalty!r}")


def _take(x: jax.Array, idx: jax.Array) -> jax.Array:
    """``x [B, N, ...]`` gathered along axis 1 by ``idx [B, M]`` → ``[B, M, ...]``."""
    return jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)


def _select(logits, state, t, stop_ids, active, length_penalty, early_stopping, banned=()):
    """One beam step (transformers' top-k continuations, running beams, finished beams, early-stop
    heuristic) for ``logits [B * k, V]`` of the token at index ``t``. Returns the new state, each
    running beam's parent beam, and whether the loop must continue."""
    run_tok, run_score, fin_tok, fin_score, fin_done, fin_len, fin_stop, unsat = state
    b, k, m = run_tok.shape
    vocab = logits.shape[-1]
    n_keep = max(2, 1 + stop_ids.shape[0]) * k
    logp = logits_lib.ban_ids(jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1), banned).reshape(b, k, vocab)
    scores = (logp + run_score[:, :, None]).reshape(b, k * vocab)
    top_score, top_index = jax.lax.top_k(scores, n_keep)
    beam, token = top_index // vocab, (top_index % vocab).astype(jnp.int32)
    cand = _take(run_tok, beam)
    cand = jax.lax.dynamic_update_slice_in_dim(cand, token[:, :, None], t, axis=2)
    is_stop = jnp.isin(token, stop_ids)
    hits = is_stop | (t + 1 >= m)

    running = top_score + hits.astype(jnp.float32) * NEG
    nxt = jax.lax.top_k(running, k)[1]
    run_tok, run_score, parent = _take(cand, nxt), _take(running, nxt), _take(beam, nxt)

    just = hits & (jnp.arange(n_keep) < k)[None]
    length = (t + 1).astype(jnp.float32) ** length_penalty
    fin = top_score / length
    full = jnp.all(fin_done, axis=1, keepdims=True) & early_stopping
    fin = fin + full.astype(jnp.float32) * NEG
    fin = fin + (~unsat)[:, None].astype(jnp.float32) * NEG
    fin = fin + (~just).astype(jnp.float32) * NEG
    order = jax.lax.top_k(jnp.concatenate([fin_score, fin], axis=1), k)[1]
    cat = lambda old, new: _take(jnp.concatenate([old, new], axis=1), order)  # noqa: E731
    fin_tok, fin_score = cat(fin_tok, cand), cat(fin_score, fin)
    fin_done, fin_stop = cat(fin_done, just), cat(fin_stop, is_stop)
    fin_len = cat(fin_len, jnp.where(is_stop, t, t + 1).astype(jnp.int32))

    best_running = run_score[:, :1] / length
    worst = jnp.where(fin_done, jnp.min(fin_score, axis=1, keepdims=True), NEG)
    unsat = unsat & jnp.any(best_running > worst, axis=1)
    go = jnp.any(unsat) & ~(jnp.all(fin_done | ~active[:, None]) & early_stopping)
    go = go & ~jnp.all(hits | ~active[:, None])
    return (run_tok, run_score, fin_tok, fin_score, fin_done, fin_len, fin_stop, unsat), parent, go


def _prefill_fn(graphdef, state, ids, features, mask, num_beams: int, positions=None):
    model = nnx.merge(graphdef, state)
    hidden, cache = prefill_lib.prefill(model, ids, features, mask, positions)
    logits = model.logits(hidden[:, -1]).astype(jnp.float32)
    return cache, jnp.repeat(logits, num_beams, axis=0)


def _search_fn(graphdef, state, prefix, logits, prompt_mask, active, stop_ids, length_penalty, early_stopping,
               num_beams: int, max_new_tokens: int, rope_deltas=None, banned=()):
    model = nnx.merge(graphdef, state)
    text = getattr(model, "language_model", model)
    batch, k, m = prompt_mask.shape[0], num_beams, max_new_tokens
    options = (length_penalty, early_stopping, banned)
    rows = batch * k
    own_slots = max(m - 1, 1)
    start = jnp.repeat(prompt_mask.sum(axis=1), k).astype(jnp.int32)
    if rope_deltas is not None:  # Qwen2.5-VL: as the sampler, token t decodes at real tokens + t + delta
        start = start + jnp.repeat(rope_deltas, k).astype(jnp.int32)
    init_score = jnp.tile(jnp.asarray([0.0] + [NEG] * (k - 1), jnp.float32), (batch, 1))
    beams = (jnp.zeros((batch, k, m), jnp.int32), init_score, jnp.zeros((batch, k, m), jnp.int32),
             jnp.full((batch, k), NEG, jnp.float32), jnp.zeros((batch, k), bool), jnp.zeros((batch, k), jnp.int32),
             jnp.zeros((batch, k), bool), active)
    beams, parent, go = _select(logits, beams, jnp.int32(0), stop_ids, active, *options)
    row_base = (jnp.arange(batch) * k)[:, None]
    prefix = heads_major(prefix)  # the layout decode steps read

    def cond(carry):
        t, _, _, _, go = carry
        return go & (t < m)

    def body(carry):
        t, cache, beams, parent, _ = carry
        rows_from = (row_base + parent).reshape(rows)
        cache = jax.tree.map(lambda a: a[rows_from], cache)
        tok = beams[0][:, :, t - 1].reshape(rows)
        own = jnp.ones((rows, own_slots), bool)  # not read: the rows attend over their first t slots
        hidden, cache = model.forward_embeds(text.embed(tok[:, None]), positions=(start + t - 1)[:, None],
                                             key_mask=own, cache=cache, cache_index=t - 1,
                                             prefix=(prefix, prompt_mask, t, None))
        beams, parent, go = _select(model.logits(hidden[:, 0]), beams, t, stop_ids, active, *options)
        return t + 1, cache, beams, parent, go

    carry = (jnp.int32(1), model.init_cache(rows, own_slots, heads_major=True), beams, parent, go)
    _, _, beams, _, _ = jax.lax.while_loop(cond, body, carry)
    _, _, fin_tok, fin_score, _, fin_len, fin_stop, _ = beams
    return fin_tok[:, 0], fin_len[:, 0], fin_stop[:, 0], fin_score[:, 0]


_prefill = jax.jit(_prefill_fn, static_argnums=(0, 5))
_search = jax.jit(_search_fn, static_argnums=(0, 9, 10))


def beam_search(model: nnx.Module, prompts: Sequence[dict], *, num_beams: int, max_new_tokens: int,
                stop_token_ids: Sequence[int], length_penalty: float = 1.0, early_stopping: bool = False,
                batch_size: int = 4, buckets: Sequence[int] = sampler.DEFAULT_BUCKETS,
                progress: bool = True) -> list[dict]:
    """The best beam-search continuation of each prompt, as transformers' ``generate(num_beams=...,
    do_sample=False)`` finds it.

    ``prompts`` are the sampler's (``input_ids`` with image placeholders expanded, optional
    ``pixel_values`` with ``image_sizes``, or ``image_grid_thw`` for Qwen2.5-VL). Prompts of one length bucket are searched ``batch_size`` at
    a time (each prompt's result does not depend on its batch). Returns one dict per prompt:
    ``tokens`` (a one-element list: the best hypothesis, stop token excluded), ``stopped``
    (``[bool]``: ended at a stop token rather than at ``max_new_tokens``) and ``score`` (its
    length-normalised log-probability).
    """
    cfg = BeamSettings(num_beams=num_beams, max_new_tokens=max_new_tokens, length_penalty=float(length_penalty),
                     early_stopping=early_stopping)
    tc = prompt_checks.text_config(model)
    buckets = prompt_checks.check_options(num_beams, max_new_tokens, stop_token_ids, 0, batch_size, buckets, tc.vocab_size)
    chosen, _ = prompt_checks.check_prompts(model, prompts, buckets, max_new_tokens)
    if not prompts:
        return []
    graphdef, state = nnx.split(model)
    batch = min(batch_size, 1 << (len(prompts) - 1).bit_length())
    stop = jnp.asarray(sorted(set(int(t) for t in stop_token_ids)), jnp.int32)
    banned = jnp.asarray(logits_lib.reserved_ids(model, stop_token_ids), jnp.int32)  # never the image token
    groups = []
    for bucket in sorted(set(chosen)):
        members = [i for i, c in enumerate(chosen) if c == bucket]
        groups += [(bucket, members[j:j + batch]) for j in range(0, len(members), batch)]
    device = lambda x: None if x is None else jnp.asarray(x)  # noqa: E731
    results: list[dict | None] = [None] * len(prompts)
    bar = tqdm(total=len(prompts), unit="prompt", disable=not progress, desc=f"beam search ({num_beams})")
    for length, members in groups:
        b = prefill_lib.left_padded(model, graphdef, state, [prompts[i] for i in members], batch, length)
        cache, logits = _prefill(graphdef, state, jnp.asarray(b.ids), device(b.features), jnp.asarray(b.mask),
                                 num_beams, device(b.positions))
        out = _search(graphdef, state, cache, logits, jnp.asarray(b.mask), jnp.asarray(b.active), stop,
                      jnp.float32(cfg.length_penalty), jnp.bool_(cfg.early_stopping), num_beams, max_new_tokens,
                      device(b.rope_deltas), banned)
        tokens, lengths, stopped, scores = map(np.asarray, out)
        for r, i in enumerate(members):
            results[i] = {"tokens": [tokens[r, :lengths[r]].tolist()], "stopped": [bool(stopped[r])],
                          "score": float(scores[r])}
        bar.update(len(members))
    bar.close()
    return results
