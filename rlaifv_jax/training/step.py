"""The sharded DPO train step and its optimizer (METHOD.md §5): ``DPOStep(state, batch)``."""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from rlaifv_jax.core import sharding as shd
from rlaifv_jax.core.tree import flat_values, path_key, unflat_values
from rlaifv_jax.data import buckets as bucketing
from rlaifv_jax.engine.logps import MODEL_KEYS, Batch, pair_logps
from rlaifv_jax.training.loss import METRIC_NAMES, dpo_loss_sums, metrics_from_sums

# Parameter groups that DPO trains (METHOD.md §5): the projector and the language model (and the
# LLaVA-NeXT image_newline). The vision tower is frozen: it gets no gradient and no optimizer state.
TRAINABLE_PREFIXES: tuple[str, ...] = ("multi_modal_projector", "language_model", "image_newline")


def default_trainable(path: tuple, var: Any) -> bool:
    """NNX filter of trainable variables: ``Param``s outside ``vision_tower`` (a text-only model: all)."""
    return isinstance(var, nnx.Param) and (not path or path[0] != "vision_tower")


STEP_KEYS = MODEL_KEYS + ("ref_chosen_logps", "ref_rejected_logps", "weights")


# ----------------------------------------------------------------------------- optimizer
@dataclasses.dataclass(frozen=True)
class OptimSettings:
    """AdamW + clipping + warm-up/cosine schedule (METHOD.md §5 defaults; HF Trainer semantics)."""

    learning_rate: float = 5e-7
    total_steps: int = 1000  # optimizer steps the schedule spans
    warmup_ratio: float = 0.05  # warm-up steps = ceil(ratio · total_steps), linear from 0
    weight_decay: float = 0.01  # decoupled; applied to ≥2-D params only (no biases / norms)
    max_grad_norm: float = 1.0  # global-norm clipping; <= 0 disables
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    schedule: str = "cosine"  # "cosine" (to 0 at total_steps) or "constant" (after warm-up)
    master_dtype: str = "float32"  # the train state's copy of the trainable params (float32 or bfloat16)
    state_dtype: str = "float32"  # Adam's moments as stored between steps (float32 or bfloat16)

    def __post_init__(self):
        for field in ("master_dtype", "state_dtype"):
            if getattr(self, field) not in FLOAT_DTYPES:
                raise ValueError(f"OptimSettings.{field}={getattr(self, field)!r}: expected one of {sorted(FLOAT_DTYPES)}")


FLOAT_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def schedule_steps(cfg: OptimSettings) -> np.ndarray:
    """``[warm-up steps, decay end]`` of the schedule (``learning_rate_at``'s ``steps``): warm-up =
    ceil(warmup_ratio · total_steps), cosine to 0 at max(total_steps, warm-up + 1)."""
    if cfg.schedule not in ("cosine", "constant"):
        raise ValueError(f"schedule must be 'cosine' or 'constant', got {cfg.schedule!r}")
    warmup = math.ceil(cfg.warmup_ratio * cfg.total_steps)
    return np.asarray([warmup, max(cfg.total_steps, warmup + 1)], np.int32)


def learning_rate_at(cfg: OptimSettings, count: jax.Array, steps: jax.Array) -> jax.Array:
    """The learning rate after ``count`` optimizer steps, for ``steps = schedule_steps(cfg)``: linear
    from 0 over the warm-up, then cosine decay to 0 at the decay end (``cfg.schedule="cosine"``,
    ``optax.warmup_cosine_decay_schedule``) or constant. ``steps`` is an argument of the compiled
    train step, not a constant in it, so DPO runs of different lengths (each online iteration's) share
    one compiled step."""
    count, steps = jnp.asarray(count, jnp.float32), jnp.asarray(steps, jnp.float32)
    warmup, end = steps[0], steps[1]
    peak = jnp.float32(cfg.learning_rate)
    rising = peak * jnp.clip(count, 0.0, warmup) / jnp.maximum(warmup, 1.0)
    if cfg.schedule == "cosine":
        t = jnp.clip(count - warmup, 0.0, end - warmup)
        after = peak * (0.5 * (1.0 + jnp.cos(jnp.pi * t / (end - warmup))))
    else:
        after = peak
    return jnp.where(count < warmup, rising, after)


