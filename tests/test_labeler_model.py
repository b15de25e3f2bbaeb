"""Shared-prefix labeler on tiny LLaVA / LLaVA-NeXT: equal to one full (transformers) forward per question."""
import logging

import numpy as np
import pytest
import torch
from flax import nnx
from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

import tiny_hf
from chat_tokenizers import bpe_tokenizer, word_tokenizer
from rlaifv_jax.data.chat import encode_prompt
from rlaifv_jax.data.chat import labeler_question
from rlaifv_jax.data.yesno import split_prompts
from rlaifv_jax.engine.score import ImageQuestions, Labeler
from rlaifv_jax.models import anyres, hf

TOL = 1e-5
QUESTIONS = [
    "Is there a red circle?",
    "Is there a blue square in the image?",
    "Does the picture show a cat?",
    "Is there a small green triangle left of a large red circle in the image?",
    "Is there a dog?",
    "Does the image show two cats?",
]


@pytest.fixture(scope="module")
def tok():
    return word_tokenizer()


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    path = tmp_path_factory.mktemp("llava")
    return tiny_hf.llava(path, text=dict(initializer_range=0.2)), hf.load_pretrained(str(path))


@pytest.fixture(scope="module")
def llava_next(tmp_path_factory):
    path = tmp_path_factory.mktemp("llava_next")
    return tiny_hf.llava_next(path, text=dict(initializer_range=0.2)), hf.load_pretrained(str(path))


def np_softmax(x):
    x = np.asarray(x, np.float64)
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def reference(ref_model, tok, labeler, question, item, n_img, template, penalty=None):
    """One full transformers forward of the whole labeler prompt (batch 1, image included)."""
    ids = encode_prompt(tok, labeler_question(question), n_img, image_token_id=tiny_hf.IMAGE_TOKEN,
                        template=template)
    kw = {}
    if item.pixel_values is not None:
        kw["pixel_values"] = torch.tensor(np.asarray(item.pixel_values))
    if item.image_sizes is not None:
        kw["image_sizes"] = torch.tensor(np.asarray(item.image_sizes))
    input_ids = torch.tensor(ids[None].astype(np.int64))
    with torch.no_grad():
        logits = ref_model(input_ids=input_ids, **kw).logits[:, -1].float()
    if penalty is not None:
        logits = RepetitionPenaltyLogitsProcessor(penalty)(input_ids, logits)
    p = np_softmax(logits.numpy())[0]
    a = labeler.answer_ids
    return p[sorted({a["yes"], a["Yes"]})].sum(), p[sorted({a["no"], a["No"]})].sum()


def check(ref_model, tok, labeler, items, template="llava_v1", penalty=None):
    got = labeler.score(items)
    assert [len(g) for g in got] == [len(it.questions) for it in items]
    worst = 0.0
    for it, scores in zip(items, got):
        n_img = 0 if it.pixel_values is None else labeler._image_token_count(it.image_sizes)
        for q, (p_yes, p_no) in zip(it.questions, scores):
            assert isinstance(p_yes, float) and isinstance(p_no, float)
            want = reference(ref_model, tok, labeler, q, it, n_img, template, penalty)
            worst = max(worst, abs(p_yes - want[0]), abs(p_no - want[1]))
    assert worst <= TOL, worst
    return got


@pytest.mark.parametrize("make", [word_tokenizer, bpe_tokenizer])
@pytest.mark.parametrize("template", ["llava_v1", "chat"])
def test_split_is_right_after_image_and_newline(make, template):
    tok = make()
    image_id = tok.convert_tokens_to_ids("<image>")
    n = 5
    prefix, conts = split_prompts(tok, QUESTIONS, n, image_token_id=image_id, template=template)
    newline = tok("\n", add_special_tokens=False)["input_ids"]
    positions = np.flatnonzero(prefix == image_id)
    assert len(positions) == n and positions[-1] == len(prefix) - 1 - len(newline)
    assert list(prefix[len(prefix) - len(newline):]) == newline  # the image block's newline is shared
    for q, c in zip(QUESTIONS, conts):
        full = encode_prompt(tok, labeler_question(q), n, image_token_id=image_id, template=template)
        assert list(np.concatenate([prefix, c])) == list(full)
        assert list(c) == list(full[len(prefix):])
    # text-only prompts share the system prompt / template head
    prefix, conts = split_prompts(tok, QUESTIONS[:2], 0, template=template)
    for q, c in zip(QUESTIONS, conts):
        assert list(np.concatenate([prefix, c])) == list(encode_prompt(tok, labeler_question(q), 0, template=template))
    assert len(prefix) >= 6


def test_llava_shared_prefix_equals_full_forward(llava, tok, caplog):
    ref, model = llava
    rng = np.random.RandomState(0)
    with caplog.at_level(logging.INFO, logger="rlaifv_jax.engine.score"):
        labeler = Labeler(model, tok, batch_size=4)
    assert "yes/no token ids" in caplog.text
    assert labeler.answer_ids == {w: tok.convert_tokens_to_ids(w) for w in ("yes", "Yes", "no", "No")}
    px = lambda: rng.randn(1, 3, 28, 28).astype(np.float32)  # noqa: E731
    first = px()
    items = [
        ImageQuestions(QUESTIONS, first),                       # 6 questions: batches of 4 + 2 rows
        ImageQuestions([QUESTIONS[3]], px()),                   # 1 question, the longest
        ImageQuestions([], px()),                               # no questions: skipped
        ImageQuestions(QUESTIONS[:3] + [QUESTIONS[0]], first),  # same question twice in one batch
        ImageQuestions(QUESTIONS[1:3], None),                   # text only
    ]
    got = check(ref, tok, labeler, items)
    assert got[2] == []
    # self-consistency: the same question gets identical scores in one batch, and the same up to
    # float rounding in another batch shape / another call with the same image
    assert got[3][0] == got[3][3]
    np.testing.assert_allclose(got[0][0], got[3][0], rtol=0, atol=1e-7)
    programs = labeler.programs()
    kinds = [p[0] for p in programs]
    assert kinds.count("features") == 1 and kinds.count("prefill") == 2  # with and without image
    # more images with other question counts in the same buckets compile nothing new
    labeler.score([{"questions": QUESTIONS[2:5], "pixel_values": px()}, {"questions": QUESTIONS[:2]}])
    assert labeler.programs() == programs
    assert labeler._score._cache_size() == kinds.count("score")


