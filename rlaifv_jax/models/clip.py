"""CLIP vision tower (``CLIPVisionModel``) returning the hidden states of selected layers.

The patch convolution (stride = kernel = patch) is written as a linear map over flattened
patches, which is the same arithmetic and maps onto the mesh like every other ``Linear``.
Only the encoder layers up to the deepest selected one are run.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from rlaifv_jax.models.layers import LayerNorm, Linear, activation, dot_product_attention, normal


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
    """The fields of a transformers ``clip_vision_model`` config this module uses."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    image_size: int
    patch_size: int
    num_channels: int = 3
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"

    @classmethod
    def from_hf(cls, cfg: Mapping[str, Any]) -> "CLIPVisionConfig":
        if cfg.get("model_type", "clip_vision_model") not in ("clip_vision_model", "clip"):
            raise ValueError(f"unsupported vision model_type {cfg.get('model_type')!r} (clip_vision_model)")
        return cls(**{f.name: cfg[f.name] for f in dataclasses.fields(cls) if f.name in cfg})

    def to_hf(self) -> dict[str, Any]:
        return {"model_type": "clip_vision_model", **dataclasses.asdict(self)}

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


class EncoderLayer(nnx.Module):
    """Pre-LN ViT block with biased projections."""

    def __init__(self, config: CLIPVisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        d, h = config.hidden_size, config.num_attention_heads
        hd = d // h
        kw = dict(use_bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        ln = dict(eps=config.layer_norm_eps, dtype=dtype, param_dtype=param_dtype)
        self.layer_norm1 = LayerNorm(d, **ln)
        self.q_proj = Linear((d,), (h, hd), in_axes=("embed",), out_axes=("heads", "head_dim"), **kw)
        self.k_proj = Linear((d,), (h, hd), in_axes=("embed",), out_axes=("heads", "head_dim"), **kw)
        self.v_proj = Linear((d,), (h, hd), in_axes=("embed",), out_axes=("heads", "head_dim"), **kw)
        self.out_proj = Linear((h, hd), (d,), in_axes=("heads", "head_dim"), out_axes=("embed",), **kw)
        self.layer_norm2 = LayerNorm(d, **ln)
        self.fc1 = Linear((d,), (config.intermediate_size,), in_axes=("embed",), out_axes=("mlp",), **kw)
        self.fc2 = Linear((config.intermediate_size,), (d,), in_axes=("mlp",), out_axes=("embed",), **kw)
        self.act = activation(config.hidden_act)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.layer_norm1(x)
        x = x + self.out_proj(dot_product_attention(self.q_proj(h), self.k_proj(h), self.v_proj(h), None))
        return x + self.fc2(self.act(self.fc1(self.layer_norm2(x))))


class CLIPVision(nnx.Module):
    """``CLIPVisionModel``: patch + class + position embeddings, pre-LN, encoder layers."""

    def __init__(self, config: CLIPVisionConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        self.config = config
        self.dtype = dtype
        d, p, c = config.hidden_size, config.patch_size, config.num_channels
        self.patch_embedding = Linear((c, p, p), (d,), in_axes=("channels", "patch", "patch"),
                                      out_axes=("embed",), dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.class_embedding = nnx.Param(
            normal(rngs, (d,), 0.02, param_dtype), axes=("embed",))
        self.position_embedding = nnx.Param(
            normal(rngs, (config.num_patches + 1, d), 0.02, param_dtype),
            axes=("positions", "embed"))
        self.pre_layrnorm = LayerNorm(d, eps=config.layer_norm_eps, dtype=dtype, param_dtype=param_dtype)
        self.layers = nnx.List([EncoderLayer(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
                                for _ in range(config.num_hidden_layers)])

    def embed(self, pixel_values: jax.Array) -> jax.Array:
        """``[N, C, H, W]`` pixels → ``[N, 1 + patches, D]`` embeddings (after pre-LN)."""
        n, c, hgt, wid = pixel_values.shape
        p = self.config.patch_size
        if hgt != self.config.image_size or wid != self.config.image_size:
            raise ValueError(f"pixel_values are {hgt}x{wid}; the vision tower expects "
                             f"{self.config.image_size}x{self.config.image_size}")
        patches = pixel_values.reshape(n, c, hgt // p, p, wid // p, p).transpose(0, 2, 4, 1, 3, 5)
        patches = patches.reshape(n, -1, c, p, p)
        x = self.patch_embedding(patches)
        cls = jnp.broadcast_to(self.class_embedding[...].astype(x.dtype), (n, 1, x.shape[-1]))
        x = jnp.concatenate([cls, x], axis=1) + self.position_embedding[...].astype(x.dtype)
        return self.pre_layrnorm(x)

    def __call__(self, pixel_values: jax.Array, feature_layers: Sequence[int] = (-2,)) -> jax.Array:
        """Hidden states of ``feature_layers`` (transformers ``hidden_states`` indices), concatenated on features."""
        n_layers = self.config.num_hidden_layers
        wanted = [i % (n_layers + 1) for i in feature_layers]
        states = [self.embed(pixel_values)]
        for layer in self.layers[: max(wanted)]:
            states.append(layer(states[-1]))
        return jnp.concatenate([states[i] for i in wanted], axis=-1)
