"""Reader for the ``openbmb/RLAIF-V-Dataset`` schema (parquet / JSONL files).

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

It only reads: the records (``data.pairs.PreferenceRecord``) are tokenized, padded and batched by
``data.pairs`` (``read_rlaifv(text_fn=pairs.pair_text_fn(...))`` tokenizes while reading).
"""
from __future__ import annotations

import base64
import binascii
import collections
import json
import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from rlaifv_jax.data.pairs import PreferenceRecord, SkipRecord, open_image

TEXT_FIELDS: tuple[str, ...] = ("question", "chosen", "rejected")
META_FIELDS: tuple[str, ...] = ("ds_name", "origin_dataset", "origin_split", "idx", "image_path")
_IMAGE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


class DatasetFileError(RuntimeError):
    """A data file that cannot be read at all."""


def _image_source(raw: dict[str, Any], base_dir: str) -> bytes | str | SkipRecord:
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
    for p in paths:
        full = p if os.path.isabs(p) else os.path.join(base_dir, p)
        if os.path.isfile(full):
            return full
    return SkipRecord("image_missing_file")


def validate_row(
    raw: dict[str, Any],
    source: str,
    base_dir: str,
    text_fn: Callable[[PreferenceRecord], dict[str, Any]] | None = None,
) -> PreferenceRecord | SkipRecord:
    """One raw row → a record with its image source (bytes or path), or the ``SkipRecord`` of the
    first failing check (module docstring); the image is fully decoded once to check it."""
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
    image = _image_source(raw, base_dir)
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
