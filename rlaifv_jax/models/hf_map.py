"""Where each parameter of ours lives in a transformers checkpoint: its name and its layout.

Built in: Llama (also Mistral, Qwen2), CLIP vision, LLaVA and LLaVA-NeXT. A new family defines on its
model class (and registers it in ``hf.ARCHITECTURES``):

* ``HF_ARCHITECTURE: str``: the ``architectures`` entry written on export;
* ``hf_name(self, path) -> str``: the transformers name of the parameter at ``path``;
* optional ``hf_to_ours(self, path, tensor) -> np.ndarray | None``: ``tensor`` is a safetensors
  slice (index it to read, ``tensor[:]`` for all of it); return the whole parameter in our layout,
  or ``None`` for the default layout (then each process reads only the slices it needs);
* optional ``ours_to_hf(self, path, array) -> np.ndarray | None``: the inverse, ``None`` = default.

Default layout (:func:`layout`): ``Linear`` kernels ``[in..., out...]`` are transformers'
``[out, in]`` with each side flattened; kernels with 3 or more input dims are patch convolutions,
``[in, *spatial, out]`` ↔ ``[out, in, *spatial]``; biases are flattened; the rest is as is.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
from flax import nnx

from rlaifv_jax.models.clip import CLIPVision
from rlaifv_jax.models.layers import Linear
from rlaifv_jax.models.llama import Llama
from rlaifv_jax.models.llava import Llava, LlavaNext

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
    if hasattr(model, "hf_name"):
        return model.hf_name(path)
    if isinstance(model, Llama):
        return _llama_name(path)
    if isinstance(model, CLIPVision):
        return _clip_name(path)
    head, rest = path[0], path[1:]
    if isinstance(model, Llava):
        if head == "language_model":
            return "language_model." + _llama_name(rest)
        if head == "vision_tower":
            return "vision_tower." + _clip_name(rest)
        if head == "multi_modal_projector":
            return f"multi_modal_projector.{rest[0]}.{_leaf(rest[1])}"
        if head == "image_newline":
            return "image_newline"
    raise KeyError(f"no Hugging Face name for {path} of {type(model).__name__}")


def canonical(key: str, architecture: str) -> str:
    """A checkpoint's tensor name in the spelling ``hf_name`` uses (older layouts are aliased)."""
    aliases = {"CLIPVisionModel": _CLIP_ALIASES}.get(architecture, _LLAVA_ALIASES if architecture.startswith("Llava") else ())
    for alt, canon in aliases:
        if key.startswith(alt):
            return canon + key[len(alt):]
    return key


def architecture(model: nnx.Module) -> str:
    """The ``architectures`` entry transformers needs to load an export of ``model``."""
    if hasattr(model, "HF_ARCHITECTURE"):
        return model.HF_ARCHITECTURE
    if isinstance(model, LlavaNext):
        return "LlavaNextForConditionalGeneration"
    if isinstance(model, Llava):
        return "LlavaForConditionalGeneration"
    if isinstance(model, CLIPVision):
        return "CLIPVisionModel"
    if isinstance(model, Llama):
        return {"mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}.get(
            model.config.model_type, "LlamaForCausalLM")
    raise TypeError(f"cannot export {type(model).__name__}: no HF_ARCHITECTURE")


# ----------------------------------------------------------------------------- layouts
def bounds(index: tuple, shape: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
    """``(start, stop)`` per dim of a ``make_array_from_callback`` index (unit-step slices)."""
    index = tuple(index) + (slice(None),) * (len(shape) - len(index))
    out = []
    for s, n in zip(index, shape):
        start, stop, step = s.indices(n)
        if step != 1:
            raise ValueError(f"strided index {s} is not supported")
        out.append((start, stop))
    return tuple(out)


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where an array of ours sits in its transformers tensor: HF dim ``j`` is our dims ``groups[j]``
    flattened (row-major, in that order). E.g. a q-projection kernel ``[embed, heads, head_dim]`` is
    HF ``[heads * head_dim, embed]``: ``groups == ((1, 2), (0,))``."""
    shape: tuple[int, ...]
    groups: tuple[tuple[int, ...], ...]

    @property
    def order(self) -> tuple[int, ...]:
        return tuple(d for g in self.groups for d in g)

    @property
    def hf_shape(self) -> tuple[int, ...]:
        return tuple(math.prod(self.shape[d] for d in g) for g in self.groups)

    def to_hf(self, ours: np.ndarray) -> np.ndarray:
        return np.transpose(ours, self.order).reshape(self.hf_shape)

    def _split(self, index: tuple) -> tuple[tuple[slice, ...], list[int], tuple[slice, ...]]:
        bnd = bounds(index, self.shape)
        hf_index, block, inner = [], [], []
        for g in self.groups:
            rest = math.prod(self.shape[d] for d in g[1:])
            a, b = bnd[g[0]]
            hf_index.append(slice(a * rest, b * rest))
            block += [b - a] + [self.shape[d] for d in g[1:]]
            inner += [slice(None)] + [slice(*bnd[d]) for d in g[1:]]
        return tuple(hf_index), block, tuple(inner)

    def hf_index(self, index: tuple) -> tuple[slice, ...]:
        """The block of the HF tensor to read for our ``array[index]``: for each HF dim, the rows of
        its leading sub-dim in ``index``, whole along the others (our rules never split those)."""
        return self._split(index)[0]

    def from_hf_block(self, block: np.ndarray, index: tuple) -> np.ndarray:
        """Our ``array[index]`` from the HF block read at ``hf_index(index)``."""
        _, shape, inner = self._split(index)
        return np.transpose(block.reshape(shape)[inner], np.argsort(self.order))


def layout(leaf: str, shape: tuple[int, ...], n_in: int | None) -> Layout:
    """The default :class:`Layout` of a parameter (module docstring)."""
    nd = len(shape)
    if leaf == "kernel":
        n_in = 1 if n_in is None else n_in
        ins, outs = tuple(range(n_in)), tuple(range(n_in, nd))
        groups = tuple((d,) for d in outs + ins) if n_in >= 3 else (outs, ins)
    elif leaf == "bias":
        groups = (tuple(range(nd)),)
    else:
        groups = tuple((d,) for d in range(nd))
    return Layout(tuple(shape), groups)


def linear_inputs(model: nnx.Module) -> dict[tuple, int]:
    """Number of input dims of every ``Linear`` kernel, by kernel path."""
    return {tuple(p) + ("kernel",): m.n_in for p, m in nnx.iter_modules(model) if isinstance(m, Linear)}


def to_hf(model: nnx.Module, path: tuple, array: np.ndarray, n_in: int | None) -> np.ndarray:
    """Parameter ``path`` of ``model`` (whole, on the host) in the transformers layout."""
    hook = getattr(model, "ours_to_hf", None)
    out = hook(path, array) if hook else None
    return layout(path[-1], array.shape, n_in).to_hf(array) if out is None else out


def extra_tensors(model: nnx.Module, architecture: str, dtype) -> dict[str, np.ndarray]:
    """Tensors transformers expects that we do not keep: CLIP's pooled-output LayerNorm (unused by
    LLaVA), written as an identity so nothing is left randomly initialised."""
    if not (architecture.startswith("Llava") or architecture == "CLIPVisionModel"):
        return {}
    prefix = "" if architecture == "CLIPVisionModel" else "vision_tower."
    width = model.config.vision.hidden_size if architecture.startswith("Llava") else model.config.hidden_size
    return {prefix + "post_layernorm.weight": np.ones((width,), dtype),
            prefix + "post_layernorm.bias": np.zeros((width,), dtype)}
