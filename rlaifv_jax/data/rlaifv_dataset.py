"""Reader for the ``openbmb/RLAIF-V-Dataset`` schema and the grain pipeline that batches its pairs.

Schema (METHOD.md §8), parquet shards or JSONL: ``ds_name``, ``image`` (``{bytes, path}``),
``question``, ``chosen``, ``rejected``, ``origin_dataset``, ``origin_split``, ``idx``, ``image_path``.
The image comes from, in order: ``image.bytes`` (raw bytes, or a base64 string as JSONL must carry
it; a bare base64 string as ``image`` also works), else ``image.path``, else ``image_path`` (the
first that exists); a relative path is resolved against the directory of the file holding the record.

Bad records are skipped and counted by reason (the first failing check wins, in this order):
``bad_json`` (a JSONL line that is not a JSON object), ``missing_field`` (question/chosen/rejected
absent or not a string), ``empty_question``, ``empty_answer``, ``chosen_equals_rejected`` (after strip), the ``text_fn`` callback
(which raises ``SkipRecord(reason)``, e.g. ``too_long`` after tokenization), then ``missing_image``,
``image_missing_file`` and ``image_undecodable`` (full decode). A file that cannot be read at all
raises ``DatasetFileError`` naming the file.

Records keep their encoded image (bytes, or the file path) in memory, not decoded pixels; pixels are
produced lazily by the pipeline's ``example_fn``. Embedded parquet images therefore stay in host
memory (as many bytes as the image column of the files read); path images are read when used. This
reader is for one-off files; at dataset scale build the TFDS dataset (``data.rlaifv_tfds``), whose
records stay on disk and are read per batch.

Tokenize once: ``read_rlaifv(text_fn=pair_text_fn(...))`` or ``data.tokenized.tokenize_records`` (any random-access
source) stores each pair's token ids; the reference pass and every epoch reuse them.

Pipeline: ``MapDataset.source(records) → shuffle(seed) → host shard → repeat(epochs) → map(example_fn)
→ batch``; each host keeps an equal share (the shuffled epoch is truncated to a multiple of the host
count, so every host yields the same number of batches), and each epoch is reshuffled. Optionally
length-bucketed (``make_pair_dataset(buckets=..., sort_window=...)``, see ``data.buckets``).
"""
from __future__ import annotations

import base64
import binascii
import collections
import collections.abc
import dataclasses
import io
import json
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import grain
import jax
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from rlaifv_jax.data import buckets as bucketing
from rlaifv_jax.core import paths as core_paths
from rlaifv_jax.data.chat import PlaceholderMismatch, encode_prompt_answer

TEXT_FIELDS: tuple[str, ...] = ("question", "chosen", "rejected")
META_FIELDS: tuple[str, ...] = ("ds_name", "origin_dataset", "origin_split", "idx", "image_path")
_IMAGE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


