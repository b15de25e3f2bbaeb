"""RLAIF-V-Dataset reader (parquet + JSONL, bad records counted), tokenize-once, the grain pipeline (sharding,
resume), and the lazy prompt-file reader."""
import base64
import collections
import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from rlaifv_jax.data.chat import llava_image_preprocess
from rlaifv_jax.data.pairs import (make_iterator, make_pair_dataset, pair_example_fn, pair_lengths, pair_text_fn,
                                   tokenize_records)
from rlaifv_jax.data.rlaifv_dataset import DatasetFileError, read_rlaifv
from rlaifv_jax.data.prompts import read_prompt_file
from rlaifv_rows import IMAGE_ID, png_bytes, row, tokenizer  # noqa: F401  (tokenizer: fixture)


@pytest.fixture()
def files(tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.png").write_bytes(png_bytes(5))
    long_answer = " ".join(["red"] * 60)
    rows = [
        row(0, image_bytes=png_bytes(0)),
        row(1, image_bytes=b"\x89PNG not really an image"),  # image_undecodable
        row(2, image_bytes=png_bytes(2), question=None),  # missing_field
        row(3, image_bytes=png_bytes(3), chosen="   "),  # empty_answer
        row(4, image_bytes=png_bytes(4), chosen=" a red circle ", rejected="a red circle"),  # chosen_equals_rejected
        row(5, image_path="imgs/a.png"),  # relative path, kept
        row(6, image_path="imgs/missing.png"),  # image_missing_file
        row(7, image_bytes=png_bytes(7)),
        row(8, image_bytes=png_bytes(8), chosen=long_answer),  # too_long (with text_fn)
        row(9, image_bytes=png_bytes(9), question="  "),  # empty_question
    ]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "part-0.parquet")
    b64 = base64.b64encode(png_bytes(10)).decode()
    lines = [
        json.dumps(row(10, image_bytes=None) | {"image": {"bytes": b64, "path": None}}),
        json.dumps(row(11, image_path="imgs/a.png") | {"image": None}),
        json.dumps({k: v for k, v in row(12, image_path="imgs/a.png").items() if k != "question"}),  # missing_field
        "{not json",  # bad_json
        json.dumps(row(14) | {"image": {"bytes": "@@not base64@@"}}),  # image_undecodable
        json.dumps(row(15) | {"image": None, "image_path": "imgs/nope.jpg"}),  # image_missing_file
        json.dumps(row(16) | {"image": b64}),  # bare base64 string, kept
    ]
    (tmp_path / "extra.jsonl").write_text("\n".join(lines) + "\n")
    return [str(tmp_path / "part-0.parquet"), str(tmp_path / "extra.jsonl")]


def test_reader_counts_and_survivors(files, tokenizer):
    records, skipped = read_rlaifv(files, verbose=False)
    assert skipped == collections.Counter(
        image_undecodable=2, missing_field=2, empty_question=1, empty_answer=1, chosen_equals_rejected=1,
        image_missing_file=2, bad_json=1,
    )
    assert [r.meta["idx"] for r in records] == [0, 5, 7, 8, 10, 11, 16]
    by_idx = {r.meta["idx"]: r for r in records}
    assert by_idx[0].image == png_bytes(0) and by_idx[10].image == png_bytes(10)
    assert by_idx[5].image.endswith("imgs/a.png") and by_idx[11].image == by_idx[5].image
    assert by_idx[7].meta["origin_split"] == json.dumps({"model": "m"}) and by_idx[7].meta["ds_name"] == "toy"

    text_fn = pair_text_fn(tokenizer, image_token_count=4, image_token_id=IMAGE_ID, max_length=64)
    records, skipped = read_rlaifv(files, text_fn=text_fn, verbose=False)
    assert skipped["too_long"] == 1 and 8 not in [r.meta["idx"] for r in records]
    assert sum(skipped.values()) + len(records) == 10 + 7


