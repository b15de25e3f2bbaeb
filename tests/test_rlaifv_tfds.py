"""RLAIF-V-Dataset as TFDS (ArrayRecord) built from parquet shards, read back through grain."""
import collections
import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from rlaifv_jax.data import buckets, rlaifv_tfds
from rlaifv_jax.data.chat import llava_image_preprocess
from rlaifv_jax.data.pairs import make_iterator, make_pair_dataset, pair_example_fn, pair_text_fn, tokenize_records
from rlaifv_jax.data.rlaifv_dataset import DatasetFileError
from rlaifv_rows import IMAGE_ID, png_bytes, row, tokenizer  # noqa: F401  (tokenizer: fixture)

ANSWERS = ["a red circle", "a blue square", "a cat and a dog", "yes", "no there is a dog", "a red square é"]


def gray_png(seed):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (6, 9), dtype=np.uint8), "L").save(buf, format="PNG")
    return buf.getvalue()


def shard_rows(lo, hi):
    rows = []
    for i in range(lo, hi):
        r = row(i, image_bytes=gray_png(i) if i == 3 else png_bytes(i), chosen=ANSWERS[i % 6], rejected=ANSWERS[(i + 1) % 6])
        if i == 5:
            r["image"]["bytes"] = b"not an image"  # image_undecodable
        if i == 8:
            r["rejected"] = r["chosen"]  # chosen_equals_rejected
        if i == 13:
            r["chosen"] = " ".join(["red"] * 60)  # too_long for the tokenizer below
        rows.append(r)
    return rows


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("rlaifv")
    shards = root / "shards"
    shards.mkdir()
    pq.write_table(pa.Table.from_pylist(shard_rows(0, 30)), shards / "part-000.parquet")
    pq.write_table(pa.Table.from_pylist(shard_rows(30, 60)), shards / "part-001.parquet")
    data_dir = str(root / "tfds")
    builder = rlaifv_tfds.prepare(str(shards), data_dir, heldout_fraction=0.25, heldout_seed=1)
    return shards, data_dir, builder


def test_build_splits_and_fields(built):
    shards, data_dir, builder = built
    train, heldout = rlaifv_tfds.load_split(data_dir, "train"), rlaifv_tfds.load_split(data_dir, "heldout")
    ids = {s: sorted(int(r.meta["idx"]) for r in recs) for s, recs in (("train", train), ("heldout", heldout))}
    valid = [i for i in range(60) if i not in (5, 8)]
    assert not set(ids["train"]) & set(ids["heldout"])  # disjoint
    assert sorted(ids["train"] + ids["heldout"]) == valid
    assert ids["heldout"] == [i for i in valid if rlaifv_tfds.is_heldout(i, 0.25, 1)] and 5 < len(ids["heldout"]) < 25
    meta = builder.info.metadata
    skipped = collections.Counter(meta["skipped"]["train"]) + collections.Counter(meta["skipped"]["heldout"])
    assert skipped == {"image_undecodable": 1, "chosen_equals_rejected": 1}
    assert meta["kept"] == {"train": len(train), "heldout": len(heldout)}
    assert sum(meta["reencoded_rgb"].values()) == 1

    by_idx = {int(r.meta["idx"]): r for r in list(train) + list(heldout)}
    r = by_idx[2]
    assert (r.question, r.chosen, r.rejected, r.image) == ("what is in the image ?", ANSWERS[2], ANSWERS[3], png_bytes(2))
    assert r.meta["ds_name"] == "toy" and r.meta["image_path"] == "" and r.source == "part-000.parquet:2"
    assert by_idx[42].chosen == ANSWERS[0] and by_idx[35].chosen == "a red square é"
    gray = np.asarray(Image.open(io.BytesIO(by_idx[3].image)))  # re-encoded as RGB, same pixels
    np.testing.assert_array_equal(gray, np.asarray(Image.open(io.BytesIO(gray_png(3))).convert("RGB")))

    # a glob builds from the matching shards only; other options on a built config are refused
    one = rlaifv_tfds.prepare(str(shards / "part-001*.parquet"), data_dir, heldout_fraction=0.25, heldout_seed=1,
                              config="second_shard")
    assert sum(one.info.metadata["kept"].values()) == 30
    with pytest.raises(ValueError, match="was built with"):
        rlaifv_tfds.prepare(str(shards), data_dir, heldout_fraction=0.5, heldout_seed=1)
    with pytest.raises(DatasetFileError, match="no file matches"):
        rlaifv_tfds.prepare(str(shards / "*.jsonl"), data_dir, config="none")
    with pytest.raises(DatasetFileError, match="prepare"):
        rlaifv_tfds.load_split(data_dir, "train", config="never_built")


