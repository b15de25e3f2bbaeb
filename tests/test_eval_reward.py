"""Best-of-N's rewards: the implicit reward's formula against NumPy and its teacher-forced log-probs against
transformers (LLaVA, Qwen2.5-VL); the claim-verification reward against the labeler's transformers forwards."""
import numpy as np
import pytest
import torch

import tiny_hf
import tiny_qwen
from rlaifv_jax.data import chat
from rlaifv_jax.data.yesno import NO_WORDS, YES_WORDS
from rlaifv_jax.engine import reward
from rlaifv_jax.engine.score import Labeler
from rlaifv_jax.eval.policy import best_index
from rlaifv_jax.eval.questions import Question
from rlaifv_jax.feedback.claim_reward import ClaimReward
from rlaifv_jax.feedback.claims import LLMClaimExtractor, parse_bullets
from rlaifv_jax.models import hf


def test_implicit_reward_formula():
    rng = np.random.default_rng(0)
    pol, ref = rng.normal(-20, 5, 16), rng.normal(-20, 5, 16)
    lengths = rng.integers(1, 40, 16)
    want = np.array([0.1 / t * (p - r) for p, r, t in zip(pol, ref, lengths)])
    np.testing.assert_allclose(reward.implicit_reward(pol, ref, lengths, 0.1), want, rtol=1e-12)
    # length normalisation: the same per-token margin gives the same reward at any length
    np.testing.assert_allclose(reward.implicit_reward([-3.0, -30.0], [-4.0, -40.0], [3, 30], 0.5), [1 / 6, 1 / 6])
    with pytest.raises(ValueError, match="at least one token"):
        reward.implicit_reward([0.0], [0.0], [0], 0.1)


def test_sequence_logps_equals_transformers(tmp_path):
    ref = tiny_hf.llava(tmp_path, text={"initializer_range": 0.2})
    model = hf.load_pretrained(str(tmp_path))
    rng = np.random.RandomState(1)
    ids = [1] + rng.randint(3, 90, 7).tolist()
    ids[2:2] = [tiny_hf.IMAGE_TOKEN] * model.num_image_tokens()
    prompt = {"input_ids": ids, "pixel_values": rng.randn(1, 3, 28, 28).astype(np.float32)}
    answers = [rng.randint(3, 90, n).tolist() + [2] for n in (1, 6, 3, 9, 4)]
    sums, counts = reward.sequence_logps(model, prompt, answers, batch_size=2)
    assert counts.tolist() == [len(a) for a in answers]
    for a, got in zip(answers, sums):
        full = torch.tensor([ids + a])
        logits = ref(input_ids=full, pixel_values=torch.tensor(prompt["pixel_values"])).logits[0].float()
        logp = torch.log_softmax(logits[len(ids) - 1:-1], -1)[torch.arange(len(a)), torch.tensor(a)].sum()
        np.testing.assert_allclose(got, logp.item(), rtol=1e-5, atol=1e-4)


def test_sequence_logps_equals_transformers_on_qwen(tmp_path):
    """Qwen2.5-VL: the answers continue the prompt's multimodal positions (rope delta of a 6x14 grid)."""
    ref = tiny_qwen.model(tmp_path, text={"initializer_range": 0.2})
    model = hf.load_pretrained(str(tmp_path))
    px, grid = tiny_qwen.encode(tiny_qwen.image(84, 196, 3))
    rng = np.random.RandomState(2)
    ids = [1] + rng.randint(3, 80, 6).tolist()
    ids[2:2] = [tiny_qwen.START] + [tiny_qwen.IMAGE] * model.num_image_tokens(grid) + [tiny_qwen.END]
    prompt = {"input_ids": ids, "pixel_values": px, "image_grid_thw": grid}
    answers = [rng.randint(3, 80, n).tolist() + [tiny_qwen.IM_END] for n in (2, 7, 4)]
    sums, counts = reward.sequence_logps(model, prompt, answers, batch_size=2)
    assert counts.tolist() == [len(a) for a in answers]
    for a, got in zip(answers, sums):
        full = torch.tensor([ids + a])
        with torch.no_grad():
            logits = ref(input_ids=full, pixel_values=torch.tensor(px), image_grid_thw=torch.tensor(grid),
                         mm_token_type_ids=(full == tiny_qwen.IMAGE).long()).logits[0].double()
        logp = torch.log_softmax(logits[len(ids) - 1:-1], -1)[torch.arange(len(a)), torch.tensor(a)].sum()
        np.testing.assert_allclose(got, logp.item(), rtol=1e-5, atol=1e-4)


