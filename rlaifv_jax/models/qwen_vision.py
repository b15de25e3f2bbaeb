"""Qwen2.5-VL vision tower (``Qwen2_5_VisionTransformerPretrainedModel``) with static shapes.

Arithmetic follows transformers exactly: Conv3d patch embedding (patch 14, temporal patch 2; an
image is two identical frames) written as a ``Linear`` over the flattened patch; ViT blocks with
RMSNorm, fused biased qkv, 2D rotary embeddings and a biased SwiGLU MLP; window attention on every
block except ``fullatt_block_indexes``. The 2×2 patch merger (``PatchMerger``) is the model's
projector (``qwen2_5_vl.Qwen25VL.multi_modal_projector``): like LLaVA's, it trains while the tower
stays frozen.

**Layout.** transformers permutes the merged 2×2 units into attention windows
(``window_size`` px = ``window_units`` merged units a side, 4×4 units = 64 patches at 112 px), runs
each window as its own ``cu_seqlens`` chunk, and restores the order after the merger. Here the
permutation is the same and the windows are packed back to back (a partial window at an image edge
takes only its own patches), so the slots hold exactly the images' patches, then padding. Window
attention runs over fixed *chunks* of ``window_slots`` slots: a window never spans more than two
consecutive chunks, so each chunk's queries attend to the keys of the chunk before, the chunk
itself and the chunk after (``[chunks, 64, 192]``), masked to their own window. Full attention is
one segment mask (same frame ↔ attend). No per-window loops; only the chunk count decides the
shapes. ``vision_inputs`` computes the layout on the host from ``image_grid_thw``.

**Buckets and compilations.** The chunk count (``⌈patches / 64⌉``) is padded up to the next entry of
``CHUNK_BUCKETS`` (powers of two and their 1.5×: 1, 2, 3, 4, 6, 8, 12, …), so the tower compiles
once per bucket used, never per image size: at most 14 programs for images up to 128 chunks
(8192 patches; RLAIF-V's ``max_pixels = 1280·28·28`` gives ≤ 5120 patches = 80 chunks), usually
2–3 for a dataset resized near ``max_pixels`` (images of 65–96 chunks share the 96-chunk program).
Padding costs ≤ 1.5× in the linear layers and ≤ 2.25× in the (few) full-attention blocks; a fixed
``chunks=`` (DPO batches: every image of a run padded alike) gives one program. Padding slots attend
only to padding and are never gathered.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rlaifv_jax.models.layers import Linear, RMSNorm, activation, dot_product_attention
from rlaifv_jax.models.llama import MLP, apply_rope

CHUNK_BUCKETS: tuple[int, ...] = tuple(sorted({b for k in range(11) for b in (2 ** k, 3 * 2 ** k // 2)}))
_EPS = 1e-6  # transformers hard-codes the vision RMSNorm epsilon


class PatchGeometry:
    """Head and patch sizes of a Qwen vision config (Qwen2.5-VL's and Qwen3-VL's)."""

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Values per flattened patch row of ``pixel_values`` (C · T · p · p: 1176 at patch 14, 1536 at 16)."""
        return self.in_channels * self.temporal_patch_size * self.patch_size ** 2


