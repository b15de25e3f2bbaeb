"""Labeler pieces that need no model: verdict rule, yes/no token ids, yes/no probabilities."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

import tiny_hf
from rlaifv_jax.data.yesno import answer_forms, resolve_answer_ids, yes_no_token_ids
from rlaifv_jax.engine.score import yes_no_probs
from rlaifv_jax.feedback.verdicts import accept_claim

IDS = {"yes": 3, "Yes": 7, "no": 11, "No": 2}


def word_tokenizer(words):
    """``words`` at ids 1, 2, ... after ``[UNK]``."""
    return tiny_hf.word_level({w: i for i, w in enumerate(["[UNK]"] + words)}, "[UNK]")


def test_accept_claim_ties_reject():
    assert accept_claim(0.6, 0.4)
    assert not accept_claim(0.4, 0.6)
    assert not accept_claim(0.5, 0.5)


def test_yes_no_token_ids_from_tokenizer():
    tok = word_tokenizer(["USER", "ASSISTANT", ":", "No", "yes", "Yes", "no", "hmm"])
    ids = yes_no_token_ids(tok, "USER: is it ? ASSISTANT:")
    assert ids == {"yes": 5, "Yes": 6, "no": 7, "No": 4}
    assert yes_no_token_ids(tok, "USER: ASSISTANT:", word_prefix=" ") == ids
    assert yes_no_token_ids(tok, "ASSISTANT:", overrides={"No": 99})["No"] == 99
    assert yes_no_token_ids(None, "", overrides={"yes": 1, "Yes": 2, "no": 3, "No": 4}) == {
        "yes": 1, "Yes": 2, "no": 3, "No": 4}


def test_yes_no_token_ids_errors_name_word_and_config():
    tok = word_tokenizer(["ASSISTANT", ":", "yes", "Yes", "no"])  # no "No"
    with pytest.raises(ValueError, match=r"'No'.*unknown token.*overrides"):
        yes_no_token_ids(tok, "ASSISTANT:")
    full = word_tokenizer(["ASSISTANT", ":", "yes", "Yes", "no", "No", "hmm"])
    with pytest.raises(ValueError, match=r"'hmm yes' .* 2 tokens"):
        yes_no_token_ids(full, "ASSISTANT:", word_prefix="hmm ")
    with pytest.raises(ValueError, match="merges with the end"):
        yes_no_token_ids(full, "ASSISTANT")  # "ASSISTANTyes" is one (unknown) word
    with pytest.raises(ValueError, match="unknown words"):
        yes_no_token_ids(full, "ASSISTANT:", overrides={"YES": 1})


def test_answer_prefix_auto_tries_the_template_prefix_then_the_other():
    tok = word_tokenizer(["ASSISTANT", ":", "yes", "Yes", "no", "No"])
    ids = {"yes": 3, "Yes": 4, "no": 5, "No": 6}
    assert resolve_answer_ids(tok, "ASSISTANT:", template_prefix=" ") == (ids, " ")
    # "ASSISTANTyes" is one (unknown) word: the template's "" fails, " " reads the answer
    assert resolve_answer_ids(tok, "ASSISTANT", template_prefix="") == (ids, " ")
    with pytest.raises(ValueError, match="merges with the end"):
        resolve_answer_ids(tok, "ASSISTANT", template_prefix="", answer_prefix="")  # explicit: no fallback
    forms = answer_forms(tok, "ASSISTANT")
    assert forms["yes"] is None and forms[" Yes"] == [4] and len(forms) == 8


def test_unresolvable_labeler_answer_is_one_line_naming_tokenizer_and_forms():
    tok = word_tokenizer(["ASSISTANT", ":", "yes", "Yes", "no"])  # no "No"
    with pytest.raises(ValueError) as err:
        resolve_answer_ids(tok, "ASSISTANT:", template_prefix=" ")
    msg = str(err.value)
    assert "\n" not in msg and type(tok).__name__ in msg and "'No' -> [0]" in msg and "' yes' -> [3]" in msg
    assert "labeler.answer_prefix" in msg


def np_softmax(x):
    x = np.asarray(x, np.float64)
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_yes_no_probs_matches_numpy():
    logits = np.random.default_rng(0).normal(size=(3, 16)).astype(np.float32) * 3
    p_yes, p_no = jax.jit(lambda x: yes_no_probs(x, IDS))(logits)
    ref = np_softmax(logits)
    np.testing.assert_allclose(p_yes, ref[:, 3] + ref[:, 7], rtol=1e-5)
    np.testing.assert_allclose(p_no, ref[:, 11] + ref[:, 2], rtol=1e-5)


def test_yes_no_probs_float32_from_bf16_and_leading_dims():
    logits = jnp.asarray(np.random.default_rng(1).normal(size=(2, 3, 16)) * 4, jnp.bfloat16)
    p_yes, p_no = yes_no_probs(logits, IDS)
    assert p_yes.dtype == jnp.float32 and p_yes.shape == (2, 3)
    ref = np_softmax(np.asarray(logits.astype(jnp.float32)))
    np.testing.assert_allclose(p_no, ref[..., 11] + ref[..., 2], rtol=1e-5)


def test_same_token_for_both_spellings_counted_once():
    logits = np.zeros(4, np.float32)  # uniform: each token 0.25
    p_yes, p_no = yes_no_probs(logits, {"yes": 1, "Yes": 1, "no": 2, "No": 3})
    np.testing.assert_allclose([p_yes, p_no], [0.25, 0.5], rtol=1e-6)


@pytest.mark.parametrize("penalty", [1.1, 1.2])
def test_repetition_penalty_matches_transformers(penalty):
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(2, 16)).astype(np.float32) * 3
    logits[0, 3], logits[0, 11], logits[1, 7], logits[1, 2] = 2.0, -1.5, -0.5, 1.0  # both signs penalised
    prompt = np.array([[3, 11, 5, 3, 0], [7, 2, 2, 9, 12]])  # repeats are penalised once
    torch_scores = RepetitionPenaltyLogitsProcessor(penalty)(torch.tensor(prompt), torch.tensor(logits))
    ref = np_softmax(torch_scores.numpy())
    p_yes, p_no = yes_no_probs(logits, IDS, repetition_penalty=penalty, prompt_token_ids=prompt)
    np.testing.assert_allclose(p_yes, ref[:, 3] + ref[:, 7], rtol=1e-5)
    np.testing.assert_allclose(p_no, ref[:, 11] + ref[:, 2], rtol=1e-5)
    plain_yes, _ = yes_no_probs(logits, IDS)
    assert not np.allclose(p_yes, plain_yes)


def test_repetition_penalty_ignores_padding_ids():
    logits = np.random.default_rng(3).normal(size=(2, 16)).astype(np.float32)
    padded = np.array([[3, 2, -1, -1], [11, 7, 7, 5]])
    ref_rows = [RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor([[3, 2]]), torch.tensor(logits[:1])),
                RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor([[11, 7, 7, 5]]), torch.tensor(logits[1:]))]
    ref = np_softmax(torch.cat(ref_rows).numpy())
    p_yes, _ = yes_no_probs(logits, IDS, repetition_penalty=1.3, prompt_token_ids=padded)
    np.testing.assert_allclose(p_yes, ref[:, 3] + ref[:, 7], rtol=1e-5)
    with pytest.raises(ValueError, match="prompt_token_ids"):
        yes_no_probs(logits, IDS, repetition_penalty=1.3)