def _cast_floats(tree: Any, dtype) -> Any:
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def stored_in(tx: optax.GradientTransformation, dtype) -> optax.GradientTransformation:
    """``tx`` with its floating state stored in ``dtype`` between steps and updated in float32."""

    def init(params):
        return _cast_floats(tx.init(params), dtype)

    def update(updates, state, params=None):
        updates, state = tx.update(updates, _cast_floats(state, jnp.float32), params)
        return updates, _cast_floats(state, dtype)

    return optax.GradientTransformation(init, update)


def make_optimizer(cfg: OptimSettings) -> optax.GradientTransformation:
    """Clipping + AdamW up to the learning rate: its update times ``-learning_rate_at(...)`` is
    ``optax.adamw``'s with that schedule (the train step applies the rate)."""
    decay_mask = lambda params: jax.tree.map(lambda x: x.ndim >= 2, params)  # noqa: E731
    parts = [optax.clip_by_global_norm(cfg.max_grad_norm)] if cfg.max_grad_norm > 0 else []
    parts += [optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps),
              optax.add_decayed_weights(cfg.weight_decay, decay_mask)]
    tx = optax.chain(*parts)
    return tx if cfg.state_dtype == "float32" else stored_in(tx, FLOAT_DTYPES[cfg.state_dtype])


# ----------------------------------------------------------------------------- train step
@dataclasses.dataclass(frozen=True)
class LossSettings:
    """Options of ``dpo_pair_terms`` plus gradient accumulation."""

    beta: float = 0.1
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0
    sft_weight: float = 0.0
    average: bool = False
    grad_accum: int = 1  # micro-batches per optimizer step; the result equals the one big batch
    answer_window: int | None = None  # max answer tokens (LM head on that window only); None: automatic, the batch's longest answer, bucketed (exact)
    remat: str = "none"  # per decoder layer: "none", "full" (recompute the layer in the backward pass) or
    # "dots" (keep the matmul outputs, recompute the rest); less activation memory, more FLOPs

    def __post_init__(self):
        if self.remat not in REMAT_CHOICES:
            raise ValueError(f"LossSettings.remat={self.remat!r}: expected one of {REMAT_CHOICES}")


REMAT_CHOICES = ("none", "full", "dots")


def _like_params(abstract: Any, param_shardings: Mapping[str, Any], replicated: NamedSharding) -> Any:
    """Shardings for an optax state: a leaf under a dict key that names a param of the same shape
    takes that param's sharding (Adam's mu / nu), everything else is replicated."""

    def one(path, leaf):
        for entry in reversed(path):
            key = getattr(entry, "key", None)
            if isinstance(key, str) and key in param_shardings:
                sh, shape = param_shardings[key]
                if tuple(leaf.shape) == tuple(shape):
                    return sh
                break
        return replicated

    return jax.tree_util.tree_map_with_path(one, abstract)


