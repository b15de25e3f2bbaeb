"""Qwen2.5-VL parity with transformers (float32, highest matmul precision) on a tiny random model:
logits, vision features, M-RoPE positions, cached greedy decoding, bucket padding, export."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from PIL import Image
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLImageProcessorPil

from rlaifv_jax.models import hf, qwen_vision
from rlaifv_jax.models.qwen2_5_vl import Qwen25VL, Qwen25VLConfig

TOL = 1e-4
IMAGE, START, END = 110, 111, 112
ARCH_DIR = os.path.join(os.path.dirname(__file__), "..", "configs", "arch")
# 56 px windows = 2 x 2 merged units: the test images span 6 and 8 windows, some partial; block 1 of 3
# attends fully, blocks 0 and 2 by window.
TEXT = dict(vocab_size=120, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, rope_parameters={"rope_type": "default", "mrope_section": [2, 1, 1],
                                                    "rope_theta": 10000.0})
VISION = dict(depth=3, hidden_size=32, intermediate_size=48, num_heads=4, out_hidden_size=32, window_size=56,
              fullatt_block_indexes=[1])


def _tiny(path, seed=0, **kw):
    """A random transformers Qwen2.5-VL saved to ``path`` (root-level size fields set as well)."""
    torch.manual_seed(seed)
    root = {k: v for k, v in TEXT.items() if k != "rope_parameters"}
    cfg = Qwen2_5_VLConfig(text_config=dict(TEXT), vision_config=dict(VISION), image_token_id=IMAGE,
                           vision_start_token_id=START, vision_end_token_id=END, **root, **kw)
    ref = Qwen2_5_VLForConditionalGeneration(cfg).eval()
    ref.save_pretrained(str(path))
    return ref


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen")
    ref = _tiny(path)
    return ref, hf.load_pretrained(str(path))


@pytest.fixture(scope="module")
def images():
    """Two images through the real processor: 150x100 px → 10x8 patches, 84x196 px → 6x14 patches."""
    rng = np.random.RandomState(0)
    proc = Qwen2VLImageProcessorPil(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 40)
    out = []
    for h, w in ((150, 100), (84, 196)):
        enc = proc(images=Image.fromarray(rng.randint(0, 255, (h, w, 3)).astype(np.uint8)), return_tensors="np")
        out.append((np.asarray(enc["pixel_values"]), np.asarray(enc["image_grid_thw"])))
    return out


def _row(rng, grids, text=(5, 7, 4)):
    """Text, then per image ``<|vision_start|> image tokens <|vision_end|>`` and more text."""
    ids = list(rng.randint(3, 100, text[0]))
    for i, g in enumerate(grids):
        ids += [START] + [IMAGE] * (int(np.prod(g)) // 4) + [END] + list(rng.randint(3, 100, text[1 + i % 2]))
    return ids


def _batch(rows):
    """Left-padded ids and mask."""
    width = max(map(len, rows))
    ids = np.array([[0] * (width - len(r)) + r for r in rows])
    mask = np.array([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def _hf(ref, ids, mask, px, grid):
    t = torch.tensor
    with torch.no_grad():
        return ref(input_ids=t(ids), attention_mask=t(mask), pixel_values=t(px), image_grid_thw=t(grid),
                   mm_token_type_ids=t((ids == IMAGE).astype(np.int64))).logits.numpy()


def _diff(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


def test_one_image_logits_features_positions(models, images):
    ref, model = models
    px, grid = images[0]
    cfg = model.config.vision
    assert qwen_vision.num_windows(grid, cfg) == 6 and 0 < len(cfg.fullatt_block_indexes) < cfg.depth
    ids, mask = _batch([_row(np.random.RandomState(1), [grid[0]])])
    with torch.no_grad():
        want_feats = ref.model.get_image_features(torch.tensor(px), torch.tensor(grid)).pooler_output[0].numpy()
    assert _diff(model.image_features(px, grid), want_feats) <= TOL
    assert _diff(model(jnp.asarray(ids), pixel_values=px, image_grid_thw=grid), _hf(ref, ids, mask, px, grid)) <= TOL


def test_two_images_of_different_sizes_in_a_left_padded_batch(models, images):
    ref, model = models
    (px_a, grid_a), (px_b, grid_b) = images
    rng = np.random.RandomState(2)
    ids, mask = _batch([_row(rng, [grid_a[0]], text=(3, 2, 2)), _row(rng, [grid_b[0], grid_a[0]])])
    px, grid = np.concatenate([px_a, px_b, px_a]), np.concatenate([grid_a, grid_b, grid_a])
    t = torch.tensor
    want_pos, want_delta = ref.model.get_rope_index(t(ids), t((ids == IMAGE).astype(np.int64)), t(grid),
                                                    attention_mask=t(mask))
    pos, delta = model.position_ids(ids, mask, grid)
    np.testing.assert_array_equal(pos, want_pos.numpy())
    np.testing.assert_array_equal(delta, want_delta.numpy()[:, 0])
    got = np.asarray(model(jnp.asarray(ids), pixel_values=px, image_grid_thw=grid, attention_mask=jnp.asarray(mask)))
    real = mask.astype(bool)
    assert _diff(got[real], _hf(ref, ids, mask, px, grid)[real]) <= TOL


def test_cached_greedy_decode_with_rope_deltas_matches_generate(models, images):
    """Prefill at ``position_ids``; decode at ``real tokens before + rope_deltas``: HF's greedy tokens."""
    ref, model = models
    px, grid = images[1]
    ids, mask = _batch([_row(np.random.RandomState(3), [grid[0]])])
    steps, t = 5, torch.tensor
    with torch.no_grad():
        want = ref.generate(input_ids=t(ids), attention_mask=t(mask), pixel_values=t(px), image_grid_thw=t(grid),
                            mm_token_type_ids=t((ids == IMAGE).astype(np.int64)), max_new_tokens=steps,
                            do_sample=False)[0, ids.shape[1]:].numpy()
    n = ids.shape[1]
    positions, deltas = model.position_ids(ids, mask, grid)
    key_mask = jnp.zeros((1, n + steps), bool).at[:, :n].set(True)
    x = model.embed(jnp.asarray(ids), model.image_features(px, grid))
    hidden, cache = model.forward_embeds(x, positions=positions, key_mask=key_mask, cache=model.init_cache(1, n + steps))
    tokens = [int(jnp.argmax(model.logits(hidden[:, -1])))]
    for i in range(steps - 1):
        slot = n + i
        key_mask = key_mask.at[:, slot].set(True)
        pos = jnp.asarray([[slot + deltas[0]]])
        hidden, cache = model.forward_embeds(model.embed(jnp.asarray([[tokens[-1]]])), positions=pos,
                                             key_mask=key_mask, cache=cache, cache_index=slot)
        tokens.append(int(jnp.argmax(model.logits(hidden[:, -1]))))
    np.testing.assert_array_equal(tokens, want)


