"""Best-of-N's implicit reward: the formula against NumPy, the teacher-forced log-probs against transformers."""
import numpy as np
import pytest
import torch

import tiny_hf
from rlaifv_jax.engine import reward
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
