"""RLAIF-V-Dataset as a TFDS dataset (ArrayRecord, no TensorFlow) and its grain reader.

Build once from local parquet shards (a directory or a glob; no network)::

    prepare("/data/RLAIF-V-Dataset", data_dir)            # every *.parquet in the directory
    prepare("/data/RLAIF-V-Dataset/*_00[0-4].parquet", data_dir)

Each row is checked like ``rlaifv_dataset.read_rlaifv`` does (bad rows skipped and counted by reason,
in the dataset's ``metadata.json``), and lands in ``train`` or ``heldout``: a seeded hash of ``idx``
(``is_heldout``) sends ``heldout_fraction`` of the ids to ``heldout``, the same ids for every build.
Features: ``image`` (the row's encoded bytes as stored; non-RGB images re-encoded as RGB PNG),
``question``, ``chosen``, ``rejected``, ``ds_name``, ``origin_dataset``, ``origin_split``, ``idx``,
``image_path`` (text; ``idx`` as its string) and ``source`` (``"file:row"``).

Read back (random access, records stay on disk; images are read undecoded and decoded per batch)::

    records = load_split(data_dir, "train")                          # tfds.data_source
    pairs, skipped = tokenize_records(records, pair_text_fn(...))    # tokenized once
    ds = make_pair_dataset(pairs, example_fn=pair_example_fn(...), batch_size=..., seed=...,
                           buckets=length_buckets(max_length), sort_window=16)

``make_pair_dataset`` gives the grain ``MapDataset``: seeded shuffle, sharded by process, maps
(image decoding and preprocessing) in grain threads or workers (``make_iterator(worker_count=)``).
"""
from __future__ import annotations

import collections
import collections.abc
import dataclasses
import glob
import hashlib
import io
import os
from typing import Any

import tensorflow_datasets as tfds
from PIL import Image

from rlaifv_jax.data.pairs import PreferenceRecord, SkipRecord
from rlaifv_jax.data.rlaifv_dataset import META_FIELDS, DatasetFileError, iter_rows, validate_row

NAME = "rlaifv_dataset"
SPLITS: tuple[str, ...] = ("train", "heldout")
TEXT_FEATURES: tuple[str, ...] = ("question", "chosen", "rejected", *META_FIELDS, "source")