def test_unreadable_files_raise_with_name(tmp_path):
    bad = tmp_path / "broken.parquet"
    bad.write_bytes(b"definitely not parquet")
    with pytest.raises(DatasetFileError, match="broken.parquet"):
        read_rlaifv(str(bad), verbose=False)
    with pytest.raises(DatasetFileError, match="absent.jsonl"):
        read_rlaifv(str(tmp_path / "absent.jsonl"), verbose=False)


def _toy_records(tmp_path, tokenizer, n):
    (tmp_path / "im.png").write_bytes(png_bytes(1, size=(10, 7)))
    answers = ["a red circle", "a blue square", "a cat and a dog", "yes", "no there is a dog"]
    lines = [json.dumps(row(i, image_path="im.png", chosen=answers[i % 5], rejected=answers[(i + 1) % 5])) for i in range(n)]
    (tmp_path / "toy.jsonl").write_text("\n".join(lines))
    text_fn = pair_text_fn(tokenizer, image_token_count=4, image_token_id=IMAGE_ID, max_length=64)
    records, skipped = read_rlaifv(str(tmp_path / "toy.jsonl"), text_fn=text_fn, verbose=False)
    assert not skipped and len(records) == n
    return records


def _idx_fn(record):
    return {"idx": np.int64(record.meta["idx"])}


def test_pair_examples(tmp_path, tokenizer):
    records = _toy_records(tmp_path, tokenizer, 5)
    image_fn = lambda im: llava_image_preprocess(im, size=8)  # noqa: E731
    ds = make_pair_dataset(records, example_fn=pair_example_fn(image_fn, max_length=64, pad_id=tokenizer.eos_token_id),
                           batch_size=2, seed=0, shard_index=0, shard_count=1)
    batch = ds[0]
    assert batch["pixel_values"].shape == (2, 3, 8, 8)
    assert batch["chosen_tokens"].shape == batch["rejected_tokens"].shape == (2, 64)
    by_text = {r.chosen: r for r in records}
    for b in range(2):
        s, n = batch["answer_start"][b], batch["chosen_len"][b]
        words = tokenizer.convert_ids_to_tokens(batch["chosen_tokens"][b, s: s + n].tolist())
        assert words[-1] == "</s>"
        rec = by_text[" ".join(words[:-1])]
        m = batch["rejected_len"][b]
        assert tokenizer.convert_ids_to_tokens(batch["rejected_tokens"][b, s: s + m].tolist()) == rec.rejected.split() + ["</s>"]
        assert (batch["chosen_tokens"][b, :s] == IMAGE_ID).sum() == 4


def test_sharding_epochs_and_resume(tmp_path, tokenizer):
    records = _toy_records(tmp_path, tokenizer, 11)
    shards = [
        [b["idx"].tolist() for b in make_pair_dataset(records, example_fn=_idx_fn, batch_size=2, seed=7,
                                                      shard_index=i, shard_count=3)]
        for i in range(3)
    ]
    assert [len(s) for s in shards] == [1, 1, 1]  # 11 -> 9 usable -> 3 per host -> one batch of 2
    flat = [x for s in shards for b in s for x in b]
    assert len(set(flat)) == len(flat) == 6

    two = make_pair_dataset(records, example_fn=_idx_fn, batch_size=1, seed=7, num_epochs=2, shard_index=0, shard_count=1)
    order = [int(b["idx"][0]) for b in two]
    assert sorted(order[:11]) == sorted(order[11:]) == list(range(11))
    assert order[:11] != order[11:]

    ds = make_pair_dataset(records, example_fn=_idx_fn, batch_size=2, seed=3, num_epochs=None, shard_index=0, shard_count=1)
    it = make_iterator(ds)
    for _ in range(4):
        next(it)
    state = it.get_state()
    expected = [next(it)["idx"].tolist() for _ in range(9)]
    resumed = make_iterator(ds)
    resumed.set_state(state)
    assert [next(resumed)["idx"].tolist() for _ in range(9)] == expected
    fresh = make_iterator(ds)
    assert [next(fresh)["idx"].tolist() for _ in range(13)][4:] == expected


