"""Hugging Face checkpoints in and out, without torch, one tensor (or one slice) at a time.

``load_pretrained(dir, shardings=...)`` reads ``config.json`` and ``*.safetensors`` (one file or a
``model.safetensors.index.json``), builds the module abstractly and creates every parameter with
``jax.make_array_from_callback``: each process reads, through ``safetensors``' ``get_slice``, only
the slices that its own devices hold, converted to our layout slice by slice. Placement is the
caller's: ``shardings`` maps the abstract state to shardings, e.g.
``lambda s: sharding.state_shardings(s, mesh, rules)``; ``None`` means one device.

``save_pretrained(model, dir)`` writes what transformers writes for the same architecture, tensor by
tensor: each parameter is gathered alone (across hosts when it is sharded over them) and process 0
writes files of at most ``shard_bytes`` (plus ``model.safetensors.index.json`` when there are
several), each atomically, the index last. Paths may be local or ``gs://``.

Names and layouts, and the hooks a new model family defines, are in ``models/hf_map.py``; a new
family also registers its class in ``ARCHITECTURES``.
"""
from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import re
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import ml_dtypes  # noqa: F401  (registers bfloat16 with NumPy: safetensors' NumPy backend needs it)
import numpy as np
import safetensors
import safetensors.numpy
from flax import nnx
from jax.experimental import multihost_utils

from rlaifv_jax.core import paths
from rlaifv_jax.models import hf_map
from rlaifv_jax.models.clip import CLIPVision, CLIPVisionConfig
from rlaifv_jax.models.llama import Llama, LlamaConfig
from rlaifv_jax.models.llava import Llava, LlavaConfig, LlavaNext
from rlaifv_jax.models.qwen2_5_vl import Qwen25VL, Qwen25VLConfig
from rlaifv_jax.models.qwen3_vl import Qwen3VL, Qwen3VLConfig

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
# Files of a checkpoint directory that are not weights or config: copied along on export.
ASSET_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
               "added_tokens.json", "chat_template.json", "chat_template.jinja", "preprocessor_config.json",
               "processor_config.json", "generation_config.json")
INDEX_FILE = "model.safetensors.index.json"
SHARD_BYTES = 5 * 10**9  # transformers' default max_shard_size
_WEIGHT_FILE_RE = re.compile(r"^model(-\d{5}-of-\d{5})?\.safetensors$")

# A callable from the abstract NNX state to a matching pytree of shardings (or of Variables holding them).
Shardings = Callable[[nnx.State], Any]


def parse_dtype(name: str, field: str = "dtype"):
    """``"bfloat16"`` → ``jnp.bfloat16``, with an error naming ``field`` otherwise."""
    if name not in DTYPES:
        raise ValueError(f"{field}={name!r}: expected one of {sorted(DTYPES)}")
    return DTYPES[name]


ARCHITECTURES: dict[str, tuple[type, Callable[[dict], Any]]] = {
    "LlamaForCausalLM": (Llama, LlamaConfig.from_hf),
    "MistralForCausalLM": (Llama, LlamaConfig.from_hf),
    "Qwen2ForCausalLM": (Llama, LlamaConfig.from_hf),
    "CLIPVisionModel": (CLIPVision, CLIPVisionConfig.from_hf),
    "LlavaForConditionalGeneration": (Llava, LlavaConfig.from_hf),
    "LlavaNextForConditionalGeneration": (LlavaNext, LlavaConfig.from_hf),
    "Qwen2_5_VLForConditionalGeneration": (Qwen25VL, Qwen25VLConfig.from_hf),
    "Qwen3VLForConditionalGeneration": (Qwen3VL, Qwen3VLConfig.from_hf),
}


def read_slice(tensor: Any, index: tuple) -> np.ndarray:
    """``tensor[index]`` of a safetensors slice: every byte the loader reads goes through here."""
    return tensor[index]


