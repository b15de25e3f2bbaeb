"""LoRA adapters on every linear layer of the language model (METHOD.md §5: r 64, α 16, dropout 0.05).

``apply_lora(model, rank, alpha, dropout)`` wraps each LM ``Linear`` (attention q/k/v/o and MLP
gate/up/down; not the LM head, as PEFT's ``all-linear``) in a ``LoRALinear``:
``y = base(x) + (α/r) · dropout(x) · A · B`` with ``A`` Kaiming-uniform (PEFT's init) and ``B = 0``,
so the wrapped model starts exactly equal to the base. Train with
``DPOStep(..., trainable=lora_trainable, prepare=prepare)``: only ``A``/``B`` are trained and carry
optimizer state; the base weights sit in the frozen part of the split, so the reference policy *is*
the frozen base (reference log-probs are computed before training, when ``B = 0``) and no second
copy of the model is held. ``merge_lora(model)`` folds ``(α/r)·A·B`` into the base kernels and
restores plain ``Linear`` layers (for export or the next iteration's base).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from rlaifv_jax.core import sharding as shd
from rlaifv_jax.models.layers import Linear

TARGETS = (("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")), ("mlp", ("gate_proj", "up_proj", "down_proj")))


class LoRAParam(nnx.Param):
    """A LoRA adapter matrix (the only trainable variables under LoRA)."""


class LoRAKey(nnx.Variable):
    """Per-module dropout key data, filled by ``prepare`` inside the train step."""


class LoRALinear(nnx.Module):
    def __init__(self, base: Linear, *, rank: int, alpha: float, dropout: float, rngs: nnx.Rngs):
        self.base = base
        shape = base.kernel[...].shape
        in_shape, out_shape = shape[: base.n_in], shape[base.n_in:]
        axes = base.kernel.axes
        fan_in = math.prod(in_shape)
        bound = 1.0 / math.sqrt(fan_in)  # kaiming_uniform(a=√5) as in PEFT / torch Linear
        dtype = base.kernel[...].dtype
        self.lora_a = LoRAParam(jax.random.uniform(rngs.params(), (*in_shape, rank), jnp.float32, -bound, bound).astype(dtype),
                                axes=tuple(axes[: base.n_in]) + (None,))
        self.lora_b = LoRAParam(jnp.zeros((rank, *out_shape), dtype), axes=(None,) + tuple(axes[base.n_in:]))
        self.key = LoRAKey(jnp.zeros((2,), jnp.uint32))
        self.scale = alpha / rank
        self.dropout = dropout
        self.train_mode = False

    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.base(x)
        dtype, n_in = self.base.dtype, self.base.n_in
        h = x.astype(dtype)
        if self.train_mode and self.dropout > 0:
            keep = jax.random.bernoulli(jax.random.wrap_key_data(self.key[...]), 1.0 - self.dropout, h.shape)
            h = jnp.where(keep, h / (1.0 - self.dropout), 0).astype(dtype)
        h = jnp.tensordot(h, self.lora_a[...].astype(dtype), axes=(tuple(range(h.ndim - n_in, h.ndim)), tuple(range(n_in))))
        h = jnp.tensordot(h, self.lora_b[...].astype(dtype), axes=((h.ndim - 1,), (0,)))
        return y + (self.scale * h).astype(y.dtype)


def _lm(model: nnx.Module):
    return getattr(model, "language_model", model)


def lora_modules(model: nnx.Module) -> list[LoRALinear]:
    return [m for _, m in nnx.iter_modules(model) if isinstance(m, LoRALinear)]


def apply_lora(model: nnx.Module, *, rank: int = 64, alpha: float = 16.0, dropout: float = 0.05,
               seed: int = 0, mesh: Mesh | None = None, rules: shd.Rules = shd.TRAIN_RULES) -> nnx.Module:
    """Wrap every LM linear layer in place (see module docstring); returns ``model``."""
    if lora_modules(model):
        raise ValueError("model already has LoRA adapters")
    rngs = nnx.Rngs(seed)
    for layer in _lm(model).layers:
        for group, names in TARGETS:
            parent = getattr(layer, group)
            for name in names:
                setattr(parent, name, LoRALinear(getattr(parent, name), rank=rank, alpha=alpha, dropout=dropout, rngs=rngs))
    if mesh is not None:
        shd.shard_module(model, mesh, rules)
    return model


def lora_trainable(path: tuple, var) -> bool:
    """``DPOStep`` trainable filter: only the adapters."""
    return isinstance(var, LoRAParam)


def prepare(model: nnx.Module, rng: jax.Array, train: bool) -> None:
    """``DPOStep`` hook: dropout on (with a distinct key per module) for training."""
    for i, m in enumerate(lora_modules(model)):
        m.train_mode = train
        m.key[...] = jax.random.key_data(jax.random.fold_in(rng, i)).astype(jnp.uint32)


def merge_lora(model: nnx.Module) -> nnx.Module:
    """Fold the adapters into the base kernels and put plain ``Linear`` layers back (in place)."""
    for layer in _lm(model).layers:
        for group, names in TARGETS:
            parent = getattr(layer, group)
            for name in names:
                m = getattr(parent, name)
                if not isinstance(m, LoRALinear):
                    continue
                kernel = m.base.kernel[...]
                delta = jnp.tensordot(m.lora_a[...].astype(jnp.float32), m.lora_b[...].astype(jnp.float32), axes=1)
                m.base.kernel[...] = (kernel.astype(jnp.float32) + m.scale * delta).astype(kernel.dtype)
                setattr(parent, name, m.base)
    return model
