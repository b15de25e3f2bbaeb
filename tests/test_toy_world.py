"""Tests for the toy world: determinism, pixels vs ground truth, bias rates, tokenizer, image encoding."""
import numpy as np
import pytest
from PIL import Image
from transformers import AutoTokenizer

from rlaifv_jax.data import toy_world as tw

CFG = tw.WorldSettings()


@pytest.fixture(scope="module")
def splits():
    return tw.make_splits(CFG, n_warm=1500, n_prompts=40, n_eval=40, seed=7)


def test_deterministic_given_seed(splits):
    again = tw.make_splits(CFG, n_warm=1500, n_prompts=40, n_eval=40, seed=7)
    for name in splits:
        assert len(again[name]) == len(splits[name])
        for a, b in zip(splits[name], again[name]):
            assert a["id"] == b["id"] and a["objects"] == b["objects"] and a["question"] == b["question"]
            assert a.get("answer") == b.get("answer") and a.get("yesno") == b.get("yesno")
            np.testing.assert_array_equal(a["image"], b["image"])
    other = tw.make_splits(CFG, n_warm=5, n_prompts=5, n_eval=5, seed=8)
    assert any(not np.array_equal(a["image"], b["image"]) for a, b in zip(other["eval"], splits["eval"]))


def test_splits_are_distinct_streams(splits):
    assert not np.array_equal(splits["prompts"][0]["image"], splits["eval"][0]["image"])
    assert not np.array_equal(splits["prompts"][0]["image"], splits["warmstart"][0]["image"])
    assert {r["kind"] for r in splits["warmstart"]} == {"caption", "yesno"}
    assert all("answer" not in r for r in splits["prompts"])


def _nearest(rgb):
    names = list(tw.PALETTE) + ["background"]
    refs = np.array(list(tw.PALETTE.values()) + [CFG.background], dtype=float)
    return names[int(np.argmin(((refs - np.asarray(rgb, float)) ** 2).sum(1)))]


# Which box corners (tl, tr, bl, br) each solid shape covers.
CORNERS = {"square": (1, 1, 1, 1), "circle": (0, 0, 0, 0), "cross": (0, 0, 0, 0), "triangle": (0, 0, 1, 1)}


def test_ground_truth_matches_pixels():
    cell = CFG.image_size // CFG.grid
    for rec in tw.eval_split(CFG, 60, seed=3):
        img = rec["image"]
        assert img.shape == (32, 32, 3) and img.dtype == np.uint8
        assert 1 <= len(rec["objects"]) <= 4 and len(set(rec["objects"])) == len(rec["objects"])
        assert rec["cells"] == sorted(rec["cells"])
        for (colour, shape), index, (x0, y0, x1, y1) in zip(rec["objects"], rec["cells"], rec["boxes"]):
            row, col = divmod(index, CFG.grid)
            assert col * cell <= x0 < x1 < (col + 1) * cell and row * cell <= y0 < y1 < (row + 1) * cell
            cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
            assert _nearest(img[cy, cx]) == colour
            corners = [img[y0, x0], img[y0, x1], img[y1, x0], img[y1, x1]]
            got = tuple(int(_nearest(c) == colour) for c in corners)
            assert got == CORNERS[shape], (shape, got)
        for index in set(range(CFG.grid ** 2)) - set(rec["cells"]):
            row, col = divmod(index, CFG.grid)
            block = img[row * cell:(row + 1) * cell, col * cell:(col + 1) * cell].astype(int)
            assert np.abs(block - np.array(CFG.background)).max() <= CFG.noise


