"""Qwen3-VL (``Qwen3VLForConditionalGeneration``, dense 2B–32B): a ViT with learned position
embeddings and DeepStack mergers, and the Qwen3 decoder under interleaved M-RoPE.

Follows transformers 5.25's ``modeling_qwen3_vl``:

* **Vision tower.** Conv3d patch embedding (patch 16, temporal patch 2, with bias); a learned
  ``num_position_embeddings`` table (a square of ``side²``) resampled bilinearly with
  ``align_corners=True`` to each image's patch grid, in merge-block order
  (``get_vision_interpolation_indices_and_weights``), added to the patches; ViT blocks with
  LayerNorm, fused biased qkv, the 2D axial rotary of ``qwen_vision`` and a biased
  ``gelu_pytorch_tanh`` MLP; every block attends over each whole frame (no windows).
* **Mergers.** The main merger (LayerNorm over the width, then each 2×2 unit concatenated → Linear →
  GELU → Linear) gives the features written at the image tokens; the block listed k-th in
  ``deepstack_visual_indexes`` goes through DeepStack merger k (LayerNorm over the concatenated
  unit) and its output is added to the decoder's hidden states at the image tokens right after
  decoder layer k.
* **Decoder.** ``llama.Llama`` with Qwen3's q/k RMSNorm and explicit ``head_dim``; interleaved
  M-RoPE (``qwen2_5_vl.mrope_axes(..., interleaved=True)``), positions from the same
  ``rope_index`` as Qwen2.5-VL; tied or untied LM head.

**One image-feature path.** ``tile_features`` returns, per image token, the main features and the
DeepStack features side by side, ``[tokens, D · (1 + K)]``. ``embed`` writes them at the image
tokens (the text embeddings widened with zeros) and ``forward_embeds`` splits the width again: the
first D channels enter the decoder, the other K · D are added after layers 0 … K-1 (zero away from
image tokens, so the sum equals transformers' masked add). Every engine path (sampler, beam
search, labeler, reference log-probs, DPO step) thereby carries DeepStack unchanged; decode steps
embed plain text (width D, no DeepStack). The tower's host layout is ``qwen_vision.vision_inputs``
(one window per frame, chunks of 64 slots for the bucket padding); the bilinear taps are computed
under jit from the slots' patch positions and their image's grid.

Parameter groups: ``vision_tower`` (patch embedding, position table, blocks; frozen in DPO),
``multi_modal_projector`` (the main and DeepStack mergers; trained) and ``language_model``.
Hugging Face names: ``model.visual.*``, ``model.language_model.*``, ``lm_head.weight``.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rlaifv_jax.models.layers import Embed, LayerNorm, Linear, activation
from rlaifv_jax.models.llama import Cache, Llama, LlamaConfig
from rlaifv_jax.models.qwen2_5_vl import Qwen25VL, mrope_axes
from rlaifv_jax.models.qwen_vision import PatchEmbed, PatchGeometry, VisionAttention, axial_angles

_EPS = 1e-6  # transformers hard-codes the vision LayerNorm epsilon
_TEXT_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "rms_norm_eps")
_TEXT_DEFAULTS = {"rms_norm_eps": 1e-6, "max_position_embeddings": 128000, "hidden_act": "silu", "head_dim": 128}


@dataclasses.dataclass(frozen=True)
class Qwen3VisionConfig(PatchGeometry):
    """The fields of a transformers ``qwen3_vl_vision`` config this module uses."""

    depth: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    out_hidden_size: int
    num_position_embeddings: int = 2304
    deepstack_visual_indexes: tuple[int, ...] = (8, 16, 24)
    patch_size: int = 16
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    in_channels: int = 3
    hidden_act: str = "gelu_pytorch_tanh"
    rope_theta: float = 10000.0

    window_units = None  # no attention windows: each block attends over whole frames (qwen_vision.vision_inputs)
    window_slots = 64  # slots per chunk of the bucket padding (qwen_vision.CHUNK_BUCKETS)
    patch_bias = True  # read by qwen_vision.PatchEmbed

    @classmethod
    def from_hf(cls, cfg: Mapping[str, Any]) -> "Qwen3VisionConfig":
        rope = cfg.get("rope_parameters") or {}
        if rope.get("rope_type", "axial") != "axial":
            raise ValueError(f"vision rope_type {rope.get('rope_type')!r} is not supported (axial)")
        out = cls(depth=cfg["depth"], hidden_size=cfg["hidden_size"], intermediate_size=cfg["intermediate_size"],
                  num_heads=cfg["num_heads"], out_hidden_size=cfg["out_hidden_size"],
                  num_position_embeddings=cfg.get("num_position_embeddings", 2304),
                  deepstack_visual_indexes=tuple(cfg.get("deepstack_visual_indexes", (8, 16, 24))),
                  patch_size=cfg.get("patch_size", 16), temporal_patch_size=cfg.get("temporal_patch_size", 2),
                  spatial_merge_size=cfg.get("spatial_merge_size", 2),
                  in_channels=cfg.get("in_channels", cfg.get("in_chans", 3)),
                  hidden_act=cfg.get("hidden_act", "gelu_pytorch_tanh"),
                  rope_theta=float(rope.get("rope_theta", 10000.0)))
        side = math.isqrt(out.num_position_embeddings)
        if side * side != out.num_position_embeddings:
            raise ValueError(f"vision num_position_embeddings {out.num_position_embeddings} is not a square")
        if out.hidden_size % out.num_heads or (out.hidden_size // out.num_heads) % 4:
            raise ValueError(f"vision hidden_size {out.hidden_size} / num_heads {out.num_heads} must be a "
                             "head_dim divisible by 4 (2D rotary)")
        ds = list(out.deepstack_visual_indexes)
        if ds != sorted(set(ds)) or any(not 0 <= i < out.depth for i in ds):
            raise ValueError(f"deepstack_visual_indexes {ds} must be increasing blocks of the {out.depth}-block tower")
        return out

    def to_hf(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "rope_theta"}
        out["deepstack_visual_indexes"] = list(self.deepstack_visual_indexes)
        out["rope_parameters"] = {"rope_type": "axial", "rope_theta": self.rope_theta}
        return {"model_type": "qwen3_vl_vision", **out}

    @property
    def grid_side(self) -> int:
        """Side of the learned position table (``√num_position_embeddings``)."""
        return math.isqrt(self.num_position_embeddings)


@dataclasses.dataclass(frozen=True)
class Qwen3VLConfig:
    """The fields of a transformers ``qwen3_vl`` config this module uses."""

    text: LlamaConfig
    vision: Qwen3VisionConfig
    mrope_section: tuple[int, ...] = (24, 20, 20)
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653

    @classmethod
    def from_hf(cls, cfg: Mapping[str, Any]) -> "Qwen3VLConfig":
        """From a transformers config dict (``text_config`` nested; its rope as v5 ``rope_parameters``
        or the hub's ``rope_scaling`` with ``rope_theta`` beside it)."""
        if cfg.get("model_type", "qwen3_vl") != "qwen3_vl":
            raise ValueError(f"unsupported multimodal model_type {cfg.get('model_type')!r} (qwen3_vl)")
        text = dict(cfg.get("text_config") or {})
        if not text:
            raise ValueError("qwen3_vl config without text_config")
        rope = dict(text.get("rope_parameters") or text.get("rope_scaling") or {})
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise ValueError(f"text rope type {rope_type!r} is not supported (default, with mrope_section)")
        sections = tuple(int(s) for s in rope.get("mrope_section") or (24, 20, 20))
        head_dim = text.get("head_dim") or _TEXT_DEFAULTS["head_dim"]
        if len(sections) != 3 or sum(sections) != head_dim // 2:
            raise ValueError(f"rope mrope_section {list(sections)} must be 3 sizes summing to head_dim / 2 = "
                             f"{head_dim // 2}")
        if text.get("attention_bias"):
            raise ValueError("attention_bias=true is not supported for Qwen3-VL (the released models have none)")
        llama = {**_TEXT_DEFAULTS, **{k: text[k] for k in _TEXT_FIELDS if text.get(k) is not None},
                 "model_type": "qwen3", "attention_bias": False, "use_sliding_window": False,
                 "rope_parameters": {"rope_type": "default",
                                     "rope_theta": rope.get("rope_theta", text.get("rope_theta", 5e6))}}
        tie = cfg.get("tie_word_embeddings", text.get("tie_word_embeddings", False))
        token = {f.name: int(cfg.get(f.name, f.default))
                 for f in dataclasses.fields(cls) if f.name.endswith("token_id")}
        return cls(text=LlamaConfig.from_hf(llama, tie_word_embeddings=bool(tie)),
                   vision=Qwen3VisionConfig.from_hf(cfg["vision_config"]), mrope_section=sections, **token)

    def to_hf(self) -> dict[str, Any]:
        """The transformers v5 config dict (as ``save_pretrained`` writes it)."""
        t = self.text
        rope = {"rope_type": "default", "mrope_section": list(self.mrope_section), "mrope_interleaved": True,
                "rope_theta": t.rope_theta}
        text = {"model_type": "qwen3_vl_text", **{k: getattr(t, k) for k in _TEXT_FIELDS}, "rope_parameters": rope,
                "attention_bias": False}
        tokens = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name.endswith("token_id")}
        return {"model_type": "qwen3_vl", "tie_word_embeddings": t.tie_word_embeddings, "text_config": text,
                "vision_config": self.vision.to_hf(), **tokens}


