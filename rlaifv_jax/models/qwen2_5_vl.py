"""Qwen2.5-VL (``Qwen2_5_VLForConditionalGeneration``): the vision tower of ``qwen_vision`` and the
Qwen2.5 decoder (``llama.Llama`` with qkv bias) under multimodal rotary positions (M-RoPE).

**M-RoPE.** Every token has three positions (temporal, row, column); text tokens repeat one
position three times, image tokens get (t, y, x) offset by the text before them, and the text after
an image continues at ``max(h, w) / merge`` past it (transformers' ``get_rope_index``, here
``rope_index`` on the host in NumPy). The rotary frequencies are split into ``mrope_section``
chunks, chunk i rotating by position i. ``forward_embeds`` takes ``positions [3, B, T]``, or
``[B, T]`` for text-only rows (the same position in every section).

**Driving it** (sampler, labeler, trainer): prefill with ``positions, rope_deltas =
model.position_ids(input_ids, attention_mask, image_grid_thw)``; decode the token at cache slot
``s`` with the 1D position ``(real tokens before it) + rope_deltas`` (a ``[B, T]`` array), exactly
as transformers' ``generate`` does. Images: ``vision_inputs(pixel_values, image_grid_thw)`` on the
host (bucket-padded, see ``qwen_vision``), ``tile_features`` under jit, then
``pack_tile_features`` keeps the real tokens. Batched layouts (``[B, ...]`` arrays of one image per
row, e.g. DPO pairs) give ``[B, tokens, D]`` features, and ``embed`` takes such per-row features.

Parameter groups as LLaVA's: ``vision_tower`` (patch embedding and ViT blocks; frozen in DPO),
``multi_modal_projector`` (the 2×2 patch merger; trained with the language model) and
``language_model``.

The shared model interface (``image_features``, ``embed``, ``forward_embeds``, ``logits``,
``init_cache``, ``num_image_tokens``) is the one of ``llava.Llava``; ``image_sizes`` is replaced
by ``image_grid_thw [images, 3]`` (the image processor's patch grid, one (t, h, w) row per image).
Hugging Face import/export (``models.hf``): ``HF_ARCHITECTURE`` and ``hf_name`` (hub layout:
``visual.*``, ``model.*``, ``lm_head.weight``); every tensor, the Conv3d patch kernel included, has
``hf``'s default layout.
"""
from __future__ import annotations

import dataclasses
import itertools
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rlaifv_jax.models import qwen_vision
from rlaifv_jax.models.llama import Cache, Llama, LlamaConfig, rope_inv_freq
from rlaifv_jax.models.llava import check_image_tokens, merge_image_features
from rlaifv_jax.models.qwen_vision import PatchMerger, QwenVision, QwenVisionConfig

# Text-config fields and defaults of transformers' ``Qwen2_5_VLTextConfig`` (used when a file omits them).
_TEXT_DEFAULTS = {"rms_norm_eps": 1e-5, "max_position_embeddings": 32768, "hidden_act": "silu"}
_TEXT_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "hidden_act", "max_position_embeddings", "rms_norm_eps")


