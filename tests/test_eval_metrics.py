"""The four suites' metrics on tiny fixtures in each official format, against hand-computed values."""
import json
import os

import pytest

from rlaifv_jax.eval import amber, coco, mmhal, object_halbench, pope, suites, text
from rlaifv_jax.eval.answers import read_answers
from rlaifv_jax.eval.objects import EXTRACTION_PROMPT, LLMExtractor, RuleExtractor, parse_object_list

FIX = os.path.join(os.path.dirname(__file__), "fixtures", "eval")


def _answers(suite, questions):
    return read_answers(os.path.join(FIX, "answers", f"{suite}.jsonl"), [q.id for q in questions])[0]


# ----------------------------------------------------------------------------- text and COCO vocabulary
def test_lemmas_and_coco_vocabulary():
    assert text.words("A man's dogs, two mice.") == ["a", "man", "'s", "dogs", ",", "two", "mice", "."]
    assert text.noun_lemmas("Dogs mice glasses children buses") == ["dog", "mouse", "glass", "child", "bus"]
    vocab = coco.CocoVocabulary.load()
    names = [c["name"] for c in coco.categories()]
    assert len(names) == 80 and all(vocab.category_of[n] == n for n in names)
    assert vocab.objects("Two hot dogs and a traffic light") == [("hot dog", "hot dog"), ("traffic light", "traffic light")]
    assert vocab.objects("a baby elephant and a passenger train") == [("elephant", "elephant"), ("train", "train")]
    assert vocab.objects("a baby") == [("baby", "person")]  # alone, "baby" is a person
    assert vocab.objects("the seat of the toilet") == [("toilet", "toilet")]  # no chair
    assert vocab.objects("a seat") == [("seat", "chair")]
    assert vocab.objects("home plate and a bow tie") == [("tie", "tie")]


# ----------------------------------------------------------------------------- Object HalBench
@pytest.fixture(scope="module")
def objhal():
    questions, root = object_halbench.load(os.path.join(FIX, "object_halbench"))
    return questions, root, _answers("object_halbench", questions)


def test_object_halbench_ground_truth(objhal):
    questions, root, _ = objhal
    truth, report = coco.ground_truth(root, [101, 202, 303, 404], coco.CocoVocabulary.load())
    # instances ∪ caption objects through synonyms (man → person, kitten → cat, sofa → couch)
    assert truth == {101: {"person", "dog", "frisbee"}, 202: {"cat", "couch"}, 303: {"car", "bus", "fire hydrant"},
                     404: set()}
    assert report["images_without_annotations"] == []
    assert [q.id for q in questions] == ["101", "202", "303", "404"] and questions[0].image_is_base64


def test_object_halbench_rule_path(objhal):
    questions, root, answers = objhal
    metrics, items = object_halbench.score(questions, root, answers)
    # 101: woman(person) frisbee dog bird(baby bird) bench → 2 hallucinated of 5
    # 202: cat couch laptop cat → 1 of 4 (CHAIR counts the repeated cat); 303: car, fire hydrant → 0 of 2; 404: none
    assert items["101"]["hallucinated"] == ["bird", "bench"] and items["202"]["hallucinated"] == ["laptop"]
    assert metrics["mention_hall"] == pytest.approx(3 / 11)
    assert metrics["response_hall"] == pytest.approx(2 / 3)  # 404 mentions no COCO object
    assert metrics["chair_s"] == pytest.approx(2 / 4)
    assert metrics["recall"] == pytest.approx(7 / 8)  # bus never mentioned
    assert metrics["avg_len"] == pytest.approx((15 + 15 + 13 + 10) / 4)
    assert metrics["extractor"] == "rule" and metrics["n_extraction_failed"] == 0


def test_one_absent_object_of_three(objhal):
    questions, root, _ = objhal
    metrics, _ = object_halbench.score(questions[1:2], root, {"202": "A cat on a couch next to a laptop."})
    assert metrics["mention_hall"] == pytest.approx(1 / 3) and metrics["response_hall"] == 1.0