def _pipeline(data_dir, tokenizer, *, seed, shard_index=0, shard_count=1):  # noqa: F811
    records = rlaifv_tfds.load_split(data_dir, "train")
    text_fn = pair_text_fn(tokenizer, image_token_count=4, image_token_id=IMAGE_ID, max_length=64)
    pairs, skipped = tokenize_records(records, text_fn, num_threads=2, verbose=False)
    base = pair_example_fn(lambda im: llava_image_preprocess(im, size=8), max_length=64, pad_id=tokenizer.pad_token_id)

    def example_fn(record):
        return base(record) | {"idx": np.int64(record.meta["idx"])}

    ds = make_pair_dataset(pairs, example_fn=example_fn, batch_size=3, seed=seed, num_epochs=2,
                           buckets=buckets.length_buckets(64, min_length=16), sort_window=2,
                           shard_index=shard_index, shard_count=shard_count)
    return pairs, skipped, ds


def test_grain_reads_back_shuffled_deterministically(built, tokenizer):  # noqa: F811
    _, data_dir, _ = built
    pairs, skipped, ds = _pipeline(data_dir, tokenizer, seed=7)
    assert skipped == ({} if rlaifv_tfds.is_heldout(13, 0.25, 1) else {"too_long": 1})
    n = len(pairs)
    assert len(ds) == 2 * (n // 3)

    def run(ds):
        it = make_iterator(ds)
        return [next(it) for _ in range(len(ds))]

    first = run(ds)
    again = run(_pipeline(data_dir, tokenizer, seed=7)[2])  # a fresh reader, the same seed
    assert [b["idx"].tolist() for b in first] == [b["idx"].tolist() for b in again]
    other = run(_pipeline(data_dir, tokenizer, seed=8)[2])
    assert [b["idx"].tolist() for b in first] != [b["idx"].tolist() for b in other]
    epoch = [i for b in first[: n // 3] for i in b["idx"].tolist()]
    assert len(set(epoch)) == len(epoch) == n // 3 * 3  # one epoch: distinct pairs

    by_idx = {int(p.meta["idx"]): p for p in pairs}
    b = first[0]
    assert b["chosen_tokens"].shape[1] in buckets.length_buckets(64, min_length=16)
    for row_i, idx in enumerate(b["idx"].tolist()):  # images decoded from the stored bytes, per record
        want = llava_image_preprocess(Image.open(io.BytesIO(by_idx[idx].image)).convert("RGB"), size=8)
        np.testing.assert_allclose(b["pixel_values"][row_i], want)
        start, k = int(b["answer_start"][row_i]), int(b["chosen_len"][row_i])
        assert tokenizer.convert_ids_to_tokens(b["chosen_tokens"][row_i, start:start + k].tolist())[:-1] == \
            [w if w in tokenizer.vocab else "<unk>" for w in by_idx[idx].chosen.split()]

    # sharded by process: two hosts see disjoint pairs at every step
    hosts = [_pipeline(data_dir, tokenizer, seed=7, shard_index=h, shard_count=2)[2] for h in range(2)]
    assert len(hosts[0]) == len(hosts[1]) == 2 * (n // 6)
    for i in range(len(hosts[0]) // 2):
        a, c = hosts[0][i]["idx"].tolist(), hosts[1][i]["idx"].tolist()
        assert not set(a) & set(c)