@dataclasses.dataclass(frozen=True)
class Qwen25VLConfig:
    """The fields of a transformers ``qwen2_5_vl`` config this module uses."""

    text: LlamaConfig
    vision: QwenVisionConfig
    mrope_section: tuple[int, ...] = (16, 24, 24)
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653

    @classmethod
    def from_hf(cls, cfg: Mapping[str, Any]) -> "Qwen25VLConfig":
        """From a transformers config dict: v5 (nested ``text_config``) or the hub's flat layout
        (text fields at the root, ``rope_scaling = {"type": "mrope", "mrope_section": ...}``)."""
        if cfg.get("model_type", "qwen2_5_vl") != "qwen2_5_vl":
            raise ValueError(f"unsupported multimodal model_type {cfg.get('model_type')!r} (qwen2_5_vl)")
        text = dict(cfg.get("text_config") or cfg)
        rope = dict(text.get("rope_parameters") or text.get("rope_scaling") or {})
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "mrope"):
            raise ValueError(f"text rope type {rope_type!r} is not supported (default / mrope)")
        sections = tuple(int(s) for s in rope.get("mrope_section") or ())
        heads = text["num_attention_heads"]
        half = text["hidden_size"] // heads // 2
        if len(sections) != 3 or sum(sections) != half:
            raise ValueError(f"rope mrope_section {list(sections)} must be 3 sizes summing to head_dim / 2 = {half}")
        if text.get("use_sliding_window"):
            raise ValueError("use_sliding_window=true: sliding-window attention is not implemented")
        llama = {k: text[k] for k in _TEXT_FIELDS if k in text}
        llama = {**_TEXT_DEFAULTS, **llama, "model_type": "qwen2", "attention_bias": True, "use_sliding_window": False,
                 "rope_parameters": {"rope_type": "default",
                                     "rope_theta": rope.get("rope_theta", text.get("rope_theta", 1e6))}}
        tie = cfg.get("tie_word_embeddings", text.get("tie_word_embeddings", False))
        token = {f.name: int(cfg.get(f.name, f.default))
                 for f in dataclasses.fields(cls) if f.name.endswith("token_id")}
        return cls(text=LlamaConfig.from_hf(llama, tie_word_embeddings=bool(tie)),
                   vision=QwenVisionConfig.from_hf(cfg["vision_config"]), mrope_section=sections, **token)

    def to_hf(self) -> dict[str, Any]:
        """The transformers v5 config dict; the text fields also at the root, as hub files have them."""
        t = self.text
        fields = {k: getattr(t, k) for k in _TEXT_FIELDS}
        rope = {"rope_type": "default", "mrope_section": list(self.mrope_section), "rope_theta": t.rope_theta}
        text = {"model_type": "qwen2_5_vl_text", **fields, "rope_parameters": rope, "use_sliding_window": False,
                "sliding_window": None, "tie_word_embeddings": t.tie_word_embeddings}
        tokens = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name.endswith("token_id")}
        return {"model_type": "qwen2_5_vl", **fields, "rope_theta": t.rope_theta,
                "rope_scaling": {"type": "mrope", "mrope_section": list(self.mrope_section)},
                "tie_word_embeddings": t.tie_word_embeddings, "text_config": text,
                "vision_config": self.vision.to_hf(), **tokens}