class DPOStep:
    """The jitted, sharded DPO train step for one model.

    The model is split once into ``graphdef``, the trainable variables (``trainable`` filter; by
    default projector + LM) and the frozen rest (vision tower, and the base weights under LoRA).
    The train state is a plain pytree ``{"step", "params", "opt_state", "rng"}`` with ``params`` a
    flat ``{path: array}`` dict of master weights in ``optim.master_dtype`` (default float32; the
    forward casts to the module's compute ``dtype``, e.g. bfloat16). ``step(state, batch) ->
    (state, metrics)`` is one optimizer step on the whole batch (``grad_accum`` micro-batches,
    exact), jitted with explicit in/out shardings and the state donated. One compile per batch
    structure; ``compiles`` counts traces.

    ``model`` may be abstract (``nnx.eval_shape``: ``jax.ShapeDtypeStruct`` leaves): nothing is
    placed on devices, and :meth:`lower` gives the step's program for ``rlaifv_jax.plan`` (the mesh
    may then hold compile-only TPU devices); running it needs a concrete model.
    """

    def __init__(self, model: nnx.Module, optim: OptimSettings, loss: LossSettings = LossSettings(), *,
                 mesh: Mesh | None = None, rules: shd.Rules = shd.TRAIN_RULES,
                 trainable: Callable = default_trainable,
                 prepare: Callable[[nnx.Module, jax.Array, bool], None] | None = None):
        self.mesh = mesh or shd.make_mesh(1, 1, 1, devices=jax.devices()[:1])
        self.rules = rules
        self.optim, self.loss = optim, loss
        self.tx = make_optimizer(optim)
        self.schedule_steps = schedule_steps(optim)
        self.prepare = prepare  # hook(model, rng, train) run on the merged model (LoRA dropout keys)
        self.graphdef, self.trainable_template, self.frozen_template = nnx.split(model, trainable, ...)
        self.replicated = NamedSharding(self.mesh, P())
        t_sh = shd.state_shardings(self.trainable_template, self.mesh, rules)
        f_sh = shd.state_shardings(self.frozen_template, self.mesh, rules)
        self.param_shardings = {path_key(p): v.get_value() for p, v in nnx.to_flat_state(t_sh)}
        self.frozen_shardings = {path_key(p): v.get_value() for p, v in nnx.to_flat_state(f_sh)}
        frozen = flat_values(self.frozen_template)
        self.is_abstract = any(isinstance(v, jax.ShapeDtypeStruct)
                               for v in jax.tree.leaves(flat_values(self.trainable_template)) + jax.tree.leaves(frozen))
        self.frozen = ({k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=self.frozen_shardings[k])
                        for k, v in frozen.items()} if self.is_abstract
                       else jax.device_put(frozen, self.frozen_shardings))
        master = FLOAT_DTYPES[optim.master_dtype]
        abstract_params = {k: jax.ShapeDtypeStruct(v.shape, master if jnp.issubdtype(v.dtype, jnp.floating) else v.dtype)
                           for k, v in flat_values(self.trainable_template).items()}
        abstract_opt = jax.eval_shape(self.tx.init, abstract_params)
        shapes = {k: (self.param_shardings[k], v.shape) for k, v in abstract_params.items()}
        self.state_shardings = {
            "step": self.replicated,
            "params": self.param_shardings,
            "opt_state": _like_params(abstract_opt, shapes, self.replicated),
            "rng": self.replicated,
        }
        self._abstract = {"step": jax.ShapeDtypeStruct((), jnp.int32), "params": abstract_params,
                          "opt_state": abstract_opt, "rng": jax.ShapeDtypeStruct((2,), jnp.uint32)}
        self.compiles = 0
        self._jitted: dict[Any, Any] = {}

    # -- state ---------------------------------------------------------------------------------
    def init_state(self, seed: int = 0) -> dict[str, Any]:
        """The step-0 state, every array already on its final sharding."""
        self._concrete("init_state")
        # A copy (never an alias of the model's buffers): the state is donated to the step.
        params = jax.device_put(flat_values(self.trainable_template), self.param_shardings, may_alias=False)
        params = {k: x.astype(self._abstract["params"][k].dtype) for k, x in params.items()}
        opt_state = jax.jit(self.tx.init, out_shardings=self.state_shardings["opt_state"])(params)
        return {"step": jax.device_put(jnp.zeros((), jnp.int32), self.replicated), "params": params,
                "opt_state": opt_state,
                "rng": jax.device_put(jax.random.key_data(jax.random.key(seed)).astype(jnp.uint32), self.replicated)}

    def _concrete(self, what: str) -> None:
        if self.is_abstract:
            raise ValueError(f"DPOStep.{what}: this step was built from an abstract model (nnx.eval_shape); "
                             "it can only be lowered (DPOStep.lower)")

    def abstract_state(self) -> dict[str, Any]:
        """``ShapeDtypeStruct``s with target shardings: the restore target for ``Checkpointer``."""
        return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            self._abstract, self.state_shardings)

    def model(self, state: Mapping[str, Any] | None = None) -> nnx.Module:
        """An NNX model holding ``state['params']`` (default: the initial ones) and the frozen part,
        params cast back to the module's param dtype (for export, sampling, reference passes)."""
        template = flat_values(self.trainable_template)
        params = template if state is None else {
            k: jnp.asarray(v).astype(template[k].dtype) for k, v in state["params"].items()}
        return nnx.merge(self.graphdef, unflat_values(self.trainable_template, params),
                         unflat_values(self.frozen_template, self.frozen))

    # -- the step ------------------------------------------------------------------------------
    def _loss_fn(self, params, frozen, batch, global_count, rng):
        frozen = jax.lax.stop_gradient(frozen)
        model = nnx.merge(self.graphdef, unflat_values(self.trainable_template, params),
                          unflat_values(self.frozen_template, frozen))
        if self.prepare is not None:
            self.prepare(model, rng, True)
        c = self.loss
        lp = pair_logps(model, batch, answer_window=c.answer_window, remat=c.remat)
        loss_sum, sums = dpo_loss_sums(
            lp["chosen"], lp["rejected"], batch["ref_chosen_logps"], batch["ref_rejected_logps"],
            weights=batch.get("weights"), beta=c.beta, loss_type=c.loss_type,
            label_smoothing=c.label_smoothing, sft_weight=c.sft_weight, average=c.average,
            chosen_lengths=lp["chosen_len"], rejected_lengths=lp["rejected_len"])
        return loss_sum / global_count, sums

    def _grads(self, state, frozen, batch):
        """Accumulated gradient of the batch-mean loss and the accumulated metric sums."""
        k = self.loss.grad_accum
        n = batch["chosen_tokens"].shape[0]
        if n % k:
            raise ValueError(f"batch of {n} pairs does not split into grad_accum={k} micro-batches")
        weights = batch.get("weights")
        global_count = jnp.maximum(jnp.float32(n) if weights is None else jnp.sum(weights.astype(jnp.float32)), 1e-12)
        rng = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
        grad_fn = jax.grad(self._loss_fn, has_aux=True)
        if k == 1:
            grads, sums = grad_fn(state["params"], frozen, batch, global_count, rng)
        else:
            # micro-batch j = rows j, j+k, j+2k, ...: a reshape that keeps each device's rows local.
            micro = jax.tree.map(lambda x: jnp.swapaxes(x.reshape((n // k, k) + x.shape[1:]), 0, 1), batch)

            def body(carry, xs):
                mb, j = xs
                g, s = grad_fn(state["params"], frozen, mb, global_count, jax.random.fold_in(rng, j))
                return jax.tree.map(jnp.add, carry, (g, s)), None

            zero_g = jax.tree.map(jnp.zeros_like, state["params"])
            zero_s = {name: jnp.zeros((), jnp.float32) for name in METRIC_NAMES + ("count",)}
            (grads, sums), _ = jax.lax.scan(body, (zero_g, zero_s), (micro, jnp.arange(k)))
        return grads, sums

    def _step(self, state, frozen, batch, steps):
        self.compiles += 1  # runs at trace time only
        grads, sums = self._grads(state, frozen, batch)
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = self.tx.update(grads, state["opt_state"], state["params"])
        rate = learning_rate_at(self.optim, state["step"], steps)
        params = optax.apply_updates(state["params"], jax.tree.map(lambda u: -rate.astype(u.dtype) * u, updates))
        metrics = metrics_from_sums(sums)
        metrics["grad_norm"] = grad_norm
        metrics["learning_rate"] = rate
        metrics["pairs"] = sums["count"]
        new_state = {"step": state["step"] + 1, "params": params, "opt_state": opt_state, "rng": state["rng"]}
        return new_state, metrics

    def gradients(self, state: dict[str, Any], batch: Batch) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
        """``(grads, metrics)`` of one step without applying it (not donated; for tests and probes)."""
        batch = {k: v for k, v in batch.items() if k in STEP_KEYS}
        with jax.set_mesh(self.mesh):
            grads, sums = jax.jit(self._grads)(state, self.frozen, jax.device_put(batch, self.batch_shardings(batch)))
        return grads, metrics_from_sums(sums)

    def batch_shardings(self, batch: Batch) -> dict[str, NamedSharding]:
        return {k: shd.batch_sharding(self.mesh, np.ndim(v), self.rules) for k, v in batch.items()}

    def program(self, batch: Batch) -> tuple[Any, dict[str, NamedSharding]]:
        """The jitted step ``(state, frozen, batch, schedule_steps) -> (state, metrics)`` for ``batch``'s
        structure (arrays or ``ShapeDtypeStruct``s; keys outside
        ``STEP_KEYS`` ignored), created once per shape/dtype signature, and the batch shardings."""
        batch = {k: v for k, v in batch.items() if k in STEP_KEYS}
        key = tuple(sorted((k, tuple(np.shape(v)), str(v.dtype if hasattr(v, "dtype") else np.asarray(v).dtype))
                           for k, v in batch.items()))
        b_sh = self.batch_shardings(batch)
        fn = self._jitted.get(key)
        if fn is None:
            metric_sh = {name: self.replicated for name in METRIC_NAMES + ("grad_norm", "learning_rate", "pairs")}
            fn = jax.jit(self._step, in_shardings=(self.state_shardings, self.frozen_shardings, b_sh, self.replicated),
                         out_shardings=(self.state_shardings, metric_sh), donate_argnums=(0,))
            self._jitted[key] = fn
        return fn, b_sh

    def lower(self, batch: Batch) -> jax.stages.Lowered:
        """The step's program lowered for a batch of this structure, from abstract state and shardings
        (nothing touches a device; works on compile-only TPU meshes)."""
        fn, b_sh = self.program(batch)
        batch = {k: jax.ShapeDtypeStruct(np.shape(v), v.dtype if hasattr(v, "dtype") else np.asarray(v).dtype,
                                         sharding=b_sh[k]) for k, v in batch.items() if k in b_sh}
        frozen = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=self.frozen_shardings[k])
                  for k, v in self.frozen.items()}
        with jax.set_mesh(self.mesh):
            steps = jax.ShapeDtypeStruct(self.schedule_steps.shape, self.schedule_steps.dtype, sharding=self.replicated)
            return fn.lower(self.abstract_state(), frozen, batch, steps)

    def __call__(self, state: dict[str, Any], batch: Batch) -> tuple[dict[str, Any], dict[str, jax.Array]]:
        batch = {k: v for k, v in batch.items() if k in STEP_KEYS}
        window = self.loss.answer_window
        longest = max(int(np.max(batch["chosen_len"])), int(np.max(batch["rejected_len"])))
        if window is not None:
            if longest > window:
                raise ValueError(f"an answer of {longest} tokens exceeds loss.answer_window={window}")
        elif bucketing.WINDOW_KEY not in batch:  # automatic window: the longest answer, bucketed (exact)
            length = np.shape(batch["chosen_tokens"])[1]
            if jax.process_count() > 1:  # one padded length and one window for every host's share
                length, longest = (int(v) for v in np.max(
                    multihost_utils.process_allgather(np.asarray([length, longest])), axis=0))
                batch = bucketing.pad_tokens(batch, length)
            window = bucketing.answer_window(longest, length)
            if window is not None:
                batch = bucketing.with_answer_window(batch, window)
        fn, b_sh = self.program(batch)
        if jax.process_count() > 1:  # each host holds its share of the global batch
            batch = {k: jax.make_array_from_process_local_data(b_sh[k], np.asarray(v)) for k, v in batch.items()}
        else:
            batch = jax.device_put(batch, b_sh)
        with jax.set_mesh(self.mesh):
            return fn(state, self.frozen, batch, jax.device_put(self.schedule_steps, self.replicated))