@dataclasses.dataclass(frozen=True)
class QwenVisionConfig(PatchGeometry):
    """The fields of a transformers ``qwen2_5_vl_vision`` config this module uses."""

    depth: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    out_hidden_size: int
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    in_channels: int = 3
    window_size: int = 112
    fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
    hidden_act: str = "silu"
    rope_theta: float = 10000.0
    tokens_per_second: int = 2

    @classmethod
    def from_hf(cls, cfg: Mapping[str, Any]) -> "QwenVisionConfig":
        """From a transformers vision config dict (hub files spell ``in_channels`` as ``in_chans``)."""
        rope = cfg.get("rope_parameters") or {}
        if rope.get("rope_type", "axial") != "axial":
            raise ValueError(f"vision rope_type {rope.get('rope_type')!r} is not supported (axial)")
        out = cls(
            depth=cfg["depth"], hidden_size=cfg["hidden_size"], intermediate_size=cfg["intermediate_size"],
            num_heads=cfg["num_heads"], out_hidden_size=cfg["out_hidden_size"],
            patch_size=cfg.get("patch_size", 14), temporal_patch_size=cfg.get("temporal_patch_size", 2),
            spatial_merge_size=cfg.get("spatial_merge_size", 2),
            in_channels=cfg.get("in_channels", cfg.get("in_chans", 3)), window_size=cfg.get("window_size", 112),
            fullatt_block_indexes=tuple(cfg.get("fullatt_block_indexes", (7, 15, 23, 31))),
            hidden_act=cfg.get("hidden_act", "silu"), rope_theta=float(rope.get("rope_theta", 10000.0)),
            tokens_per_second=cfg.get("tokens_per_second", 2))
        if out.window_units < 1:
            raise ValueError(f"vision window_size {out.window_size} is smaller than one merged unit "
                             f"({out.spatial_merge_size} x {out.patch_size} px)")
        if out.hidden_size % out.num_heads or (out.hidden_size // out.num_heads) % 4:
            raise ValueError(f"vision hidden_size {out.hidden_size} / num_heads {out.num_heads} must be a "
                             "head_dim divisible by 4 (2D rotary)")
        return out

    def to_hf(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "rope_theta"}
        out["fullatt_block_indexes"] = list(self.fullatt_block_indexes)
        out["rope_parameters"] = {"rope_type": "axial", "rope_theta": self.rope_theta}
        return {"model_type": "qwen2_5_vl_vision", **out}

    mlp_bias = True  # read by llama.MLP, which the vision blocks reuse

    @property
    def window_units(self) -> int:
        """Merged units per window side (transformers' ``vit_merger_window_size``)."""
        return self.window_size // self.spatial_merge_size // self.patch_size

    @property
    def window_slots(self) -> int:
        """Patch slots per window: ``window_units² · merge²``."""
        return self.window_units ** 2 * self.spatial_merge_size ** 2


# ----------------------------------------------------------------------------- host-side layout
LAYOUT_KEYS: tuple[str, ...] = ("slots", "positions", "segments", "windows", "order")  # besides pixel_values


def _grid(image_grid_thw: Any) -> np.ndarray:
    grid = np.asarray(image_grid_thw, np.int64).reshape(-1, 3)
    if grid.size == 0 or np.any(grid < 1):
        raise ValueError(f"image_grid_thw must be positive (t, h, w) rows, got {grid.tolist()}")
    return grid


def num_windows(image_grid_thw: Any, config: QwenVisionConfig) -> int:
    """Attention windows of the images ``image_grid_thw [images, 3]``."""
    m = config.spatial_merge_size
    units = [(t, h // m, w // m, config.window_units or max(h // m, w // m)) for t, h, w in _grid(image_grid_thw)]
    return int(sum(t * -(-hm // u) * -(-wm // u) for t, hm, wm, u in units))


def num_chunks(image_grid_thw: Any, config: QwenVisionConfig) -> int:
    """Chunks of ``window_slots`` slots the images' patches fill (before bucketing)."""
    return -(-int(np.sum(np.prod(_grid(image_grid_thw), axis=1))) // config.window_slots)


def bucket(chunks: int, buckets: Sequence[int] = CHUNK_BUCKETS) -> int:
    """The smallest bucket ≥ ``chunks`` (beyond the largest: the next multiple of it)."""
    for b in sorted(buckets):
        if b >= chunks:
            return b
    top = max(buckets)
    return -(-chunks // top) * top


def vision_inputs(pixel_values: Any, image_grid_thw: Any, config: QwenVisionConfig,
                  buckets: Sequence[int] = CHUNK_BUCKETS, chunks: int | None = None) -> dict[str, Any]:
    """The tower's padded inputs for processor output ``pixel_values [patches, patch_dim]`` and
    ``image_grid_thw [images, 3]`` (several images: rows concatenated in placeholder order).

    Returns arrays of ``S = C · window_slots`` slots, ``C = bucket(num_chunks)`` or the given
    ``chunks`` (``ValueError`` if the images need more): ``pixel_values [S, patch_dim]`` (the rows,
    zero-padded; NumPy or jax as given), ``slots [S]`` (the row each slot reads), ``positions [S, 2]``
    (the patch's (row, col) for the 2D rotary), ``segments [S]`` (frame id), ``windows [S]``
    (attention window id; both -1 for padding) and ``order [S / merge²]`` (the merged slot of each
    image token, in placeholder order, then padding). Windows and their unit order are
    transformers' ``get_vision_window_index``, packed without padding; a config without windows
    (``window_units = None``, Qwen3-VL) makes each frame one window, its units in row-major order.
    """
    grid = _grid(image_grid_thw)
    m = config.spatial_merge_size
    unit = m * m
    rows = int(np.sum(np.prod(grid, axis=1)))
    if tuple(np.shape(pixel_values)) != (rows, config.patch_dim):
        raise ValueError(f"pixel_values of shape {tuple(np.shape(pixel_values))} do not match image_grid_thw "
                         f"{grid.tolist()}: expected [{rows}, {config.patch_dim}] (the Qwen2-VL image processor's "
                         "flattened patches)")
    units, window_ids, coords, frames = [], [], [], []
    merged = frame = window = 0
    for t, h, w in grid:
        hm, wm = h // m, w // m
        u = config.window_units or max(hm, wm)
        nh, nw = -(-hm // u), -(-wm // u)
        index = np.full((t, nh * u, nw * u), -1, np.int64)
        index[:, :hm, :wm] = merged + np.arange(t * hm * wm).reshape(t, hm, wm)
        blocks = index.reshape(t, nh, u, nw, u).transpose(0, 1, 3, 2, 4).reshape(-1, u * u)
        real = blocks >= 0
        units.append(blocks[real])  # window by window, each window's units in row-major order
        window_ids.append(np.broadcast_to(window + np.arange(len(blocks))[:, None], blocks.shape)[real])
        tt, yy, xx = np.meshgrid(np.arange(t), np.arange(hm), np.arange(wm), indexing="ij")
        coords.append(np.stack([yy, xx], -1).reshape(-1, 2))
        frames.append(frame + tt.reshape(-1))
        merged, frame, window = merged + t * hm * wm, frame + t, window + len(blocks)
    need = num_chunks(grid, config)
    total = bucket(need, buckets) if chunks is None else int(chunks)
    if total < need:
        raise ValueError(f"images of {rows} patches need {need} chunks of {config.window_slots} slots; "
                         f"only {total} were given")
    per_chunk = config.window_slots // unit
    pad = total * per_chunk - merged
    units = np.concatenate(units + [np.full(pad, -1, np.int64)])  # [units] global merged unit, -1: padding
    window_ids = np.concatenate(window_ids + [np.full(pad, -1, np.int64)])
    coords, frames = np.concatenate(coords), np.concatenate(frames)
    real = units >= 0
    safe = np.where(real, units, 0)
    sub = np.stack(np.meshgrid(np.arange(m), np.arange(m), indexing="ij"), -1).reshape(unit, 2)
    positions = coords[safe][:, None, :] * m + sub[None]  # [units, merge², 2]
    order = np.zeros(len(units), np.int32)
    order[units[real]] = np.flatnonzero(real)
    slot_pad = total * config.window_slots - rows
    if isinstance(pixel_values, jax.Array):
        px = jnp.pad(pixel_values, ((0, slot_pad), (0, 0)))
    else:
        px = np.pad(np.asarray(pixel_values, np.float32), ((0, slot_pad), (0, 0)))
    return {
        "pixel_values": px,
        "slots": (safe[:, None] * unit + np.arange(unit)[None]).reshape(-1).astype(np.int32),
        "positions": positions.reshape(-1, 2).astype(np.int32),
        "segments": np.repeat(np.where(real, frames[safe], -1), unit).astype(np.int32),
        "windows": np.repeat(window_ids, unit).astype(np.int32),
        "order": order,
    }


# ----------------------------------------------------------------------------- modules
def rotate(x: jax.Array, angles: jax.Array) -> jax.Array:
    """Rotary embedding of ``x [B, T, H, D]`` by per-token angles ``angles [B, T, D/2]``.

    ``llama.apply_rope`` computes ``positions[..., None] * inv_freq``: unit positions and the
    angle table as ``inv_freq`` give exactly ``angles`` (a product by 1.0), then its rotate-half.
    """
    return apply_rope(x, jnp.ones(x.shape[:2], jnp.float32), angles)


class PatchEmbed(nnx.Module):
    """Conv3d with stride = kernel = (T, p, p) (bias: ``config.patch_bias``, Qwen3-VL): a linear map of
    each flattened patch."""

    def __init__(self, config: QwenVisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        c, t, p = config.in_channels, config.temporal_patch_size, config.patch_size
        self.shape = (c, t, p, p)
        self.proj = Linear(self.shape, (config.hidden_size,), in_axes=("channels", "patch", "patch", "patch"),
                           out_axes=("embed",), use_bias=getattr(config, "patch_bias", False), dtype=dtype,
                           param_dtype=param_dtype, rngs=rngs)

    def __call__(self, patches: jax.Array) -> jax.Array:
        return self.proj(patches.reshape(patches.shape[:-1] + self.shape))


class VisionAttention(nnx.Module):
    """Fused-qkv self-attention with 2D rotary (applied in float32, as transformers does)."""

    def __init__(self, config: QwenVisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        d, h, hd = config.hidden_size, config.num_heads, config.head_dim
        kw = dict(use_bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.qkv = Linear((d,), (3, h, hd), in_axes=("embed",), out_axes=(None, "heads", "head_dim"), **kw)
        self.proj = Linear((h, hd), (d,), in_axes=("heads", "head_dim"), out_axes=("embed",), **kw)

    def __call__(self, x: jax.Array, angles: jax.Array, mask: jax.Array, neighbors: bool = False) -> jax.Array:
        """``x [B, T, D]`` (B chunks of T slots, or 1 × all slots), ``angles [B, T, hd/2]``; ``mask
        [B, T, T]``, or with ``neighbors`` ``[B, T, 3T]``: each chunk attends to the keys of the chunk
        before, itself and the chunk after (``chunk_neighbors``)."""
        qkv = self.qkv(x)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        q = rotate(q.astype(jnp.float32), angles).astype(v.dtype)
        k = rotate(k.astype(jnp.float32), angles).astype(v.dtype)
        if neighbors:
            k, v = chunk_neighbors(k, 0), chunk_neighbors(v, 0)
        return self.proj(dot_product_attention(q, k, v, mask))


def axial_angles(positions: jax.Array, head_dim: int, theta: float) -> jax.Array:
    """``[S, head_dim/2]`` angles of patch ``positions [S, 2]``: row frequencies then column
    frequencies (axial 2D rotary, ``head_dim / 4`` frequencies each)."""
    half = head_dim // 2
    inv_freq = 1.0 / (theta ** (jnp.arange(0, half, 2, dtype=jnp.float32) / half))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [S, 2, head_dim/4]
    return freqs.reshape(freqs.shape[0], -1)


def chunk_neighbors(x: jax.Array, fill: Any) -> jax.Array:
    """``x [C, T, ...]`` → ``[C, 3T, ...]``: chunk c's previous chunk, itself and its next chunk
    (``fill`` beyond the ends)."""
    padded = jnp.pad(x, [(1, 1)] + [(0, 0)] * (x.ndim - 1), constant_values=fill)
    return jnp.concatenate([padded[:-2], padded[1:-1], padded[2:]], axis=1)


class VisionBlock(nnx.Module):
    def __init__(self, config: QwenVisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        norm = dict(eps=_EPS, dtype=dtype, param_dtype=param_dtype)
        self.norm1 = RMSNorm(config.hidden_size, **norm)
        self.attn = VisionAttention(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm2 = RMSNorm(config.hidden_size, **norm)
        self.mlp = MLP(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x, angles, mask, neighbors=False):
        x = x + self.attn(self.norm1(x), angles, mask, neighbors)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nnx.Module):
    """RMSNorm, then each 2×2 unit's four patches concatenated → Linear → GELU → Linear."""

    def __init__(self, config: QwenVisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        d, unit = config.hidden_size, config.spatial_merge_size ** 2
        kw = dict(use_bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.unit = unit
        self.ln_q = RMSNorm(d, eps=_EPS, dtype=dtype, param_dtype=param_dtype)
        self.linear_1 = Linear((unit, d), (unit * d,), in_axes=(None, "embed"), out_axes=("mlp",), **kw)
        self.linear_2 = Linear((unit * d,), (config.out_hidden_size,), in_axes=("mlp",), out_axes=("embed",), **kw)
        self.act = activation("gelu")

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.ln_q(x)
        return self.linear_2(self.act(self.linear_1(x.reshape(-1, self.unit, x.shape[-1]))))


class QwenVision(nnx.Module):
    """The tower up to the merger: ``vision_inputs`` arrays → patch features ``[S, hidden_size]`` in
    slot order (``PatchMerger`` then merges each 2×2 unit, ``order`` restores placeholder order)."""

    def __init__(self, config: QwenVisionConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        self.config = config
        self.dtype = dtype
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.patch_embed = PatchEmbed(config, **kw)
        self.blocks = nnx.List([VisionBlock(config, **kw) for _ in range(config.depth)])

    def __call__(self, inputs: Mapping[str, jax.Array]) -> jax.Array:
        c = self.config
        slots = jnp.asarray(inputs["slots"])
        n, chunk = slots.shape[0], c.window_slots
        x = self.patch_embed(jnp.take(jnp.asarray(inputs["pixel_values"]), slots, axis=0).astype(self.dtype))
        angles = axial_angles(jnp.asarray(inputs["positions"]), c.head_dim, c.rope_theta)
        seg = jnp.asarray(inputs["segments"])
        full_mask = (seg[:, None] == seg[None, :])[None]
        win = jnp.asarray(inputs["windows"]).reshape(-1, chunk)
        window_mask = win[:, :, None] == chunk_neighbors(win, -2)[:, None, :]  # -2: beyond the ends
        for i, block in enumerate(self.blocks):
            if i in c.fullatt_block_indexes:
                x = block(x[None], angles[None], full_mask)[0]
            else:
                x = block(x.reshape(-1, chunk, x.shape[-1]), angles.reshape(-1, chunk, angles.shape[-1]),
                          window_mask, True).reshape(n, -1)
        return x


def num_image_tokens(image_grid_thw: Any, config: QwenVisionConfig) -> int:
    """Placeholder tokens of the images ``image_grid_thw [images, 3]``: ``Σ t·h·w / merge²``."""
    return int(np.sum(np.prod(_grid(image_grid_thw), axis=1))) // config.spatial_merge_size ** 2


__all__ = ["CHUNK_BUCKETS", "LAYOUT_KEYS", "PatchMerger", "QwenVision", "QwenVisionConfig", "bucket", "num_chunks",
           "num_image_tokens", "num_windows", "vision_inputs"]
