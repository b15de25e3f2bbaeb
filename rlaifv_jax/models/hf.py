"""Hugging Face checkpoints in and out, without torch.

``load_pretrained(dir)`` reads ``config.json`` + ``*.safetensors`` (single file or sharded index),
builds the module abstractly and places each tensor straight onto its final sharding.
``save_pretrained(model, dir)`` writes the layout transformers writes (and reads) for the same
architecture. Supported: ``LlamaForCausalLM`` (and ``MistralForCausalLM``, ``Qwen2ForCausalLM``),
``CLIPVisionModel``, ``LlavaForConditionalGeneration``, ``LlavaNextForConditionalGeneration``.
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
import struct
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from rlaifv_jax.models.clip import CLIPVision, CLIPVisionConfig
from rlaifv_jax.models.llama import Llama, LlamaConfig
from rlaifv_jax.models.llava import Llava, LlavaConfig, LlavaNext
from rlaifv_jax.sharding import TRAIN_RULES, Rules, state_shardings

_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
           "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
           "BOOL": np.bool_}
_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
# Files of a checkpoint directory that are not weights or config: copied along on export.
ASSET_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
               "added_tokens.json", "chat_template.json", "chat_template.jinja", "preprocessor_config.json",
               "processor_config.json", "generation_config.json")


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
}

# File-key prefixes other transformers versions / hub repos use → the canonical names we map to.
_LLAVA_ALIASES = (
    ("model.vision_tower.vision_model.", "vision_tower."),
    ("model.vision_tower.", "vision_tower."),
    ("vision_tower.vision_model.", "vision_tower."),
    ("model.language_model.", "language_model.model."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("model.image_newline", "image_newline"),
    ("lm_head.", "language_model.lm_head."),
)
_CLIP_ALIASES = (("vision_model.", ""),)  # older files, and the vision half of a CLIPModel


# ----------------------------------------------------------------------------- safetensors I/O
class SafetensorsFile:
    """A memory-mapped safetensors file read into NumPy (bfloat16 via ml_dtypes)."""

    def __init__(self, path: str):
        self.path = path
        try:
            with open(path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(n))
        except (OSError, struct.error, ValueError) as e:
            raise ValueError(f"{path}: not a readable safetensors file ({e})") from None
        header.pop("__metadata__", None)
        self.header = header
        self.offset = 8 + n
        self._mm = np.memmap(path, dtype=np.uint8, mode="r")

    def keys(self) -> list[str]:
        return list(self.header)

    def get(self, key: str) -> np.ndarray:
        info = self.header[key]
        if info["dtype"] not in _DTYPES:
            raise ValueError(f"{self.path}: tensor {key} has unsupported dtype {info['dtype']}")
        start, end = info["data_offsets"]
        raw = self._mm[self.offset + start: self.offset + end]
        return raw.view(_DTYPES[info["dtype"]]).reshape(info["shape"])


def write_safetensors(path: str, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> None:
    """Write ``tensors`` as a safetensors file (atomically: temp file + rename)."""
    header: dict[str, Any] = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    arrays = {}
    for name in sorted(tensors):
        a = np.ascontiguousarray(tensors[name])
        header[name] = {"dtype": _NAMES[a.dtype], "shape": list(a.shape),
                        "data_offsets": [offset, offset + a.nbytes]}
        arrays[name] = a
        offset += a.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for a in arrays.values():
            f.write(a.tobytes())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _open_checkpoint(path: str) -> dict[str, SafetensorsFile]:
    """Map every tensor name in the checkpoint directory to the file that holds it."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        files = {name: SafetensorsFile(os.path.join(path, name)) for name in sorted(set(weight_map.values()))}
        return {k: files[v] for k, v in weight_map.items()}
    names = sorted(n for n in os.listdir(path) if n.endswith(".safetensors"))
    if not names:
        raise FileNotFoundError(f"{path}: no *.safetensors files (torch .bin checkpoints are not read: "
                                "convert them with transformers' save_pretrained(safe_serialization=True))")
    out = {}
    for name in names:
        f = SafetensorsFile(os.path.join(path, name))
        out.update({k: f for k in f.keys()})
    return out


# ----------------------------------------------------------------------------- name maps
def _clip_name(path: tuple) -> str:
    head = path[0]
    if head == "patch_embedding":
        return "embeddings.patch_embedding.weight"
    if head == "class_embedding":
        return "embeddings.class_embedding"
    if head == "position_embedding":
        return "embeddings.position_embedding.weight"
    if head == "layers":
        i, mod, leaf = path[1], path[2], path[3]
        group = "self_attn." if mod in ("q_proj", "k_proj", "v_proj", "out_proj") else "mlp." if mod in ("fc1", "fc2") else ""
        return f"encoder.layers.{i}.{group}{mod}.{_leaf(leaf)}"
    return f"{head}.{_leaf(path[1])}"  # pre_layrnorm