def test_pair_rate_two_object_world():
    # With exactly 2 objects: the first draw is a pair member with prob 12/16; its partner follows
    # with prob q, else the second draw (uniform over 15) hits the partner with prob 1/15.
    cfg = tw.WorldSettings(min_objects=2, max_objects=2)
    rng = np.random.default_rng(0)
    partners = tw.partner_map(cfg)
    n = 5000
    hits = sum(partners.get(a) == b for a, b in (tw.sample_objects(rng, cfg) for _ in range(n)))
    expected = 12 / 16 * (0.8 + 0.2 / 15)
    assert abs(hits / n - expected) < 0.03
    no_bias = tw.WorldSettings(min_objects=2, max_objects=2, pair_rate=0.0)
    hits = sum(partners.get(a) == b for a, b in (tw.sample_objects(rng, no_bias) for _ in range(n)))
    assert abs(hits / n - 12 / 16 / 15) < 0.015


def test_caption_partner_rate_and_clean_yesno(splits):
    partners = tw.partner_map(CFG)
    eligible = mentioned = 0
    for rec in splits["warmstart"]:
        objects = rec["objects"]
        if rec["kind"] == "caption":
            sentences = [s.strip() for s in rec["answer"].split(" .") if s.strip()]
            said = [tuple(s.split()[3:5]) for s in sentences]
            assert all(s.startswith("there is a ") and len(s.split()) == 5 for s in sentences)
            assert [o for o in said if o in objects] == objects  # every object, in order
            assert [o for o in said if o not in objects] == rec["hallucinated"]
            for obj in objects:
                if obj in partners and partners[obj] not in objects:
                    eligible += 1
                    i = said.index(obj)
                    if i + 1 < len(said) and said[i + 1] == partners[obj]:
                        mentioned += 1
            assert mentioned <= eligible and len(rec["hallucinated"]) <= eligible
        else:
            assert rec["question"] == f"is there a {rec['target'][0]} {rec['target'][1]} in the image ? Please answer yes or no."
            assert rec["answer"] == ("yes" if rec["target"] in objects else "no")
    assert eligible > 500
    assert abs(mentioned / eligible - CFG.caption_partner_rate) < 0.06
    answers = [r["answer"] for r in splits["warmstart"] if r["kind"] == "yesno"]
    assert answers.count("yes") == answers.count("no") == 1500


def test_hard_negative_rate(splits):
    partners = tw.partner_map(CFG)
    hard = total = 0
    for rec in splits["warmstart"]:
        if rec["kind"] == "yesno" and rec["answer"] == "no":
            absent_partners = {partners[o] for o in rec["objects"] if o in partners} - set(rec["objects"])
            if absent_partners:
                total += 1
                hard += rec["target"] in absent_partners
    # a uniform absent pick is an absent partner with prob ~|absent partners| / ~13, so hard/total =
    # rate + (1 - rate) * that; bounded between rate and rate + (1 - rate) * 2 / 12.
    assert CFG.hard_negative_rate - 0.05 < hard / total < CFG.hard_negative_rate + 0.2 / 6 + 0.05


def test_eval_yesno_labels(splits):
    for rec in splits["eval"]:
        (q_yes, a_yes), (q_no, a_no) = rec["yesno"]
        assert (a_yes, a_no) == ("yes", "no")
        assert q_yes.endswith(" in the image ? Please answer yes or no.")
        assert tuple(q_yes.split()[3:5]) in rec["objects"] and tuple(q_no.split()[3:5]) not in rec["objects"]


