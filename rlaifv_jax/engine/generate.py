"""Jitted sampling: n responses per prompt from one prefill, with deconfounded PRNG streams.

``generate`` groups prompts by length bucket, left-pads a batch of prompts into the bucket, runs
one *prefill* program (image features merged, one KV cache per prompt) and one *decode* program
(a ``lax.while_loop`` over all ``batch × num_samples`` rows; each row attends to its prompt's
shared prefix cache, read once for all n samples, plus its own generated tokens' cache, updated in
place, and read up to the filled slot only: ``layers.decode_attention`` walks it in blocks with an
online softmax, up to the deepest row, or on TPU through the Pallas kernel of
``models.ragged_kernel``, each row up to its own fill (``own_cache_for``); per-row early stop). With ``decode_rows`` the decode program is the *continuous*
one: the batch's rows go through that many slots, a slot whose row stopped taking the next waiting
(prompt, sample) row at once, inside the same ``while_loop`` (each slot reads its prompt's prefix
from a window of the batch's prompts). A run compiles two programs per length bucket
it meets (plus one vision program per pixel shape); ``compiled_programs()`` counts them.

Decoding follows transformers' ``generate``: the repetition penalty (over prompt + generated
tokens, image placeholders included) is applied first, in greedy and sampling mode alike; then,
when sampling, temperature, top-k and top-p, in that order. ``temperature=0`` is greedy. Nothing is
on by default: transformers 4 (the official RLAIF-V code) sampled with ``top_k=50`` unless told
otherwise, so pass ``top_k=50`` to reproduce it. With both top-k and top-p, top-p runs on the k
candidates only (no sort of the vocabulary; identical except for exact ties at a cut-off).

Randomness: sample ``j`` of the prompt with identity ``p`` uses the key
``fold_in(fold_in(key(seed), p), j)``, folded with the step index at every step, so its tokens do
not depend on which other prompts share its batch or on the bucket (up to floating-point
differences between batch shapes, which only matter at exact near-ties).

Returned ``logprobs`` are the **raw model** log-probabilities of the sampled tokens
(``log_softmax`` of the unprocessed logits: temperature 1, no penalty, no filtering), i.e. what
the trainer computes for the same tokens with a teacher-forced forward.

Prompts come from ``rlaifv_jax.data.chat`` (``encode_prompt`` with ``llava_v1`` or a tokenizer's
chat template; ``llava_image_preprocess`` pads LLaVA-1.5 images to square). For LLaVA-NeXT, the
anyres ``pixel_values [num_images, max_tiles, C, H, W]`` and ``image_sizes`` come from
transformers' ``LlavaNextImageProcessor`` (its PIL backend works without torchvision). For
Qwen2.5-VL, ``pixel_values [patches, patch_dim]`` and ``image_grid_thw [images, 3]`` come from
``Qwen2VLImageProcessorPil``; the prefill runs at the multimodal positions of
``model.position_ids`` (computed on the host per batch) and token ``t`` decodes at position
``real prompt tokens + t + rope_delta`` (transformers' ``generate``). Its tower compiles once per
chunk bucket (``models.qwen_vision``), not per image size.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import logging
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from tqdm.auto import tqdm

from rlaifv_jax.core import device_time, sharding
from rlaifv_jax.engine import vision
from rlaifv_jax.engine.logits import DecodeSettings, choose_tokens, presence_mask, reserved_ids, row_keys
from rlaifv_jax.engine.prefill import left_padded, prefill
from rlaifv_jax.engine.prompt_checks import check_options, check_prompts, text_config
from rlaifv_jax.models import ragged_kernel
from rlaifv_jax.models.layers import DECODE_BLOCK, OWN_CACHE_PATHS, heads_major, own_cache_path

DEFAULT_BUCKETS: tuple[int, ...] = (32, 64, 128, 256, 384, 512, 640, 768, 1024, 1536, 2048, 3072, 4096)

_TRACES: collections.Counter = collections.Counter()
log = logging.getLogger(__name__)  # one DEBUG line per call (--verbosity=1): where its time went


def compiled_programs() -> dict[str, int]:
    """Programs the sampler has compiled in this process so far, by kind (prefill, decode, vision)."""
    return {**_TRACES, **vision.TRACES}


# ----------------------------------------------------------------------------- jitted programs
def _constrain(x: jax.Array, spec: P | None) -> jax.Array:
    return x if spec is None else jax.lax.with_sharding_constraint(x, spec)


@dataclasses.dataclass(frozen=True)
class _Static:
    """Static arguments of the prefill/decode programs."""

    num_samples: int
    max_new_tokens: int
    cache_spec: P | None  # the decode rows' (slots') own caches, heads-major ``[R, K, S, D]``
    rows_spec: P | None
    slots: int = 0  # decode slots of the continuous decoder (0: the static decoder, one slot per row)
    own_cache: str = "xla"  # how decode steps read the own cache (``layers.own_cache_path``)


def own_cache_for(model: nnx.Module, mesh: Mesh | None, max_new_tokens: int) -> str:
    """How the decode programs read each row's own cache on ``mesh`` (default: this process's
    devices): the Pallas kernel of ``models.ragged_kernel`` on TPU where its blocks tile the head
    size and the own cache (each row reads its own filled blocks), else the pure-JAX walk up to the
    deepest row (as ``layers.decode_attention`` itself falls back: an own cache shorter than one
    block is one block of its own length)."""
    device = mesh.devices.flat[0] if mesh is not None else jax.devices()[0]
    block = min(DECODE_BLOCK, own_cache_slots(max_new_tokens))
    tiles = ragged_kernel.supported(text_config(model).head_dim, block)
    return "pallas" if device.platform == "tpu" and tiles else "xla"


def _reading_own_cache(fn):
    """``fn`` traced under ``layers.own_cache_path`` of its ``_Static`` argument."""
    @functools.wraps(fn)
    def traced(*args, **kwargs):
        static = next(a for a in args if isinstance(a, _Static))
        with own_cache_path(static.own_cache):
            return fn(*args, **kwargs)
    return traced


def decode_slots(decode_rows: int | None, rows: int) -> int:
    """The continuous decoder's slots for ``rows`` (batch × samples) rows: 0 (the static decoder) when off."""
    return 0 if decode_rows is None else min(decode_rows, rows)