def _split(prompts):  # a stand-in split LLM: one bulleted fact per sentence of the answer
    return ["### Facts:\n" + "".join(f"- {f.strip()}\n" for f in p.split("\nAnswer: ")[1].split(".") if f.strip())
            for p in prompts]


def _convert(prompts):  # a stand-in convert LLM: the fact's words as the question, "w0" facts dropped
    return ["".join(f"- {f}\n" for f in parse_bullets(p.split("### Declarative sentences:")[1]) if "w0" not in f)
            for p in prompts]


def test_claim_reward_is_minus_rejected_claims(tmp_path):
    """``--reward labeler``: claims through the LLM extractor (stand-in LLMs), a tiny Qwen2.5-VL labeler
    (p_yes/p_no against full transformers forwards), reward −(rejected claims), None without claims."""
    ref = tiny_qwen.model(tmp_path, seed=2, text={"initializer_range": 0.5})
    model, tok = hf.load_pretrained(str(tmp_path)), tiny_qwen.tokenizer()
    images = [tiny_qwen.image(84, 84, 4), tiny_qwen.image(56, 112, 5)]
    texts = [["w1 w2 . w3 the image . w4", "", "w5 . w0 w6"], ["w7 w8 w9 .", "w10 . w11 w12 . w13 . w14 w15"]]
    questions = [Question(str(i), "describe the image .", None) for i in range(2)]
    score = ClaimReward(LLMClaimExtractor(_split, _convert), Labeler(model, tok, template="chat", batch_size=2).score,
                        tiny_qwen.encode, "image_grid_thw")
    got = score(questions, [{"image": im} for im in images], [{"texts": t} for t in texts])
    assert [[s["status"] for s in q] for q in got] == [["ok", "no_claims", "count_mismatch"], ["ok", "ok"]]
    assert [len(s["questions"]) for s in got[0] + got[1]] == [3, 0, 0, 1, 4]
    rejected = 0
    for image, per_question in zip(images, got):
        px, grid = tiny_qwen.encode(image)
        for s in per_question:
            want_yes, want_no = [], []
            for q in s["questions"]:
                ids = chat.encode_prompt(tok, chat.labeler_question(q), model.num_image_tokens(grid),
                                         image_token_id=tiny_qwen.IMAGE, template="chat")
                with torch.no_grad():
                    logits = ref(input_ids=torch.tensor(ids[None]), pixel_values=torch.tensor(px),
                                 image_grid_thw=torch.tensor(grid),
                                 mm_token_type_ids=torch.tensor((ids[None] == tiny_qwen.IMAGE).astype(np.int64))
                                 ).logits[0, -1].double()
                probs = torch.softmax(logits, -1).numpy()
                want_yes.append(sum(probs[tiny_qwen.VOCAB[w]] for w in YES_WORDS))
                want_no.append(sum(probs[tiny_qwen.VOCAB[w]] for w in NO_WORDS))
            np.testing.assert_allclose(s["p_yes"], want_yes, rtol=2e-5, atol=1e-6)  # float32 through two codes
            np.testing.assert_allclose(s["p_no"], want_no, rtol=2e-5, atol=1e-6)
            n_rejected = sum(py <= pn for py, pn in zip(want_yes, want_no))
            rejected += n_rejected
            assert s["reward"] == (-float(n_rejected) if s["status"] == "ok" else None)
    assert 0 < rejected < 8  # both verdicts occur among the 8 claims
    assert best_index([None, -1.0, 0.0, 0.0]) == 2 and best_index([None, None]) == 0