def test_object_halbench_llm_path(objhal):
    questions, root, answers = objhal
    replies = {"101": '["woman", "frisbee", "dogs", "baby bird", "bench"]',
               "202": 'Here are the objects:\n["cat", "couch", "laptop", "cat"]',
               "303": "I cannot tell.", "404": "[]"}
    seen = []

    def judge(prompts):
        seen.extend(prompts)
        return [next(v for k, v in replies.items() if answers[k] in p) for p in prompts]

    metrics, items = object_halbench.score(questions, root, answers, judge)
    assert len(seen) == 4 and seen[0].startswith(EXTRACTION_PROMPT[:60])
    assert f"<image> {questions[0].question}" in seen[0] and answers["101"] in seen[0]
    # each extracted word once per answer: 101 → 5 mentions (2 hallucinated), 202 → 3 (1), 404 → 0;
    # 303's reply is no JSON list: flagged, counted, and its answer goes through the rule path (2, 0)
    assert metrics["mention_hall"] == pytest.approx(3 / 10)
    assert metrics["response_hall"] == pytest.approx(2 / 3)
    assert metrics["n_extraction_failed"] == 1 and metrics["extraction_failed_ids"] == ["303"]
    assert items["303"]["extraction_failed"] and items["303"]["objects"] == [["car", "car"], ["fire hydrant", "fire hydrant"]]


def test_extraction_parsing_and_short_answers():
    assert parse_object_list('["a", "b"]') == ["a", "b"]
    assert parse_object_list('Sure!\n["dog"]') == ["dog"]
    assert parse_object_list("()") == [] and parse_object_list("[]") == []
    assert parse_object_list('{"objects": ["dog"]}') is None and parse_object_list("a dog") is None
    asked = []
    out = LLMExtractor(lambda ps: asked.extend(ps) or ['["dog"]'] * len(ps))([("q", "A dog."), ("q", "A big brown dog runs.")])
    assert len(asked) == 1 and out[0].objects == [] and out[1].objects == [("dog", "dog")]
    assert RuleExtractor()([("q", "A dog.")])[0].objects == [("dog", "dog")]


# ----------------------------------------------------------------------------- POPE
def test_pope():
    questions = pope.load(os.path.join(FIX, "pope", "coco_pope_random.json"), os.path.join(FIX, "pope", "images"))
    metrics, items = pope.score(questions, _answers("pope", questions))
    assert list(metrics) == ["random"]
    m = metrics["random"]
    # yes/TP, no/TN, "There is a car..." → yes/FP, "do not" → no/FN, Yes/TP, No./TN, "NO, nothing" → yes/FP
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (2, 2, 2, 1)
    assert m["accuracy"] == pytest.approx(4 / 7) and m["precision"] == pytest.approx(1 / 2)
    assert m["recall"] == pytest.approx(2 / 3) and m["f1"] == pytest.approx(4 / 7)
    assert m["yes_ratio"] == pytest.approx(4 / 7)
    assert items["3"]["prediction"] == "yes" and items["4"]["prediction"] == "no"


def test_pope_splits_from_category(tmp_path):
    path = tmp_path / "llava_pope_test.jsonl"
    rows = [{"question_id": i, "image": "x.jpg", "text": "Is there a dog?", "label": lab, "category": cat}
            for i, (lab, cat) in enumerate([("yes", "random"), ("no", "random"), ("no", "popular")])]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    questions = pope.load(str(path))
    metrics, _ = pope.score(questions, {"0": "Yes", "1": "Yes", "2": "No"})
    assert set(metrics) == {"all", "popular", "random"}
    assert metrics["random"]["accuracy"] == 0.5 and metrics["popular"]["accuracy"] == 1.0
    assert metrics["all"]["n"] == 3 and metrics["all"]["yes_ratio"] == pytest.approx(2 / 3)


# ----------------------------------------------------------------------------- AMBER
def test_amber():
    questions, vocab = amber.load(os.path.join(FIX, "amber", "data"), os.path.join(FIX, "amber", "images"))
    metrics, items = amber.score(questions, vocab, _answers("amber", questions))
    # 1: puppy(→dog) man(→person) grass: safe; ball, cat: hallucinated (and both hallu objects covered)
    # 2: car: safe; line, orange: global safe words; sky not mentioned; "Trees" is capitalised, which
    #    WordNet does not lemmatize, so (as officially) it is no vocabulary word and tree is not covered
    assert items["1"]["hallucinated"] == ["ball", "cat"] and items["2"]["hallucinated"] == []
    assert items["2"]["mentions"] == ["line", "car", "orange"]
    g = metrics["generative"]
    assert g["chair"] == pytest.approx(2 / 8) and g["cover"] == pytest.approx(4 / 6)
    assert g["hal"] == pytest.approx(1 / 2) and g["cog"] == pytest.approx(2 / 3)
    assert g["printed"] == {"chair": 25.0, "cover": 66.7, "hal": 50.0, "cog": 66.7}
    # discriminative, "No" positive, answers read as written: 3 Yes/yes ✓, 4 No/no ✓, 5 Yes/no ✗, 6 No/yes ✗,
    # 7 " No\n"/no ✗ (not the string "No"), 8 "Yes, it is."/yes ✗
    d = metrics["discriminative"]
    assert d["accuracy"] == pytest.approx(2 / 6) and d["precision"] == pytest.approx(1 / 2)
    assert d["recall"] == pytest.approx(1 / 3) and d["f1"] == pytest.approx(0.4) and d["n_not_yes_no"] == 2
    # printed as inference.py: P 50.0, R 33.3 → 2·.5·.333/(.833 + 1e-4)
    assert d["printed"] == {"accuracy": 33.3, "precision": 50.0, "recall": 33.3, "f1": 40.0}
    assert metrics["existence"]["accuracy"] == 1.0 and metrics["existence"]["f1"] == 1.0
    assert metrics["existence"]["printed"]["f1"] == 100.0  # 2·1·1/(2 + 1e-3) = 99.95…
    assert metrics["attribute"]["accuracy"] == 0.0 and metrics["attribute"]["f1"] == 0.0
    assert metrics["relation"]["n"] == 2 and metrics["relation"]["accuracy"] == 0.0
    assert metrics["attribute-state"]["n"] == 1 and metrics["attribute-number"]["n"] == 1


