"""Answer log-probabilities: the teacher-forced pass that DPO, the reference pass and best-of-N share.

A "log-prob" of a response is the SUM over its answer tokens (the assistant answer including the
end-of-turn token) of ``log p(token_t | tokens_<t)``; prompt and image positions never count.

Pair batches hold one image per pair. LLaVA: ``pixel_values [B, C, H, W]``. Qwen2.5-VL
(``pair_image_arrays``, built on the host per pair): the tower layout of each image padded to one
fixed chunk count (``pixel_values [B, S, patch_dim]`` and ``vision_*`` arrays, see
``models.qwen_vision.vision_inputs``) and the multimodal ``positions [B, 3, L]`` shared by the
chosen and rejected rows (the answers are text after the same prompt); every array leads with the
pair axis, so batches stack, shard, pad and split into micro-batches like LLaVA's.
"""
from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from rlaifv_jax.core import device_time, sharding as shd
from rlaifv_jax.data.buckets import IMAGE_PACK_KEY, PACK_PAD, WINDOW_KEY, with_answer_window
from rlaifv_jax.models import anyres
from rlaifv_jax.models.qwen_vision import LAYOUT_KEYS

Batch = Mapping[str, Any]

def answer_logps(
    logits: jax.Array, tokens: jax.Array, answer_start: jax.Array, answer_len: jax.Array, *, shifted: bool = False
) -> tuple[jax.Array, jax.Array]:
    """Sum of answer-token log-probs per row, and the number of answer tokens.

    Args:
      logits: ``[B, T, V]``, any float dtype; ``logits[:, t]`` is the model output at position ``t``
        and predicts ``tokens[:, t + 1]``.
      tokens: ``[B, T]`` int, the full input sequence (prompt, image tokens, answer, padding).
      answer_start: ``[B]`` int, index in ``tokens`` of the first answer token (≥ 1).
      answer_len: ``[B]`` int, number of answer tokens (including the end-of-turn token).
      shifted: ``logits`` is ``[B, T - 1, V]``, already without the last position (no slice of
        the logits: TPU's compiler fails on the gradient of a slice of a ``[B, W + 1, V]`` window).

    Returns:
      ``(sum_logps [B] float32, count [B] int32)``. The mask comes from ``answer_start``/``answer_len``
      only (never from token ids, so an EOS equal to the pad id counts). Each term is
      ``logits[target] − logsumexp(logits)`` in float32: the target logit is gathered first and the
      logsumexp is a reduction whose float32 up-cast XLA fuses into it, so no ``[B, T, V]`` float32
      log-softmax is materialised. Answer tokens beyond position ``T − 1`` are not counted.
    """
    pred = logits if shifted else logits[:, :-1]  # [B, T-1, V] predicts tokens[:, 1:]
    targets = tokens[:, 1:].astype(jnp.int32)
    target_logit = jnp.take_along_axis(pred, targets[..., None], axis=-1)[..., 0].astype(jnp.float32)
    row_max = jax.lax.stop_gradient(jnp.max(pred, axis=-1).astype(jnp.float32))
    lse = row_max + jnp.log(jnp.sum(jnp.exp(pred.astype(jnp.float32) - row_max[..., None]), axis=-1))
    positions = jnp.arange(1, tokens.shape[1], dtype=jnp.int32)[None, :]
    start = answer_start.astype(jnp.int32)[:, None]
    mask = (positions >= start) & (positions < start + answer_len.astype(jnp.int32)[:, None])
    token_logps = jnp.where(mask, target_logit - lse, 0.0)
    return jnp.sum(token_logps, axis=-1), jnp.sum(mask, axis=-1, dtype=jnp.int32)


