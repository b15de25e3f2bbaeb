"""Preference pairs, from record to batch, for every DPO path (online, offline, reference pass, planner).

* The record: ``PreferenceRecord`` (question, chosen, rejected, encoded image or its path, features)
  and ``SkipRecord`` (raised to drop one, with a counted reason); ``open_image`` decodes its image.
* Tokenize once: ``pair_text_fn`` (prompt + answers, ``too_long`` never truncated) run on every record
  by ``tokenize_records``, which stores the token ids compactly beside any random-access source
  (``TokenizedRecords``); the reference pass and every epoch reuse them (``pair_lengths``).
* Padding: ``pair_example_fn`` gives one pair's fixed-shape arrays (the inputs of
  ``engine.logps.pair_logps``).
* Batching: ``make_pair_dataset`` is the grain pipeline ``MapDataset.source(records) → shuffle(seed) →
  host shard → repeat(epochs) → map(example_fn) → batch``; each host keeps an equal share (the shuffled
  epoch is truncated to a multiple of the host count, so every host yields the same number of
  batches), each epoch is reshuffled, optionally length-bucketed (``buckets=``, ``sort_window=``, see
  ``data.buckets``); ``make_iterator`` the checkpointable iterator over it.

Readers produce the records: ``data.rlaifv_dataset`` (parquet / JSONL files), ``data.rlaifv_tfds``
(TFDS), and the online loop's ``stages/encode``.
"""
from __future__ import annotations

import collections
import collections.abc
import dataclasses
import io
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import grain
import jax
import numpy as np
from PIL import Image

from rlaifv_jax.data import buckets as bucketing
from rlaifv_jax.data.chat import encode_prompt_answer


class SkipRecord(Exception):
    """Raised by a record callback to drop the record; ``reason`` is the count key."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclasses.dataclass
class PreferenceRecord:
    """One preference pair. ``image`` is encoded image bytes or a path to an image file."""

    question: str
    chosen: str
    rejected: str
    image: bytes | str
    source: str  # "file:row", for error messages and audits
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)
    features: dict[str, Any] = dataclasses.field(default_factory=dict)  # text_fn output


def open_image(image: bytes | str) -> Image.Image:
    """Decode a record's image (bytes or path) fully, as an RGB PIL image."""
    with Image.open(io.BytesIO(image) if isinstance(image, bytes) else image) as im:
        im.load()
        return im.convert("RGB")


def pair_text_fn(
    tokenizer,
    *,
    image_token_count: int | Callable[[PreferenceRecord], int],
    image_token_id: int | None,
    max_length: int,
    template: str = "llava_v1",
) -> Callable[[PreferenceRecord], dict[str, np.ndarray]]:
    """A ``text_fn``: encode prompt, chosen and rejected; ``SkipRecord("too_long")`` if prompt + the
    longer answer exceeds ``max_length`` tokens (never truncates). ``image_token_count`` may depend on
    the record (LLaVA-NeXT: ``model.num_image_tokens(image size)``)."""

    def text_fn(record: PreferenceRecord) -> dict[str, np.ndarray]:
        kw = dict(image_token_id=image_token_id, template=template)
        count = image_token_count(record) if callable(image_token_count) else image_token_count
        chosen = encode_prompt_answer(tokenizer, record.question, record.chosen, count, **kw)
        rejected = encode_prompt_answer(tokenizer, record.question, record.rejected, count, **kw)
        longest = len(chosen.prompt_ids) + max(len(chosen.answer_ids), len(rejected.answer_ids))
        if longest > max_length:
            raise SkipRecord("too_long")
        return {
            "prompt_ids": chosen.prompt_ids,
            "chosen_ids": chosen.answer_ids,
            "rejected_ids": rejected.answer_ids,
        }

    return text_fn


def pad_pair(prompt_ids: Sequence[int], chosen_ids: Sequence[int], rejected_ids: Sequence[int], *, max_length: int,
             pad_id: int) -> dict[str, np.ndarray]:
    """One pair's token arrays: ``chosen_tokens`` / ``rejected_tokens`` ``[max_length]`` (prompt + answer,
    then ``pad_id``), ``chosen_len``, ``rejected_len`` and ``answer_start`` (the prompt length, shared)."""
    out: dict[str, np.ndarray] = {}
    for name, answer in (("chosen", chosen_ids), ("rejected", rejected_ids)):
        ids = np.concatenate([np.asarray(prompt_ids, np.int32), np.asarray(answer, np.int32)])
        tokens = np.full((max_length,), pad_id, np.int32)
        tokens[: len(ids)] = ids
        out[f"{name}_tokens"] = tokens
        out[f"{name}_len"] = np.int32(len(answer))
    out["answer_start"] = np.int32(len(prompt_ids))
    return out


