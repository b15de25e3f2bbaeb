"""Sharded weight I/O (models/hf.py): loads equal transformers, sharded loads equal unsharded ones
slice for slice, bf16 checkpoints load exactly, multi-file exports load back in transformers, and
with 2 processes each reads about half of an fsdp-sharded checkpoint."""
import copy
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P
from transformers import LlavaForConditionalGeneration

import multiproc
import tiny_hf
from rlaifv_jax.core import sharding
from rlaifv_jax.models import hf
from rlaifv_jax.models.llama import Llama, LlamaConfig

WORKER = os.path.join(os.path.dirname(__file__), "multiproc_worker.py")


def _flat(model) -> dict:
    return {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model))}


def _inputs(batch=2):
    ids = np.random.RandomState(0).randint(3, 90, (batch, 16))
    ids[:, 2:6] = tiny_hf.IMAGE_TOKEN
    px = np.random.RandomState(1).randn(batch, 3, 28, 28).astype(np.float32)
    return ids, px


def _torch_logits(model, ids, px):
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids), pixel_values=torch.tensor(px)).logits.numpy()


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    path = tmp_path_factory.mktemp("llava")
    ref = tiny_hf.llava(path, text=dict(initializer_range=0.2))
    return ref, str(path), hf.load_pretrained(str(path))


def test_load_parity_with_transformers(llava):
    ref, _, model = llava
    ids, px = _inputs()
    got = model(jnp.asarray(ids), pixel_values=jnp.asarray(px))
    assert np.max(np.abs(np.asarray(got) - _torch_logits(ref, ids, px))) <= 1e-4


@pytest.mark.parametrize("shape", [(1, 8, 1), (2, 2, 2)])
def test_sharded_load_equals_unsharded(llava, shape):
    _, path, plain = llava
    mesh = sharding.make_mesh(*shape)
    model = hf.load_pretrained(path, shardings=lambda s: sharding.state_shardings(s, mesh))
    want = _flat(plain)
    split = 0
    for p, v in nnx.to_flat_state(nnx.state(model)):
        arr = v.get_value()
        assert arr.sharding.is_equivalent_to(
            NamedSharding(mesh, sharding.logical_to_spec(v.axes, sharding.TRAIN_RULES, arr.shape, mesh)), arr.ndim)
        split += not arr.sharding.is_fully_replicated
        np.testing.assert_array_equal(np.asarray(arr), want[p], err_msg=str(p))
    assert split > 20


def _split_every_dim(mesh):
    """Shard each of an array's (up to 3) dims over its own mesh axis when it divides: inner dims
    of flattened HF tensors (head_dim, patch) get split too, which our rules never do."""
    def one(var):
        shape = var.get_value().shape
        names = list(mesh.axis_names)[::-1]
        spec = [names.pop() if names and n % mesh.shape[names[-1]] == 0 else None for n in shape]
        return var.replace(NamedSharding(mesh, P(*spec)))
    return lambda state: jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def test_inner_dims_split_read_exact_slices(llava):
    _, path, plain = llava
    mesh = sharding.make_mesh(2, 2, 2)
    model = hf.load_pretrained(path, shardings=_split_every_dim(mesh))
    q = model.language_model.layers[0].self_attn.q_proj.kernel[...]
    assert q.sharding.spec == P("data", "fsdp", "tensor")  # [embed, heads, head_dim]: head_dim split
    want = _flat(plain)
    for p, v in nnx.to_flat_state(nnx.state(model)):
        np.testing.assert_array_equal(np.asarray(v.get_value()), want[p], err_msg=str(p))


def test_bfloat16_checkpoint_loads_exactly(tmp_path, llava):
    ref, _, plain = llava
    copy.deepcopy(ref).to(torch.bfloat16).save_pretrained(str(tmp_path))
    raw = safetensors.numpy.load_file(str(tmp_path / "model.safetensors"))
    assert raw["language_model.model.embed_tokens.weight"].dtype == jnp.bfloat16
    mesh = sharding.make_mesh(1, 8, 1)
    model = hf.load_pretrained(str(tmp_path), dtype=jnp.bfloat16,
                               shardings=lambda s: sharding.state_shardings(s, mesh))
    q = model.language_model.layers[1].self_attn.q_proj.kernel[...]
    assert q.dtype == jnp.bfloat16
    want = raw["language_model.model.layers.1.self_attn.q_proj.weight"]  # [heads * head_dim, embed]
    np.testing.assert_array_equal(np.asarray(q).reshape(q.shape[0], -1).T, want)
    want = _flat(plain)  # torch and NumPy both round float32 to bfloat16 to nearest even
    for p, v in nnx.to_flat_state(nnx.state(model)):
        np.testing.assert_array_equal(np.asarray(v.get_value()), want[p].astype(jnp.bfloat16), err_msg=str(p))