def pair_logps(model: nnx.Module, batch: Batch, *, image_sizes: Any = None,
               answer_window: int | None = None, remat: str = "none") -> dict[str, jax.Array]:
    """Summed answer log-probs of the chosen and rejected responses of a pair batch.

    ``batch``: ``chosen_tokens``/``rejected_tokens`` ``[B, L]`` (right-padded; image placeholders
    expanded), ``answer_start``, ``chosen_len``, ``rejected_len`` ``[B]`` and, for a multimodal model,
    ``pixel_values`` ``[B, C, H, W]`` (one image per pair; Qwen2.5-VL: the arrays of
    ``pair_image_arrays``; LLaVA-NeXT: ``[B, max_tiles, C, H, W]`` and ``image_pack [B, L]``, each
    pair's ``anyres.pack_indices`` with ``buckets.PACK_NEWLINE`` / ``PACK_PAD``, see
    ``data.pairs.pair_example_fn``). Each image is encoded ONCE: its features are tiled over
    the chosen and the rejected rows, which run as one ``2B`` batch (Qwen2.5-VL: per-row features, each row reading its
    own image's tokens). The vision tower runs under ``stop_gradient`` (frozen); the projector is
    differentiable. Positions are ``arange(L)`` (Qwen2.5-VL: the batch's ``positions``) and the key
    mask comes from lengths (``t < answer_start + len``), never from ids.

    ``remat``: the decoder's rematerialisation in the backward pass (``Llama.forward_embeds``).

    With ``answer_window = W`` (static, ≥ every answer length) the LM head and log-softmax run only
    on the ``W + 1`` positions from ``answer_start - 1`` on, instead of all ``L``; a batch carrying
    ``window_positions`` ``[B, W + 1]`` (``data.buckets.with_answer_window``: the automatic window,
    the batch's longest answer bucketed) runs the head on those positions. Both are exact.

    Returns ``{"chosen": [B], "rejected": [B], "chosen_len": [B], "rejected_len": [B]}`` (float32
    sums, int32 counts of answer tokens inside the window).
    """
    chosen, rejected = jnp.asarray(batch["chosen_tokens"]), jnp.asarray(batch["rejected_tokens"])
    b, length = chosen.shape
    tokens = jnp.concatenate([chosen, rejected], axis=0)
    start = jnp.asarray(batch["answer_start"], jnp.int32)
    lens = jnp.concatenate([jnp.asarray(batch["chosen_len"], jnp.int32), jnp.asarray(batch["rejected_len"], jnp.int32)])
    starts = jnp.concatenate([start, start])
    feats = None
    if batch.get("pixel_values") is not None:
        pixels = jnp.asarray(batch["pixel_values"])
        if "vision_slots" in batch:  # Qwen2.5-VL: one tower layout per pair -> [B, tokens, D]
            pixels = {"pixel_values": pixels, **{k: jnp.asarray(batch["vision_" + k]) for k in LAYOUT_KEYS}}
        if IMAGE_PACK_KEY in batch:  # LLaVA-NeXT [B, tiles, C, H, W]: each pair's anyres packing is a
            # gather with its host-computed indices, so every image size runs in the same program
            tiles = model.tile_features(pixels, frozen_tower=True)  # [B * tiles, tile_tokens, D]
            per_pair = pixels.shape[1] * tiles.shape[1]
            pack = jnp.asarray(batch[IMAGE_PACK_KEY], jnp.int32)  # [B, L]: rows of this pair's tiles, < 0: newline
            rows = jnp.where(pack < 0, b * per_pair, pack + per_pair * jnp.arange(b, dtype=jnp.int32)[:, None])
            feats = anyres.pack_features(tiles, model.image_newline[...], rows.reshape(-1)).reshape(pack.shape + (-1,))
        else:
            feats = model.image_features(pixels, image_sizes, frozen_tower=True)
        feats = jnp.concatenate([feats, feats], axis=0)  # rows: chosen pairs, then rejected pairs
    if IMAGE_PACK_KEY in batch:  # row r's k-th image token takes feats[r, k]
        is_image = tokens == model.config.image_token_id
        if not isinstance(tokens, jax.core.Tracer):
            packed = np.sum(np.asarray(batch[IMAGE_PACK_KEY]) != PACK_PAD, axis=1)
            if not np.array_equal(np.sum(np.asarray(is_image), axis=1), np.tile(packed, 2)):
                raise ValueError(f"{IMAGE_PACK_KEY}: a pair's packed image rows differ from its image tokens")
        x = model.embed(jnp.where(is_image, 0, tokens))
        slot = jnp.clip(jnp.cumsum(is_image, axis=1) - 1, 0, feats.shape[1] - 1)
        x = jnp.where(is_image[..., None], jnp.take_along_axis(feats, slot[..., None], axis=1).astype(x.dtype), x)
    else:
        x = model.embed(tokens, feats)
    index = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32)[None], tokens.shape)
    positions = index
    if "positions" in batch:  # [B, 3, >= L] multimodal positions (cut buckets only drop padding)
        pos = jnp.asarray(batch["positions"], jnp.int32)[..., :length]
        positions = jnp.moveaxis(jnp.concatenate([pos, pos], axis=0), 1, 0)
    key_mask = index < (starts + lens)[:, None]
    hidden, _ = model.forward_embeds(x, positions=positions, key_mask=key_mask, remat=remat)
    window = batch.get(WINDOW_KEY)
    if answer_window is not None and window is not None:
        raise ValueError(f"give answer_window ({answer_window}) or a batch with {WINDOW_KEY}, not both")
    if answer_window is not None:
        window = jnp.clip(start[:, None] - 1 + jnp.arange(answer_window + 1)[None], 0, length - 1)
    if window is not None:  # gather the window; the answer then starts at window index 1
        window = jnp.asarray(window, jnp.int32)
        idx = jnp.concatenate([window, window], axis=0)
        hidden = jnp.take_along_axis(hidden, idx[:, :-1, None], axis=1)  # the last position predicts nothing
        tokens, starts = jnp.take_along_axis(tokens, idx, axis=1), jnp.ones_like(starts)
    sums, counts = answer_logps(model.logits(hidden), tokens, starts, lens, shifted=window is not None)
    return {"chosen": sums[:b], "rejected": sums[b:], "chosen_len": counts[:b], "rejected_len": counts[b:]}


