"""Answers that our scorers once read differently from the official scripts, each scored the official way.

Every test names the answer that exposed a difference; the comment beside it gives the metric the old
reading produced and the value the official script produces (and we now produce).
"""
import json
import os

import pytest

from rlaifv_jax.eval import amber, coco, object_halbench, text

FIX = os.path.join(os.path.dirname(__file__), "fixtures", "eval")


# ----------------------------------------------------------------------------- Object HalBench (NLTK tokenizer)
def test_word_tokenize_matches_nltk_rules():
    # NLTKWordTokenizer keeps "cat/dog" one token; Punkt splits sentences so each final period is split off
    assert text.words("A cat/dog is sleeping on the chair. There is a dog.") == [
        "a", "cat/dog", "is", "sleeping", "on", "the", "chair", ".", "there", "is", "a", "dog", "."]
    assert text.words("A man's dogs, two mice.") == ["a", "man", "'s", "dogs", ",", "two", "mice", "."]
    assert text.word_tokenize("It's 2.5 m wide (a T-shirt).") == ["It", "'s", "2.5", "m", "wide", "(", "a", "T-shirt",
                                                                  ")", "."]
    assert [text.noun_lemma(w) for w in ("dogs", "TV", "Dogs", "cat/dog", "t-shirts")] == [
        "dog", "TV", "Dogs", "cat/dog", "t-shirt"]


def test_slash_joined_words_are_one_token():
    vocab = coco.CocoVocabulary.load()
    assert vocab.objects("A cat/dog is sleeping on the chair.") == [("chair", "chair")]
    questions, root = object_halbench.load(os.path.join(FIX, "object_halbench"))
    answers = {"101": "A woman throws a frisbee to her dogs. A baby bird sits on a bench.",
               "202": "A cat/dog is sleeping on the couch.",
               "303": "A red car is parked next to a fire hydrant on the street.",
               "404": "This is a picture of a street in the city."}
    metrics, items = object_halbench.score(questions, root, answers)
    # truth 202 = {cat, couch}. Splitting on "/" found cat, dog (hallucinated) and couch:
    # before: response_hall 2/3 = 0.667, mention_hall 3/10 = 0.300, recall 7/8 = 0.875
    # after (official, only "couch"): response_hall 1/3 = 0.333, mention_hall 2/8 = 0.250, recall 6/8 = 0.750
    assert items["202"]["objects"] == [["couch", "couch"]] and items["202"]["hallucinated"] == []
    assert metrics["response_hall"] == pytest.approx(1 / 3) and metrics["mention_hall"] == pytest.approx(2 / 8)
    assert metrics["recall"] == pytest.approx(6 / 8)


def test_wine_glas_double_word():
    # the official table maps the lemma pair "wine glas" to "wine glass" (a WordNet artefact); kept for parity
    assert coco.CocoVocabulary.load().merge_double_words(["a", "wine", "glas"]) == ["a", "wine glass"]


# ----------------------------------------------------------------------------- AMBER
def _amber(tmp_path, annotations, relation):
    data = tmp_path / "data"
    (data / "query").mkdir(parents=True)
    (data / "query" / "query_all.json").write_text(json.dumps(
        [{"id": a["id"], "image": f"AMBER_{a['id']}.jpg", "query": "q"} for a in annotations]))
    (data / "annotations.json").write_text(json.dumps(annotations))
    (data / "relation.json").write_text(json.dumps(relation))
    (data / "safe_words.txt").write_text("light\n")
    return amber.load(str(data))


def test_amber_tv_is_a_television(tmp_path):
    # AMBER's own relation.json: "television": ["TV", "screen"]
    questions, vocab = _amber(tmp_path, [
        {"id": 1, "type": "generative", "truth": ["television", "sofa"], "hallu": ["dog"]},
        {"id": 2, "type": "generative", "truth": ["sofa"], "hallu": ["television"]},
    ], {"television": ["TV", "screen"], "sofa": ["couch"], "dog": ["puppy"]})
    metrics, items = amber.score(questions, vocab, {"1": "A TV stands next to a sofa.",
                                                    "2": "A sofa faces a TV. Dogs sleep; a tv is off."})
    # WordNet leaves "TV" (and "Dogs") as written, and inference.py matches case-sensitively: "TV" is a mention,
    # "tv" and "Dogs" are not. Lower-casing the answer made "TV" unmatchable and "Dogs" a (hallucinated) dog:
    # before: cover 2/3 = 0.667, cog 0/2 = 0.0, chair 1/3 = 0.333 (dog), hal 1/2 = 0.5
    # after:  cover 3/3 = 1.0,   cog 1/2 = 0.5, chair 1/4 = 0.25 (TV),  hal 1/2 = 0.5
    assert items["1"]["mentions"] == ["TV", "sofa"] and items["1"]["covered"] == ["television", "sofa"]
    assert items["2"]["mentions"] == ["sofa", "TV"] and items["2"]["hallucinated"] == ["TV"]
    assert items["2"]["hallu_covered"] == ["television"]
    g = metrics["generative"]
    assert (g["cover"], g["cog"], g["chair"], g["hal"]) == (1.0, 0.5, 0.25, 0.5)  # cog: dog (1) + television (2)