def rope_index(input_ids: Any, attention_mask: Any, image_grid_thw: Any, *, image_token_id: int,
               spatial_merge_size: int) -> tuple[np.ndarray, np.ndarray]:
    """transformers' ``get_rope_index`` for images, in NumPy: ``(positions [3, B, T], rope_deltas [B])``.

    Padding (``attention_mask == 0``) gets position 0; each run of image tokens takes the next
    ``image_grid_thw`` row (rows in batch order) and must hold ``t·h·w / merge²`` tokens.
    ``rope_deltas = max position + 1 - real tokens``: add it to 1D positions when decoding.
    """
    ids = np.asarray(input_ids)
    if ids.ndim != 2:
        raise ValueError(f"input_ids must be [batch, length], got shape {ids.shape}")
    mask = np.ones(ids.shape, bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
    grids = iter(()) if image_grid_thw is None else iter(np.asarray(image_grid_thw, np.int64).reshape(-1, 3))
    m = spatial_merge_size
    positions = np.zeros((3,) + ids.shape, np.int64)
    deltas = np.zeros(ids.shape[0], np.int64)
    used = 0
    for b in range(ids.shape[0]):
        row = ids[b][mask[b]]
        parts, current = [], 0
        for is_image, run in itertools.groupby(row == image_token_id):
            n = len(list(run))
            if not is_image:
                parts.append(np.broadcast_to(np.arange(n) + current, (3, n)))
                current += n
                continue
            grid = next(grids, None)
            if grid is None:
                raise ValueError(f"row {b}: more image-token runs than image_grid_thw rows ({used})")
            t, h, w = (int(v) for v in grid)
            if n != t * (h // m) * (w // m):
                raise ValueError(f"row {b}: image run of {n} tokens, but image_grid_thw row {used} {[t, h, w]} "
                                 f"gives {t * (h // m) * (w // m)}")
            tt, yy, xx = np.meshgrid(np.arange(t), np.arange(h // m), np.arange(w // m), indexing="ij")
            parts.append(np.stack([tt, yy, xx]).reshape(3, -1) + current)
            current += max(h, w) // m
            used += 1
        if parts:
            llm = np.concatenate(parts, axis=1)
            positions[:, b, mask[b]] = llm
            deltas[b] = llm.max() + 1 - len(row)
    if next(grids, None) is not None:
        raise ValueError(f"image_grid_thw has more rows than the {used} image-token runs in input_ids")
    return positions, deltas


def mrope_axes(sections: Sequence[int], interleaved: bool = False) -> np.ndarray:
    """Which position (0 temporal, 1 row, 2 column) turns each rotary frequency, ``[sum(sections)]``.

    Chunked (Qwen2.5-VL, transformers' ``recomposition_frequencies``): frequency j of chunk i of
    ``sections`` turns by position i. Interleaved (Qwen3-VL): frequencies 1, 4, 7, … below
    ``3 · sections[1]`` turn by the row, 2, 5, 8, … below ``3 · sections[2]`` by the column, the rest by time."""
    if not interleaved:
        return np.repeat(np.arange(len(sections)) % 3, sections)
    j = np.arange(sum(sections))
    axes = np.zeros_like(j)
    for axis in (1, 2):
        axes[(j % 3 == axis) & (j < 3 * sections[axis])] = axis
    return axes


def mrope_angles(positions: jax.Array, inv_freq: jax.Array, axes: np.ndarray) -> jax.Array:
    """Rotary angles ``[B, T, head_dim/2]`` of ``positions [3, B, T]``: frequency j turns by position
    ``axes[j]`` (``mrope_axes``)."""
    pos = jnp.moveaxis(positions, 0, -1).astype(jnp.float32)  # [B, T, 3]
    return pos[..., axes] * inv_freq


class Qwen25VL(nnx.Module):
    """``Qwen2_5_VLForConditionalGeneration`` (images; videos are not supported)."""

    HF_ARCHITECTURE = "Qwen2_5_VLForConditionalGeneration"
    IMAGE_LAYOUT_KEY = "image_grid_thw"  # the prompt/batch key beside pixel_values (LLaVA: image_sizes)

    def __init__(self, config: Qwen25VLConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        self.config = config
        self.dtype = dtype
        self.vision_tower = QwenVision(config.vision, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.multi_modal_projector = PatchMerger(config.vision, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.language_model = Llama(config.text, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    # ------------------------------------------------------------------ images
    def vision_inputs(self, pixel_values: Any, image_grid_thw: Any,
                      buckets: Sequence[int] = qwen_vision.CHUNK_BUCKETS, chunks: int | None = None) -> dict[str, Any]:
        """Host-side, bucket-padded tower inputs (see ``qwen_vision.vision_inputs``)."""
        return qwen_vision.vision_inputs(pixel_values, image_grid_thw, self.config.vision, buckets, chunks)

    def tile_features(self, inputs: Mapping[str, Any], frozen_tower: bool = False) -> jax.Array:
        """Merged features ``[S / merge², D]`` of ``vision_inputs``, placeholder order, padding last
        (static shapes: jit this); for a batch of layouts (``[B, ...]`` arrays) ``[B, S / merge², D]``,
        one image after the other. ``frozen_tower``: no gradient flows into the tower (the merger,
        the projector, still trains)."""
        if jnp.ndim(inputs["slots"]) == 2:
            return jax.lax.map(lambda one: self.tile_features(one, frozen_tower),
                               {k: jnp.asarray(v) for k, v in inputs.items()})
        hidden = self.vision_tower(inputs)
        if frozen_tower:
            hidden = jax.lax.stop_gradient(hidden)
        return jnp.take(self.multi_modal_projector(hidden), jnp.asarray(inputs["order"]), axis=0)

    def pack_tile_features(self, features: jax.Array, pixel_shape: Any = None, image_grid_thw: Any = None) -> jax.Array:
        """The images' ``[image_tokens, D]`` rows of ``tile_features`` output."""
        if image_grid_thw is None:
            raise ValueError("Qwen2.5-VL needs image_grid_thw to pack image features")
        return features[: self.num_image_tokens(image_grid_thw)]

    def image_features(self, pixel_values: Any, image_grid_thw: Any = None, *, frozen_tower: bool = False) -> jax.Array:
        """``[image_tokens, D]`` features of processor output ``pixel_values [patches, patch_dim]``
        with ``image_grid_thw``; or, given ``vision_inputs`` arrays (inside jit), the padded
        ``tile_features`` (``embed`` reads only as many rows as there are image tokens)."""
        if isinstance(pixel_values, Mapping):
            feats = self.tile_features(pixel_values, frozen_tower)
            return feats if image_grid_thw is None else self.pack_tile_features(feats, None, image_grid_thw)
        if image_grid_thw is None:
            raise ValueError("Qwen2.5-VL needs image_grid_thw with pixel_values")
        feats = self.tile_features(self.vision_inputs(pixel_values, image_grid_thw), frozen_tower)
        return self.pack_tile_features(feats, None, image_grid_thw)

    def num_image_tokens(self, image_size: Any = None) -> int:
        """Placeholder tokens of the image(s) with patch grid ``image_size`` = (t, h, w) rows of
        ``image_grid_thw`` (``t·h·w / merge²`` each)."""
        if image_size is None or np.shape(image_size)[-1:] != (3,):
            raise ValueError(f"Qwen2.5-VL counts image tokens from image_grid_thw (t, h, w) rows, got {image_size!r}")
        return qwen_vision.num_image_tokens(image_size, self.config.vision)

    def position_ids(self, input_ids: Any, attention_mask: Any = None,
                     image_grid_thw: Any = None) -> tuple[np.ndarray, np.ndarray]:
        """``(positions [3, B, T], rope_deltas [B])`` of left-padded ``input_ids`` (see ``rope_index``)."""
        return rope_index(input_ids, attention_mask, image_grid_thw, image_token_id=self.config.image_token_id,
                          spatial_merge_size=self.config.vision.spatial_merge_size)

    # ------------------------------------------------------------------ text
    def embed(self, input_ids: jax.Array, image_features: jax.Array | None = None) -> jax.Array:
        """Text embeddings with image features written at the image-token positions, in order:
        ``image_features [N, D]`` over the whole batch (row-major), or ``[B, N, D]`` per row (row b's
        image tokens take ``image_features[b, :count]``; the padding rows after are not read).
        Features wider than the text embeddings (Qwen3-VL's DeepStack channels) widen the text
        embeddings with zeros."""
        ids = jnp.asarray(input_ids)
        token = self.config.image_token_id
        text = self.language_model.embed(jnp.where(ids == token, 0, ids))
        if image_features is None:
            if not isinstance(input_ids, jax.core.Tracer) and np.any(np.asarray(input_ids) == token):
                raise ValueError("input_ids hold image tokens but no pixel_values were given")
            return text
        extra = image_features.shape[-1] - text.shape[-1]
        if extra:
            text = jnp.pad(text, [(0, 0)] * (text.ndim - 1) + [(0, extra)])
        if image_features.ndim == 2:
            check_image_tokens(input_ids, token, image_features.shape[0])
            return merge_image_features(text, ids, image_features, token)
        if not isinstance(input_ids, jax.core.Tracer):
            most = int(np.max(np.sum(np.asarray(input_ids) == token, axis=1)))
            if image_features.shape[0] != ids.shape[0] or most > image_features.shape[1]:
                raise ValueError(f"per-row image features {tuple(image_features.shape)} do not cover input_ids "
                                 f"{tuple(ids.shape)} with up to {most} image tokens per row")
        is_image = ids == token
        index = jnp.clip(jnp.cumsum(is_image, axis=1) - 1, 0, image_features.shape[1] - 1)
        feats = jnp.take_along_axis(image_features, index[..., None], axis=1).astype(text.dtype)
        return jnp.where(is_image[..., None], feats, text)

    def forward_embeds(self, x: jax.Array, *, positions: jax.Array, key_mask: jax.Array,
                       cache: Cache | None = None, cache_index: jax.Array | int = 0,
                       prefix: tuple[Cache, jax.Array] | None = None,
                       deepstack: jax.Array | None = None, remat: str = "none") -> tuple[jax.Array, Cache | None]:
        """The decoder on embeddings ``x [B, T, D]`` (arguments as ``Llama.forward_embeds``), with
        ``positions [3, B, T]`` (M-RoPE) or ``[B, T]`` (one position for all three sections)."""
        positions = jnp.asarray(positions)
        if positions.ndim == 2:
            positions = jnp.broadcast_to(positions[None], (3,) + positions.shape)
        angles = mrope_angles(positions, rope_inv_freq(self.language_model.config), self.mrope_axes)
        return self.language_model.forward_embeds(x, key_mask=key_mask, cache=cache, cache_index=cache_index,
                                                  prefix=prefix, angles=angles, deepstack=deepstack, remat=remat)

    @property
    def mrope_axes(self) -> np.ndarray:
        """The position axis of each rotary frequency (chunked ``mrope_section``)."""
        return mrope_axes(self.config.mrope_section)

    def logits(self, hidden: jax.Array) -> jax.Array:
        return self.language_model.logits(hidden)

    def init_cache(self, batch: int, length: int, dtype=None, heads_major: bool = False) -> Cache:
        return self.language_model.init_cache(batch, length, dtype, heads_major)

    def __call__(self, input_ids: jax.Array, *, pixel_values: Any = None, image_grid_thw: Any = None,
                 attention_mask: jax.Array | None = None, positions: jax.Array | None = None) -> jax.Array:
        """Logits ``[B, T, V]`` for left-padded ``input_ids`` holding the expanded image tokens.

        ``positions`` default to ``position_ids`` (host-side: pass them when jitting)."""
        feats = None if pixel_values is None else self.image_features(pixel_values, image_grid_thw)
        x = self.embed(input_ids, feats)
        key_mask = jnp.ones(x.shape[:2], bool) if attention_mask is None else jnp.asarray(attention_mask, bool)
        if positions is None:
            positions, _ = self.position_ids(input_ids, attention_mask, image_grid_thw)
        hidden, _ = self.forward_embeds(x, positions=positions, key_mask=key_mask)
        return self.logits(hidden)

    # ------------------------------------------------------------------ Hugging Face names
    def hf_name(self, path: tuple) -> str:
        """The transformers (hub layout) tensor name of the variable at ``path``."""
        head, rest = path[0], [str(p) for p in path[1:]]
        rest[-1] = "weight" if rest[-1] in ("kernel", "embedding") else rest[-1]
        if head == "vision_tower":
            return "visual." + ".".join(rest)
        if head == "multi_modal_projector":
            if rest[0] in ("linear_1", "linear_2"):
                rest[:1] = ["mlp", "0" if rest[0] == "linear_1" else "2"]
            return "visual.merger." + ".".join(rest)
        if head == "language_model":
            return "lm_head.weight" if rest[0] == "lm_head" else "model." + ".".join(rest)
        raise KeyError(f"no Hugging Face name for {path}")
