"""Parity of our Flax models with transformers (float32, highest matmul precision), export round
trips, sharded forwards, and the one-line errors for bad checkpoints and inputs."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
from flax import nnx
from transformers import (CLIPVisionModel, LlamaForCausalLM, LlavaForConditionalGeneration,
                          LlavaNextForConditionalGeneration, MistralConfig, MistralForCausalLM)

import tiny_hf
from rlaifv_jax.core import sharding
from rlaifv_jax.models import hf

TOL = 1e-4


def _ids(rng, shape, high=90):
    return rng.randint(3, high, shape)


def _max_diff(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


def _forward(model, *args, **kwargs):
    """``model(*args, **kwargs)`` compiled as one program: run op by op, every op compiles on its own
    (about 80 ms each here, a hundred or more per forward)."""
    return nnx.jit(lambda m, *a, **k: m(*a, **k))(model, *args, **kwargs)


ROPES = {
    "default": None,
    "linear": {"rope_type": "linear", "factor": 2.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64},
}


@pytest.mark.parametrize("rope", sorted(ROPES))
def test_llama_parity_long_sequence(tmp_path, rope):
    ref = tiny_hf.llama(tmp_path, rope_scaling=ROPES[rope], rope_theta=500.0)
    model = hf.load_pretrained(str(tmp_path))
    ids = _ids(np.random.RandomState(0), (2, 640))
    want = ref(torch.tensor(ids)).logits.detach().numpy()
    assert _max_diff(_forward(model, jnp.asarray(ids)), want) <= TOL


def test_llama_tied_mha_and_left_padding(tmp_path):
    ref = tiny_hf.llama(tmp_path, tie_word_embeddings=True, num_key_value_heads=4)
    model = hf.load_pretrained(str(tmp_path))
    assert model.lm_head is None
    ids = _ids(np.random.RandomState(1), (3, 12))
    mask = np.ones_like(ids)
    mask[0, :5] = 0
    mask[2, :2] = 0
    pos = np.maximum(mask.cumsum(1) - 1, 0)
    want = ref(torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=torch.tensor(pos)).logits
    got = np.asarray(_forward(model, jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
    real = mask.astype(bool)
    assert _max_diff(got[real], want.detach().numpy()[real]) <= TOL


def test_mistral_parity_and_sliding_window_error(tmp_path):
    torch.manual_seed(0)
    cfg = MistralConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=1, sliding_window=64)
    ref = tiny_hf.save(MistralForCausalLM(cfg), tmp_path)
    model = hf.load_pretrained(str(tmp_path))
    ids = _ids(np.random.RandomState(2), (1, 40))
    assert _max_diff(_forward(model, jnp.asarray(ids)), ref(torch.tensor(ids)).logits.detach().numpy()) <= TOL
    with pytest.raises(ValueError, match="sliding window"):
        model(jnp.asarray(_ids(np.random.RandomState(2), (1, 65))))


def test_kv_cache_decode_matches_full_forward(tmp_path):
    tiny_hf.llama(tmp_path)
    model = hf.load_pretrained(str(tmp_path))
    ids = jnp.asarray(_ids(np.random.RandomState(3), (2, 10)))
    full = _forward(model, ids)

    @nnx.jit
    def step(m, tokens, positions, key_mask, cache, index):
        h, cache = m.forward_embeds(m.embed(tokens), positions=positions, key_mask=key_mask, cache=cache,
                                    cache_index=index)
        return m.logits(h), cache

    key_mask = jnp.zeros((2, 16), bool).at[:, :6].set(True)
    logits, cache = step(model, ids[:, :6], jnp.broadcast_to(jnp.arange(6), (2, 6)), key_mask, model.init_cache(2, 16),
                         jnp.int32(0))
    steps = [logits]
    for t in range(6, 10):
        key_mask = key_mask.at[:, t].set(True)
        logits, cache = step(model, ids[:, t:t + 1], jnp.full((2, 1), t), key_mask, cache, jnp.int32(t))
        steps.append(logits)
    assert _max_diff(jnp.concatenate(steps, axis=1), full) <= TOL


@pytest.mark.parametrize("layer", [-2, -1, [-3, -1]])
def test_clip_vision_parity(tmp_path, layer):
    torch.manual_seed(0)
    ref = tiny_hf.save(CLIPVisionModel(tiny_hf.vision_config()), tmp_path)
    tower = hf.load_pretrained(str(tmp_path))
    px = np.random.RandomState(0).randn(2, 3, 28, 28).astype(np.float32)
    states = ref(torch.tensor(px), output_hidden_states=True).hidden_states
    layers = layer if isinstance(layer, list) else [layer]
    want = torch.cat([states[i] for i in layers], dim=-1).detach().numpy()
    assert _max_diff(tower(jnp.asarray(px), layers), want) <= TOL


def _llava_inputs(rng, n_image_tokens, batch=2, length=24):
    ids = _ids(rng, (batch, length))
    for b in range(batch):
        start = 2 + b
        ids[b, start:start + n_image_tokens] = tiny_hf.IMAGE_TOKEN
    return ids


@pytest.mark.parametrize("strategy,layer", [("default", -2), ("full", -1), ("default", [-3, -2])])
def test_llava_parity_and_export(tmp_path, strategy, layer):
    ref = tiny_hf.llava(tmp_path / "hf", vision_feature_select_strategy=strategy, vision_feature_layer=layer)
    model = hf.load_pretrained(str(tmp_path / "hf"))
    n = model.num_image_tokens()
    assert n == 4 + (strategy == "full")
    ids = _llava_inputs(np.random.RandomState(0), n)
    px = np.random.RandomState(1).randn(2, 3, 28, 28).astype(np.float32)
    want = ref(input_ids=torch.tensor(ids), pixel_values=torch.tensor(px)).logits.detach().numpy()
    got = _forward(model, jnp.asarray(ids), pixel_values=jnp.asarray(px))
    assert _max_diff(got, want) <= TOL
    hf.save_pretrained(model, str(tmp_path / "export"))
    back = LlavaForConditionalGeneration.from_pretrained(str(tmp_path / "export")).eval()
    again = back(input_ids=torch.tensor(ids), pixel_values=torch.tensor(px)).logits.detach().numpy()
    assert _max_diff(again, want) <= TOL


def test_llama_export_roundtrip(tmp_path):
    ref = tiny_hf.llama(tmp_path / "hf", tie_word_embeddings=True)
    model = hf.load_pretrained(str(tmp_path / "hf"))
    hf.save_pretrained(model, str(tmp_path / "export"))
    back = LlamaForCausalLM.from_pretrained(str(tmp_path / "export")).eval()
    ids = torch.tensor(_ids(np.random.RandomState(0), (1, 9)))
    assert _max_diff(back(ids).logits.detach().numpy(), ref(ids).logits.detach().numpy()) <= TOL
    cfg = json.load(open(tmp_path / "export" / "config.json"))
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["eos_token_id"] == 2


NEXT_SIZES = [(28, 28), (30, 50), (50, 30), (60, 20)]


def test_llava_next_parity_mixed_image_sizes_and_export(tmp_path):
    ref = tiny_hf.llava_next(tmp_path / "hf")
    model = hf.load_pretrained(str(tmp_path / "hf"))
    rng = np.random.RandomState(0)
    counts = [model.num_image_tokens(s) for s in NEXT_SIZES]
    length = max(counts) + 12
    ids = _ids(rng, (len(NEXT_SIZES), length))
    for b, n in enumerate(counts):
        ids[b, 3:3 + n] = tiny_hf.IMAGE_TOKEN
    px = rng.randn(len(NEXT_SIZES), 5, 3, 28, 28).astype(np.float32)
    sizes = np.asarray(NEXT_SIZES)
    want = ref(input_ids=torch.tensor(ids), pixel_values=torch.tensor(px),
               image_sizes=torch.tensor(sizes)).logits.detach().numpy()
    got = model(jnp.asarray(ids), pixel_values=jnp.asarray(px), image_sizes=sizes)
    assert _max_diff(got, want) <= TOL
    hf.save_pretrained(model, str(tmp_path / "export"))
    back = LlavaNextForConditionalGeneration.from_pretrained(str(tmp_path / "export")).eval()
    again = back(input_ids=torch.tensor(ids), pixel_values=torch.tensor(px),
                 image_sizes=torch.tensor(sizes)).logits.detach().numpy()
    assert _max_diff(again, want) <= TOL


def test_bfloat16_load_is_close(tmp_path):
    tiny_hf.llama(tmp_path)
    f32 = hf.load_pretrained(str(tmp_path))
    bf16 = hf.load_pretrained(str(tmp_path), dtype=jnp.bfloat16)
    assert bf16.layers[0].mlp.up_proj.kernel[...].dtype == jnp.bfloat16
    ids = jnp.asarray(_ids(np.random.RandomState(0), (1, 16)))
    assert _max_diff(_forward(bf16, ids), _forward(f32, ids)) < 0.1


@pytest.mark.parametrize("shape", [(2, 2, 2), (1, 8, 1), (1, 2, 4)])
def test_sharded_forward_equals_unsharded(tmp_path, shape):
    tiny_hf.llava(tmp_path)
    plain = hf.load_pretrained(str(tmp_path))
    mesh = sharding.make_mesh(*shape)
    sharded = hf.load_pretrained(str(tmp_path), shardings=lambda s: sharding.state_shardings(s, mesh))
    kernel = sharded.language_model.layers[0].mlp.up_proj.kernel[...]
    assert len(kernel.sharding.device_set) == 8
    ids = _llava_inputs(np.random.RandomState(0), 4, batch=8)
    px = np.random.RandomState(1).randn(8, 3, 28, 28).astype(np.float32)
    with jax.set_mesh(mesh):
        ids_s = jax.device_put(ids, sharding.batch_sharding(mesh, 2))
        got = _forward(sharded, ids_s, pixel_values=jnp.asarray(px))
    assert _max_diff(got, _forward(plain, jnp.asarray(ids), pixel_values=jnp.asarray(px))) <= 1e-5


def test_rules_refuse_two_axes_on_one_mesh_axis():
    with pytest.raises(ValueError, match="both map to mesh axis"):
        sharding.logical_to_spec(("mlp", "heads"))
    mesh = sharding.make_mesh(1, 2, 4)
    spec = sharding.logical_to_spec(("embed", "kv_heads", "head_dim"), shape=(32, 2, 8), mesh=mesh)
    assert tuple(spec) == ("fsdp", None, None)  # 2 KV heads do not split 4 ways: replicated


def test_bad_checkpoints_give_one_line_errors(tmp_path):
    tiny_hf.llava(tmp_path)
    cfg_path = tmp_path / "config.json"
    cfg = json.load(open(cfg_path))
    json.dump({**cfg, "architectures": ["GPT2LMHeadModel"]}, open(cfg_path, "w"))
    with pytest.raises(ValueError, match="GPT2LMHeadModel.*not supported"):
        hf.load_pretrained(str(tmp_path))
    json.dump({k: v for k, v in cfg.items() if k != "architectures"}, open(cfg_path, "w"))
    with pytest.raises(ValueError, match="no 'architectures'"):
        hf.load_pretrained(str(tmp_path))
    json.dump({**cfg, "text_config": {**cfg["text_config"], "hidden_size": 48, "head_dim": 12}},
              open(cfg_path, "w"))
    with pytest.raises(ValueError, match=r"model.safetensors:language_model.model.embed_tokens.weight: shape"):
        hf.load_pretrained(str(tmp_path))
    json.dump(cfg, open(cfg_path, "w"))
    tensors = safetensors.numpy.load_file(str(tmp_path / "model.safetensors"))
    del tensors["multi_modal_projector.linear_2.bias"]
    safetensors.numpy.save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(KeyError, match="multi_modal_projector.linear_2.bias is missing"):
        hf.load_pretrained(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="config.json: missing"):
        hf.load_pretrained(str(tmp_path / "nowhere"))


def test_wrong_number_of_image_tokens(tmp_path):
    tiny_hf.llava(tmp_path)
    model = hf.load_pretrained(str(tmp_path))
    ids = _llava_inputs(np.random.RandomState(0), 3, batch=1)
    px = np.zeros((1, 3, 28, 28), np.float32)
    with pytest.raises(ValueError, match="hold 3 image tokens .* give 4 features"):
        model(jnp.asarray(ids), pixel_values=jnp.asarray(px))
