"""Tokenize once: every pair's token ids stored compactly beside a random-access record source
(``tokenize_records``), read by the reference pass and every epoch alike."""
from __future__ import annotations

import collections
from collections.abc import Callable, Sequence
from typing import Any

import grain
import numpy as np

from rlaifv_jax.data.rlaifv_dataset import PreferenceRecord, SkipRecord


class TokenizedRecords(collections.abc.Sequence):
    """The records of a random-access ``source`` that passed ``text_fn``, with its features stored
    once, compactly (each 1-D feature of all records concatenated, plus offsets); ``self[i]`` is
    ``source[keep[i]]`` with ``features`` attached (views). Images stay in the source, undecoded."""

    def __init__(self, source: Sequence[PreferenceRecord], keep: np.ndarray,
                 features: dict[str, tuple[np.ndarray, np.ndarray]]):
        self.source, self.keep, self.features = source, np.asarray(keep, np.int64), features

    def __len__(self) -> int:
        return len(self.keep)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        record = self.source[int(self.keep[i])]  # keep[i] raises IndexError past the end
        record.features = {k: values[offsets[i]:offsets[i + 1]] for k, (values, offsets) in self.features.items()}
        return record

    def feature_lengths(self, key: str) -> np.ndarray:
        return np.diff(self.features[key][1])


def _ragged(arrays: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    offsets = np.zeros(len(arrays) + 1, np.int64)
    np.cumsum([len(a) for a in arrays], out=offsets[1:])
    return (np.concatenate(arrays) if arrays else np.zeros((0,), np.int32)), offsets


class _TextFeatures:
    """grain map: a record's ``text_fn`` features, or its skip reason (a class so workers can pickle it)."""

    def __init__(self, text_fn: Callable[[PreferenceRecord], dict[str, Any]]):
        self.text_fn = text_fn

    def __call__(self, record: PreferenceRecord) -> dict[str, np.ndarray] | str:
        try:
            return self.text_fn(record)
        except SkipRecord as skip:
            return skip.reason


def tokenize_records(
    source: Sequence[PreferenceRecord],
    text_fn: Callable[[PreferenceRecord], dict[str, Any]],
    *,
    num_threads: int = 4,
    verbose: bool = True,
) -> tuple[TokenizedRecords, collections.Counter]:
    """Run ``text_fn`` (e.g. ``pair_text_fn``) ONCE on every record of ``source`` in a grain map
    (``num_threads`` threads); records it skips (``SkipRecord``) are counted by reason and left out.
    Every feature must be a 1-D array. The result feeds both the reference pass and training."""
    ds = grain.MapDataset.source(source).map(_TextFeatures(text_fn))
    options = grain.ReadOptions(num_threads=max(num_threads, 1), prefetch_buffer_size=4 * max(num_threads, 1))
    keep: list[int] = []
    columns: dict[str, list[np.ndarray]] = {}
    skipped: collections.Counter = collections.Counter()
    for i, out in enumerate(ds.to_iter_dataset(options)):
        if isinstance(out, str):
            skipped[out] += 1
            continue
        keep.append(i)
        for k, v in out.items():
            v = np.asarray(v)
            if v.ndim != 1:
                raise ValueError(f"text_fn feature {k!r} of record {i} has shape {v.shape}; expected 1-D")
            columns.setdefault(k, []).append(v)
    if verbose:
        detail = ", ".join(f"{k}={v}" for k, v in sorted(skipped.items())) or "none"
        print(f"tokenized {len(keep)} of {len(source)} pairs; skipped: {detail}")
    return TokenizedRecords(source, np.asarray(keep, np.int64), {k: _ragged(v) for k, v in columns.items()}), skipped


def pair_lengths(records: Sequence[PreferenceRecord]) -> np.ndarray:
    """Tokens each pair uses, prompt + the longer answer (``pair_text_fn`` features), as int64 ``[N]``."""
    if isinstance(records, TokenizedRecords):
        return records.feature_lengths("prompt_ids") + np.maximum(
            records.feature_lengths("chosen_ids"), records.feature_lengths("rejected_ids"))
    return np.asarray([len(r.features["prompt_ids"]) + max(len(r.features["chosen_ids"]), len(r.features["rejected_ids"]))
                       for r in records], np.int64)