def test_bucket_padding_is_invisible_and_compiles_once_per_bucket(models, images):
    _, model = models
    graphdef, state = nnx.split(model)
    traces = []

    @jax.jit
    def tile(state, inputs):
        traces.append(1)
        return nnx.merge(graphdef, state).tile_features(inputs)

    feats = {}
    for (px, grid), buckets in ((images[0], (8,)), (images[1], (8,)), (images[0], (2, 64))):
        inputs = model.vision_inputs(px, grid, buckets)
        assert inputs["slots"].shape[0] == qwen_vision.bucket(qwen_vision.num_windows(grid, model.config.vision),
                                                              buckets) * model.config.vision.window_slots
        feats[grid.tobytes(), buckets] = model.pack_tile_features(tile(state, inputs), None, grid)
    assert len(traces) == 2  # 6 and 8 windows share the 8-window program; 64 windows is another
    assert _diff(feats[images[0][1].tobytes(), (8,)], feats[images[0][1].tobytes(), (2, 64)]) <= 1e-6
    assert _diff(feats[images[0][1].tobytes(), (8,)], model.image_features(*images[0])) <= 1e-6


def test_export_round_trip_tied_embeddings(tmp_path, images):
    ref = _tiny(tmp_path / "src", seed=1, tie_word_embeddings=True)
    model = hf.load_pretrained(str(tmp_path / "src"))
    assert model.language_model.lm_head is None
    hf.save_pretrained(model, str(tmp_path / "export"))
    back = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(tmp_path / "export")).eval()
    px, grid = images[0]
    ids, mask = _batch([_row(np.random.RandomState(4), [grid[0]])])
    want = _hf(ref, ids, mask, px, grid)
    assert _diff(_hf(back, ids, mask, px, grid), want) <= 1e-6
    assert _diff(model(jnp.asarray(ids), pixel_values=px, image_grid_thw=grid), want) <= TOL


@pytest.mark.parametrize("size, layers, tied", [("7b", 28, False), ("3b", 36, True)])
def test_hub_architecture_configs(size, layers, tied):
    with open(os.path.join(ARCH_DIR, f"qwen2.5-vl-{size}-instruct", "config.json")) as f:
        cfg = json.load(f)
    config = Qwen25VLConfig.from_hf(cfg)
    ref = Qwen2_5_VLConfig(**cfg)
    t, v = config.text, config.vision
    assert (t.num_hidden_layers, t.tie_word_embeddings, t.attention_bias) == (layers, tied, True)
    assert (t.hidden_size, t.num_key_value_heads, t.rope_theta) == (ref.text_config.hidden_size,
                                                                     ref.text_config.num_key_value_heads, 1e6)
    assert config.mrope_section == (16, 24, 24) and t.head_dim == 128
    assert (v.window_units, v.window_slots, v.patch_dim, v.out_hidden_size) == (4, 64, 1176, t.hidden_size)
    assert v.fullatt_block_indexes == tuple(ref.vision_config.fullatt_block_indexes) == (7, 15, 23, 31)
    assert Qwen25VLConfig.from_hf(config.to_hf()) == config


def test_bad_inputs_name_the_problem(models, images):
    _, model = models
    px, grid = images[0]
    with pytest.raises(ValueError, match=r"pixel_values of shape \(79, 1176\) do not match image_grid_thw"):
        model.image_features(px[:-1], grid)
    ids, _ = _batch([_row(np.random.RandomState(5), [grid[0]])])
    with pytest.raises(ValueError, match="image run of 20 tokens, but image_grid_thw row 0"):
        model.position_ids(ids, None, images[1][1])
    with pytest.raises(ValueError, match="more rows than the 1 image-token runs"):
        model.position_ids(ids, None, np.concatenate([grid, grid]))