def _pad_batch(batch: Batch, size: int) -> dict[str, np.ndarray]:
    n = len(next(iter(batch.values())))
    if n == size:
        return dict(batch)
    return {k: np.concatenate([np.asarray(v), np.repeat(np.asarray(v)[:1], size - n, axis=0)]) for k, v in batch.items()}


@functools.partial(jax.jit, static_argnums=0)
def _pair_logps_jit(graphdef: nnx.GraphDef, state: nnx.State, batch: Batch) -> dict[str, jax.Array]:
    # Module-level so the compiled forward is reused across calls (keyed by graphdef and shapes).
    return pair_logps(nnx.merge(graphdef, state), batch)


def lower_reference(model: nnx.Module, state: nnx.State, batch: Batch, mesh: Mesh) -> Any:
    """The compiled forward ``reference_logps`` runs for one pair batch, from abstract ``state`` and
    ``batch`` (``jax.ShapeDtypeStruct``s with shardings; ``mesh`` may hold compile-only TPU devices)."""
    with jax.set_mesh(mesh):
        return _pair_logps_jit.lower(nnx.graphdef(model), state, batch).compile()


def reference_logps(model: nnx.Module, batches: Iterable[Batch], *, mesh: Mesh | None = None,
                    rules: shd.Rules = shd.TRAIN_RULES, batch_size: int | None = None) -> dict[str, np.ndarray]:
    """Reference log-probs of the frozen policy ``model`` in one pass over ``batches``.

    Returns host arrays ``{"ref_chosen_logps": [N], "ref_rejected_logps": [N]}`` in batch order
    (N = total rows). Every batch is padded to ``batch_size`` (default: the first batch's size) and
    the padding rows dropped, so repeated calls with one ``batch_size`` reuse one compiled forward
    per sequence length and automatic answer window (``data.buckets.with_answer_window``, exact).
    ``model`` is not modified. Store the result beside the pairs and feed it to the train step as
    batch keys ``ref_chosen_logps`` / ``ref_rejected_logps``.
    """
    graphdef, state = nnx.split(model)
    out: dict[str, list[np.ndarray]] = {"ref_chosen_logps": [], "ref_rejected_logps": []}
    size = batch_size
    for batch in batches:
        batch = with_answer_window({k: np.asarray(v) for k, v in batch.items() if k in MODEL_KEYS})
        n = len(batch["chosen_tokens"])
        size = size or n
        if n > size:
            raise ValueError(f"a batch of {n} pairs exceeds batch_size={size}")
        padded = _pad_batch(batch, size)
        if mesh is not None:
            padded = {k: jax.device_put(v, shd.batch_sharding(mesh, v.ndim, rules)) for k, v in padded.items()}
        with device_time.device_work():
            res = jax.device_get(_pair_logps_jit(graphdef, state, padded))
        out["ref_chosen_logps"].append(np.asarray(res["chosen"])[:n])
        out["ref_rejected_logps"].append(np.asarray(res["rejected"])[:n])
    return {k: (np.concatenate(v) if v else np.zeros((0,), np.float32)) for k, v in out.items()}


