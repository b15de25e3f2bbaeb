"""Tests for the rule-based split + convert of the toy language."""
from rlaifv_jax.data.toy_world import WorldSettings, labeler_prompt, warmstart_split
from rlaifv_jax.feedback.claims import ClaimResult
from rlaifv_jax.feedback.toy_claims import RuleClaimExtractor, parse_answer

EXT = RuleClaimExtractor()


def test_clean_caption():
    [res] = EXT.extract([("describe the image .", "there is a red circle . there is a blue square .")])
    assert res == ClaimResult(
        facts=["there is a red circle", "there is a blue square"],
        questions=["is there a red circle in the image ?", "is there a blue square in the image ?"],
        status="ok",
        raw_split="- there is a red circle\n- there is a blue square",
        raw_convert="- is there a red circle in the image ?\n- is there a blue square in the image ?")


def test_messy_spacing_case_and_repeats():
    text = "There is a  Red circle.there is a blue square\nthere is an yellow cross !! there is a red circle ."
    res = EXT.extract_one(text)
    assert res.status == "ok"
    assert res.facts == ["there is a red circle", "there is a blue square", "there is a yellow cross"]
    assert res.questions[2] == "is there a yellow cross in the image ?"


def test_garbage_is_counted_not_dropped():
    text = "there is a red circle . circle blue <unk> . there is a red . there is a purple circle ."
    parsed = parse_answer(text)
    assert parsed.objects == [("red", "circle")]
    assert parsed.unparsed == ["circle blue <unk>", "there is a red", "there is a purple circle"]
    assert parsed.sentences == ["there is a red circle"] + parsed.unparsed
    res = EXT.extract_one(text)
    assert (res.status, res.facts, res.questions, res.raw_convert) == ("unparseable", [], [], "")
    assert res.raw_split == "- there is a red circle\n- circle blue <unk>\n- there is a red\n- there is a purple circle"
    # purple is an object of a world that has it
    assert RuleClaimExtractor(WorldSettings(colours=("red", "purple"), pairs=())).extract_one(
        "there is a purple circle .").status == "ok"


def test_missing_period_run_on_is_unparseable():
    res = EXT.extract_one("there is a red circle there is a blue square")
    assert res.status == "unparseable" and res.facts == []


def test_no_claims():
    for text in ("", "   ", " . . \n", "?"):
        assert EXT.extract_one(text) == ClaimResult([], [], "no_claims")
    assert EXT.extract_one("there is a red circle .").to_dict()["status"] == "ok"


def test_batch_order_and_labeler_form_matches_training_data():
    items = [("q", "there is a green cross ."), ("q", ""), ("q", "yes")]
    assert [r.status for r in EXT.extract(items)] == ["ok", "no_claims", "unparseable"]
    question = EXT.extract_one("there is a green cross .").questions[0]
    assert labeler_prompt(question) == "is there a green cross in the image ? Please answer yes or no."
    trained = {r["question"] for r in warmstart_split(WorldSettings(), 300, seed=0) if r["kind"] == "yesno"}
    assert labeler_prompt(question) in trained


def test_round_trip_on_training_captions():
    for rec in warmstart_split(WorldSettings(), 100, seed=1):
        if rec["kind"] == "caption":
            res = EXT.extract_one(rec["answer"])
            assert res.status == "ok"
            assert res.facts == [f"there is a {c} {s}" for c, s in dict.fromkeys(
                [o for o in _said(rec["answer"])])]
            assert set(_said(rec["answer"])) == set(rec["objects"]) | set(rec["hallucinated"])


def _said(caption):
    return [tuple(s.split()[3:5]) for s in caption.split(" .") if s.strip()]