class SkipRecord(Exception):
    """Raised by a record callback to drop the record; ``reason`` is the count key."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class DatasetFileError(RuntimeError):
    """A data file that cannot be read at all."""


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


def _image_source(raw: dict[str, Any], base_dir: str, allow_outside_root: bool = False) -> bytes | str | SkipRecord:
    image = raw.get("image")
    if isinstance(image, str):
        image = {"bytes": image}
    image = image if isinstance(image, dict) else {}
    data = image.get("bytes")
    if isinstance(data, (bytes, bytearray)):
        return bytes(data)
    if isinstance(data, str):
        try:
            return base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            return SkipRecord("image_undecodable")
    if data is not None:
        return SkipRecord("image_undecodable")
    paths = [p for p in (image.get("path"), raw.get("image_path")) if isinstance(p, str) and p]
    if not paths:
        return SkipRecord("missing_image")
    outside = False
    for p in paths:
        full = core_paths.resolve_under(p, base_dir, allow_outside_root)
        outside |= full is None
        if full is not None and os.path.isfile(full):
            return full
    return SkipRecord("image_outside_root" if outside else "image_missing_file")


def validate_row(
    raw: dict[str, Any],
    source: str,
    base_dir: str,
    text_fn: Callable[[PreferenceRecord], dict[str, Any]] | None = None,
    allow_outside_root: bool = False,
) -> PreferenceRecord | SkipRecord:
    """One raw row → a record with its image source (bytes or path), or the ``SkipRecord`` of the
    first failing check (module docstring); the image is fully decoded once to check it. Image
    paths resolve against ``base_dir`` (the image root); one outside it is ``image_outside_root``
    unless ``allow_outside_root``."""
    texts = [raw.get(k) for k in TEXT_FIELDS]
    if not all(isinstance(t, str) for t in texts):
        return SkipRecord("missing_field")
    question, chosen, rejected = texts
    if not question.strip():
        return SkipRecord("empty_question")
    if not chosen.strip() or not rejected.strip():
        return SkipRecord("empty_answer")
    if chosen.strip() == rejected.strip():
        return SkipRecord("chosen_equals_rejected")
    record = PreferenceRecord(
        question, chosen, rejected, b"", source, meta={k: raw.get(k) for k in META_FIELDS}
    )
    if text_fn is not None:
        try:
            record.features = text_fn(record)
        except SkipRecord as skip:
            return skip
    image = _image_source(raw, base_dir, allow_outside_root)
    if isinstance(image, SkipRecord):
        return image
    try:
        open_image(image)
    except _IMAGE_ERRORS:
        return SkipRecord("image_undecodable")
    record.image = image
    return record


def iter_rows(path: str) -> Iterator[dict[str, Any] | SkipRecord]:
    """Rows of one parquet or JSONL file as dicts; a JSONL line that is not a JSON object is a SkipRecord."""
    try:
        if path.endswith(".parquet"):
            for batch in pq.ParquetFile(path).iter_batches(batch_size=256):
                yield from batch.to_pylist()
            return
        with open(path, encoding="utf-8") as f:
            for line in f:
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    yield SkipRecord("bad_json")
                    continue
                yield row if isinstance(row, dict) else SkipRecord("bad_json")
    except (OSError, pa.ArrowException, UnicodeDecodeError) as e:
        raise DatasetFileError(f"cannot read data file {path}: {e}") from e


DATA_SUFFIXES: tuple[str, ...] = (".parquet", ".jsonl")


def data_files(paths: str | Iterable[str]) -> list[str]:
    """Files to read: a directory stands for its ``*.parquet`` and ``*.jsonl`` files (sorted, not
    recursive; ``DatasetFileError`` if it has none); any other path is kept as given."""
    out: list[str] = []
    for path in [paths] if isinstance(paths, str) else list(paths):
        if not os.path.isdir(path):
            out.append(path)
            continue
        found = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(DATA_SUFFIXES))
        if not found:
            raise DatasetFileError(f"directory {path} holds no {' / '.join(DATA_SUFFIXES)} file")
        out.extend(found)
    return out


def read_rlaifv(
    paths: str | Iterable[str],
    *,
    text_fn: Callable[[PreferenceRecord], dict[str, Any]] | None = None,
    verbose: bool = True,
) -> tuple[list[PreferenceRecord], collections.Counter]:
    """Read parquet (``*.parquet``) and JSONL files, or directories of them (``data_files``); return
    valid records and skip counts by reason.

    ``text_fn(record) -> features`` runs on every record that passed the text checks (e.g. tokenize
    and check the length), may raise ``SkipRecord``; its result is stored in ``record.features``.
    """
    paths = data_files(paths)
    records: list[PreferenceRecord] = []
    skipped: collections.Counter = collections.Counter()
    for path in paths:
        base_dir = os.path.dirname(os.path.abspath(path))
        for row_index, raw in enumerate(iter_rows(path)):
            result = raw if isinstance(raw, SkipRecord) else validate_row(
                raw, f"{path}:{row_index}", base_dir, text_fn
            )
            if isinstance(result, SkipRecord):
                skipped[result.reason] += 1
            else:
                records.append(result)
    if verbose:
        detail = ", ".join(f"{k}={v}" for k, v in sorted(skipped.items())) or "none"
        print(f"RLAIF-V data: kept {len(records)} pairs from {len(paths)} file(s); skipped: {detail}")
    return records, skipped


def pair_text_fn(
    tokenizer,
    *,
    image_token_count: int | Callable[[PreferenceRecord], int],
    image_token_id: int | None,
    max_length: int,
    template: str = "llava_v1",
) -> Callable[[PreferenceRecord], dict[str, np.ndarray]]:
    """A ``text_fn``: encode prompt, chosen and rejected; ``SkipRecord("too_long")`` if prompt + the
    longer answer exceeds ``max_length`` tokens (never truncates), ``SkipRecord("image_token_in_text")``
    if the texts still map to image placeholder ids (``chat.check_placeholders``). ``image_token_count`` may depend on
    the record (LLaVA-NeXT: ``model.num_image_tokens(image size)``)."""

    def text_fn(record: PreferenceRecord) -> dict[str, np.ndarray]:
        kw = dict(image_token_id=image_token_id, template=template)
        count = image_token_count(record) if callable(image_token_count) else image_token_count
        try:
            chosen = encode_prompt_answer(tokenizer, record.question, record.chosen, count, **kw)
            rejected = encode_prompt_answer(tokenizer, record.question, record.rejected, count, **kw)
        except PlaceholderMismatch:
            raise SkipRecord("image_token_in_text") from None
        longest = len(chosen.prompt_ids) + max(len(chosen.answer_ids), len(rejected.answer_ids))
        if longest > max_length:
            raise SkipRecord("too_long")
        return {
            "prompt_ids": chosen.prompt_ids,
            "chosen_ids": chosen.answer_ids,
            "rejected_ids": rejected.answer_ids,
        }

    return text_fn


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
        for name in ("chosen", "rejected"):
            ids = np.concatenate([f["prompt_ids"], f[f"{name}_ids"]])
            tokens = np.full((max_length,), pad_id, np.int32)
            tokens[: len(ids)] = ids
            out[f"{name}_tokens"] = tokens
            out[f"{name}_len"] = np.int32(len(f[f"{name}_ids"]))
        out["answer_start"] = np.int32(len(f["prompt_ids"]))
        return out

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
        from rlaifv_jax.data.tokenized import pair_lengths  # (tokenized builds on this module's records)
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
