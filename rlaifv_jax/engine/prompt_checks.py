"""Host-side checks of sampler inputs, run before anything is compiled: options, prompts (ids,
lengths, buckets, image placeholders against the images' features), and each prompt's PRNG identity."""
from __future__ import annotations

import hashlib
from typing import Any, Sequence

import jax
import numpy as np
from flax import nnx

from rlaifv_jax.engine import vision
from rlaifv_jax.models.llava import Llava, LlavaNext, check_image_tokens
from rlaifv_jax.models.qwen2_5_vl import Qwen25VL


def text_config(model: nnx.Module):
    return getattr(model.config, "text", model.config)


def prompt_key(prompt_id: Any) -> int:
    """The uint32 folded into the run key for a prompt: an int id itself, a str id hashed (sha256)."""
    if isinstance(prompt_id, (int, np.integer)) and not isinstance(prompt_id, bool) and 0 <= prompt_id < 2**32:
        return int(prompt_id)
    if isinstance(prompt_id, str):
        return int.from_bytes(hashlib.sha256(prompt_id.encode()).digest()[:4], "little")
    raise ValueError(f"prompt id must be an int in [0, 2**32) or a str, got {prompt_id!r}")


def num_image_features(model: nnx.Module, prompt: dict) -> int:
    """Image features the prompt's pixel_values give (0 without images); validates their layout."""
    px = prompt.get("pixel_values")
    if px is None:
        return 0
    if isinstance(model, Qwen25VL):
        grid = prompt.get("image_grid_thw")
        if grid is None:
            raise ValueError("Qwen2.5-VL needs image_grid_thw, one (t, h, w) row per image")
        grid = np.asarray(grid).reshape(-1, 3)
        want = (int(np.sum(np.prod(grid, axis=1))), model.config.vision.patch_dim)
        if tuple(np.shape(px)) != want:
            raise ValueError(f"pixel_values of shape {np.shape(px)} do not match image_grid_thw {grid.tolist()}: "
                             f"expected {list(want)} (the Qwen2-VL image processor's flattened patches)")
        return model.num_image_tokens(grid)
    if not isinstance(model, Llava):
        raise ValueError("a text-only model was given pixel_values")
    shape = np.shape(px)
    side = model.config.vision.image_size
    ndim = 5 if isinstance(model, LlavaNext) else 4
    if len(shape) != ndim or tuple(shape[-3:]) != (model.config.vision.num_channels, side, side):
        layout = "[images, tiles, C, H, W]" if ndim == 5 else "[images, C, H, W]"
        raise ValueError(f"pixel_values of shape {shape} do not match {layout} with C, H, W = "
                         f"{model.config.vision.num_channels}, {side}, {side}")
    if not isinstance(model, LlavaNext):
        return shape[0] * model.num_image_tokens()
    sizes = prompt.get("image_sizes")
    if sizes is None or len(sizes) != shape[0]:
        raise ValueError(f"LLaVA-NeXT needs image_sizes, one (height, width) per image ({shape[0]} images)")
    return sum(model.num_image_tokens(s) for s in sizes)


def image_features(model: nnx.Module, graphdef, state, prompt: dict) -> jax.Array | None:
    """``[image_tokens, D]`` features of one prompt's images, in placeholder order (a device array,
    dispatched, not waited for)."""
    px = prompt.get("pixel_values")
    if px is None:
        return None
    return vision.image_features(graphdef, state, px, prompt.get(vision.layout_key(model)), model=model)


def check_options(num_samples: int, max_new_tokens: int, stop_token_ids: Sequence[int], seed: int,
                   batch_size: int, buckets: Sequence[int], vocab: int) -> tuple[int, ...]:
    """Validate the run's options; return the sorted buckets."""
    def positive(name, v):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {v!r}")

    positive("num_samples", num_samples)
    positive("max_new_tokens", max_new_tokens)
    positive("batch_size", batch_size)
    if not buckets:
        raise ValueError("buckets must name at least one prompt length")
    for b in buckets:
        positive("every bucket", b)
    if not stop_token_ids:
        raise ValueError("stop_token_ids must name at least one token id (e.g. the EOS id)")
    bad = [t for t in stop_token_ids if isinstance(t, bool) or not isinstance(t, (int, np.integer)) or not 0 <= t < vocab]
    if bad:
        raise ValueError(f"stop_token_ids {bad} are not token ids of a {vocab}-token vocabulary")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**32:
        raise ValueError(f"seed must be an int in [0, 2**32), got {seed!r}")
    return tuple(sorted(set(int(b) for b in buckets)))


def check_prompts(model: nnx.Module, prompts: Sequence[dict], buckets: tuple[int, ...],
                   max_new_tokens: int) -> tuple[list[int], list[int]]:
    """Validate every prompt; return each prompt's bucket and PRNG identity."""
    tc = text_config(model)
    chosen, keys = [], []
    for i, prompt in enumerate(prompts):
        ids = prompt.get("input_ids") if isinstance(prompt, dict) else None
        if ids is None or len(ids) == 0:
            raise ValueError(f"prompt {i}: empty or missing input_ids")
        arr = np.asarray(ids)
        if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer) or arr.min() < 0 or arr.max() >= tc.vocab_size:
            raise ValueError(f"prompt {i}: input_ids must be a flat list of ids in [0, {tc.vocab_size})")
        if len(ids) > buckets[-1]:
            raise ValueError(f"prompt {i}: {len(ids)} tokens exceed the largest bucket ({buckets[-1]}); "
                             "add a larger bucket or shorten the prompt")
        if len(ids) + max_new_tokens > tc.max_position_embeddings:
            raise ValueError(f"prompt {i}: {len(ids)} prompt + {max_new_tokens} new tokens exceed the model's "
                             f"max_position_embeddings ({tc.max_position_embeddings})")
        bucket = next(b for b in buckets if b >= len(ids))
        if tc.sliding_window is not None and bucket + max_new_tokens - 1 > tc.sliding_window:
            raise ValueError(f"prompt {i}: bucket {bucket} + {max_new_tokens} new tokens exceed the model's "
                             f"sliding window ({tc.sliding_window}); sliding-window attention is not implemented")
        try:
            n_features = num_image_features(model, prompt)
            if getattr(model.config, "image_token_id", None) is not None:
                check_image_tokens(arr, model.config.image_token_id, n_features)
            if vision.uses_mrope(model):  # each placeholder run must match its grid row
                model.position_ids(arr[None], None, prompt.get("image_grid_thw") if n_features else None)
        except ValueError as e:
            raise ValueError(f"prompt {i}: {e}") from None
        chosen.append(bucket)
        keys.append(prompt_key(prompt.get("id", i)))
    return chosen, keys