# ----------------------------------------------------------------------------- vision
def position_taps(positions: jax.Array, segments: jax.Array, side: int) -> tuple[jax.Array, jax.Array]:
    """Bilinear (``align_corners=True``) taps into the ``side × side`` position table for patch
    ``positions [S, 2]`` of frames ``segments [S]`` (-1: padding): ``(indices [S, 4], weights [S, 4])``,
    transformers' ``get_vision_interpolation_indices_and_weights``. Each frame's grid is its largest
    patch position + 1."""
    n = positions.shape[0]
    seg = jnp.where(segments >= 0, segments, n - 1)  # padding: a segment no frame uses (frames < n / 4)
    size = jax.ops.segment_max(positions, seg, num_segments=n)[seg] + 1  # [S, 2] the frame's (h, w)

    def axis(index, length):
        src = index.astype(jnp.float32) * (side - 1) / jnp.maximum(length - 1, 1).astype(jnp.float32)
        floor = jnp.floor(src)
        offsets = jnp.arange(2)
        taps = jnp.clip(floor.astype(jnp.int32)[:, None] + offsets, 0, side - 1)
        weights = jnp.maximum(1 - jnp.abs(src[:, None] - floor[:, None] - offsets), 0)
        return taps, weights

    (h_taps, h_w), (w_taps, w_w) = axis(positions[:, 0], size[:, 0]), axis(positions[:, 1], size[:, 1])
    indices = (h_taps[:, :, None] * side + w_taps[:, None, :]).reshape(n, 4)
    return indices, (h_w[:, :, None] * w_w[:, None, :]).reshape(n, 4)