def test_multi_file_export_loads_in_transformers(tmp_path, llava):
    ref, path, _ = llava
    mesh = sharding.make_mesh(2, 2, 2)
    model = hf.load_pretrained(path, shardings=lambda s: sharding.state_shardings(s, mesh))
    out = tmp_path / "export"
    hf.save_pretrained(model, str(out), shard_bytes=20_000)
    index = json.loads((out / hf.INDEX_FILE).read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 3 and files == sorted(n for n in os.listdir(out) if n.endswith(".safetensors"))
    contents = [safetensors.numpy.load_file(str(out / f)) for f in files]
    assert index["metadata"]["total_size"] == sum(a.nbytes for c in contents for a in c.values())
    for c in contents[:-1]:  # at most the cap, unless one tensor alone is larger (the last adds 2 tiny extras)
        assert sum(a.nbytes for a in c.values()) <= 20_000 or len(c) == 1
    ids, px = _inputs()
    want = _torch_logits(ref, ids, px)
    back = LlavaForConditionalGeneration.from_pretrained(str(out)).eval()
    assert np.max(np.abs(_torch_logits(back, ids, px) - want)) <= 1e-4
    hf.save_pretrained(model, str(out))  # one file again: the old shards and index are removed
    assert sorted(n for n in os.listdir(out) if "safetensors" in n) == ["model.safetensors"]
    back = LlavaForConditionalGeneration.from_pretrained(str(out)).eval()
    assert np.max(np.abs(_torch_logits(back, ids, px) - want)) <= 1e-4


def test_two_processes_each_read_half_of_an_fsdp_checkpoint(tmp_path, llava):
    _, path, plain = llava
    outs = multiproc.run_workers(WORKER, ["--task", "hf_load", "--checkpoint", path,
                                          "--export", str(tmp_path / "export")], n=2, local_devices=4)
    fractions = [o["read_bytes"] / o["total_bytes"] for o in outs]
    print("per-process read fraction:", [round(f, 4) for f in fractions])
    for o, f in zip(outs, fractions):
        assert o["mismatches"] == [] and o["split_across_processes"] > 20
        assert 0.45 <= f <= 0.6, fractions
    exported = hf.load_pretrained(str(tmp_path / "export"))
    want = _flat(plain)
    for p, v in _flat(exported).items():
        np.testing.assert_array_equal(v, want[p], err_msg=str(p))


class _Hooked(Llama):
    """A "new family" through the hook protocol: its own names ("decoder.*") and a tensor stored in
    another layout (the LM head as ``[in, out]``, under "lm_head.t")."""
    HF_ARCHITECTURE = "ToyHookedForCausalLM"

    def hf_name(self, path):
        if path[0] == "lm_head":
            return "lm_head.t"
        return "decoder." + ".".join(map(str, path[:-1])) + "." + ("weight" if path[-1] in ("kernel", "embedding") else path[-1])

    def hf_to_ours(self, path, tensor):
        return tensor[:] if path[0] == "lm_head" else None

    def ours_to_hf(self, path, array):
        return array if path[0] == "lm_head" else None


def test_hook_protocol_for_new_families(tmp_path, monkeypatch):
    tiny_hf.llama(tmp_path / "hf")
    plain = hf.load_pretrained(str(tmp_path / "hf"))
    raw = safetensors.numpy.load_file(str(tmp_path / "hf" / "model.safetensors"))
    hooked = {("decoder." + k[len("model."):] if k.startswith("model.") else k): v for k, v in raw.items()}
    hooked["lm_head.t"] = np.ascontiguousarray(hooked.pop("lm_head.weight").T)
    (tmp_path / "toy").mkdir()
    safetensors.numpy.save_file(hooked, str(tmp_path / "toy" / "model.safetensors"))
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "toy" / "config.json").write_text(json.dumps({**cfg, "architectures": [_Hooked.HF_ARCHITECTURE]}))
    monkeypatch.setitem(hf.ARCHITECTURES, _Hooked.HF_ARCHITECTURE, (_Hooked, LlamaConfig.from_hf))
    mesh = sharding.make_mesh(1, 8, 1)
    model = hf.load_pretrained(str(tmp_path / "toy"), shardings=lambda s: sharding.state_shardings(s, mesh))
    assert isinstance(model, _Hooked)
    want = _flat(plain)
    for p, v in _flat(model).items():
        np.testing.assert_array_equal(v, want[p], err_msg=str(p))
    hf.save_pretrained(model, str(tmp_path / "out"))
    out = safetensors.numpy.load_file(str(tmp_path / "out" / "model.safetensors"))
    assert sorted(out) == sorted(hooked)
    for k, v in hooked.items():
        np.testing.assert_array_equal(out[k], v, err_msg=k)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["architectures"] == [_Hooked.HF_ARCHITECTURE]