def prefix_window(batch: int, slots: int, num_samples: int) -> int:
    """Prompts whose prefixes the continuous decoder's ``slots`` may read at once (every prompt of the
    batch for the static decoder, ``slots == 0``)."""
    return min(batch, -(-slots // num_samples) + 1) if slots else batch


def own_cache_slots(max_new_tokens: int) -> int:
    """Slots of a row's own generated-token cache (the first token comes from the prefill's logits)."""
    return max(max_new_tokens - 1, 1)


def _prefill_fn(graphdef, state, ids, features, mask, static: _Static, positions=None):
    """Embed + prefill a left-padded batch (at ``positions [3, B, T]`` for Qwen2.5-VL); return its KV
    cache (one copy per prompt, shared by the prompt's ``num_samples`` rows during decoding) and the
    last-position logits tiled ``num_samples`` times (row ``b * n + j``, float32)."""
    _TRACES["prefill"] += 1
    model = nnx.merge(graphdef, state)
    n = static.num_samples
    hidden, cache = prefill(model, ids, features, mask, positions)
    logits = model.logits(hidden[:, -1]).astype(jnp.float32)
    return cache, _constrain(jnp.repeat(logits, n, axis=0), static.rows_spec)


def _decode_fn(graphdef, state, prefix, logits, prompt_ids, prompt_mask, prompt_keys, active, seed,
               stop_ids, static: _Static, cfg: DecodeSettings, rope_deltas=None):
    """Decode all rows in one ``while_loop``: every row attends to its prompt's shared ``prefix``
    cache plus a cache of its own generated tokens (updated in place). ``rope_deltas [B]`` (Qwen2.5-VL)
    shift each prompt's decode positions. Returns tokens, raw log-probs, lengths (stop excluded) and
    whether each row met a stop token."""
    _TRACES["decode"] += 1
    model = nnx.merge(graphdef, state)
    text = getattr(model, "language_model", model)  # generated ids are plain text tokens
    n, max_new = static.num_samples, static.max_new_tokens
    batch = prompt_ids.shape[0]
    rows = batch * n
    vocab = logits.shape[-1]
    own_slots = own_cache_slots(max_new)
    cache = jax.tree.map(lambda a: _constrain(a, static.cache_spec),
                         model.init_cache(rows, own_slots, heads_major=True))
    prefix = heads_major(prefix)  # once per batch: the layout the steps read in place
    start = jnp.repeat(prompt_mask.sum(axis=1), n).astype(jnp.int32)  # position of token 0
    if rope_deltas is not None:
        start = start + jnp.repeat(rope_deltas, n).astype(jnp.int32)
    keys = None if cfg.greedy else row_keys(seed, jnp.repeat(prompt_keys, n), jnp.tile(jnp.arange(n), batch))
    row_index = jnp.arange(rows)
    seen = None
    if cfg.penalizes:
        seen = jnp.repeat(presence_mask(jnp.where(prompt_mask, prompt_ids, -1), vocab), n, axis=0)

    def record(carry, logits, t):
        tokens, logps, lengths, done, seen = carry
        tok, logp = choose_tokens(logits, seen, keys, t, cfg)
        stop = jnp.isin(tok, stop_ids)
        lengths = lengths + (~done & ~stop)
        tokens = jax.lax.dynamic_update_slice_in_dim(tokens, tok[:, None], t, axis=1)
        logps = jax.lax.dynamic_update_slice_in_dim(logps, logp[:, None], t, axis=1)
        if seen is not None:
            seen = seen.at[row_index, tok].set(True)
        return tok, (tokens, logps, lengths, done | stop, seen)

    init = (jnp.zeros((rows, max_new), jnp.int32), jnp.zeros((rows, max_new), jnp.float32),
            jnp.zeros((rows,), jnp.int32), ~jnp.repeat(active, n), seen)
    tok, out = record(init, logits, jnp.int32(0))

    def cond(state):
        t, _, _, out = state
        return (t < max_new) & ~jnp.all(out[3])

    def body(state):
        t, cache, tok, out = state
        own = jnp.ones((rows, own_slots), bool)  # not read: the rows attend over their first t slots
        hidden, cache = model.forward_embeds(text.embed(tok[:, None]), positions=(start + t - 1)[:, None],
                                             key_mask=own, cache=cache, cache_index=t - 1,
                                             prefix=(prefix, prompt_mask, t, None))
        cache = jax.tree.map(lambda a: _constrain(a, static.cache_spec), cache)
        tok, out = record(out, model.logits(hidden[:, 0]).astype(jnp.float32), t)
        return t + 1, cache, tok, out

    _, _, _, (tokens, logps, lengths, done, _) = jax.lax.while_loop(cond, body, (jnp.int32(1), cache, tok, out))
    return tokens, logps, lengths, done


def _continuous_fn(graphdef, state, prefix, logits, prompt_ids, prompt_mask, prompt_keys, active, seed,
                   stop_ids, static: _Static, cfg: DecodeSettings, rope_deltas=None):
    """Decode the ``batch × n`` (prompt, sample) rows of a prefilled batch through ``static.slots`` decode
    slots (continuous batching): a slot whose row stops takes the next waiting row at once, inside one
    ``while_loop``. Row ``w = b * n + j`` reads prompt ``b``'s prefix (``prefix_rows``), its own cache
    restarted at slot 0, and draws with the key of ``(prompt_keys[b], j)`` folded with its own step,
    so its tokens are the static decoder's. A fresh slot spends one step on its first token (taken from
    the prefill's logits). Returns what ``_decode_fn`` returns, in row order."""
    _TRACES["decode"] += 1
    model = nnx.merge(graphdef, state)
    text = getattr(model, "language_model", model)
    n, max_new, slots = static.num_samples, static.max_new_tokens, static.slots
    batch, vocab = prompt_ids.shape[0], logits.shape[-1]
    rows = batch * n
    none = rows  # the row index of an idle slot (writes are dropped)
    own_slots = own_cache_slots(max_new)
    cache = jax.tree.map(lambda a: _constrain(a, static.cache_spec),
                         model.init_cache(slots, own_slots, heads_major=True))
    prefix = heads_major(prefix)  # once per batch: the layout the steps read in place
    start = prompt_mask.sum(axis=1).astype(jnp.int32)  # position of token 0, per prompt
    if rope_deltas is not None:
        start = start + rope_deltas.astype(jnp.int32)
    seen_prompt = presence_mask(jnp.where(prompt_mask, prompt_ids, -1), vocab) if cfg.penalizes else None
    waiting = active.sum().astype(jnp.int32) * n  # active prompts come first (left_padded)
    window = prefix_window(batch, slots, n)

    def lowest(row, next_row):
        """The lowest prompt a slot holds (the next waiting one if none does)."""
        return jnp.min(jnp.where(row < none, row // n, next_row // n))

    def assign(free, row, t, next_row, seen):
        """Free slots take the next waiting rows, in slot order, of the ``window`` prompts from the
        lowest one held (so that a step reads ``window`` prefixes, not the whole batch's)."""
        held = jnp.where(free, none, row)
        limit = jnp.minimum(waiting, (lowest(held, next_row) + window) * n)
        new = next_row + jnp.cumsum(free) - 1
        take = free & (new < limit)
        row = jnp.where(free, jnp.where(take, new, none), row)
        if seen is not None:
            seen = jnp.where(free[:, None], seen_prompt[jnp.minimum(row // n, batch - 1)], seen)
        return row, jnp.where(free, 0, t), next_row + take.sum(), seen

    def cond(carry):
        return jnp.any(carry[1] < none) | (carry[4] < waiting)

    def body(carry):
        cache, row, t, tok, next_row, seen, out = carry
        prompt = jnp.minimum(row // n, batch - 1)
        lo = jnp.minimum(lowest(row, next_row), batch - window)
        near = jax.tree.map(lambda a: jax.lax.dynamic_slice_in_dim(a, lo, window, axis=0), (prefix, prompt_mask))
        hidden, cache = model.forward_embeds(
            text.embed(tok[:, None]), positions=(start[prompt] + t - 1)[:, None],
            key_mask=jnp.ones((slots, own_slots), bool), cache=cache, cache_index=jnp.maximum(t - 1, 0),
            prefix=(*near, jnp.maximum(t, 1), jnp.clip(prompt - lo, 0, window - 1)))
        cache = jax.tree.map(lambda a: _constrain(a, static.cache_spec), cache)
        fresh = (t == 0)[:, None]
        step_logits = jnp.where(fresh, logits[jnp.minimum(row, rows - 1)],
                                model.logits(hidden[:, 0]).astype(jnp.float32))
        keys = None if cfg.greedy else row_keys(seed, prompt_keys[prompt], row % n)
        tok, logp = choose_tokens(step_logits, seen, keys, t, cfg)
        tokens, logps, lengths, stopped = out
        stop = jnp.isin(tok, stop_ids)
        tokens, logps = tokens.at[row, t].set(tok, mode="drop"), logps.at[row, t].set(logp, mode="drop")
        lengths = lengths.at[row].set(jnp.where(stop, t, t + 1), mode="drop")
        stopped = stopped.at[row].set(stop, mode="drop")
        if seen is not None:
            seen = seen.at[jnp.arange(slots), tok].set(True)
        row, t, next_row, seen = assign(stop | (t + 1 >= max_new) | (row == none), row, t + 1, next_row, seen)
        return cache, row, t, tok, next_row, seen, (tokens, logps, lengths, stopped)

    out = (jnp.zeros((rows, max_new), jnp.int32), jnp.zeros((rows, max_new), jnp.float32),
           jnp.zeros((rows,), jnp.int32), jnp.zeros((rows,), bool))
    seen = None if seen_prompt is None else jnp.zeros((slots, vocab), bool)
    row, t, next_row, seen = assign(jnp.ones((slots,), bool), jnp.full((slots,), none),
                                    jnp.zeros((slots,), jnp.int32), jnp.int32(0), seen)
    carry = (cache, row, t, jnp.zeros((slots,), jnp.int32), next_row, seen, out)
    return jax.lax.while_loop(cond, body, carry)[-1]


_prefill = jax.jit(_prefill_fn, static_argnums=(0, 5))
_decode = jax.jit(_reading_own_cache(_decode_fn), static_argnums=(0, 10, 11))
_continuous = jax.jit(_reading_own_cache(_continuous_fn), static_argnums=(0, 10, 11))


def _spec(mesh: Mesh | None, axes: tuple[str | None, ...], shape: tuple[int, ...]) -> P | None:
    return None if mesh is None else sharding.logical_to_spec(axes, sharding.SERVE_RULES, shape, mesh)


def generate(model: nnx.Module, prompts: Sequence[dict], *, num_samples: int = 1, max_new_tokens: int,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
             repetition_penalty: float | None = None, stop_token_ids: Sequence[int], seed: int = 0,
             batch_size: int = 8, buckets: Sequence[int] = DEFAULT_BUCKETS, mesh: Mesh | None = None,
             decode_rows: int | None = None, own_cache: str | None = None,
             progress: bool = True) -> list[dict[str, list]]:
    """Sample ``num_samples`` responses for each prompt.

    ``prompts``: dicts with ``input_ids`` (image placeholders expanded), optional ``pixel_values``
    (and ``image_sizes`` for LLaVA-NeXT) in transformers' layout, and optional ``id`` (an int or
    str; the prompt's PRNG identity, default its list index; prompts sharing an id share their
    random streams, which is harmless for identical prompts). ``batch_size`` prompts share a
    prefill; their ``batch_size × num_samples`` rows decode together (the batch size is rounded down
    to the power of two that covers all prompts, once per run). With ``decode_rows`` (continuous
    batching), they decode through that many slots instead, a slot taking the batch's next waiting
    (prompt, sample) row as soon as its row stops; tokens are the same as without it (per-row PRNG
    streams). Under ``mesh`` rows are split over
    ``data``/``fsdp`` and KV heads over ``tensor``; load the model with ``rules=SERVE_RULES``.
    ``own_cache`` picks how decode steps read each row's own cache (``layers.OWN_CACHE_PATHS``;
    default ``own_cache_for``: the Pallas kernel on TPU, the pure-JAX walk elsewhere); every path
    gives the same tokens up to float rounding.

    Returns one dict per prompt: ``tokens`` (``num_samples`` lists of ids, stop token excluded),
    ``logprobs`` (the raw model log-prob of each token, see the module docstring) and ``stopped``
    (whether each sample ended at a stop token rather than at ``max_new_tokens``). All inputs are
    checked before anything is compiled.
    """
    cfg = DecodeSettings(temperature=temperature, top_k=top_k, top_p=top_p,
                         repetition_penalty=repetition_penalty, banned_ids=reserved_ids(model, stop_token_ids))
    tc = text_config(model)
    buckets = check_options(num_samples, max_new_tokens, stop_token_ids, seed, batch_size, buckets,
                             tc.vocab_size)
    chosen, prompt_keys = check_prompts(model, prompts, buckets, max_new_tokens)
    if not prompts:
        return []
    before = compiled_programs()
    graphdef, state = nnx.split(model)
    n = num_samples
    batch = min(batch_size, 1 << (len(prompts) - 1).bit_length())
    rows = batch * n
    if decode_rows is not None and (isinstance(decode_rows, bool) or not isinstance(decode_rows, int)
                                    or decode_rows < 1):
        raise ValueError(f"decode_rows must be an integer >= 1 or None, got {decode_rows!r}")
    slots = decode_slots(decode_rows, rows)
    stop = jnp.asarray(sorted(set(int(t) for t in stop_token_ids)), jnp.int32)
    batches = []  # prompts grouped by bucket, in input order within a bucket
    for b in sorted(set(chosen)):
        group = [i for i in range(len(prompts)) if chosen[i] == b]
        batches += [group[k:k + batch] for k in range(0, len(group), batch)]
    results: list[dict[str, list] | None] = [None] * len(prompts)
    total_tokens = 0
    start_time = time.perf_counter()
    bar = tqdm(total=len(prompts), unit="prompt", disable=not progress, desc="sampling")
    # Where the time goes, logged at the end: ``prepare`` (padding, image features, transfers), ``generate``
    # (the prefill and decode programs, compiling included, until their outputs are on the host), ``results``.
    phases = dict.fromkeys(("prepare", "generate", "results"), 0.0)
    with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
        for members in batches:
            length = chosen[members[0]]
            cache_len = length + max_new_tokens - 1
            static = batch_static(mesh, model, rows=rows, cache_len=cache_len, num_samples=n,
                                  max_new_tokens=max_new_tokens, slots=slots, own_cache=own_cache)
            t0 = time.perf_counter()
            padded = left_padded(model, graphdef, state, [prompts[i] for i in members], batch, length)
            keys = np.zeros((batch,), np.uint32)
            keys[:len(members)] = [prompt_keys[i] for i in members]
            put = ((lambda x, axes: jax.device_put(x, NamedSharding(mesh, _spec(mesh, axes, x.shape))))
                   if mesh is not None else (lambda x, axes: jnp.asarray(x)))
            ids_d, mask_d = put(padded.ids, ("batch", None)), put(padded.mask, ("batch", None))
            features_d = None if padded.features is None else put(padded.features, (None, None))
            positions = None if padded.positions is None else put(padded.positions, (None, "batch", None))
            deltas = None if padded.rope_deltas is None else put(padded.rope_deltas, ("batch",))
            t1 = time.perf_counter()
            with device_time.device_work():
                cache, logits = _prefill(graphdef, state, ids_d, features_d, mask_d, static, positions)
                tokens, logps, lengths, done = (_continuous if slots else _decode)(
                    graphdef, state, cache, logits, ids_d, mask_d, put(keys, ("batch",)),
                    put(padded.active, ("batch",)), jnp.uint32(seed), stop, static, cfg, deltas)
                tokens, logps, lengths, done = map(np.asarray, (tokens, logps, lengths, done))
            t2 = time.perf_counter()
            phases["prepare"] += t1 - t0
            phases["generate"] += t2 - t1
            for r, i in enumerate(members):
                sl = range(r * n, (r + 1) * n)
                results[i] = {"tokens": [tokens[k, :lengths[k]].tolist() for k in sl],
                              "logprobs": [logps[k, :lengths[k]].tolist() for k in sl],
                              "stopped": [bool(done[k]) for k in sl]}
                total_tokens += int(lengths[r * n:(r + 1) * n].sum())
            phases["results"] += time.perf_counter() - t2
            bar.update(len(members))
            bar.set_postfix_str(f"{total_tokens / (time.perf_counter() - start_time):.1f} tok/s")
    bar.close()
    after = compiled_programs()
    new = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    wall = max(time.perf_counter() - start_time, 1e-9)
    log.debug("sampled %d prompts × %d in %.1fs (%d tokens); compiled %d programs %s over %d buckets; "
              "prefill+decode programs busy %.0f %% of the time, idle %.0f %% (batch preparation with image "
              "features %.0f %%, results %.0f %%)", len(prompts), n, wall, total_tokens, sum(new.values()), new,
              len(set(chosen)), 100 * phases["generate"] / wall, 100 * (1 - phases["generate"] / wall),
              100 * phases["prepare"] / wall, 100 * phases["results"] / wall)
    return results


# ----------------------------------------------------------------------------- ahead-of-time lowering
def batch_static(mesh: Mesh | None, model: nnx.Module, *, rows: int, cache_len: int, num_samples: int,
                 max_new_tokens: int, slots: int = 0, own_cache: str | None = None) -> _Static:
    """The static arguments of one batch's prefill and decode programs (``rows = batch × num_samples``;
    ``slots``: the continuous decoder's slots, 0 for the static decoder; ``own_cache``: how decode
    steps read the own cache, ``layers.OWN_CACHE_PATHS``, default ``own_cache_for``)."""
    tc = text_config(model)
    if own_cache is not None and own_cache not in OWN_CACHE_PATHS:
        raise ValueError(f"own_cache must be one of {OWN_CACHE_PATHS} or None, got {own_cache!r}")
    return _Static(num_samples=num_samples, max_new_tokens=max_new_tokens,
                   cache_spec=_spec(mesh, ("batch", "kv_heads", None, "head_dim"),
                                    (slots or rows, tc.num_key_value_heads, cache_len, tc.head_dim)),
                   rows_spec=_spec(mesh, ("batch", None), (rows, tc.vocab_size)), slots=slots,
                   own_cache=own_cache_for(model, mesh, max_new_tokens) if own_cache is None else own_cache)


def lower_programs(model: nnx.Module, state: nnx.State, mesh: Mesh, *, batch: int, length: int, num_samples: int,
                   max_new_tokens: int, sampling: DecodeSettings, num_stop_ids: int = 1,
                   decode_rows: int | None = None) -> dict[str, Any]:
    """The prefill and decode programs ``generate`` runs for one batch of ``batch`` prompts padded to
    ``length`` tokens, compiled from abstract arguments (``state``: ``jax.ShapeDtypeStruct``s with
    shardings, e.g. of an ``nnx.eval_shape`` model; ``mesh`` may hold compile-only TPU devices).
    ``decode_rows``: the continuous decoder through that many slots, as ``generate(decode_rows=)``.
    Returns ``{"prefill", "decode"}`` compiled programs (the decode input is the prefill's output)."""
    graphdef = nnx.graphdef(model)
    rows = batch * num_samples
    slots = decode_slots(decode_rows, rows)
    static = batch_static(mesh, model, rows=rows, cache_len=length + max_new_tokens - 1, num_samples=num_samples,
                          max_new_tokens=max_new_tokens, slots=slots)

    def arg(shape, dtype, axes):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, _spec(mesh, axes, shape)))

    ids, mask = arg((batch, length), jnp.int32, ("batch", None)), arg((batch, length), jnp.bool_, ("batch", None))
    features = positions = deltas = None
    if getattr(model.config, "image_token_id", None) is not None:
        features = arg((batch * length, vision.feature_size(model)), model.dtype, (None, None))
    if vision.uses_mrope(model):
        positions = arg((3, batch, length), jnp.int32, (None, "batch", None))
        deltas = arg((batch,), jnp.int32, ("batch",))
    with jax.set_mesh(mesh):
        prefill_program = _prefill.lower(graphdef, state, ids, features, mask, static, positions).compile()
        cache, logits = prefill_program.out_info
        decode_program = (_continuous if slots else _decode).lower(
            graphdef, state, cache, logits, ids, mask, arg((batch,), jnp.uint32, ("batch",)),
            arg((batch,), jnp.bool_, ("batch",)), arg((), jnp.uint32, ()), arg((num_stop_ids,), jnp.int32, (None,)),
            static, sampling, deltas).compile()
    return {"prefill": prefill_program, "decode": decode_program}


@dataclasses.dataclass(frozen=True)
class CacheBytes:
    """What one decode step of a batch reads from its KV caches, per chip (``decode_cache_bytes``)."""

    prefix: int  # the prompts' prefix caches a step reads (continuous: the window of prompts its slots hold)
    own: int  # the decode rows' (slots') own-token caches, all ``own_slots`` slots
    own_slots: int  # slots per row of the own cache (max_new_tokens - 1)
    prefix_all: int  # the whole batch's prefix caches (held for the batch's lifetime)


def decode_cache_bytes(model: nnx.Module, mesh: Mesh, *, batch: int, length: int, num_samples: int,
                       max_new_tokens: int, decode_rows: int | None = None) -> CacheBytes:
    """Per-chip bytes of the prefix and own-token KV caches of one batch's decoder, as ``generate``
    lays them out under ``mesh`` (rows over data/fsdp, KV heads over tensor): the inputs of the
    planner's per-step HBM traffic."""
    tc = text_config(model)
    rows = batch * num_samples
    slots = decode_slots(decode_rows, rows)
    own_slots = own_cache_slots(max_new_tokens)
    per_token = 2 * tc.num_hidden_layers * tc.num_key_value_heads * tc.head_dim * jnp.dtype(model.dtype).itemsize

    def per_chip(rows_: int, tokens: int) -> int:
        shape = (rows_, tokens, tc.num_key_value_heads, tc.head_dim)
        spec = _spec(mesh, ("batch", None, "kv_heads", "head_dim"), shape)
        shard = NamedSharding(mesh, spec).shard_shape(shape)
        return int(per_token * shard[0] * shard[1] * (shard[2] / tc.num_key_value_heads))

    return CacheBytes(prefix=per_chip(prefix_window(batch, slots, num_samples), length),
                      own=per_chip(slots or rows, own_slots), own_slots=own_slots, prefix_all=per_chip(batch, length))