class VisionMLP(nnx.Module):
    def __init__(self, config: Qwen3VisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(use_bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        d, i = config.hidden_size, config.intermediate_size
        self.linear_fc1 = Linear((d,), (i,), in_axes=("embed",), out_axes=("mlp",), **kw)
        self.linear_fc2 = Linear((i,), (d,), in_axes=("mlp",), out_axes=("embed",), **kw)
        self.act = activation(config.hidden_act)

    def __call__(self, x):
        return self.linear_fc2(self.act(self.linear_fc1(x)))


class VisionBlock(nnx.Module):
    """Pre-LayerNorm ViT block: ``qwen_vision.VisionAttention`` and a two-layer MLP."""

    def __init__(self, config: Qwen3VisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        norm = dict(eps=_EPS, dtype=dtype, param_dtype=param_dtype)
        self.norm1 = LayerNorm(config.hidden_size, **norm)
        self.attn = VisionAttention(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm2 = LayerNorm(config.hidden_size, **norm)
        self.mlp = VisionMLP(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x, angles, mask):
        x = x + self.attn(self.norm1(x), angles, mask)
        return x + self.mlp(self.norm2(x))


class Merger(nnx.Module):
    """LayerNorm (over the width, or with ``postshuffle`` over the concatenated 2×2 unit), then each
    unit's four patches concatenated → Linear → GELU → Linear (``Qwen3VLVisionPatchMerger``)."""

    def __init__(self, config: Qwen3VisionConfig, postshuffle: bool, *, dtype, param_dtype, rngs: nnx.Rngs):
        d, unit = config.hidden_size, config.spatial_merge_size ** 2
        kw = dict(use_bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.unit, self.postshuffle = unit, postshuffle
        self.norm = LayerNorm(unit * d if postshuffle else d, eps=_EPS, dtype=dtype, param_dtype=param_dtype)
        self.linear_fc1 = Linear((unit, d), (unit * d,), in_axes=(None, "embed"), out_axes=("mlp",), **kw)
        self.linear_fc2 = Linear((unit * d,), (config.out_hidden_size,), in_axes=("mlp",), out_axes=("embed",), **kw)
        self.act = activation("gelu")

    def __call__(self, x: jax.Array) -> jax.Array:
        """Patch features ``[S, d]`` (slot order, 2×2 units consecutive) → ``[S / 4, out]``."""
        d = x.shape[-1]
        x = self.norm(x.reshape(-1, self.unit * d)) if self.postshuffle else self.norm(x)
        return self.linear_fc2(self.act(self.linear_fc1(x.reshape(-1, self.unit, d))))


class Qwen3Vision(nnx.Module):
    """The tower up to the mergers: ``vision_inputs`` arrays → ``(patch features [S, d], DeepStack
    block outputs [K, S, d])`` in slot order."""

    def __init__(self, config: Qwen3VisionConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        self.config = config
        self.dtype = dtype
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.patch_embed = PatchEmbed(config, **kw)
        self.pos_embed = Embed(config.num_position_embeddings, config.hidden_size, axes=(None, "embed"), **kw)
        self.blocks = nnx.List([VisionBlock(config, **kw) for _ in range(config.depth)])

    def __call__(self, inputs: Mapping[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
        c = self.config
        slots, positions = jnp.asarray(inputs["slots"]), jnp.asarray(inputs["positions"])
        seg = jnp.asarray(inputs["segments"])
        x = self.patch_embed(jnp.take(jnp.asarray(inputs["pixel_values"]), slots, axis=0).astype(self.dtype))
        taps, weights = position_taps(positions, seg, c.grid_side)
        table = self.pos_embed.embedding[...]
        pos = jnp.sum(jnp.take(table, taps, axis=0) * weights[..., None].astype(table.dtype), axis=1)
        x = x + pos.astype(x.dtype)
        angles = axial_angles(positions, c.head_dim, c.rope_theta)[None]
        mask = (seg[:, None] == seg[None, :])[None]
        deep = []
        for i, block in enumerate(self.blocks):
            x = block(x[None], angles, mask)[0]
            if i in c.deepstack_visual_indexes:
                deep.append(x)
        return x, jnp.stack(deep) if deep else jnp.zeros((0,) + x.shape, x.dtype)


class Projector(nnx.Module):
    """The main merger and the DeepStack mergers: ``[S / 4, out · (1 + K)]`` (main features first)."""

    def __init__(self, config: Qwen3VisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.merger = Merger(config, False, **kw)
        self.deepstack_merger_list = nnx.List([Merger(config, True, **kw)
                                               for _ in config.deepstack_visual_indexes])

    def __call__(self, hidden: jax.Array, deep: jax.Array) -> jax.Array:
        parts = [self.merger(hidden)] + [m(deep[k]) for k, m in enumerate(self.deepstack_merger_list)]
        return jnp.concatenate(parts, axis=-1)


# ----------------------------------------------------------------------------- model
class Qwen3VL(Qwen25VL):
    """``Qwen3VLForConditionalGeneration`` (images; videos are not supported). The host-side methods
    (``vision_inputs``, ``position_ids``, ``num_image_tokens``, ``embed``, packing) are Qwen2.5-VL's."""

    HF_ARCHITECTURE = "Qwen3VLForConditionalGeneration"

    def __init__(self, config: Qwen3VLConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = config
        self.dtype = dtype
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.vision_tower = Qwen3Vision(config.vision, **kw)
        self.multi_modal_projector = Projector(config.vision, **kw)
        self.language_model = Llama(config.text, **kw)

    @property
    def feature_size(self) -> int:
        """Width of ``image_features`` rows: the decoder width times (1 + DeepStack layers)."""
        return self.config.text.hidden_size * (1 + len(self.config.vision.deepstack_visual_indexes))

    @property
    def mrope_axes(self) -> np.ndarray:
        return mrope_axes(self.config.mrope_section, interleaved=True)

    def tile_features(self, inputs: Mapping[str, Any], frozen_tower: bool = False) -> jax.Array:
        """Features ``[S / merge², D · (1 + K)]`` of ``vision_inputs`` (main, then DeepStack k = 0 … K-1),
        placeholder order, padding last; for a batch of layouts ``[B, S / merge², D · (1 + K)]``.
        ``frozen_tower``: no gradient into the tower (the mergers still train)."""
        if jnp.ndim(inputs["slots"]) == 2:
            return jax.lax.map(lambda one: self.tile_features(one, frozen_tower),
                               {k: jnp.asarray(v) for k, v in inputs.items()})
        hidden, deep = self.vision_tower(inputs)
        if frozen_tower:
            hidden, deep = jax.lax.stop_gradient(hidden), jax.lax.stop_gradient(deep)
        return jnp.take(self.multi_modal_projector(hidden, deep), jnp.asarray(inputs["order"]), axis=0)

    def forward_embeds(self, x: jax.Array, *, positions: jax.Array, key_mask: jax.Array,
                       cache: Cache | None = None, cache_index: jax.Array | int = 0,
                       prefix: tuple[Cache, jax.Array] | None = None,
                       deepstack: jax.Array | None = None, remat: str = "none") -> tuple[jax.Array, Cache | None]:
        """The decoder on ``x [B, T, D]`` or, from ``embed`` with image features, ``[B, T, D · (1 + K)]``:
        the channels past D are the DeepStack features, added after decoder layers 0 … K-1 (``remat`` as
        ``Llama.forward_embeds``)."""
        d = self.config.text.hidden_size
        if x.shape[-1] != d:
            if deepstack is not None or x.shape[-1] % d:
                raise ValueError(f"embeddings of width {x.shape[-1]}: expected {d} or a multiple (DeepStack)")
            deepstack = jnp.moveaxis(x[..., d:].reshape(x.shape[:-1] + (-1, d)), -2, 0)
            x = x[..., :d]
        return super().forward_embeds(x, positions=positions, key_mask=key_mask, cache=cache,
                                      cache_index=cache_index, prefix=prefix, deepstack=deepstack, remat=remat)

    # ------------------------------------------------------------------ Hugging Face names
    def hf_name(self, path: tuple) -> str:
        """The transformers tensor name of the variable at ``path``."""
        head, rest = path[0], [str(p) for p in path[1:]]
        rest[-1] = "weight" if rest[-1] in ("kernel", "embedding") else rest[-1]
        if head in ("vision_tower", "multi_modal_projector"):
            return "model.visual." + ".".join(rest)
        if head == "language_model":
            return "lm_head.weight" if rest[0] == "lm_head" else "model.language_model." + ".".join(rest)
        raise KeyError(f"no Hugging Face name for {path}")


__all__ = ["Qwen3VL", "Qwen3VLConfig", "Qwen3VisionConfig", "position_taps"]