# ----------------------------------------------------------------------------- reading
def read_config(path: str) -> tuple[str, dict[str, Any]]:
    """``(architecture, config dict)`` from ``path/config.json``, with a clear error when unsupported."""
    cfg_path = os.path.join(path, "config.json")
    if not paths.exists(cfg_path):
        raise FileNotFoundError(f"{cfg_path}: missing (expected a Hugging Face model directory)")
    try:
        cfg = json.loads(paths.read_text(cfg_path))
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_path}: not valid JSON ({e})") from None
    archs = cfg.get("architectures") or []
    if not archs:
        raise ValueError(f"{cfg_path}: no 'architectures' field; supported: {sorted(ARCHITECTURES)}")
    if archs[0] not in ARCHITECTURES:
        raise ValueError(f"{cfg_path}: architecture {archs[0]!r} is not supported; supported: "
                         f"{sorted(ARCHITECTURES)}")
    return archs[0], cfg


def _weight_files(path: str) -> dict[str, str]:
    """Every tensor name of the checkpoint directory → the file name that holds it."""
    index = os.path.join(path, INDEX_FILE)
    if paths.exists(index):
        return dict(json.loads(paths.read_text(index))["weight_map"])
    names = sorted(n for n in paths.listdir(path) if n.endswith(".safetensors"))
    if not names:
        raise FileNotFoundError(f"{path}: no *.safetensors files (torch .bin checkpoints are not read: "
                                "convert them with transformers' save_pretrained(safe_serialization=True))")
    out = {}
    for name in names:
        with _open(os.path.join(path, name)) as f:
            out.update({k: name for k in f.keys()})
    return out


def _open(file: str):
    try:
        return safetensors.safe_open(paths.local_file(file), framework="np")
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
        raise ValueError(f"{file}: not a readable safetensors file ({e})") from None


class _Checkpoint:
    """The tensors of a checkpoint directory, by canonical name, opened lazily (one handle per file)."""

    def __init__(self, path: str, architecture: str, stack: contextlib.ExitStack):
        self.path, self.stack = path, stack
        self.files = {hf_map.canonical(k, architecture): (k, f) for k, f in _weight_files(path).items()}
        self.handles: dict[str, Any] = {}
        self.used: set[str] = set()

    def tensor(self, name: str) -> tuple[Any, str]:
        """``(safetensors slice, "file:key")`` of canonical tensor ``name``."""
        if name not in self.files:
            raise KeyError(f"{self.path}: tensor {name} is missing from the checkpoint")
        key, file = self.files[name]
        if file not in self.handles:
            self.handles[file] = self.stack.enter_context(_open(os.path.join(self.path, file)))
        self.used.add(name)
        return self.handles[file].get_slice(key), f"{file}:{key}"


def _reader(model: nnx.Module, path: tuple, tensor: Any, where: str, shape: tuple[int, ...],
            n_in: int | None, dtype) -> Callable[[tuple], np.ndarray]:
    """``index -> our_array[index]`` (as ``dtype``) for the parameter at ``path``, one read per index."""
    hook = getattr(model, "hf_to_ours", None)
    whole = hook(path, tensor) if hook else None
    if whole is not None:
        if tuple(whole.shape) != shape:
            raise ValueError(f"tensor {where}: {type(model).__name__}.hf_to_ours gave shape "
                             f"{tuple(whole.shape)}, expected {shape}")
        read = lambda index: whole[index]  # noqa: E731
    else:
        lay = hf_map.layout(path[-1], shape, n_in)
        if tuple(tensor.get_shape()) != lay.hf_shape:
            raise ValueError(f"tensor {where}: shape {tuple(tensor.get_shape())} does not fit the config "
                             f"(expected {lay.hf_shape} for our {shape})")
        read = lambda index: lay.from_hf_block(read_slice(tensor, lay.hf_index(index)), index)  # noqa: E731
    cache: dict[tuple, np.ndarray] = {}  # replicas of one shard on several local devices: read once

    def cb(index: tuple) -> np.ndarray:
        key = hf_map.bounds(index, shape)
        if key not in cache:
            cache[key] = np.asarray(read(index), dtype=dtype)
        return cache[key]

    return cb


