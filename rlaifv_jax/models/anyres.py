"""LLaVA-NeXT "anyres" image features: host-side shape logic and a one-gather packing.

Everything here mirrors transformers' LLaVA-NeXT (``select_best_resolution``,
``get_anyres_image_grid_shape``, ``image_size_to_num_patches``, ``unpad_image`` and
``LlavaNextModel.pack_image_features``) exactly. The per-image shapes depend on the concrete
image size, so they are computed in NumPy on the host; inside ``jit`` the packing is a single
``jnp.take`` with a constant index array.

Layout of a packed image (``strategy="default"``, with newline): the base patch's ``L`` tokens,
then the grid of crops re-assembled into one ``(rows*side, cols*side)`` feature map, unpadded to
the image's aspect ratio, read row by row with the newline embedding after every row.
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

Size = Sequence[int]
Pinpoints = Sequence[Sequence[int]]

STRATEGIES = ("default", "full")


def _size(image_size: Size) -> tuple[int, int]:
    """(height, width) as Python ints, from a tuple, list or array."""
    height, width = (int(v) for v in np.asarray(image_size).tolist())
    return height, width


def select_best_resolution(original_size: Size, possible_resolutions: Pinpoints) -> tuple[int, int]:
    """The (height, width) pinpoint that keeps the most image pixels, then wastes the fewest.

    Same arithmetic and tie-breaking (first pinpoint wins) as transformers.
    """
    original_height, original_width = _size(original_size)
    best_fit = None
    max_effective_resolution = 0
    min_wasted_resolution = float("inf")
    for height, width in possible_resolutions:
        scale = min(width / original_width, height / original_height)
        downscaled_width, downscaled_height = int(original_width * scale), int(original_height * scale)
        effective_resolution = min(downscaled_width * downscaled_height, original_width * original_height)
        wasted_resolution = (width * height) - effective_resolution
        if effective_resolution > max_effective_resolution or (
            effective_resolution == max_effective_resolution and wasted_resolution < min_wasted_resolution
        ):
            max_effective_resolution = effective_resolution
            min_wasted_resolution = wasted_resolution
            best_fit = (int(height), int(width))
    if best_fit is None:
        raise ValueError(f"no pinpoint in {possible_resolutions} keeps any pixel of an image of size {original_size}")
    return best_fit


def grid_shape(image_size: Size, grid_pinpoints: Pinpoints, vision_image_size: int) -> tuple[int, int]:
    """(rows, cols) of vision-tower crops tiling the best resolution (floor division, as transformers)."""
    height, width = select_best_resolution(image_size, grid_pinpoints)
    return height // vision_image_size, width // vision_image_size


def num_patches(image_size: Size, grid_pinpoints: Pinpoints, vision_image_size: int) -> int:
    """Number of vision-tower inputs for one image: the crops (ceil division, as transformers) plus the base patch."""
    height, width = select_best_resolution(image_size, grid_pinpoints)
    return -(-height // vision_image_size) * -(-width // vision_image_size) + 1


def _unpad_slices(original_size: Size, current_height: int, current_width: int) -> tuple[slice, slice]:
    """The (rows, cols) slices transformers' ``unpad_image`` keeps of a (current_height, current_width) map."""
    original_height, original_width = _size(original_size)
    if original_width / original_height > current_width / current_height:
        new_height = int(round(original_height * (current_width / original_width), 7))
        padding = (current_height - new_height) // 2
        return slice(padding, current_height - padding), slice(None)
    new_width = int(round(original_width * (current_height / original_height), 7))
    padding = (current_width - new_width) // 2
    return slice(None), slice(padding, current_width - padding)


def unpadded_shape(
    image_size: Size, *, grid_pinpoints: Pinpoints, vision_image_size: int, patch_size: int
) -> tuple[int, int]:
    """(height, width) in feature cells of the re-assembled crop grid after ``unpad_image``."""
    rows, cols = grid_shape(image_size, grid_pinpoints, vision_image_size)
    side = vision_image_size // patch_size
    row_slice, col_slice = _unpad_slices(image_size, rows * side, cols * side)
    return len(range(rows * side)[row_slice]), len(range(cols * side)[col_slice])