def test_amber_discriminative_answers_are_read_as_written(tmp_path):
    answers = {"1": "No", "2": " No", "3": "No ", "4": "Yes\n", "5": "Yes", "6": "yes", "7": "No", "8": "Yes"}
    truths = ["no", "no", "no", "yes", "yes", "yes", "yes", "no"]
    questions, vocab = _amber(tmp_path, [{"id": i + 1, "type": "discriminative-hallucination", "truth": t}
                                         for i, t in enumerate(truths)], {"dog": []})
    metrics, items = amber.score(questions, vocab, answers)
    d = metrics["discriminative"]
    # stripping made " No", "No " and "Yes\n" answers: accuracy 5/8 = 0.625, P 3/4, R 3/4, F1 0.750
    # as written (official): correct 1 and 5 only:     accuracy 2/8 = 0.250, P 1/2, R 1/4, F1 0.333
    assert d["accuracy"] == pytest.approx(2 / 8) and d["precision"] == pytest.approx(1 / 2)
    assert d["recall"] == pytest.approx(1 / 4) and d["n_not_yes_no"] == 4
    assert items["2"]["answer"] == " No"


# ----------------------------------------------------------------------------- POPE in LLaVA's format
def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_pope_llava_questions_with_pope_labels_equal_merged_file(tmp_path):
    from rlaifv_jax.eval import pope
    suffix = "\nAnswer the question using a single word or phrase."
    merged, llava, label_files = [], [], {}
    qid = 0
    for category, labels in (("adversarial", "yes no no yes"), ("popular", "no yes"), ("random", "yes no yes")):
        for k, label in enumerate(labels.split()):
            qid += 1
            row = {"image": f"COCO_val2014_{qid:012d}.jpg", "text": f"Is there a thing {k}?"}
            label_files.setdefault(category, []).append({"question_id": k + 1, **row, "label": label})
            merged.append({"question_id": qid, **row, "label": label, "category": category})
            llava.append({"question_id": qid, "image": row["image"], "text": row["text"] + suffix,
                          "category": category})
    (tmp_path / "coco").mkdir()
    for category, rows in label_files.items():
        _jsonl(tmp_path / "coco" / f"coco_pope_{category}.json", rows)
    llava_file = _jsonl(tmp_path / "llava_pope_test.jsonl", llava)
    merged_file = _jsonl(tmp_path / "merged.jsonl", merged)
    answers = {str(i + 1): a for i, a in enumerate(
        ["Yes", "No.", "Yes, there is", "There is not", "No", "yes", "Yes", "No, it is not", "No"])}
    joined, _ = pope.score(pope.load(llava_file), answers)
    reference, _ = pope.score(pope.load(merged_file), answers)
    assert joined == reference and set(joined) == {"adversarial", "popular", "random", "all"}
    assert joined["adversarial"]["tp"] == 1 and joined["all"]["n"] == 9
    assert pope.score(pope.load(llava_file, labels=str(tmp_path / "coco")), answers)[0] == reference
    # the join is positional, so the files must agree line by line
    _jsonl(tmp_path / "coco" / "coco_pope_random.json", label_files["random"][:2])
    with pytest.raises(ValueError, match="2 labels but .* 3 'random' questions"):
        pope.load(llava_file)
    _jsonl(tmp_path / "coco" / "coco_pope_random.json", label_files["random"][::-1])
    with pytest.raises(ValueError, match="not in the same order"):
        pope.load(llava_file)
    (tmp_path / "alone").mkdir()
    with pytest.raises(ValueError, match="no labels .* pass --labels DIR"):
        pope.load(_jsonl(tmp_path / "alone" / "llava_pope_test.jsonl", llava))
    with pytest.raises(ValueError, match="nowhere: not a directory"):
        pope.load(llava_file, labels=str(tmp_path / "nowhere"))


# ----------------------------------------------------------------------------- MMHal-Bench summary
TYPES = ["attribute", "adversarial", "comparison", "counting", "relation", "environment", "holistic", "other"]


def _mmhal(tmp_path, types):
    from rlaifv_jax.eval import mmhal
    rows = [{"question_type": t, "image_src": f"https://x/{i}.jpg", "image_content": ["Dog"], "question": f"q{i}",
             "gt_answer": "a"} for i, t in enumerate(types)]
    (tmp_path / "template.json").write_text(json.dumps(rows))
    return mmhal.load(str(tmp_path / "template.json"))


def test_mmhal_informativeness_and_layout(tmp_path, caplog):
    from rlaifv_jax.eval import mmhal
    questions = _mmhal(tmp_path, TYPES * 12)
    answers = {q.id: "An answer." for q in questions}
    ratings = [i % 7 for i in range(96)]  # question i rated i % 7
    metrics, _ = mmhal.score(questions, answers, lambda ps: [f"Rating: {r}" for r in ratings[:len(ps)]])
    # official: informativeness = mean(r - 3 if r >= 3 else r) / 3 * 100; r = 0..6 → 0 1 2 0 1 2 3
    expected = sum((r - 3 if r >= 3 else r) for r in ratings) / 96 / 3 * 100
    assert metrics["informativeness"] == pytest.approx(expected) and metrics["layout"] == "official"
    by_position = [sum(ratings[i] for i in range(t, 96, 8)) / 12 for t in range(8)]  # the official i % 8 grouping
    assert [metrics["per_type"][t] for t in TYPES] == pytest.approx(by_position)
    assert mmhal.informativeness([6, 3, 2, 0]) == pytest.approx((3 + 0 + 2 + 0) / 4 / 3 * 100)
    # a reordered template, or fewer than 96 answers, is not the layout the official summary assumes
    swapped = TYPES * 12
    swapped[8], swapped[9] = swapped[9], swapped[8]
    metrics, _ = mmhal.score(_mmhal(tmp_path, swapped), answers, lambda ps: ["Rating: 4"] * len(ps))
    assert metrics["layout"].startswith("question 8 has type 'adversarial'") and "layout" in caplog.text
    metrics, _ = mmhal.score(questions, {"0": "x"}, lambda ps: ["Rating: 4"] * len(ps))
    assert metrics["layout"] == "95 of the 96 questions unanswered"