def _llama_name(path: tuple) -> str:
    if path[0] == "lm_head":
        return "lm_head.weight"
    return "model." + ".".join(str(p) for p in path[:-1]) + "." + _leaf(path[-1])


def _leaf(name: str) -> str:
    return "weight" if name in ("kernel", "embedding") else name


def hf_name(model: nnx.Module, path: tuple) -> str:
    """The transformers state-dict name of the variable at ``path`` in ``model``."""
    if isinstance(model, Llama):
        return _llama_name(path)
    if isinstance(model, CLIPVision):
        return _clip_name(path)
    head, rest = path[0], path[1:]
    if head == "language_model":
        return "language_model." + _llama_name(rest)
    if head == "vision_tower":
        return "vision_tower." + _clip_name(rest)
    if head == "multi_modal_projector":
        return f"multi_modal_projector.{rest[0]}.{_leaf(rest[1])}"
    if head == "image_newline":
        return "image_newline"
    raise KeyError(f"no Hugging Face name for {path}")


def to_ours(name: str, leaf: str, hf: np.ndarray, our_shape: tuple, n_in: int | None = None) -> np.ndarray:
    """Convert a transformers tensor to our layout (kernels are ``[in..., out...]``, ``n_in`` input dims)."""
    fits = True
    if leaf == "kernel" and hf.ndim == 4:  # patch convolution [D, C, p, p] → [C, p, p, D]
        out = hf.transpose(1, 2, 3, 0)
    elif leaf == "kernel":
        fits = hf.ndim == 2 and hf.shape[1] == math.prod(our_shape[:n_in]) and hf.size == math.prod(our_shape)
        out = hf.T.reshape(our_shape) if fits else hf
    else:
        out = hf.reshape(our_shape) if hf.size == math.prod(our_shape) else hf
    if not fits or tuple(out.shape) != tuple(our_shape):
        raise ValueError(f"tensor {name}: shape {tuple(hf.shape)} does not fit the config (expected "
                         f"{tuple(our_shape)} in our layout)")
    return out


def to_hf(leaf: str, ours: np.ndarray, n_in: int | None = None) -> np.ndarray:
    """Inverse of ``to_ours``."""
    if leaf == "kernel" and ours.ndim == 4 and n_in == 3:
        return ours.transpose(3, 0, 1, 2)
    if leaf == "kernel":
        return ours.reshape(math.prod(ours.shape[:n_in]), -1).T
    if leaf == "bias":
        return ours.reshape(-1)
    return ours


def _linear_inputs(model: nnx.Module) -> dict[tuple, int]:
    """Number of input dims of every ``Linear`` kernel, by kernel path."""
    from rlaifv_jax.models.layers import Linear
    return {tuple(p) + ("kernel",): m.n_in for p, m in nnx.iter_modules(model) if isinstance(m, Linear)}


def _canonical(key: str, architecture: str) -> str:
    aliases = {"CLIPVisionModel": _CLIP_ALIASES}.get(architecture, _LLAVA_ALIASES if architecture.startswith("Llava") else ())
    if aliases:
        for alt, canon in aliases:
            if key.startswith(alt):
                return canon + key[len(alt):]
    return key


# ----------------------------------------------------------------------------- public API
def read_config(path: str) -> tuple[str, dict[str, Any]]:
    """``(architecture, config dict)`` from ``path/config.json``, with a clear error when unsupported."""
    cfg_path = os.path.join(path, "config.json")
    try:
        with open(cfg_path) as f:
            cfg = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{cfg_path}: missing (expected a Hugging Face model directory)") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_path}: not valid JSON ({e})") from None
    archs = cfg.get("architectures") or []
    if not archs:
        raise ValueError(f"{cfg_path}: no 'architectures' field; supported: {sorted(ARCHITECTURES)}")
    if archs[0] not in ARCHITECTURES:
        raise ValueError(f"{cfg_path}: architecture {archs[0]!r} is not supported; supported: "
                         f"{sorted(ARCHITECTURES)}")
    return archs[0], cfg


def build_model(architecture: str, cfg: dict[str, Any], *, dtype=jnp.float32, param_dtype=None,
                seed: int = 0) -> nnx.Module:
    """A randomly initialised module of ``architecture`` for a transformers config dict."""
    cls, parse = ARCHITECTURES[architecture]
    model = cls(parse(cfg), dtype=dtype, param_dtype=param_dtype or dtype, rngs=nnx.Rngs(seed))
    model.hf_config_json = json.dumps(cfg)
    return model


