"""Qwen3-VL parity with transformers (float32) on two tiny random layouts (``tiny_qwen.QWEN3``: they
differ in DeepStack blocks, position-table side, M-RoPE sections and tied embeddings): logits of a
left-padded batch with two images of different, non-square grids, vision + DeepStack features,
M-RoPE positions, cached greedy decoding, export round trip."""
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import AutoModelForImageTextToText, Qwen3VLConfig, Qwen3VLForConditionalGeneration

import tiny_qwen as tq
from rlaifv_jax.core import sharding
from rlaifv_jax.models import hf, qwen2_5_vl
from rlaifv_jax.models.qwen3_vl import Qwen3VL, Qwen3VLConfig as OurConfig

TOL = 1e-4
DIFFS: dict[str, float] = {}  # recorded figures (printed at the end of the module with -s)
ARCH_DIR = os.path.join(os.path.dirname(__file__), "..", "configs", "arch")
IMAGE, START, END = tq.IMAGE, tq.START, tq.END


@pytest.fixture(scope="module", params=["a", "b"])
def models(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(f"qwen3_{request.param}")
    ref = tq.model3(path, request.param)
    return request.param, ref, hf.load_pretrained(str(path)), path


@pytest.fixture(scope="module")
def images():
    """160x96 px → 10x6 patches and 96x192 px → 6x12 patches (both non-square, different sizes)."""
    return [tq.encode3(tq.image(h, w, seed=i)) for i, (h, w) in enumerate(((150, 100), (84, 196)))]


_row = functools.partial(tq.prompt_ids, image=IMAGE, start=START, end=END, words=(0, 60))
_batch = functools.partial(tq.left_padded, pad=tq.EOS)


def _hf(ref, ids, mask, px, grid):
    t = torch.tensor
    with torch.no_grad():
        return ref(input_ids=t(ids), attention_mask=t(mask), pixel_values=t(px), image_grid_thw=t(grid),
                   mm_token_type_ids=t((ids == IMAGE).astype(np.int64))).logits.numpy()


def _ours(model, ids, mask, px, grid):
    """The engine's way: host layout and positions, one jitted forward (feature packing inside)."""
    graphdef, state = nnx.split(model)
    pos, _ = model.position_ids(ids, mask, grid)
    inputs = model.vision_inputs(px, grid)
    n = model.num_image_tokens(grid)

    @jax.jit
    def fwd(state, ids, inputs, positions, mask):
        m = nnx.merge(graphdef, state)
        x = m.embed(ids, m.tile_features(inputs)[:n])
        hidden, _ = m.forward_embeds(x, positions=positions, key_mask=mask)
        return m.logits(hidden)
    return np.asarray(fwd(state, jnp.asarray(ids), inputs, pos, jnp.asarray(mask, bool)))


def _diff(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


def test_two_images_logits_features_positions(models, images):
    variant, ref, model, _ = models
    (px_a, grid_a), (px_b, grid_b) = images
    assert grid_a[0, 1] != grid_a[0, 2] and grid_b[0, 1] != grid_b[0, 2] and (grid_a != grid_b).any()
    rng = np.random.RandomState(2)
    ids, mask = _batch([_row(rng, [grid_a[0]], text=(3, 2, 2)), _row(rng, [grid_b[0], grid_a[0]])])
    px, grid = np.concatenate([px_a, px_b, px_a]), np.concatenate([grid_a, grid_b, grid_a])
    t = torch.tensor
    # vision: main and DeepStack features side by side
    with torch.no_grad():
        out = ref.model.get_image_features(t(px), t(grid))
    want = np.concatenate([torch.cat(out.pooler_output).numpy()]
                          + [torch.cat(f).numpy() for f in out.deepstack_features], axis=-1)
    feats = np.asarray(tq.image_features(model, px, grid))
    assert feats.shape == (model.num_image_tokens(grid), model.feature_size) == want.shape
    DIFFS[f"{variant} vision+deepstack features"] = _diff(feats, want)
    assert DIFFS[f"{variant} vision+deepstack features"] <= TOL
    want_pos, want_delta = ref.model.get_rope_index(t(ids), t((ids == IMAGE).astype(np.int64)), t(grid),
                                                    attention_mask=t(mask))
    pos, delta = model.position_ids(ids, mask, grid)
    np.testing.assert_array_equal(pos, want_pos.numpy())
    np.testing.assert_array_equal(delta, want_delta.numpy()[:, 0])
    real = mask.astype(bool)
    DIFFS[f"{variant} logits (2 rows, 3 images)"] = _diff(_ours(model, ids, mask, px, grid)[real],
                                                          _hf(ref, ids, mask, px, grid)[real])
    assert DIFFS[f"{variant} logits (2 rows, 3 images)"] <= TOL


def test_cached_greedy_decode_matches_generate(models, images):
    """Prefill (DeepStack carried in the embeddings) at ``position_ids``; decode plain text at
    ``real tokens before + rope_deltas``: transformers' greedy tokens."""
    _, ref, model, _ = models
    px, grid = images[1]
    ids, mask = _batch([_row(np.random.RandomState(3), [grid[0]])])
    steps, t = 6, torch.tensor
    with torch.no_grad():
        want = ref.generate(input_ids=t(ids), attention_mask=t(mask), pixel_values=t(px), image_grid_thw=t(grid),
                            mm_token_type_ids=t((ids == IMAGE).astype(np.int64)), max_new_tokens=steps,
                            do_sample=False, min_new_tokens=steps)[0, ids.shape[1]:].numpy()
    tokens = tq.cached_greedy(model, ids, mask, grid, tq.image_features(model, px, grid), steps)
    np.testing.assert_array_equal(tokens, want)


def test_export_reloads_with_the_same_logits(models, images, tmp_path):
    variant, ref, model, _ = models
    assert (model.language_model.lm_head is None) == ref.config.tie_word_embeddings
    hf.save_pretrained(model, str(tmp_path / "export"))
    back = AutoModelForImageTextToText.from_pretrained(str(tmp_path / "export")).eval()
    assert isinstance(back, Qwen3VLForConditionalGeneration)
    px, grid = images[0]
    ids, mask = _batch([_row(np.random.RandomState(4), [grid[0]])])
    want = _hf(ref, ids, mask, px, grid)
    DIFFS[f"{variant} export reload logits"] = _diff(_hf(back, ids, mask, px, grid), want)
    assert DIFFS[f"{variant} export reload logits"] <= 1e-6
    again = hf.load_pretrained(str(tmp_path / "export"))
    assert _diff(_ours(again, ids, mask, px, grid), want) <= TOL


@pytest.mark.parametrize("sections", [(2, 3, 3), (24, 20, 20), (2, 1, 1)])
def test_interleaved_mrope_axes_follow_transformers(sections):
    """The axis of each frequency, read off transformers' own recomposition of marker frequencies."""
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextRotaryEmbedding
    from transformers.models.qwen3_vl.configuration_qwen3_vl import Qwen3VLTextConfig
    half = sum(sections)
    rope = Qwen3VLTextRotaryEmbedding(Qwen3VLTextConfig(head_dim=2 * half, rope_parameters={
        "rope_type": "default", "mrope_section": list(sections), "rope_theta": 10000.0}))
    marker = torch.arange(3, dtype=torch.float32)[:, None, None, None].expand(3, 1, 1, half).clone()
    want = rope.recomposition_frequencies(marker)[0, 0, :half].numpy()
    np.testing.assert_array_equal(qwen2_5_vl.mrope_axes(sections, interleaved=True), want)


def test_bad_configs_and_inputs_name_the_problem(models, images):
    _, _, model, path = models
    cfg = json.loads((path / "config.json").read_text())
    bad = {**cfg, "vision_config": {**cfg["vision_config"], "deepstack_visual_indexes": [2, 0]}}
    with pytest.raises(ValueError, match="must be increasing blocks"):
        OurConfig.from_hf(bad)
    bad = {**cfg, "vision_config": {**cfg["vision_config"], "num_position_embeddings": 15}}
    with pytest.raises(ValueError, match="not a square"):
        OurConfig.from_hf(bad)
    px, grid = images[0]
    with pytest.raises(ValueError, match=r"do not match image_grid_thw"):
        model.image_features(px[:-1], grid)
    with pytest.raises(ValueError, match="embeddings of width 40"):
        model.forward_embeds(jnp.zeros((1, 2, 40)), positions=jnp.zeros((1, 2), jnp.int32),
                             key_mask=jnp.ones((1, 2), bool))


def test_zz_report_diffs():
    """Prints the recorded parity figures (run with -s)."""
    print("\nQwen3-VL parity (max abs diff, float32):")
    for k, v in sorted(DIFFS.items()):
        print(f"  {k}: {v:.3g}")


@pytest.mark.parametrize("size, layers, tied, deepstack",
                         [("8b", 36, False, (8, 16, 24)), ("2b", 28, True, (5, 11, 17))])
def test_hub_architecture_configs(size, layers, tied, deepstack):
    with open(os.path.join(ARCH_DIR, f"qwen3-vl-{size}-instruct", "config.json")) as f:
        cfg = json.load(f)
    config = OurConfig.from_hf(cfg)
    ref = Qwen3VLConfig(**cfg)
    t, v = config.text, config.vision
    assert (t.num_hidden_layers, t.tie_word_embeddings, t.qk_norm, t.attention_bias) == (layers, tied, True, False)
    assert (t.hidden_size, t.num_key_value_heads, t.head_dim, t.rope_theta) == (
        ref.text_config.hidden_size, ref.text_config.num_key_value_heads, ref.text_config.head_dim, 5e6)
    assert config.mrope_section == tuple(ref.text_config.rope_parameters["mrope_section"]) == (24, 20, 20)
    assert v.deepstack_visual_indexes == tuple(ref.vision_config.deepstack_visual_indexes) == deepstack
    assert (v.patch_dim, v.grid_side, v.out_hidden_size) == (1536, 48, t.hidden_size)
    assert OurConfig.from_hf(config.to_hf()) == config
    # Every parameter has logical axes that shard on a mesh, and the count equals transformers' (a
    # short decoder and tower keep it quick; the DeepStack blocks stay inside the short tower).
    short = {**cfg, "text_config": {**cfg["text_config"], "num_hidden_layers": 4},
             "vision_config": {**cfg["vision_config"], "depth": 3, "deepstack_visual_indexes": [0, 1, 2]}}
    params = nnx.state(nnx.eval_shape(lambda: Qwen3VL(OurConfig.from_hf(short), rngs=nnx.Rngs(0))), nnx.Param)
    flat = [v for _, v in nnx.to_flat_state(params)]
    assert all(len(v.axes) == v.get_value().ndim for v in flat)
    sharding.state_shardings(params, sharding.make_mesh(fsdp=4, tensor=2))
    with torch.device("meta"):
        ref_model = Qwen3VLForConditionalGeneration(Qwen3VLConfig(**short))
    assert sum(v.get_value().size for v in flat) == sum(p.numel() for p in ref_model.parameters())