def test_tokenizer_round_trip_and_vocab(splits, tmp_path):
    tok = tw.build_tokenizer(CFG)
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == ("<s>", "</s>", "<pad>", "<unk>")
    for word in ("yes", "no", "Yes", "No"):
        ids = tok(word, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1 and ids[0] != tok.unk_token_id
    assert tok("<image>", add_special_tokens=False)["input_ids"] == [tok.convert_tokens_to_ids("<image>")]
    texts = [r["question"] for r in splits["warmstart"]] + [r["answer"] for r in splits["warmstart"]]
    texts += list(tw.CAPTION_INSTRUCTIONS) + [tw._CHAT_TEXT]
    for text in texts:
        ids = tok(text)["input_ids"]
        assert ids[0] == tok.bos_token_id and tok.unk_token_id not in ids
    caption = next(r["answer"] for r in splits["warmstart"] if r["hallucinated"])
    ids = tok(caption)["input_ids"]
    assert len(ids) == 1 + len(caption.split())
    assert tok.decode(ids, skip_special_tokens=True) == caption
    tok.save_pretrained(tmp_path)
    assert (tmp_path / "tokenizer.json").exists()
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded(caption)["input_ids"] == ids and loaded.eos_token_id == tok.eos_token_id
    assert loaded("USER: <image>\nis it ? ASSISTANT:", add_special_tokens=False)["input_ids"] == [
        tok.convert_tokens_to_ids(w) for w in ["user", ":", "<image>", "is", "<unk>", "?", "assistant", ":"]]


def test_encode_image():
    img = np.zeros((2, 3, 3), np.uint8)
    img[0, 1] = (255, 0, 51)
    out = tw.encode_image(img)
    assert out.shape == (3, 2, 3) and out.dtype == np.float32
    np.testing.assert_allclose(out[:, 0, 1], [1.0, -1.0, -0.6], atol=1e-6)
    np.testing.assert_allclose(out[:, 1, 2], [-1.0, -1.0, -1.0])
    np.testing.assert_array_equal(tw.encode_image(Image.fromarray(img)), out)
    assert tw.encode_image(np.stack([img, img])).shape == (2, 3, 2, 3)


def test_config_validation():
    with pytest.raises(ValueError):
        tw.WorldSettings(colours=("orange",))
    with pytest.raises(ValueError):
        tw.WorldSettings(pairs=((("red", "circle"), ("blue", "square")), (("red", "circle"), ("green", "cross"))))
    with pytest.raises(ValueError):
        tw.WorldSettings(max_objects=5)


def test_labeler_split_asks_every_object_and_every_absent_partner():
    cfg = tw.WorldSettings()
    partners = tw.partner_map(cfg)
    records = tw.labeler_split(cfg, 60, seed=0)
    answers = [r["answer"] for r in records]
    assert {r["kind"] for r in records} == {"yesno"} and answers.count("no") >= answers.count("yes")
    for image_id in {r["image_id"] for r in records}:
        mine = [r for r in records if r["image_id"] == image_id]
        objects = mine[0]["objects"]
        for r in mine:
            assert r["answer"] == ("yes" if r["target"] in objects else "no")
            assert r["question"] == tw.labeler_prompt(tw.yesno_question(r["target"]))
        asked = {r["target"] for r in mine}
        assert set(objects) <= asked
        assert {partners[o] for o in objects if o in partners and partners[o] not in objects} <= asked


def test_labeler_records_clean_adds_unbiased_captions_of_the_same_images():
    cfg = tw.WorldSettings(caption_partner_rate=0.7)
    ids = lambda records: [(r["id"], r["answer"]) for r in records]  # noqa: E731
    yesno = tw.labeler_split(cfg, 40, seed=0)
    assert ids(tw.labeler_records(cfg, "yesno", 40, seed=0)) == ids(yesno)
    policy = tw.labeler_records(cfg, "policy", 40, seed=0)
    assert ids(policy) == ids(tw.warmstart_split(cfg, 40, seed=0))
    clean = tw.labeler_records(cfg, "clean", 40, seed=0)
    captions = [r for r in clean if r["kind"] == "caption"]
    assert len(captions) == 40 and ids(clean[40:]) == ids(yesno)
    biased = [r for r in policy if r["kind"] == "caption"]
    assert [r["image_id"] for r in captions] == [r["image_id"] for r in biased]
    assert all(not r["hallucinated"] for r in captions) and any(r["hallucinated"] for r in biased)
    for r in captions:  # every caption names exactly the objects shown
        assert r["answer"] == " ".join(f"there is a {c} {s} ." for c, s in r["objects"])
    with pytest.raises(ValueError, match="toy labeler data must be one of"):
        tw.labeler_records(cfg, "captions", 4, seed=0)
