"""Self-feedback reward for best-of-N at inference (METHOD.md §6).

``r(x, y) = (β / T) · Σ_t [log π_θ(y_t | x, y_<t) − log π_ref(y_t | x, y_<t)]``: the DPO implicit
reward of an answer under the aligned model π_θ and its pre-alignment base π_ref, divided by the
number ``T`` of answer tokens (the end-of-turn token included, as in DPO's π(y)); without the
division the sum favours short answers. Log-probs come from one teacher-forced pass per model
(``sequence_logps``), the same ``answer_logps`` the DPO loss uses, at the positions DPO uses
(Qwen2.5-VL: ``logps.answer_positions``, multimodal).
"""
from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rlaifv_jax.engine import vision
from rlaifv_jax.engine.logps import answer_logps, answer_positions


def implicit_reward(policy_logps, reference_logps, lengths, beta: float) -> np.ndarray:
    """``β · (policy_logps − reference_logps) / lengths``, elementwise (summed log-probs, token counts)."""
    lengths = np.asarray(lengths)
    if np.any(lengths < 1):
        raise ValueError(f"every answer needs at least one token, got lengths {lengths.tolist()}")
    diff = np.asarray(policy_logps, np.float64) - np.asarray(reference_logps, np.float64)
    return beta * diff / lengths


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


@functools.partial(jax.jit, static_argnums=(0, 7))
def _logps(graphdef, state, tokens, features, positions, start, lens, window: int):
    """Summed log-probs of ``tokens[r, start : start + lens[r]]`` at ``positions`` (``[B, T]``, or
    ``[3, B, T]`` multimodal); the LM head runs only on the ``window + 1`` positions from ``start - 1`` on."""
    model = nnx.merge(graphdef, state)
    rows, length = tokens.shape
    index = jnp.arange(length, dtype=jnp.int32)[None]
    hidden, _ = model.forward_embeds(model.embed(tokens, features), positions=positions,
                                     key_mask=index < (start + lens)[:, None])
    idx = jnp.broadcast_to(jnp.clip(start - 1 + jnp.arange(window + 1), 0, length - 1), (rows, window + 1))
    hidden = jnp.take_along_axis(hidden, idx[..., None], axis=1)
    window_tokens = jnp.take_along_axis(tokens, idx, axis=1)
    return answer_logps(model.logits(hidden), window_tokens, jnp.ones((rows,), jnp.int32), lens)


def sequence_logps(model: nnx.Module, prompt: dict, answers: Sequence[Sequence[int]], *,
                   batch_size: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Teacher-forced summed log-probs of each answer (token ids, end-of-turn included) after one
    sampler-style ``prompt`` (``input_ids`` with placeholders expanded, optional ``pixel_values`` /
    ``image_sizes``, or ``image_grid_thw`` for Qwen2.5-VL). The image is encoded once and shared by
    all answers. Returns ``(sums [N] float32, counts [N] int32)``."""
    if not answers or any(len(a) == 0 for a in answers):
        raise ValueError("sequence_logps needs at least one answer and no empty answer")
    graphdef, state = nnx.split(model)
    ids = np.asarray(prompt["input_ids"], np.int32)
    feats, layout = None, prompt.get(vision.layout_key(model))
    if prompt.get("pixel_values") is not None:
        feats = np.asarray(vision.image_features(graphdef, state, prompt["pixel_values"], layout, model=model))
    longest = max(len(a) for a in answers)
    window, length = _round_up(longest, 32), _round_up(len(ids) + longest, 64)
    pad_id = 1 if getattr(model.config, "image_token_id", None) == 0 else 0
    rows = min(batch_size, len(answers))
    if vision.uses_mrope(model):
        head = answer_positions(model, ids, layout if feats is not None else None, length)
        positions = jnp.asarray(np.broadcast_to(head[:, None], (3, rows, length)))
    else:
        positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32)[None], (rows, length))
    sums, counts = [], []
    for lo in range(0, len(answers), rows):
        chunk = list(answers[lo:lo + rows])
        n = len(chunk)
        chunk += [chunk[0]] * (rows - n)  # fixed shapes: one compiled program per (rows, length, window)
        tokens = np.full((rows, length), pad_id, np.int32)
        for r, a in enumerate(chunk):
            tokens[r, :len(ids)] = ids
            tokens[r, len(ids):len(ids) + len(a)] = a
        lens = np.asarray([len(a) for a in chunk], np.int32)
        features = None if feats is None else jnp.asarray(np.tile(feats, (rows, 1)))
        s, c = _logps(graphdef, state, jnp.asarray(tokens), features, positions, jnp.int32(len(ids)),
                      jnp.asarray(lens), window)
        sums.append(np.asarray(s)[:n])
        counts.append(np.asarray(c)[:n])
    return np.concatenate(sums), np.concatenate(counts)
