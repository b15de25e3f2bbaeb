"""Beam search equals transformers' ``generate(num_beams=k, do_sample=False)`` token for token."""
import numpy as np
import pytest
import torch

import tiny_hf
from rlaifv_jax.engine import beam
from rlaifv_jax.models import hf

IMG = tiny_hf.IMAGE_TOKEN


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    out = {}
    # A wider init makes next-token distributions peaked enough that beams finish at stop tokens.
    for name, build in [("llama", tiny_hf.llama), ("llava", tiny_hf.llava)]:
        path = tmp_path_factory.mktemp(name)
        kw = {"initializer_range": 0.3}
        ref = build(path, **kw) if name == "llama" else build(path, text=kw)
        out[name] = (ref, hf.load_pretrained(str(path)))
    return out


def _prompts(name, model, lengths, seed=0):
    rng = np.random.RandomState(seed)
    prompts = []
    for n in lengths:
        ids = [1] + rng.randint(3, 90, n - 1).tolist()
        p = {"input_ids": ids}
        if name == "llava":
            p["pixel_values"] = rng.randn(1, 3, 28, 28).astype(np.float32)
            ids[2:2] = [IMG] * model.num_image_tokens()
        prompts.append(p)
    return prompts


def _hf_beam(ref, prompt, k, max_new, stop, **kw):
    extra = {"pixel_values": torch.tensor(prompt["pixel_values"])} if "pixel_values" in prompt else {}
    out = ref.generate(input_ids=torch.tensor([prompt["input_ids"]]), max_new_tokens=max_new, num_beams=k,
                       do_sample=False, eos_token_id=list(stop), pad_token_id=0, output_scores=True,
                       return_dict_in_generate=True, **kw, **extra)
    seq = out.sequences[0, len(prompt["input_ids"]):].tolist()
    cut = [i for i, t in enumerate(seq) if t in stop]
    score = float(out.sequences_scores[0]) if k > 1 else float("nan")
    return (seq[:cut[0]] if cut else seq), bool(cut), score


@pytest.mark.parametrize("name", ["llama", "llava"])
def test_beam_search_equals_transformers(models, name):
    ref, model = models[name]
    prompts = _prompts(name, model, [4, 9, 15, 6])
    max_new = 12
    stops = []
    for p in prompts:  # an extra stop id: a token the greedy answers emit early, so beams finish early
        stops += _hf_beam(ref, p, 1, max_new, [2])[0][2:3]
    extra = max(set(stops), key=stops.count)
    cases = [(3, [2, extra], {}), (3, [2], {"length_penalty": 0.5}),
             (3, [2, extra], {"length_penalty": 2.0, "early_stopping": True})]
    if name == "llama":
        cases += [(1, [2, extra], {})]  # one beam: transformers' greedy search
    finished_early = 0
    for k, stop, kw in cases:
        got = beam.beam_search(model, prompts, num_beams=k, max_new_tokens=max_new, stop_token_ids=stop,
                               batch_size=2, buckets=[64], progress=False, **kw)
        for prompt, out in zip(prompts, got):
            want, stopped, score = _hf_beam(ref, prompt, k, max_new, stop, **kw)
            assert out["tokens"] == [want], (k, stop, kw)
            assert out["stopped"] == [stopped], (k, stop, kw)
            if k > 1:
                np.testing.assert_allclose(out["score"], score, rtol=1e-4, atol=1e-5)
            finished_early += stopped
    assert finished_early >= 3  # the stop/finish bookkeeping was exercised


def test_bad_options():
    with pytest.raises(ValueError, match="num_beams"):
        beam.BeamConfig(num_beams=0, max_new_tokens=4)
    with pytest.raises(ValueError, match="early_stopping"):
        beam.BeamConfig(num_beams=2, max_new_tokens=4, early_stopping="never")