def _flat_shardings(tree: Any) -> dict[tuple, jax.sharding.Sharding]:
    out = {}
    for p, v in nnx.to_flat_state(tree):
        out[tuple(p)] = v.get_value() if isinstance(v, nnx.Variable) else v
    return out


def build_model(architecture: str, cfg: dict[str, Any], *, dtype=jnp.float32, param_dtype=None,
                seed: int = 0) -> nnx.Module:
    """A randomly initialised module of ``architecture`` for a transformers config dict."""
    cls, parse = ARCHITECTURES[architecture]
    model = cls(parse(cfg), dtype=dtype, param_dtype=param_dtype or dtype, rngs=nnx.Rngs(seed))
    model.hf_config_json = json.dumps(cfg)
    return model


@functools.lru_cache(maxsize=8)
def _abstract_model(architecture: str, cfg_json: str, dtype: Any, param_dtype: Any) -> nnx.Module:
    """The module of a config built abstractly (shapes only), once per config and dtypes within a
    process: ``load_pretrained`` fills a split of it and never changes it (the online loop loads the
    same checkpoints every iteration; building the module's graph costs about 0.15 s for the toy)."""
    cls, parse = ARCHITECTURES[architecture]
    return nnx.eval_shape(lambda: cls(parse(json.loads(cfg_json)), dtype=dtype, param_dtype=param_dtype,
                                      rngs=nnx.Rngs(0)))


def load_pretrained(path: str, *, dtype=jnp.float32, param_dtype=None,
                    shardings: Shardings | None = None) -> nnx.Module:
    """Load a Hugging Face checkpoint directory (local or ``gs://``) into an NNX module.

    Parameters are stored in ``param_dtype`` (default ``dtype``); computation runs in ``dtype``.
    ``shardings(abstract_state)`` gives each parameter's sharding (default: the first local
    device); each process reads only the slices of its own devices' shards.
    """
    architecture, cfg = read_config(path)
    param_dtype = param_dtype or dtype
    abstract = _abstract_model(architecture, json.dumps(cfg, sort_keys=True), dtype, param_dtype)
    graphdef, state = nnx.split(abstract)
    placement = _flat_shardings(shardings(state)) if shardings is not None else {}
    default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    n_in = hf_map.linear_inputs(abstract)
    flat = []
    with contextlib.ExitStack() as stack:
        ckpt = _Checkpoint(path, architecture, stack)
        for p, var in nnx.to_flat_state(state):
            p = tuple(p)
            shape = tuple(var.get_value().shape)
            tensor, where = ckpt.tensor(hf_map.hf_name(abstract, p))
            cb = _reader(abstract, p, tensor, where, shape, n_in.get(p), param_dtype)
            value = jax.make_array_from_callback(shape, placement.get(p, default), cb, dtype=param_dtype)
            flat.append((p, var.replace(value)))
        unused = sorted(set(ckpt.files) - ckpt.used)
    if unused:
        logging.info("%s: %d checkpoint tensors not used (e.g. %s)", path, len(unused), unused[:3])
    model = nnx.merge(graphdef, nnx.from_flat_state(flat))
    model.hf_config_json = json.dumps(cfg)
    return model


# ----------------------------------------------------------------------------- writing
def _merge(base: dict, new: dict) -> dict:
    """``base`` updated by ``new``, nested dicts merged (keeps e.g. the original token ids)."""
    out = dict(base)
    for k, v in new.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _to_host(value: jax.Array) -> np.ndarray:
    """The whole of one array on this host; every process must call it for arrays spanning hosts."""
    if value.is_fully_replicated:
        return np.asarray(value.addressable_data(0))
    if not value.is_fully_addressable:
        return np.asarray(multihost_utils.process_allgather(value, tiled=True))
    return np.asarray(jax.device_get(value))


def _plan_files(sizes: list[int], shard_bytes: int) -> list[list[int]]:
    """Consecutive parameter indices grouped into files of at most ``shard_bytes`` (a larger
    tensor gets a file of its own)."""
    files: list[list[int]] = [[]]
    total = 0
    for i, size in enumerate(sizes):
        if files[-1] and total + size > shard_bytes:
            files.append([])
            total = 0
        files[-1].append(i)
        total += size
    return files