def load_pretrained(path: str, *, dtype=jnp.float32, mesh: Mesh | None = None, param_dtype=None,
                    rules: Rules = TRAIN_RULES) -> nnx.Module:
    """Load a local Hugging Face checkpoint directory into an NNX module.

    Parameters are stored in ``param_dtype`` (default ``dtype``) and placed directly on their
    sharding under ``mesh`` (by ``rules``); computation runs in ``dtype``.
    """
    architecture, cfg = read_config(path)
    cls, parse = ARCHITECTURES[architecture]
    config = parse(cfg)
    param_dtype = param_dtype or dtype
    abstract = nnx.eval_shape(lambda: cls(config, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    shardings = state_shardings(state, mesh, rules) if mesh is not None else None
    files = _open_checkpoint(path)
    canon = {_canonical(k, architecture): k for k in files}
    n_in = _linear_inputs(abstract)
    flat = []
    used = set()
    sh_flat = dict(nnx.to_flat_state(shardings)) if shardings is not None else {}
    for p, var in nnx.to_flat_state(state):
        name = hf_name(abstract, p)
        if name not in canon:
            raise KeyError(f"{path}: tensor {name} is missing from the checkpoint")
        key = canon[name]
        used.add(key)
        shape = var.get_value().shape
        arr = to_ours(f"{os.path.basename(files[key].path)}:{key}", p[-1], files[key].get(key), shape,
                      n_in.get(tuple(p)))
        arr = np.asarray(arr, dtype=param_dtype)
        sharding = sh_flat[p].get_value() if p in sh_flat else None
        flat.append((p, var.replace(jax.device_put(arr, sharding) if sharding else jnp.asarray(arr))))
    unused = sorted(set(files) - used)
    if unused:
        logging.info("%s: %d checkpoint tensors not used (e.g. %s)", path, len(unused), unused[:3])
    model = nnx.merge(graphdef, nnx.from_flat_state(flat))
    model.hf_config_json = json.dumps(cfg)
    return model


def _merge(base: dict, new: dict) -> dict:
    """``base`` updated by ``new``, nested dicts merged (keeps e.g. the original token ids)."""
    out = dict(base)
    for k, v in new.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _architecture(model: nnx.Module) -> str:
    if isinstance(model, LlavaNext):
        return "LlavaNextForConditionalGeneration"
    if isinstance(model, Llava):
        return "LlavaForConditionalGeneration"
    if isinstance(model, CLIPVision):
        return "CLIPVisionModel"
    if isinstance(model, Llama):
        return {"mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}.get(
            model.config.model_type, "LlamaForCausalLM")
    raise TypeError(f"cannot export {type(model).__name__}")


def iter_hf_tensors(model: nnx.Module, dtype=None) -> Iterator[tuple[str, np.ndarray]]:
    """``(transformers name, array)`` for every parameter of ``model`` (gathered to the host)."""
    n_in = _linear_inputs(model)
    for p, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        value = var.get_value()
        if not value.is_fully_addressable:  # sharded across hosts: every process takes part
            value = multihost_utils.process_allgather(value, tiled=True)
        arr = np.asarray(jax.device_get(value))
        if dtype is not None:
            arr = arr.astype(dtype)
        yield hf_name(model, p), to_hf(p[-1], arr, n_in.get(tuple(p)))


def save_pretrained(model: nnx.Module, path: str, *, dtype=None, assets_from: str | None = None) -> None:
    """Write ``model`` as a transformers checkpoint directory (``config.json`` + ``model.safetensors``),
    plus the tokenizer / processor files of the checkpoint directory ``assets_from``.

    Call it on every process: arrays sharded across hosts are gathered, process 0 writes.
    """
    architecture = _architecture(model)
    tensors = dict(iter_hf_tensors(model, dtype))
    if jax.process_index() != 0:
        return
    os.makedirs(path, exist_ok=True)
    if assets_from:
        for name in ASSET_FILES:
            if os.path.exists(os.path.join(assets_from, name)):
                shutil.copyfile(os.path.join(assets_from, name), os.path.join(path, name))
    if architecture.startswith("Llava") or architecture == "CLIPVisionModel":
        # The pooled-output LayerNorm is unused by LLaVA; write an identity so nothing is left random.
        prefix = "" if architecture == "CLIPVisionModel" else "vision_tower."
        width = model.config.vision.hidden_size if architecture.startswith("Llava") else model.config.hidden_size
        some = next(iter(tensors.values()))
        tensors[prefix + "post_layernorm.weight"] = np.ones((width,), some.dtype)
        tensors[prefix + "post_layernorm.bias"] = np.zeros((width,), some.dtype)
    cfg = _merge(json.loads(getattr(model, "hf_config_json", "{}")), model.config.to_hf())
    cfg["architectures"] = [architecture]
    cfg["dtype"] = str(np.dtype(next(iter(tensors.values())).dtype))
    write_safetensors(os.path.join(path, "model.safetensors"), tensors)
    tmp = os.path.join(path, "config.json.tmp")
    with open(tmp, "w") as f:
        json.dump(cfg, f, indent=2)
    os.replace(tmp, os.path.join(path, "config.json"))
