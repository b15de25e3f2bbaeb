"""Beam search equals transformers' ``generate(num_beams=k, do_sample=False)`` token for token
(Llama, LLaVA, and Qwen2.5-VL with images of different sizes at its multimodal positions)."""
import numpy as np
import pytest
import torch

import tiny_hf
import tiny_qwen
from rlaifv_jax.engine import beam
from rlaifv_jax.models import hf

IMG = tiny_hf.IMAGE_TOKEN
BUILD = {"llama": tiny_hf.llama, "llava": lambda path, **kw: tiny_hf.llava(path, text=kw),
         "qwen": lambda path, **kw: tiny_qwen.model(path, text=kw)}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    out = {}
    # A wider init makes next-token distributions peaked enough that beams finish at stop tokens.
    for name, build in BUILD.items():
        path = tmp_path_factory.mktemp(name)
        out[name] = (build(path, initializer_range=0.3), hf.load_pretrained(str(path)))
    return out


def _prompts(name, model, lengths, seed=0):
    rng = np.random.RandomState(seed)
    prompts = []
    for i, n in enumerate(lengths):
        ids = [1] + rng.randint(3, 80 if name == "qwen" else 90, n - 1).tolist()  # words, not special tokens
        p = {"input_ids": ids}
        if name == "llava":
            p["pixel_values"] = rng.randn(1, 3, 28, 28).astype(np.float32)
            ids[2:2] = [IMG] * model.num_image_tokens()
        if name == "qwen":  # 10x8, 6x14, 4x4 and 6x6 patch grids
            size = [(150, 100), (84, 196), (56, 56), (84, 84)][i % 4]
            p["pixel_values"], p["image_grid_thw"] = tiny_qwen.encode(tiny_qwen.image(*size, seed=i))
            ids[2:2] = [tiny_qwen.START] + [tiny_qwen.IMAGE] * model.num_image_tokens(p["image_grid_thw"]) + [tiny_qwen.END]
        prompts.append(p)
    return prompts


def _hf_beam(ref, prompt, k, max_new, stop, **kw):
    ids = torch.tensor([prompt["input_ids"]])
    extra = {key: torch.tensor(prompt[key]) for key in ("pixel_values", "image_grid_thw") if key in prompt}
    if "image_grid_thw" in prompt:
        extra["mm_token_type_ids"] = (ids == tiny_qwen.IMAGE).long()
    out = ref.generate(input_ids=ids, max_new_tokens=max_new, num_beams=k,
                       do_sample=False, eos_token_id=list(stop), pad_token_id=0, output_scores=True,
                       return_dict_in_generate=True, **kw, **extra)
    seq = out.sequences[0, len(prompt["input_ids"]):].tolist()
    cut = [i for i, t in enumerate(seq) if t in stop]
    score = float(out.sequences_scores[0]) if k > 1 else float("nan")
    return (seq[:cut[0]] if cut else seq), bool(cut), score


@pytest.mark.parametrize("name", list(BUILD))
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
        beam.BeamSettings(num_beams=0, max_new_tokens=4)
    with pytest.raises(ValueError, match="early_stopping"):
        beam.BeamSettings(num_beams=2, max_new_tokens=4, early_stopping="never")
