"""LLaVA-NeXT policies in DPO: anyres pair log-probs vs transformers, one program for every image size, export."""
import io
import math

import jax
import numpy as np
import pytest
import torch
from PIL import Image
from transformers import LlavaNextForConditionalGeneration

import tiny_hf
from rlaifv_jax.data import buckets
from rlaifv_jax.data.pairs import PreferenceRecord, pair_example_fn
from rlaifv_jax.engine import logps
from rlaifv_jax.models import anyres, hf
from rlaifv_jax.training import step as step_lib

LENGTH = 64
MAX_TILES = 5  # tiny pinpoints: up to 2 x 2 crops + the base tile


def pair(model, rng, size):
    """One pair example for an image of ``size`` (height, width), through ``pair_example_fn``: the image
    function stands in for the NeXT image processor (random tiles) and packs with ``anyres``."""
    kw = model.anyres_kwargs()

    def image_fn(im):
        hw = (im.height, im.width)
        pack = anyres.pack_indices(hw, **kw)
        newline = anyres.num_patches(hw, kw["grid_pinpoints"], kw["vision_image_size"]) * model.config.tokens_per_tile
        tiles = np.random.default_rng(list(hw)).standard_normal((MAX_TILES, 3, 28, 28)).astype(np.float32)
        return {"pixel_values": tiles, buckets.IMAGE_PACK_KEY: np.where(pack == newline, buckets.PACK_NEWLINE, pack)}

    buf = io.BytesIO()
    Image.new("RGB", size[::-1]).save(buf, format="PNG")
    prompt = [1, *rng.integers(4, 90, 2), *[tiny_hf.IMAGE_TOKEN] * model.num_image_tokens(size), *rng.integers(4, 90, 3)]
    answers = {name: [*rng.integers(4, 90, int(rng.integers(2, LENGTH - len(prompt) - 1))), 2] for name in ("chosen", "rejected")}
    record = PreferenceRecord("q", "c", "r", buf.getvalue(), str(size), features={
        "prompt_ids": np.asarray(prompt, np.int32), **{f"{k}_ids": np.asarray(v, np.int32) for k, v in answers.items()}})
    return pair_example_fn(image_fn, max_length=LENGTH, pad_id=0)(record)


def torch_logps(ref, ex, size):
    out = {}
    for name in ("chosen", "rejected"):
        tokens, start, k = ex[f"{name}_tokens"], int(ex["answer_start"]), int(ex[f"{name}_len"])
        with torch.no_grad():
            logits = ref(input_ids=torch.tensor(tokens[None, : start + k], dtype=torch.long),
                         pixel_values=torch.tensor(ex["pixel_values"][None]), image_sizes=torch.tensor([size])).logits
        logp = torch.log_softmax(logits[0].double(), -1)[start - 1: start + k - 1]
        out[name] = float(logp.gather(-1, torch.tensor(tokens[start: start + k], dtype=torch.long)[:, None]).sum())
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("next")
    return str(path), tiny_hf.llava_next(path)


def test_next_pair_logps_match_transformers_and_train(tiny, tmp_path):
    path, ref = tiny
    model = hf.load_pretrained(path)
    rng = np.random.default_rng(0)
    sizes = [(30, 50), (50, 30), (28, 28), (57, 29)]
    examples = [pair(model, rng, s) for s in sizes]
    batch = buckets.collate()(examples)
    got = jax.jit(lambda b: logps.pair_logps(model, b))(batch)
    for i, size in enumerate(sizes):
        want = torch_logps(ref, examples[i], size)
        for name in ("chosen", "rejected"):
            np.testing.assert_allclose(float(got[name][i]), want[name], atol=1e-4, rtol=0, err_msg=f"{size} {name}")
    bad = dict(batch, image_pack=batch["image_pack"][::-1])  # packing of other images: refused
    with pytest.raises(ValueError, match="packed image rows differ"):
        logps.pair_logps(model, bad)

    # a few DPO steps; batches of other image sizes reuse the one program
    opt = step_lib.OptimSettings(learning_rate=1e-3, total_steps=10, warmup_ratio=0.0)
    dpo = step_lib.DPOStep(model, opt)
    state = dpo.init_state(0)
    first = batch | logps.reference_logps(model, [batch])
    other = buckets.collate()([pair(model, rng, s) for s in [(13, 7), (100, 40), (40, 100), (29, 57)]])
    other = other | logps.reference_logps(model, [other])
    losses = []
    for b in (first, other, first, other):
        state, m = dpo(state, b)
        losses.append(float(m["loss"]))
    assert abs(losses[0] - math.log(2)) < 1e-5 and losses[2] < losses[0] and losses[3] < losses[1]
    assert dpo.compiles == 1
    assert any(k.startswith("image_newline") for k in state["params"])

    # the trained policy exports to a checkpoint transformers loads, with the same log-probs
    trained = dpo.model(state)
    hf.save_pretrained(trained, str(tmp_path / "export"))
    reloaded = LlavaNextForConditionalGeneration.from_pretrained(str(tmp_path / "export")).eval()
    after = jax.jit(lambda b: logps.pair_logps(trained, b))(batch)
    want = torch_logps(reloaded, examples[0], sizes[0])
    np.testing.assert_allclose(float(after["chosen"][0]), want["chosen"], atol=1e-4, rtol=0)
    assert abs(float(after["chosen"][0]) - float(got["chosen"][0])) > 1e-3  # training moved it