def test_directory_of_shards(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    pq.write_table(pa.Table.from_pylist([row(i, image_bytes=png_bytes(i)) for i in range(3)]), shards / "a.parquet")
    pq.write_table(pa.Table.from_pylist([row(i, image_bytes=png_bytes(i)) for i in range(3, 5)]), shards / "b.parquet")
    (shards / "notes.txt").write_text("ignored")
    records, skipped = read_rlaifv(str(shards), verbose=False)
    assert [r.meta["idx"] for r in records] == [0, 1, 2, 3, 4] and not skipped
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetFileError, match="holds no .parquet / .jsonl file"):
        read_rlaifv(str(tmp_path / "empty"), verbose=False)


def test_tokenize_records_calls_text_fn_once_per_record(files, tokenizer):
    records, _ = read_rlaifv(files, verbose=False)
    text_fn = pair_text_fn(tokenizer, image_token_count=4, image_token_id=IMAGE_ID, max_length=64)
    calls = collections.Counter()

    def counted(record):
        calls[record.source] += 1
        return text_fn(record)

    pairs, skipped = tokenize_records(records, counted, num_threads=2, verbose=False)
    assert set(calls.values()) == {1} and len(calls) == len(records)
    assert skipped == {"too_long": 1} and len(pairs) == len(records) - 1
    kept = [r for r in records if r.meta["idx"] != 8]
    for r in kept:
        r.features = text_fn(r)
    np.testing.assert_array_equal(pair_lengths(pairs), pair_lengths(kept))  # the compact store vs per-record
    for got, want in zip(pairs, kept):
        assert got.source == want.source
        for k in ("prompt_ids", "chosen_ids", "rejected_ids"):
            np.testing.assert_array_equal(got.features[k], want.features[k])
    with pytest.raises(IndexError):
        pairs[len(pairs)]


def test_prompt_file_decodes_images_on_access(tmp_path):
    Image.fromarray(np.full((4, 5, 3), 10, np.uint8)).save(tmp_path / "a.png")
    lines = [json.dumps({"id": "p", "image_path": "a.png", "question": " what ? "}),
             json.dumps({"id": "b", "image": base64.b64encode(png_bytes(3)).decode(), "question": "why ?"}),
             json.dumps({"id": "c", "image_path": "a.png", "question": ""})]
    (tmp_path / "prompts.jsonl").write_text("\n".join(lines) + "\n")
    recs, report = read_prompt_file(str(tmp_path / "prompts.jsonl"))
    assert report.kept == 2 and report.skipped == {"empty_question": 1}
    assert dict(recs[0])["question"] == "what ?" and recs[0]["id"] == "p"
    np.testing.assert_array_equal(recs[1]["image"], np.asarray(Image.open(io.BytesIO(png_bytes(3))).convert("RGB")))
    assert recs[0]["image"].dtype == np.uint8 and recs[0]["image"].shape == (4, 5, 3)
    # nothing decoded is kept: the file is read again on every access
    Image.fromarray(np.full((2, 3, 3), 99, np.uint8)).save(tmp_path / "a.png")
    assert recs[0]["image"].shape == (2, 3, 3) and recs[0].encoded() == (tmp_path / "a.png").read_bytes()
    (tmp_path / "a.png").write_bytes(b"broken later")
    with pytest.raises(ValueError, match="prompts.jsonl line 1: cannot decode the image"):
        recs[0]["image"]


def test_image_token_count_per_record(files, tokenizer):
    records, _ = read_rlaifv(files, verbose=False)
    text_fn = pair_text_fn(tokenizer, image_token_count=lambda r: 2 + r.meta["idx"] % 3, image_token_id=IMAGE_ID,
                           max_length=64)
    for r in records:
        if r.meta["idx"] != 8:  # too long
            assert (text_fn(r)["prompt_ids"] == IMAGE_ID).sum() == 2 + r.meta["idx"] % 3