def is_heldout(idx: Any, fraction: float, seed: int) -> bool:
    """Whether id ``idx`` belongs to the held-out split: ``sha256(f"{seed}:{idx}")`` as a uniform
    number in [0, 1) is below ``fraction``. Depends on the id only, not on file order."""
    digest = hashlib.sha256(f"{seed}:{idx}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64 < fraction


@dataclasses.dataclass(eq=False)
class RlaifvConfig(tfds.core.BuilderConfig):
    """Build options: the held-out share and seed, and which files of ``manual_dir`` to read."""

    heldout_fraction: float = 0.01
    heldout_seed: int = 0
    pattern: str = "*.parquet"  # glob relative to manual_dir ("**" recurses)

    def options(self) -> dict[str, Any]:
        return {"heldout_fraction": self.heldout_fraction, "heldout_seed": self.heldout_seed, "pattern": self.pattern}


def _rgb_bytes(data: bytes) -> tuple[bytes, bool]:
    """``data`` unchanged if it is an RGB image, else the image re-encoded as RGB PNG (and True)."""
    with Image.open(io.BytesIO(data)) as im:
        if im.mode == "RGB":
            return data, False
        buf = io.BytesIO()
        im.convert("RGB").save(buf, format="PNG")
        return buf.getvalue(), True


class RlaifvDataset(tfds.core.GeneratorBasedBuilder):
    """The ``openbmb/RLAIF-V-Dataset`` schema (METHOD.md §8) from local parquet shards."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "train + seeded held-out split; encoded images"}
    BUILDER_CONFIGS: list[RlaifvConfig] = []  # every build names its own config (prepare)
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Put the parquet shards of openbmb/RLAIF-V-Dataset (or any files with its columns) in "
        "manual_dir; use rlaifv_tfds.prepare(directory_or_glob, data_dir).")

    def _info(self) -> tfds.core.DatasetInfo:
        text = {k: tfds.features.Text() for k in TEXT_FEATURES}
        return tfds.core.DatasetInfo(
            builder=self,
            description="RLAIF-V preference pairs: image, question, chosen and rejected answers.",
            features=tfds.features.FeaturesDict({"image": tfds.features.Image(shape=(None, None, 3)), **text}),
            homepage="https://huggingface.co/datasets/openbmb/RLAIF-V-Dataset",
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager):
        root = os.fspath(dl_manager.manual_dir)
        pattern = self.builder_config.pattern
        files = sorted(f for f in glob.glob(os.path.join(root, pattern), recursive=True) if os.path.isfile(f))
        if not files:
            raise DatasetFileError(f"no file matches {pattern!r} in {root}")
        self.info.metadata.update(options=self.builder_config.options(), files=len(files),
                                  kept={}, skipped={}, reencoded_rgb={})
        return {split: self._generate_examples(files, root, split) for split in SPLITS}

    def _generate_examples(self, files: list[str], root: str, split: str):
        c = self.builder_config
        skipped: collections.Counter = collections.Counter()
        kept = reencoded = 0
        for path in files:
            name = os.path.relpath(path, root)
            base_dir = os.path.dirname(os.path.abspath(path))
            for row_index, raw in enumerate(iter_rows(path)):
                source = f"{name}:{row_index}"
                if isinstance(raw, SkipRecord):  # a JSONL line that is not an object: counted in train
                    skipped[raw.reason] += split == "train"
                    continue
                idx = raw.get("idx")
                if is_heldout(source if idx is None else idx, c.heldout_fraction, c.heldout_seed) != (split == "heldout"):
                    continue
                record = validate_row(raw, source, base_dir)
                if isinstance(record, SkipRecord):
                    skipped[record.reason] += 1
                    continue
                image = record.image
                if isinstance(image, str):
                    with open(image, "rb") as f:
                        image = f.read()
                image, converted = _rgb_bytes(image)
                reencoded += converted
                kept += 1
                meta = {k: "" if v is None else str(v) for k, v in record.meta.items()}
                yield source, {"image": image, "question": record.question, "chosen": record.chosen,
                               "rejected": record.rejected, "source": source, **meta}
        self.info.metadata["kept"][split] = kept
        self.info.metadata["reencoded_rgb"][split] = reencoded
        self.info.metadata["skipped"][split] = {k: v for k, v in sorted(skipped.items()) if v}
        print(f"RLAIF-V tfds {split}: kept {kept}; skipped: {self.info.metadata['skipped'][split] or 'none'}")


def _manual_dir_and_pattern(source: str) -> tuple[str, str]:
    """A directory → (it, ``*.parquet``); a glob → (its longest non-glob directory, the rest)."""
    if os.path.isdir(source):
        return source, "*.parquet"
    parts = source.split(os.sep)
    first = next((i for i, p in enumerate(parts) if any(ch in p for ch in "*?[")), None)
    if first is None:  # one file
        return os.path.dirname(source) or ".", os.path.basename(source)
    return os.sep.join(parts[:first]) or os.sep, os.sep.join(parts[first:])


def prepare(source: str, data_dir: str, *, heldout_fraction: float = 0.01, heldout_seed: int = 0,
            config: str = "default") -> RlaifvDataset:
    """Build (or reuse) the dataset under ``data_dir/rlaifv_dataset/<config>/1.0.0`` from ``source``,
    a directory of parquet shards or a glob. A dataset already built there with other options is an
    error (pick another ``config`` name or ``data_dir``), never silently reused."""
    if not 0.0 <= heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in [0, 1), got {heldout_fraction}")
    manual_dir, pattern = _manual_dir_and_pattern(source)
    if not os.path.isdir(manual_dir):
        raise DatasetFileError(f"{source}: directory {manual_dir} does not exist")
    cfg = RlaifvConfig(name=config, heldout_fraction=heldout_fraction, heldout_seed=heldout_seed, pattern=pattern)
    builder = RlaifvDataset(data_dir=data_dir, config=cfg, file_format="array_record")
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
    built = dict(builder.info.metadata.get("options", {}))
    if built != cfg.options():
        raise ValueError(f"{builder.data_dir} was built with {built}, not {cfg.options()}; "
                         f"use another config name or data_dir")
    return builder


class TfdsRecords(collections.abc.Sequence):
    """A split as a random-access sequence of ``PreferenceRecord`` (image: undecoded bytes)."""

    def __init__(self, source: Any):
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"record {i} out of range for {n} records")
        ex = self.source[i % n]
        text = {k: ex[k].decode("utf-8") for k in TEXT_FEATURES}
        return PreferenceRecord(text["question"], text["chosen"], text["rejected"], ex["image"], text["source"],
                                meta={k: text[k] for k in META_FIELDS})


def load_split(data_dir: str, split: str = "train", *, config: str = "default") -> TfdsRecords:
    """Split ``split`` of the dataset built by ``prepare`` (``tfds.data_source``, images undecoded)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    built = os.path.join(data_dir, NAME, config, str(RlaifvDataset.VERSION), "dataset_info.json")
    if not os.path.exists(built):
        raise DatasetFileError(f"no {NAME}/{config} dataset in {data_dir} (missing {built}); build it with prepare()")
    return TfdsRecords(tfds.data_source(f"{NAME}/{config}", split=split, data_dir=data_dir, download=False,
                                        decoders={"image": tfds.decode.SkipDecoding()}))