def pair_example_fn(
    image_fn: Callable[[Image.Image], np.ndarray | Mapping[str, np.ndarray]], *, max_length: int, pad_id: int
) -> Callable[[PreferenceRecord], dict[str, np.ndarray]]:
    """An ``example_fn`` for records read with ``pair_text_fn``: fixed-shape arrays for one pair.

    Returns ``pixel_values`` (``image_fn`` of the decoded RGB image), ``chosen_tokens`` and
    ``rejected_tokens`` ``[max_length]`` (prompt + answer, then ``pad_id``), ``answer_start`` (prompt
    length, shared by both), ``chosen_len`` and ``rejected_len`` — the inputs of ``logps.pair_logps``.
    For LLaVA-NeXT ``image_fn`` returns ``{"pixel_values": [max_tiles, C, H, W], "image_pack": [N]}``
    (the anyres packing of this image, see ``buckets.IMAGE_PACK_KEY``); ``image_pack`` is padded to
    ``max_length`` with ``buckets.PACK_PAD``.
    """

    def example_fn(record: PreferenceRecord) -> dict[str, np.ndarray]:
        f = record.features
        image = image_fn(open_image(record.image))
        out: dict[str, np.ndarray] = dict(image) if isinstance(image, Mapping) else {"pixel_values": image}
        if bucketing.IMAGE_PACK_KEY in out:
            pack = np.asarray(out[bucketing.IMAGE_PACK_KEY], np.int32)
            out[bucketing.IMAGE_PACK_KEY] = np.pad(pack, (0, max_length - len(pack)), constant_values=bucketing.PACK_PAD)
        return {**out, **pad_pair(f["prompt_ids"], f["chosen_ids"], f["rejected_ids"], max_length=max_length,
                                  pad_id=pad_id)}

    return example_fn


class _LoadBatch:
    """grain map: record indices → one collated batch (images decoded here, per record)."""

    def __init__(self, records, example_fn, batch_fn):
        self.records, self.example_fn, self.batch_fn = records, example_fn, batch_fn

    def __call__(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        return self.batch_fn([self.example_fn(self.records[int(i)]) for i in indices])


def make_pair_dataset(
    records: Sequence[PreferenceRecord],
    *,
    example_fn: Callable[[PreferenceRecord], Any],
    batch_size: int,
    seed: int,
    num_epochs: int | None = 1,
    shuffle: bool = True,
    shard_index: int | None = None,
    shard_count: int | None = None,
    drop_remainder: bool = True,
    buckets: Sequence[int] | None = None,
    sort_window: int = 0,
    lengths: np.ndarray | None = None,
) -> grain.MapDataset:
    """The per-host batched dataset (see module docstring). ``batch_size`` is per host;
    ``num_epochs=None`` repeats forever; shard defaults to ``jax.process_index()/process_count()``.

    ``records``: a list, or any random-access sequence (``TokenizedRecords`` over a TFDS split).
    ``buckets`` (e.g. ``length_buckets(max_length)``): each batch's token arrays are cut to the bucket
    of its longest pair; ``example_fn`` still pads to ``max_length == buckets[-1]``. Same batches, same
    results, fewer padded positions. ``sort_window > 0``: batches of similar length
    (``buckets.sorted_batches`` over windows of that many global batches, by ``lengths``, default
    ``pair_lengths(records)``); this changes which pairs share a batch, not which pairs an epoch holds.
    """
    shard_index = jax.process_index() if shard_index is None else shard_index
    shard_count = jax.process_count() if shard_count is None else shard_count
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index {shard_index} not in [0, {shard_count})")
    batch_fn = bucketing.collate(buckets) if buckets is not None else None
    if sort_window:
        if not drop_remainder:
            raise ValueError("sort_window needs drop_remainder=True (every batch is a full global batch)")
        plan = bucketing.sorted_batches(pair_lengths(records) if lengths is None else lengths, batch_size=batch_size,
                                        seed=seed, num_epochs=num_epochs, window=sort_window, shuffle=shuffle,
                                        shard_index=shard_index, shard_count=shard_count)
        return plan.map(_LoadBatch(records, example_fn, batch_fn or bucketing.collate()))
    ds = grain.MapDataset.source(records)
    if shuffle:
        ds = ds.shuffle(seed=seed)
    usable = len(records) // shard_count * shard_count
    if usable == 0:
        raise ValueError(f"{len(records)} records cannot be split over {shard_count} hosts")
    ds = ds[:usable][shard_index::shard_count]
    if num_epochs != 1:
        ds = ds.repeat(num_epochs)
    return ds.map(example_fn).batch(batch_size, drop_remainder=drop_remainder, batch_fn=batch_fn)


def make_iterator(ds: grain.MapDataset, *, num_threads: int = 2, prefetch: int = 8,
                  worker_count: int = 0) -> grain.DatasetIterator:
    """A checkpointable iterator (``get_state()`` / ``set_state()``) with threaded prefetch; with
    ``worker_count > 0`` the maps (tokenization, image decoding) run in that many grain worker
    processes (the caller needs a ``__main__`` guard and parsed absl flags, see STACK.md)."""
    options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)
    it = ds.to_iter_dataset(options)
    if worker_count > 0:
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
    return iter(it)


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