def pair_image_arrays(model: nnx.Module, pixel_values: Any, layout: Any, prompt_ids: Any, length: int, *,
                      max_patches: int | None = None) -> dict[str, np.ndarray]:
    """The image part of one pair example (host side), for sequences padded to ``length`` tokens.

    LLaVA-1.5 (``pixel_values [1, C, H, W]`` of the image encoder): ``{"pixel_values": [C, H, W]}``.
    Qwen2.5-VL (``[patches, patch_dim]`` with ``layout = image_grid_thw [1, 3]``): the tower layout
    padded to ``⌈min(max_patches, 4 · length) / 64⌉`` chunks (the image processor's largest image,
    at most as many patches as a sequence of ``length`` tokens could hold: every pair of a run has
    the same shapes) as ``pixel_values`` and ``vision_*`` arrays, and ``positions [3, length]`` of
    ``prompt_ids`` (``model.position_ids``) continued by the answer tokens at ``index + rope_delta``.
    """
    if not hasattr(model, "vision_inputs"):
        return {"pixel_values": np.asarray(pixel_values)[0]}
    vc = model.config.vision
    chunks = -(-min(max_patches or 4 * length, 4 * length) // vc.window_slots)
    inputs = model.vision_inputs(np.asarray(pixel_values, np.float32), layout, chunks=chunks)
    return {"pixel_values": inputs["pixel_values"], **{"vision_" + k: inputs[k] for k in LAYOUT_KEYS},
            "positions": answer_positions(model, prompt_ids, layout, length)}


def answer_positions(model: nnx.Module, prompt_ids: Any, layout: Any, length: int) -> np.ndarray:
    """``[3, length]`` int32 multimodal positions (``model.position_ids``, Qwen2.5-VL) of ``prompt_ids``
    with images of ``layout`` (``image_grid_thw``; None: text only), continued by answer tokens at
    ``index + rope_delta``."""
    prompt = np.asarray(prompt_ids)[None]
    head, deltas = model.position_ids(prompt, None, layout)
    positions = np.broadcast_to(np.arange(length) + deltas[0], (3, length)).copy()
    positions[:, : prompt.shape[1]] = head[:, 0]
    return positions.astype(np.int32)


MODEL_KEYS = ("pixel_values", "chosen_tokens", "rejected_tokens", "answer_start", "chosen_len", "rejected_len",
              WINDOW_KEY, IMAGE_PACK_KEY, "positions") + tuple("vision_" + k for k in LAYOUT_KEYS)
