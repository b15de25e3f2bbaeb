"""Length buckets for DPO pair batches: few padded shapes, windows sorted by length, the answer window.

A batch is padded to its longest sequence rounded up to a bucket boundary (``length_buckets``: the
powers of two and their 1.5 multiples, capped at ``max_length``), so a run compiles one program per
bucket that occurs instead of padding every pair to ``max_length``. ``sorted_batches`` makes batches
of similar length while keeping them random: the shuffled epoch is cut into windows of
``window`` global batches, each window sorted by length, cut into batches, and the batches of a
window visited in a seeded random order. ``answer_window`` is the step's automatic LM-head window:
the batch's longest answer, bucketed (exact: every answer token is inside it).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import grain
import numpy as np

TOKEN_KEYS: tuple[str, ...] = ("chosen_tokens", "rejected_tokens")
# LLaVA-NeXT pairs: for the pair's k-th image token, the row of its tile features that anyres packing
# puts there (``anyres.pack_indices``; see ``engine.logps.pair_logps``); PACK_NEWLINE marks the
# image_newline row, PACK_PAD fills the array to the token length.
IMAGE_PACK_KEY = "image_pack"
PACK_NEWLINE, PACK_PAD = -1, -2
MIN_WINDOW = 64  # smallest automatic answer window (the LM head on 65 positions is cheap)


def length_buckets(max_length: int, *, min_length: int = 64) -> tuple[int, ...]:
    """Boundaries ``2**k`` and ``3 * 2**(k-1)`` from ``min_length`` up to ``max_length`` (always included).

    Padding to the next boundary wastes at most a third of a batch; RLAIF-V-Dataset pairs
    (LLaVA-1.5 prompt ~640 tokens + answers ~100-400) with ``max_length=2048`` use 768/1024/1536/2048.
    """
    if max_length < 1 or min_length < 1:
        raise ValueError(f"max_length ({max_length}) and min_length ({min_length}) must be >= 1")
    out, k = set(), 1
    while k < max_length:
        out.update(b for b in (k, k * 3 // 2) if min_length <= b < max_length)
        k *= 2
    return tuple(sorted(out)) + (max_length,)


def bucket_length(n: int, buckets: Sequence[int]) -> int:
    """The smallest boundary ``>= n``; ``ValueError`` if ``n`` exceeds the last one."""
    for b in buckets:
        if b >= n:
            return int(b)
    raise ValueError(f"length {n} exceeds the largest bucket {buckets[-1]}")


def answer_window(longest_answer: int, length: int) -> int | None:
    """The automatic answer window of a batch padded to ``length``: its longest answer rounded up to
    ``length_buckets(length, min_length=MIN_WINDOW)``; ``None`` (no window) when it would cover the
    whole sequence anyway (``window + 1 >= length``)."""
    window = bucket_length(max(int(longest_answer), 1), length_buckets(length, min_length=MIN_WINDOW))
    return None if window + 1 >= length else window


def sequence_lengths(batch: Mapping[str, Any]) -> np.ndarray:
    """Per-pair used length ``answer_start + max(chosen_len, rejected_len)`` of a pair batch."""
    start = np.asarray(batch["answer_start"])
    return start + np.maximum(np.asarray(batch["chosen_len"]), np.asarray(batch["rejected_len"]))


def pad_tokens(batch: Mapping[str, Any], length: int, pad_id: int = 0) -> dict[str, Any]:
    """``batch`` with its token arrays (and ``image_pack``) cut or right-padded to ``length`` columns
    (no used token may be cut)."""
    used = int(np.max(sequence_lengths(batch), initial=0))
    if used > length:
        raise ValueError(f"cannot pad a batch using {used} tokens to {length}")
    out = dict(batch)
    for key, value in [(k, pad_id) for k in TOKEN_KEYS] + [(IMAGE_PACK_KEY, PACK_PAD)] * (IMAGE_PACK_KEY in batch):
        tokens = np.asarray(batch[key])
        if tokens.shape[1] >= length:
            out[key] = tokens[:, :length]
        else:
            out[key] = np.pad(tokens, ((0, 0), (0, length - tokens.shape[1])), constant_values=value)
    return out


def collate(buckets: Sequence[int] | None = None) -> Callable[[Sequence[Mapping[str, np.ndarray]]], dict[str, np.ndarray]]:
    """A grain ``batch_fn``: stack examples; with ``buckets``, cut the token arrays (padded to
    ``max_length`` by the example function) to the bucket of the batch's longest sequence."""

    def fn(examples: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
        batch = {k: np.stack([np.asarray(e[k]) for e in examples]) for k in examples[0]}
        if buckets is None:
            return batch
        length = bucket_length(int(np.max(sequence_lengths(batch))), buckets)
        width = batch[TOKEN_KEYS[0]].shape[1]
        if length > width:
            raise ValueError(f"bucket {length} is wider than the examples' {width} tokens: buckets must "
                             f"end at the example length (max_length)")
        return pad_tokens(batch, length)

    return fn


def sorted_batches(lengths: np.ndarray, *, batch_size: int, seed: int, num_epochs: int | None = 1,
                   window: int = 16, shuffle: bool = True, shard_index: int = 0,
                   shard_count: int = 1) -> grain.MapDataset:
    """Record indices ``[batch_size]`` of this host's share of each global batch, length-sorted per window.

    Each epoch is a seeded permutation of ``range(len(lengths))`` (grain's ``shuffle``, reshuffled per
    epoch; identity when ``shuffle=False``) truncated to a multiple of the global batch
    ``G = batch_size * shard_count``. Every ``window`` consecutive global batches are sorted by length
    (stable) and cut into batches, which are then visited in a seeded random order; host ``i`` takes
    rows ``i::shard_count`` of each global batch, so all hosts see similar lengths at a step.
    ``num_epochs=None`` repeats forever. Random access, O(window · G) work per element.
    """
    lengths = np.asarray(lengths)
    n, global_batch = len(lengths), batch_size * shard_count
    per_epoch = n // global_batch
    if per_epoch == 0:
        raise ValueError(f"{n} records make no global batch of {global_batch} ({shard_count} hosts x {batch_size})")
    if window < 1:
        raise ValueError(f"window must be >= 1 global batches, got {window}")
    order = grain.MapDataset.range(n)
    if shuffle:
        order = order.shuffle(seed=seed)
    plan = _WindowPlan(lengths, order.repeat(num_epochs), seed, window, per_epoch, global_batch,
                       shard_index, shard_count)
    return grain.MapDataset.range(per_epoch).repeat(num_epochs).map_with_index(plan)


class _WindowPlan:
    """Element ``i`` of ``sorted_batches`` (a class, not a closure, so grain can pickle it to workers);
    keeps the last window's sorted batches."""

    def __init__(self, lengths, order, seed, window, per_epoch, global_batch, shard_index, shard_count):
        self.lengths, self.order, self.seed, self.window = lengths, order, seed, window
        self.per_epoch, self.global_batch = per_epoch, global_batch
        self.shard_index, self.shard_count = shard_index, shard_count
        self._cached: tuple[tuple[int, int], np.ndarray] | None = None

    def _window(self, epoch: int, w: int) -> np.ndarray:
        if self._cached is None or self._cached[0] != (epoch, w):
            n, g = len(self.lengths), self.global_batch
            lo, hi = w * self.window, min((w + 1) * self.window, self.per_epoch)
            idx = np.asarray([self.order[epoch * n + p] for p in range(lo * g, hi * g)], np.int64)
            idx = idx[np.argsort(self.lengths[idx], kind="stable")].reshape(hi - lo, g)
            self._cached = (epoch, w), idx[np.random.default_rng([self.seed, epoch, w]).permutation(hi - lo)]
        return self._cached[1]

    def __call__(self, i: int, _: Any = None) -> np.ndarray:
        epoch, b = divmod(int(i), self.per_epoch)
        return self._window(epoch, b // self.window)[b % self.window][self.shard_index::self.shard_count]


WINDOW_KEY = "window_positions"


def with_answer_window(batch: Mapping[str, Any], window: int | None = None) -> dict[str, Any]:
    """``batch`` plus ``window_positions`` ``[B, W + 1]`` int32: the sequence positions the LM head
    runs on, ``answer_start - 1 + j`` for ``j <= W`` (clipped to the sequence), for the window ``W``
    given or, by default, the automatic ``answer_window`` of the batch. ``batch`` is returned as is
    when the automatic window would cover the whole sequence."""
    length = np.shape(batch["chosen_tokens"])[1]
    if window is None:
        longest = max(int(np.max(batch["chosen_len"])), int(np.max(batch["rejected_len"])))
        window = answer_window(longest, length)
        if window is None:
            return dict(batch)
    start = np.asarray(batch["answer_start"], np.int32)
    positions = np.clip(start[:, None] - 1 + np.arange(window + 1, dtype=np.int32)[None], 0, length - 1)
    return {**batch, WINDOW_KEY: positions.astype(np.int32)}