def pack_indices(
    image_size: Size,
    *,
    grid_pinpoints: Pinpoints,
    vision_image_size: int,
    patch_size: int,
    strategy: str = "default",
    with_newline: bool = True,
) -> np.ndarray:
    """Row indices reproducing ``pack_image_features`` for one image, as int32 ``[num_tokens]``.

    Indices point into ``concat(features.reshape(num_patches * L, D), newline[None])`` where
    ``L = (vision_image_size // patch_size) ** 2``; index ``num_patches * L`` is the newline row.

    Only ``strategy="default"`` (CLS dropped) can be packed: with ``"full"`` the ``L + 1`` tokens
    of a crop do not form a square map, and transformers' ``pack_image_features`` fails on every
    anyres image (an image always has at least two patches), so this raises instead.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown vision feature select strategy {strategy!r}; expected one of {STRATEGIES}")
    if strategy == "full":
        raise ValueError(
            "LLaVA-NeXT cannot pack 'full' (CLS-keeping) features of an anyres image: transformers' "
            "pack_image_features fails on them too; use vision_feature_select_strategy='default'"
        )
    side = vision_image_size // patch_size
    tokens = side * side
    patches = num_patches(image_size, grid_pinpoints, vision_image_size)
    rows, cols = grid_shape(image_size, grid_pinpoints, vision_image_size)
    if patches - 1 != rows * cols:
        raise ValueError(
            f"pinpoints {grid_pinpoints} are not multiples of the vision image size {vision_image_size}: "
            f"{patches - 1} crops do not form a {rows}x{cols} grid"
        )
    flat = np.arange(patches * tokens, dtype=np.int32).reshape(patches, tokens)
    grid = flat[1:].reshape(rows, cols, side, side).transpose(0, 2, 1, 3).reshape(rows * side, cols * side)
    grid = grid[_unpad_slices(image_size, rows * side, cols * side)]
    if with_newline:
        newline = np.full((grid.shape[0], 1), patches * tokens, dtype=np.int32)
        grid = np.concatenate([grid, newline], axis=1)
    return np.concatenate([flat[0], grid.reshape(-1)])


def num_image_tokens(
    image_size: Size,
    *,
    grid_pinpoints: Pinpoints,
    vision_image_size: int,
    patch_size: int,
    strategy: str = "default",
    with_newline: bool = True,
) -> int:
    """Number of image tokens (packed feature rows) for one image; equals ``len(pack_indices(...))``."""
    return len(
        pack_indices(
            image_size,
            grid_pinpoints=grid_pinpoints,
            vision_image_size=vision_image_size,
            patch_size=patch_size,
            strategy=strategy,
            with_newline=with_newline,
        )
    )


def batch_pack_indices(
    image_sizes: Sequence[Size],
    *,
    grid_pinpoints: Pinpoints,
    vision_image_size: int,
    patch_size: int,
    strategy: str = "default",
    with_newline: bool = True,
    tiles_per_image: int | None = None,
) -> tuple[np.ndarray, list[int], list[int]]:
    """Pack indices for several images whose patches are concatenated along the patch axis.

    Returns ``(indices, patches_per_image, tokens_per_image)``; ``indices`` points into
    ``concat(features.reshape(P * L, D), newline[None])``, so the packed images come out one after
    another, as transformers concatenates them. ``P`` is ``sum(patches_per_image)`` (only real
    patches, concatenated), or ``len(image_sizes) * tiles_per_image`` when every image occupies
    ``tiles_per_image`` padded slots (transformers' ``pixel_values [images, max_tiles, ...]`` layout).
    """
    tokens = (vision_image_size // patch_size) ** 2
    patches = [num_patches(size, grid_pinpoints, vision_image_size) for size in image_sizes]
    if tiles_per_image is not None and max(patches, default=0) > tiles_per_image:
        raise ValueError(f"an image needs {max(patches)} tiles but pixel_values hold {tiles_per_image} per image")
    strides = patches if tiles_per_image is None else [tiles_per_image] * len(patches)
    newline_row = sum(strides) * tokens
    parts, offset = [], 0
    for size, count, stride in zip(image_sizes, patches, strides):
        idx = pack_indices(
            size,
            grid_pinpoints=grid_pinpoints,
            vision_image_size=vision_image_size,
            patch_size=patch_size,
            strategy=strategy,
            with_newline=with_newline,
        )
        parts.append(np.where(idx == count * tokens, newline_row, idx + offset))
        offset += stride * tokens
    return np.concatenate(parts).astype(np.int32), patches, [len(p) for p in parts]


def pack_features(features: jax.Array, newline: jax.Array, indices: np.ndarray) -> jax.Array:
    """Gather packed image tokens ``[len(indices), D]`` from ``features [P, L, D]`` and ``newline [D]``."""
    flat = jnp.concatenate([features.reshape(-1, features.shape[-1]), newline[None].astype(features.dtype)], axis=0)
    return jnp.take(flat, jnp.asarray(indices), axis=0)
