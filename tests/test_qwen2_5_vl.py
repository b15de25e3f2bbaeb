"""Qwen2.5-VL parity with transformers (float32, highest matmul precision) on a tiny random model:
logits, vision features, M-RoPE positions, cached greedy decoding, bucket padding, export."""
import functools
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

import tiny_qwen
from rlaifv_jax.core import sharding
from rlaifv_jax.models import hf, qwen_vision
from rlaifv_jax.models.qwen2_5_vl import Qwen25VL, Qwen25VLConfig

TOL = 1e-4
IMAGE, START, END = 110, 111, 112
TRACES = []
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


_row = functools.partial(tiny_qwen.prompt_ids, image=IMAGE, start=START, end=END, words=(3, 100))
_batch = functools.partial(tiny_qwen.left_padded, pad=0)


def _hf(ref, ids, mask, px, grid):
    t = torch.tensor
    with torch.no_grad():
        return ref(input_ids=t(ids), attention_mask=t(mask), pixel_values=t(px), image_grid_thw=t(grid),
                   mm_token_type_ids=t((ids == IMAGE).astype(np.int64))).logits.numpy()


@functools.partial(jax.jit, static_argnums=0)
def _tile(graphdef, state, inputs):
    TRACES.append(1)
    return nnx.merge(graphdef, state).tile_features(inputs)


@functools.partial(jax.jit, static_argnums=0)
def _logits(graphdef, state, ids, inputs, positions, mask):
    """The engine's way: vision_inputs arrays and host positions into one jitted forward."""
    return nnx.merge(graphdef, state)(ids, pixel_values=inputs, positions=positions, attention_mask=mask)


def _call(model, ids, mask, px, grid):
    """``model(ids, pixel_values=..., image_grid_thw=...)`` (host-side positions) compiled as one program."""
    graphdef, state = nnx.split(model)
    fn = jax.jit(lambda s, p: nnx.merge(graphdef, s)(ids, pixel_values=p, image_grid_thw=grid, attention_mask=mask))
    return np.asarray(fn(state, jnp.asarray(px)))


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
    feats = _tile(*nnx.split(model), model.vision_inputs(px, grid))
    assert _diff(model.pack_tile_features(feats, None, grid), want_feats) <= TOL
    assert _diff(_call(model, ids, mask, px, grid), _hf(ref, ids, mask, px, grid)) <= TOL


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
    inputs = model.vision_inputs(px, grid)
    got = np.asarray(_logits(*nnx.split(model), jnp.asarray(ids), inputs, pos, jnp.asarray(mask)))
    real = mask.astype(bool)
    assert _diff(got[real], _hf(ref, ids, mask, px, grid)[real]) <= TOL


def test_cached_greedy_decode_with_rope_deltas_matches_generate(models, images):
    """Prefill at ``position_ids``; decode at ``real tokens before + rope_deltas``: HF's greedy tokens."""
    ref, model = models
    px, grid = images[0]
    ids, mask = _batch([_row(np.random.RandomState(3), [grid[0]])])
    steps, t = 5, torch.tensor
    with torch.no_grad():
        want = ref.generate(input_ids=t(ids), attention_mask=t(mask), pixel_values=t(px), image_grid_thw=t(grid),
                            mm_token_type_ids=t((ids == IMAGE).astype(np.int64)), max_new_tokens=steps,
                            do_sample=False)[0, ids.shape[1]:].numpy()
    graphdef, state = nnx.split(model)
    feats = model.pack_tile_features(_tile(graphdef, state, model.vision_inputs(px, grid)), None, grid)
    tokens = tiny_qwen.cached_greedy(model, ids, mask, grid, feats, steps)
    np.testing.assert_array_equal(tokens, want)


def test_shared_prefix_rows_continue_at_rope_deltas(models, images):
    """The labeler's way: rows attend to one cached image prompt (``prefix=``) and continue at
    ``prompt length + step + rope_deltas``; equal to transformers on the concatenated sequences."""
    ref, model = models
    px, grid = images[0]
    prompt = _row(np.random.RandomState(6), [grid[0]])
    conts = np.array([[7, 8, 9], [10, 11, 12]])
    n, (rows, c) = len(prompt), conts.shape
    positions, deltas = model.position_ids(np.array([prompt]), None, grid)
    graphdef, state = nnx.split(model)

    @jax.jit
    def score(state, x, positions, cont_positions):
        m = nnx.merge(graphdef, state)
        _, cache = m.forward_embeds(x, positions=positions, key_mask=jnp.ones((1, n), bool), cache=m.init_cache(1, n))
        hidden, _ = m.forward_embeds(m.embed(jnp.asarray(conts)), positions=cont_positions,
                                     key_mask=jnp.ones((rows, c), bool), cache=m.init_cache(rows, c),
                                     prefix=(cache, jnp.ones((1, n), bool)))
        return m.logits(hidden)

    feats = model.pack_tile_features(_tile(graphdef, state, model.vision_inputs(px, grid)), None, grid)
    cont_positions = np.broadcast_to(n + np.arange(c) + deltas[0], (rows, c))
    got = score(state, model.embed(jnp.asarray([prompt]), feats), positions, cont_positions)
    full = np.array([prompt + list(r) for r in conts])
    want = _hf(ref, full, np.ones_like(full), np.concatenate([px, px]), np.concatenate([grid, grid]))[:, n:]
    assert _diff(got, want) <= TOL


def test_bucket_padding_is_invisible_and_compiles_once_per_bucket(models, images):
    _, model = models
    graphdef, state = nnx.split(model)
    cfg = model.config.vision
    feats = {}
    before = len(TRACES)
    for i, buckets in ((0, (8,)), (1, (8,)), (0, qwen_vision.CHUNK_BUCKETS)):
        px, grid = images[i]
        inputs = model.vision_inputs(px, grid, buckets)
        chunks = qwen_vision.bucket(qwen_vision.num_chunks(grid, cfg), buckets)
        assert inputs["slots"].shape == (chunks * cfg.window_slots,) and chunks == (8 if len(buckets) == 1 else 6)
        feats[i, len(buckets)] = model.pack_tile_features(_tile(graphdef, state, inputs), None, grid)
        assert feats[i, len(buckets)].shape == (model.num_image_tokens(grid), cfg.out_hidden_size)
    assert len(TRACES) - before <= 2  # images of 5 and 6 chunks share the 8-chunk program
    assert _diff(feats[0, 1], feats[0, len(qwen_vision.CHUNK_BUCKETS)]) <= 1e-6
    with pytest.raises(ValueError, match="need 5 chunks of 16 slots; only 4 were given"):
        model.vision_inputs(*images[0], chunks=4)


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
    assert _diff(_call(model, ids, mask, px, grid), want) <= TOL


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
    # Every parameter has logical axes that shard on a mesh, and the count equals transformers' (two
    # layers of each stack keep it quick; the full 7B / 3B give 8,292,166,656 / 3,754,622,976 on both sides).
    short = {**cfg, "num_hidden_layers": 2, "vision_config": {**cfg["vision_config"], "depth": 2}}
    params = nnx.state(nnx.eval_shape(lambda: Qwen25VL(Qwen25VLConfig.from_hf(short), rngs=nnx.Rngs(0))), nnx.Param)
    flat = [v for _, v in nnx.to_flat_state(params)]
    assert all(len(v.axes) == v.get_value().ndim for v in flat)
    sharding.state_shardings(params, sharding.make_mesh(fsdp=4, tensor=2))
    with torch.device("meta"):
        ref_model = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**short))
    assert sum(v.get_value().size for v in flat) == sum(p.numel() for p in ref_model.parameters())


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
