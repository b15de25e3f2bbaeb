"""Hand-worked CHAIR numbers, toy mention extraction and yes/no metrics."""
import pytest

from rlaifv_jax.eval.chair import chair_metrics, toy_mentions, yesno_metrics

A, B, C, D, E = "a", "b", "c", "d", "e"
MENTIONS = [[A, B, B], [A], [], [C, D]]
TRUTHS = [{A}, {A, E}, {A}, {C}]


def test_chair_unique_mentions():
    m = chair_metrics(MENTIONS, TRUTHS)
    # hallucinating responses: 1 (B) and 4 (D); mentioning: 1, 2, 4; unique mentions A,B | A | C,D = 5
    assert m["chair_response"] == pytest.approx(2 / 3)
    assert m["chair_s"] == pytest.approx(2 / 4)
    assert m["chair_mention"] == pytest.approx(2 / 5)
    assert m["recall"] == pytest.approx(3 / 5)  # A, A, C found of {A} {A,E} {A} {C}
    assert (m["n_responses"], m["n_responses_mentioning"], m["n_responses_hallucinating"]) == (4, 3, 2)
    assert (m["n_mentions"], m["n_hallucinated_mentions"], m["n_truth_objects"], m["n_truth_mentioned"]) == (5, 2, 5, 3)


def test_chair_every_occurrence():
    m = chair_metrics(MENTIONS, TRUTHS, unique=False)
    assert m["chair_mention"] == pytest.approx(3 / 6)  # B, B, D of A,B,B,A,C,D
    assert m["chair_response"] == pytest.approx(2 / 3) and m["recall"] == pytest.approx(3 / 5)


def test_chair_edge_cases():
    m = chair_metrics([[], []], [set(), {A}])
    assert (m["chair_response"], m["chair_mention"], m["chair_s"], m["recall"]) == (0.0, 0.0, 0.0, 0.0)
    assert chair_metrics([[A]], [{A}])["chair_mention"] == 0.0
    with pytest.raises(ValueError):
        chair_metrics([[A]], [])


def test_toy_mentions():
    text = "There is a red red Circle. there is a blue square and a green cross . a purple circle yellow"
    assert toy_mentions(text) == [("red", "circle"), ("blue", "square"), ("green", "cross")]
    assert toy_mentions("there is a red circle . there is a red circle .") == [("red", "circle")] * 2
    assert toy_mentions("") == []


def test_toy_chair_end_to_end():
    captions = ["there is a red circle . there is a blue square .", "there is a green cross ."]
    truths = [{("red", "circle")}, {("green", "cross"), ("yellow", "triangle")}]
    m = chair_metrics([toy_mentions(c) for c in captions], truths)
    assert (m["chair_response"], m["chair_mention"], m["recall"]) == (0.5, pytest.approx(1 / 3), pytest.approx(2 / 3))


def test_yesno_metrics():
    m = yesno_metrics(["yes", "No.", "yes", "maybe", True], ["yes", "no", "no", "yes", "Yes"])
    # parsed predictions Y N Y ? Y vs labels Y N N Y Y: correct 0,1,4; tp 0,4; fp 2; fn 3
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["precision"] == pytest.approx(2 / 3) and m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 / 3) and m["yes_rate"] == pytest.approx(3 / 5)
    assert (m["n"], m["n_invalid"]) == (5, 1)
    with pytest.raises(ValueError):
        yesno_metrics(["yes"], ["perhaps"])