def _write_safetensors(path: str, tensors: dict[str, np.ndarray]) -> None:
    # safetensors writes raw buffers: a transposed view must be made contiguous first.
    tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    paths.atomic_write_file(path, lambda tmp: safetensors.numpy.save_file(tensors, tmp, metadata={"format": "pt"}))


def iter_hf_tensors(model: nnx.Module, dtype=None) -> Iterator[tuple[str, np.ndarray]]:
    """``(transformers name, host array)`` for every parameter of ``model``, one at a time.
    Every process must iterate it to the end (parameters sharded across hosts are all-gathered)."""
    n_in = hf_map.linear_inputs(model)
    for p, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        arr = _to_host(var.get_value())
        if dtype is not None:
            arr = arr.astype(dtype)
        yield hf_map.hf_name(model, tuple(p)), hf_map.to_hf(model, tuple(p), arr, n_in.get(tuple(p)))


def save_pretrained(model: nnx.Module, path: str, *, dtype=None, assets_from: str | None = None,
                    shard_bytes: int = SHARD_BYTES) -> None:
    """Write ``model`` as a transformers checkpoint directory (local or ``gs://``): ``config.json``,
    ``model.safetensors`` or ``model-0000i-of-0000n.safetensors`` + ``model.safetensors.index.json``
    (files of at most ``shard_bytes``), and the tokenizer / processor files of ``assets_from``.

    Call it on every process for a model sharded over hosts: parameters are gathered one at a time,
    process 0 writes. A model held by one process's devices is written by that process alone. No host
    holds more than one file's tensors. Weight files of an earlier export to ``path`` that this one
    does not rewrite are removed at the end.
    """
    architecture = hf_map.architecture(model)
    params = [(tuple(p), v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))]
    out_dtype = np.dtype(dtype if dtype is not None else params[0][1].dtype)
    sizes = [math.prod(v.shape) * np.dtype(dtype if dtype is not None else v.dtype).itemsize for _, v in params]
    files = _plan_files(sizes, shard_bytes)
    names = (["model.safetensors"] if len(files) == 1 else
             [f"model-{i + 1:05d}-of-{len(files):05d}.safetensors" for i in range(len(files))])
    # A model on this process's devices only (e.g. a toy warm start on host 0) is written by this
    # process alone; a model sharded over hosts is gathered collectively and written by process 0.
    local = all(v.is_fully_addressable for _, v in params)
    writer = local or jax.process_index() == 0
    if writer:
        paths.makedirs(path)
    tensors_iter = iter_hf_tensors(model, dtype)
    weight_map: dict[str, str] = {}
    total = 0
    for f, (name, members) in enumerate(zip(names, files)):
        tensors = dict(next(tensors_iter) for _ in members)
        if f == len(files) - 1:
            tensors.update(hf_map.extra_tensors(model, architecture, out_dtype))
        weight_map.update({k: name for k in tensors})
        total += sum(a.nbytes for a in tensors.values())
        if writer:
            _write_safetensors(os.path.join(path, name), tensors)
        del tensors
    if writer:
        for asset in ASSET_FILES if assets_from else ():
            if paths.exists(os.path.join(assets_from, asset)):
                paths.copy_file(os.path.join(assets_from, asset), os.path.join(path, asset))
        cfg = _merge(json.loads(getattr(model, "hf_config_json", "{}")), model.config.to_hf())
        cfg["architectures"] = [architecture]
        cfg["dtype"] = str(out_dtype)
        paths.atomic_write_text(os.path.join(path, "config.json"), json.dumps(cfg, indent=2))
        if len(files) > 1:
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            paths.atomic_write_text(os.path.join(path, INDEX_FILE), json.dumps(index, indent=2))
        for stale in paths.listdir(path):
            if (_WEIGHT_FILE_RE.match(stale) and stale not in names) or (stale == INDEX_FILE and len(files) == 1):
                paths.remove(os.path.join(path, stale))
    if jax.process_count() > 1 and not local:
        multihost_utils.sync_global_devices(f"save_pretrained {path}")
