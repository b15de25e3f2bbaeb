"""LLaVA-1.5 (``LlavaForConditionalGeneration``) and LLaVA-NeXT (``LlavaNextForConditionalGeneration``).

Vision tower → 2-layer projector → image features, written into the text embeddings at the
image-placeholder positions in order (transformers' ``masked_scatter``), then the Llama decoder.
All models (``Llama`` too) share one interface used by the sampler, labeler and trainer:
``image_features``, ``embed``, ``forward_embeds``, ``logits``, ``init_cache``.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rlaifv_jax.models import anyres
from rlaifv_jax.models.clip import CLIPVision, CLIPVisionConfig
from rlaifv_jax.models.layers import Linear, activation, normal
from rlaifv_jax.models.llama import Llama, LlamaConfig


@dataclasses.dataclass(frozen=True)
class LlavaConfig:
    """The fields of a transformers ``llava`` / ``llava_next`` config this module uses."""

    text: LlamaConfig
    vision: CLIPVisionConfig
    image_token_id: int
    vision_feature_layer: tuple[int, ...] = (-2,)
    vision_feature_select_strategy: str = "default"
    projector_hidden_act: str = "gelu"
    projector_bias: bool = True
    image_grid_pinpoints: tuple[tuple[int, int], ...] | None = None  # LLaVA-NeXT only
    model_type: str = "llava"

    @classmethod
    def from_hf(cls, cfg: Mapping[str, Any]) -> "LlavaConfig":
        model_type = cfg.get("model_type", "llava")
        if model_type not in ("llava", "llava_next"):
            raise ValueError(f"unsupported multimodal model_type {model_type!r} (llava, llava_next)")
        layer = cfg.get("vision_feature_layer", -2)
        strategy = cfg.get("vision_feature_select_strategy", "default")
        if strategy not in ("default", "full"):
            raise ValueError(f"vision_feature_select_strategy {strategy!r} must be 'default' or 'full'")
        token = cfg.get("image_token_id", cfg.get("image_token_index"))
        if token is None:
            raise ValueError("config has neither image_token_id nor image_token_index")
        pins = cfg.get("image_grid_pinpoints")
        if model_type == "llava_next" and not pins:
            raise ValueError("llava_next config needs image_grid_pinpoints")
        tie = cfg.get("tie_word_embeddings", cfg["text_config"].get("tie_word_embeddings", False))
        return cls(
            text=LlamaConfig.from_hf(cfg["text_config"], tie_word_embeddings=tie),
            vision=CLIPVisionConfig.from_hf(cfg["vision_config"]), image_token_id=int(token),
            vision_feature_layer=tuple(layer) if isinstance(layer, (list, tuple)) else (int(layer),),
            vision_feature_select_strategy=strategy,
            projector_hidden_act=cfg.get("projector_hidden_act", "gelu"),
            projector_bias=bool(cfg.get("multimodal_projector_bias", True)),
            image_grid_pinpoints=tuple(tuple(p) for p in pins) if pins else None, model_type=model_type)

    def to_hf(self) -> dict[str, Any]:
        layer = self.vision_feature_layer
        out = dict(
            model_type=self.model_type, text_config=self.text.to_hf(), vision_config=self.vision.to_hf(),
            image_token_index=self.image_token_id,
            vision_feature_layer=layer[0] if len(layer) == 1 else list(layer),
            vision_feature_select_strategy=self.vision_feature_select_strategy,
            projector_hidden_act=self.projector_hidden_act,
            multimodal_projector_bias=self.projector_bias,
            tie_word_embeddings=self.text.tie_word_embeddings)
        if self.image_grid_pinpoints is not None:
            out["image_grid_pinpoints"] = [list(p) for p in self.image_grid_pinpoints]
        return out

    @property
    def tokens_per_tile(self) -> int:
        """Image tokens one vision tile contributes (CLS dropped for ``default``)."""
        return self.vision.num_patches + (self.vision_feature_select_strategy == "full")


class Projector(nnx.Module):
    """``LlavaMultiModalProjector``: linear → activation → linear."""

    def __init__(self, config: LlavaConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        vd = config.vision.hidden_size * len(config.vision_feature_layer)
        td = config.text.hidden_size
        kw = dict(use_bias=config.projector_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.linear_1 = Linear((vd,), (td,), in_axes=("embed",), out_axes=("mlp",), **kw)
        self.linear_2 = Linear((td,), (td,), in_axes=("mlp",), out_axes=("embed",), **kw)
        self.act = activation(config.projector_hidden_act)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.linear_2(self.act(self.linear_1(x)))


def merge_image_features(text_embeds: jax.Array, input_ids: jax.Array, features: jax.Array,
                         image_token_id: int) -> jax.Array:
    """Write ``features [N, D]`` in order into the image-token positions of ``text_embeds [B, T, D]``."""
    is_image = (input_ids == image_token_id).reshape(-1)
    index = jnp.clip(jnp.cumsum(is_image) - 1, 0, features.shape[0] - 1)
    flat = jnp.where(is_image[:, None], features[index].astype(text_embeds.dtype),
                     text_embeds.reshape(-1, text_embeds.shape[-1]))
    return flat.reshape(text_embeds.shape)


def check_image_tokens(input_ids: Any, image_token_id: int, num_features: int) -> None:
    """One-line error when the number of image placeholders differs from the number of features."""
    if isinstance(input_ids, jax.core.Tracer):
        return
    found = int(np.sum(np.asarray(input_ids) == image_token_id))
    if found != num_features:
        raise ValueError(f"input_ids hold {found} image tokens (id {image_token_id}) but the images give "
                         f"{num_features} features; expand the <image> placeholder to exactly that many")


class Llava(nnx.Module):
    """LLaVA-1.5: ``pixel_values [num_images, C, H, W]``, one image's features per placeholder run."""

    def __init__(self, config: LlavaConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        self.config = config
        self.dtype = dtype
        self.vision_tower = CLIPVision(config.vision, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.multi_modal_projector = Projector(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.language_model = Llama(config.text, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def tile_features(self, pixel_values: jax.Array, frozen_tower: bool = False) -> jax.Array:
        """Projected features ``[tiles, tokens_per_tile, D]`` for vision tiles ``[..., C, H, W]``
        (leading axes flattened). ``frozen_tower``: no gradient flows into the vision tower."""
        tiles = pixel_values.reshape((-1,) + pixel_values.shape[-3:])
        hidden = self.vision_tower(tiles.astype(self.dtype), self.config.vision_feature_layer)
        if frozen_tower:
            hidden = jax.lax.stop_gradient(hidden)
        if self.config.vision_feature_select_strategy == "default":
            hidden = hidden[:, 1:]
        return self.multi_modal_projector(hidden)

    def pack_tile_features(self, features: jax.Array, pixel_shape: tuple[int, ...], image_sizes: Any = None) -> jax.Array:
        """Tile features ``[tiles, L, D]`` of ``pixel_values`` of shape ``pixel_shape`` → the images'
        features in placeholder order ``[total_image_tokens, D]``."""
        return features.reshape(-1, features.shape[-1])

    def image_features(self, pixel_values: jax.Array, image_sizes: Any = None, *, frozen_tower: bool = False) -> jax.Array:
        """All images' features, flattened in placeholder order: ``[total_image_tokens, D]``.

        The one image-feature function: sampler, labeler, DPO and evaluation all reach the tower
        through ``tile_features`` + ``pack_tile_features`` (``engine.vision`` jits the first)."""
        feats = self.tile_features(pixel_values, frozen_tower)
        return self.pack_tile_features(feats, tuple(pixel_values.shape), image_sizes)

    def num_image_tokens(self, image_size: tuple[int, int] | None = None) -> int:
        """Placeholder tokens one image needs."""
        return self.config.tokens_per_tile

    def embed(self, input_ids: jax.Array, image_features: jax.Array | None = None) -> jax.Array:
        """Text embeddings with image features merged at the placeholder positions."""
        ids = jnp.asarray(input_ids)
        text = self.language_model.embed(jnp.where(ids == self.config.image_token_id, 0, ids))
        if image_features is None:
            if not isinstance(input_ids, jax.core.Tracer) and np.any(np.asarray(input_ids) == self.config.image_token_id):
                raise ValueError("input_ids hold image tokens but no pixel_values were given")
            return text
        check_image_tokens(input_ids, self.config.image_token_id, image_features.shape[0])
        return merge_image_features(text, ids, image_features, self.config.image_token_id)

    def forward_embeds(self, x, **kwargs):
        """The decoder (see ``Llama.forward_embeds``)."""
        return self.language_model.forward_embeds(x, **kwargs)

    def logits(self, hidden: jax.Array) -> jax.Array:
        return self.language_model.logits(hidden)

    def init_cache(self, batch: int, length: int, dtype=None, heads_major: bool = False):
        return self.language_model.init_cache(batch, length, dtype, heads_major)

    def __call__(self, input_ids: jax.Array, *, pixel_values: jax.Array | None = None,
                 image_sizes: Any = None, attention_mask: jax.Array | None = None) -> jax.Array:
        """Logits ``[B, T, V]``; ``input_ids`` already hold the expanded image placeholders."""
        feats = None if pixel_values is None else self.image_features(jnp.asarray(pixel_values), image_sizes)
        x = self.embed(input_ids, feats)
        key_mask = jnp.ones(x.shape[:2], bool) if attention_mask is None else jnp.asarray(attention_mask, bool)
        positions = jnp.maximum(jnp.cumsum(key_mask, axis=1) - 1, 0)
        hidden, _ = self.forward_embeds(x, positions=positions, key_mask=key_mask)
        return self.logits(hidden)


class LlavaNext(Llava):
    """LLaVA-NeXT: anyres tiles per image (``pixel_values [num_images, max_tiles, C, H, W]``,
    ``image_sizes [num_images, 2]`` as (height, width)), unpadded grid with ``image_newline``."""

    def __init__(self, config: LlavaConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        super().__init__(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        d = config.text.hidden_size
        self.image_newline = nnx.Param(
            normal(rngs, (d,), 1.0 / np.sqrt(d), param_dtype), axes=("embed",))

    def anyres_kwargs(self) -> dict[str, Any]:
        """The anyres keyword arguments (pinpoints, tile size, patch size, strategy) of this model."""
        c = self.config
        return dict(grid_pinpoints=c.image_grid_pinpoints, vision_image_size=c.vision.image_size,
                    patch_size=c.vision.patch_size, strategy=c.vision_feature_select_strategy)

    def num_image_tokens(self, image_size: tuple[int, int] | None = None) -> int:
        if image_size is None:
            raise ValueError("LLaVA-NeXT needs the image size (height, width) to count image tokens")
        return anyres.num_image_tokens(tuple(int(s) for s in image_size), **self.anyres_kwargs())

    def pack_tile_features(self, features: jax.Array, pixel_shape: tuple[int, ...], image_sizes: Any = None) -> jax.Array:
        """Anyres packing of every padded tile slot of ``pixel_values [images, max_tiles, C, H, W]``
        (padding tiles are computed, then never gathered)."""
        if image_sizes is None:
            raise ValueError("LLaVA-NeXT needs image_sizes with pixel_values")
        if len(pixel_shape) != 5:
            raise ValueError(f"LLaVA-NeXT pixel_values must be [images, tiles, C, H, W], got shape {pixel_shape}")
        sizes = [tuple(int(s) for s in hw) for hw in np.asarray(image_sizes).reshape(-1, 2)]
        indices, _, _ = anyres.batch_pack_indices(sizes, tiles_per_image=pixel_shape[1], **self.anyres_kwargs())
        return anyres.pack_features(features, self.image_newline[...].astype(features.dtype), indices)