# ----------------------------------------------------------------------------- MMHal-Bench
def test_mmhal():
    questions = mmhal.load(os.path.join(FIX, "mmhal", "response_template.json"))
    assert questions[1].image.endswith(os.path.join("mmhal", "images", "b_2.jpg"))
    answers = _answers("mmhal", questions)
    replies = iter(["The response is accurate.\nRating: 6, very informative with good analysis",
                    "There is no cat. Rating: 1", "I think rating: 3 or maybe rating: 4", "No rating here."])
    prompts = []
    metrics, items = mmhal.score(questions, answers, lambda ps: prompts.extend(ps) or [next(replies) for _ in ps])
    assert "### Image Contents\nDog, Animal\n\n### Question\nWhat is the cat doing?" in prompts[1]
    assert prompts[1].endswith("### LMM Response to Evaluate\nThe cat is sleeping.\n")
    assert metrics["score"] == pytest.approx((6 + 1 + 0 + 0) / 4)  # unparseable → 0, as officially
    assert metrics["hallucination_rate"] == pytest.approx(3 / 4)
    assert metrics["score_parsed"] == pytest.approx(3.5)
    assert metrics["n_unparseable"] == 2 and metrics["unparseable_ids"] == ["2", "3"]
    assert metrics["per_type"] == {"adversarial": 1.0, "attribute": 3.0, "counting": 0.0}
    assert items["2"]["rating"] is None and items["0"]["rating"] == 6
    with pytest.raises(ValueError, match="--judge"):
        mmhal.score(questions, answers, None)


# ----------------------------------------------------------------------------- answers files and bad data
def test_answers_report(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"id": 1, "answer": "x"}\n{"id": "1", "answer": "y"}\n{"id": 9, "answer": "z"}\n'
                    'not json\n{"id": 2}\n\n{"id": 3, "answer": "w"}\n')
    answers, report = read_answers(str(path), ["1", "2", "3", "4"])
    assert answers == {"1": "x", "3": "w"}
    assert report.duplicate == ["1"] and report.unknown == ["9"] and report.missing == ["2", "4"]
    assert [m.split(":")[0] for m in report.malformed] == ["line 4", "line 5"]
    assert "2 missing (2, 4)" in report.summary()
    path.write_text('{"id": 7, "answer": "x"}\n')
    with pytest.raises(ValueError, match="no line answers"):
        read_answers(str(path), ["1"])


def test_bad_data_is_one_line_error(tmp_path):
    bad = tmp_path / "coco_pope_random.json"
    bad.write_text('{"question_id": 1, "image": "a.jpg", "text": "Is there a dog?", "label": "maybe"}\n')
    with pytest.raises(ValueError, match=r"coco_pope_random.json:1: label must be 'yes' or 'no'"):
        suites.load("pope", str(bad))
    (tmp_path / "objhal").mkdir()
    (tmp_path / "objhal" / "q.jsonl").write_text('{"image_id": 1, "question": "Describe.", "image": ""}\n')
    with pytest.raises(ValueError, match="needs COCO 2014 annotations"):
        suites.load("object_halbench", str(tmp_path / "objhal"))
    with pytest.raises(FileNotFoundError, match="annotations.json"):
        (tmp_path / "q.json").write_text("[]")
        suites.load("amber", str(tmp_path / "q.json"))