def test_repeated_questions_are_scored_once(llava, tok):
    _, model = llava
    labeler = Labeler(model, tok, batch_size=4)
    px = np.random.RandomState(5).randn(1, 3, 28, 28).astype(np.float32)
    a, b = QUESTIONS[0], QUESTIONS[1]
    got = labeler.score([ImageQuestions([a, b, a, a, b, a], px)])[0]
    assert [p[2] for p in labeler.programs() if p[0] == "score"] == [2]  # one batch of the 2 distinct questions
    once = labeler.score([ImageQuestions([a, b], px)])[0]
    assert got == [once[0], once[1], once[0], once[0], once[1], once[0]]


def test_a_labeler_built_again_traces_nothing_new(llava, tok):
    """Each online iteration builds its labelers anew, on a new load of the same checkpoint: they share
    the compiled programs (no new trace) and each scores with its own model's weights."""
    _, model = llava
    item = ImageQuestions(QUESTIONS[:3], np.random.RandomState(7).randn(1, 3, 28, 28).astype(np.float32))
    first = Labeler(model, tok, batch_size=4)
    want = first.score([item])
    traces = first._prefill._cache_size(), first._score._cache_size()
    other = nnx.clone(model)
    other.language_model.norm.weight[...] = other.language_model.norm.weight[...] * 3.0
    second = Labeler(other, tok, batch_size=4)
    got = second.score([item])
    assert (first._prefill._cache_size(), first._score._cache_size()) == traces
    assert (second._prefill, second._score) == (first._prefill, first._score)
    assert not np.allclose(got, want, atol=1e-4)  # the second labeler's own weights
    assert first.score([item]) == want


@pytest.mark.parametrize("penalty", [1.3])
def test_repetition_penalty_equals_transformers_processor(llava, tok, penalty):
    ref, model = llava
    labeler = Labeler(model, tok, repetition_penalty=penalty, batch_size=4)
    rng = np.random.RandomState(2)
    items = [ImageQuestions(QUESTIONS[:4], rng.randn(1, 3, 28, 28).astype(np.float32))]
    got = check(ref, tok, labeler, items, penalty=penalty)
    plain = reference(ref, tok, labeler, QUESTIONS[0], items[0], model.num_image_tokens(), "llava_v1")
    assert abs(got[0][0][0] - plain[0]) > 10 * TOL  # the penalty matters (yes and no are in the prompt)


def test_chat_template_labeler(llava, tok):
    ref, model = llava
    labeler = Labeler(model, tok, template="chat", batch_size=4)
    assert labeler.answer_ids["yes"] == tok.convert_tokens_to_ids("yes")
    px = np.random.RandomState(3).randn(1, 3, 28, 28).astype(np.float32)
    item = ImageQuestions(QUESTIONS[:3], px)
    before = check(ref, tok, labeler, [item], template="chat")
    programs = labeler.programs()
    norm = model.language_model.norm.weight  # the labeler follows weight updates (self-feedback)
    old = norm[...]
    try:
        norm[...] = old * 3.0
        after = labeler.score([item])
    finally:
        norm[...] = old
    assert not np.allclose(before, after, atol=1e-4) and labeler.programs() == programs
    assert labeler.score([item]) == before


def test_llava_next_mixed_sizes(llava_next, tok):
    ref, model = llava_next
    labeler = Labeler(model, tok, batch_size=4, prefix_multiple=32)
    rng = np.random.RandomState(4)
    items = []
    for size, qs in [((28, 28), QUESTIONS[:5]), ((30, 50), QUESTIONS[3:4]), ((60, 20), QUESTIONS[1:4])]:
        tiles = anyres.num_patches(size, tiny_hf.PINPOINTS, 28)
        items.append(ImageQuestions(qs, rng.randn(1, tiles, 3, 28, 28).astype(np.float32), np.asarray([size])))
    check(ref, tok, labeler, items)


def test_wrong_image_token_count_raises_model_error(llava, tok):
    _, model = llava
    labeler = Labeler(model, tok)
    two_images = np.zeros((2, 3, 28, 28), np.float32)  # 8 features for a prompt with 4 placeholders
    with pytest.raises(ValueError, match="hold 4 image tokens .* give 8 features"):
        labeler.score([ImageQuestions(QUESTIONS[:1], two_images)])


def test_yes_no_overrides_and_bad_word(llava, tok):
    _, model = llava
    ids = {"yes": 10, "Yes": 11, "no": 12, "No": 13}
    assert Labeler(model, tok, yes_no_ids=ids).answer_ids == ids
    with pytest.raises(ValueError, match="overrides"):
        Labeler(model, tok, word_prefix=" maybe ")
