"""DPO objective for RLAIF-V (METHOD.md §5): pure loss, metrics and answer log-probabilities.

Conventions
-----------
* A "log-prob" of a response is the SUM over its answer tokens (the assistant answer including the
  end-of-turn token) of ``log p(token_t | tokens_<t)``; prompt and image positions never count.
  ``average=True`` divides policy *and* reference log-probs by the answer lengths first.
* ``l = (π(y_w) − π(y_l)) − (ref(y_w) − ref(y_l))`` and β multiplies ``l`` exactly once.
* Loss variants follow TRL's ``DPOTrainer.dpo_loss`` (ε = ``label_smoothing``):
    - ``sigmoid``: ``−logσ(β l)(1−ε) − logσ(−β l) ε``
    - ``robust``:  ``(−logσ(β l)(1−ε) + logσ(−β l) ε) / (1 − 2ε)``
    - ``hinge``:   ``relu(1 − β l)``
    - ``ipo``:     ``(l − 1/(2β))²``
  TRL divides the log-probs by the response length for ``ipo`` only, implicitly. Here nothing is
  implicit: TRL's IPO is ``loss_type="ipo", average=True``; ``average=False`` gives IPO on sums.
* ``sft_weight`` adds ``−sft_weight · π(y_w)`` per pair, with ``π(y_w)`` the same (summed, or averaged
  when ``average=True``) chosen log-prob that enters the DPO term.
* Metrics carry TRL's names. ``rewards/* = β·(π − ref)`` from the (possibly averaged) log-probs;
  ``rewards/accuracies`` is the share of pairs with chosen reward strictly above rejected reward.

Gradient accumulation
---------------------
``dpo_loss_sums`` returns weighted SUMS over valid pairs plus their ``count``. Sums from micro-batches
add up (``jax.tree.map(jnp.add, a, b)``) to the sums of the big batch, so ``metrics_from_sums`` of the
accumulated sums equals ``dpo_loss`` metrics of the big batch exactly; for the gradient, differentiate
``loss_sum / global_count`` in every micro-batch. ``dpo_loss`` is the one-batch convenience:
the same sums divided by the count.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from rlaifv_jax import sharding as shd

LossType = Literal["sigmoid", "ipo", "hinge", "robust"]
LOSS_TYPES: tuple[str, ...] = ("sigmoid", "ipo", "hinge", "robust")

METRIC_NAMES: tuple[str, ...] = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
    "logps/ref_chosen",
    "logps/ref_rejected",
    "loss",
)


def _check_options(loss_type: str, beta: float, label_smoothing: float) -> None:
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    if label_smoothing and loss_type in ("ipo", "hinge"):
        raise ValueError(f"label_smoothing has no meaning for loss_type={loss_type!r}")


def preference_losses(
    logits: jax.Array, *, beta: float, loss_type: LossType = "sigmoid", label_smoothing: float = 0.0
) -> jax.Array:
    """Per-pair loss from ``logits = (π_w − π_l) − (ref_w − ref_l)`` (β is applied here, once)."""
    _check_options(loss_type, beta, label_smoothing)
    eps = label_smoothing
    z = beta * logits
    if loss_type == "sigmoid":
        return -jax.nn.log_sigmoid(z) * (1.0 - eps) - jax.nn.log_sigmoid(-z) * eps
    if loss_type == "robust":
        return (-jax.nn.log_sigmoid(z) * (1.0 - eps) + jax.nn.log_sigmoid(-z) * eps) / (1.0 - 2.0 * eps)
    if loss_type == "hinge":
        return jax.nn.relu(1.0 - z)
    return (logits - 1.0 / (2.0 * beta)) ** 2  # ipo


def dpo_pair_terms(
    policy_chosen_logps: jax.Array,
    policy_rejected_logps: jax.Array,
    ref_chosen_logps: jax.Array,
    ref_rejected_logps: jax.Array,
    *,
    beta: float = 0.1,
    loss_type: LossType = "sigmoid",
    label_smoothing: float = 0.0,
    sft_weight: float = 0.0,
    chosen_lengths: jax.Array | None = None,
    rejected_lengths: jax.Array | None = None,
    average: bool = False,
) -> dict[str, jax.Array]:
    """Per-pair loss and metric values, each ``[B]`` float32, keyed by ``METRIC_NAMES``.

    All log-prob inputs are ``[B]`` sums over answer tokens; lengths are ``[B]`` answer-token counts
    (required when ``average=True``). Only ``"loss"`` carries gradient; the rest are stop-gradient.
    """
    f32 = jnp.float32
    pc, pr = policy_chosen_logps.astype(f32), policy_rejected_logps.astype(f32)
    rc, rr = ref_chosen_logps.astype(f32), ref_rejected_logps.astype(f32)
    if average:
        if chosen_lengths is None or rejected_lengths is None:
            raise ValueError("average=True needs chosen_lengths and rejected_lengths")
        lc = jnp.maximum(chosen_lengths.astype(f32), 1.0)
        lr = jnp.maximum(rejected_lengths.astype(f32), 1.0)
        pc, rc, pr, rr = pc / lc, rc / lc, pr / lr, rr / lr
    logits = (pc - pr) - (rc - rr)
    losses = preference_losses(logits, beta=beta, loss_type=loss_type, label_smoothing=label_smoothing)
    if sft_weight:
        losses = losses - sft_weight * pc
    chosen_rewards = jax.lax.stop_gradient(beta * (pc - rc))
    rejected_rewards = jax.lax.stop_gradient(beta * (pr - rr))
    sg = jax.lax.stop_gradient
    return {
        "rewards/chosen": chosen_rewards,
        "rewards/rejected": rejected_rewards,
        "rewards/accuracies": (chosen_rewards > rejected_rewards).astype(f32),
        "rewards/margins": chosen_rewards - rejected_rewards,
        "logps/chosen": sg(pc),
        "logps/rejected": sg(pr),
        "logps/ref_chosen": rc,
        "logps/ref_rejected": rr,
        "loss": losses,
    }


def dpo_loss_sums(
    policy_chosen_logps: jax.Array,
    policy_rejected_logps: jax.Array,
    ref_chosen_logps: jax.Array,
    ref_rejected_logps: jax.Array,
    *,
    weights: jax.Array | None = None,
    **kwargs,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Weighted sums over pairs: ``(loss_sum, sums)`` with ``sums[name]`` for ``METRIC_NAMES`` plus ``count``.

    ``weights`` ``[B]`` (1 = real pair, 0 = padding; default all ones) multiplies every per-pair term.
    ``kwargs`` are those of ``dpo_pair_terms``. Sums of micro-batches add up to the big batch's sums.
    """
    w = (
        jnp.ones(policy_chosen_logps.shape, jnp.float32) if weights is None else weights.astype(jnp.float32)
    )
    # A padded pair may hold garbage (inf/nan) log-probs: zero them before any math so that neither
    # the sums nor the gradient (0 · nan = nan) can see them.
    valid = w != 0
    clean = [
        jnp.where(valid, x, 0)
        for x in (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    ]
    terms = dpo_pair_terms(*clean, **kwargs)
    sums = {k: jnp.sum(w * v) for k, v in terms.items()}
    sums["count"] = jnp.sum(w)
    loss_sum = sums["loss"]
    sums["loss"] = jax.lax.stop_gradient(loss_sum)
    return loss_sum, sums


def metrics_from_sums(sums: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Means from (possibly accumulated) ``dpo_loss_sums`` sums; an empty batch gives zeros."""
    count = jnp.maximum(sums["count"], 1e-12)
    return {k: sums[k] / count for k in METRIC_NAMES}


def dpo_loss(
    policy_chosen_logps: jax.Array,
    policy_rejected_logps: jax.Array,
    ref_chosen_logps: jax.Array,
    ref_rejected_logps: jax.Array,
    *,
    beta: float = 0.1,
    loss_type: LossType = "sigmoid",
    label_smoothing: float = 0.0,
    sft_weight: float = 0.0,
    chosen_lengths: jax.Array | None = None,
    rejected_lengths: jax.Array | None = None,
    average: bool = False,
    weights: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Mean DPO loss over valid pairs and TRL-named mean metrics (see module docstring)."""
    loss_sum, sums = dpo_loss_sums(
        policy_chosen_logps,
        policy_rejected_logps,
        ref_chosen_logps,
        ref_rejected_logps,
        weights=weights,
        beta=beta,
        loss_type=loss_type,
        label_smoothing=label_smoothing,
        sft_weight=sft_weight,
        chosen_lengths=chosen_lengths,
        rejected_lengths=rejected_lengths,
        average=average,
    )
    loss = loss_sum / jnp.maximum(sums["count"], 1e-12)
    return loss, metrics_from_sums(sums)


def answer_logps(
    logits: jax.Array, tokens: jax.Array, answer_start: jax.Array, answer_len: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Sum of answer-token log-probs per row, and the number of answer tokens.

    Args:
      logits: ``[B, T, V]``, any float dtype; ``logits[:, t]`` is the model output at position ``t``
        and predicts ``tokens[:, t + 1]``.
      tokens: ``[B, T]`` int, the full input sequence (prompt, image tokens, answer, padding).
      answer_start: ``[B]`` int, index in ``tokens`` of the first answer token (≥ 1).
      answer_len: ``[B]`` int, number of answer tokens (including the end-of-turn token).

    Returns:
      ``(sum_logps [B] float32, count [B] int32)``. The mask comes from ``answer_start``/``answer_len``
      only (never from token ids, so an EOS equal to the pad id counts). Each term is
      ``logits[target] − logsumexp(logits)`` in float32: the target logit is gathered first and the
      logsumexp is a reduction whose float32 up-cast XLA fuses into it, so no ``[B, T, V]`` float32
      log-softmax is materialised. Answer tokens beyond position ``T − 1`` are not counted.
    """
    pred = logits[:, :-1]  # [B, T-1, V] predicts tokens[:, 1:]
    targets = tokens[:, 1:].astype(jnp.int32)
    target_logit = jnp.take_along_axis(pred, targets[..., None], axis=-1)[..., 0].astype(jnp.float32)
    row_max = jax.lax.stop_gradient(jnp.max(pred, axis=-1).astype(jnp.float32))
    lse = row_max + jnp.log(jnp.sum(jnp.exp(pred.astype(jnp.float32) - row_max[..., None]), axis=-1))
    positions = jnp.arange(1, tokens.shape[1], dtype=jnp.int32)[None, :]
    start = answer_start.astype(jnp.int32)[:, None]
    mask = (positions >= start) & (positions < start + answer_len.astype(jnp.int32)[:, None])
    token_logps = jnp.where(mask, target_logit - lse, 0.0)
    return jnp.sum(token_logps, axis=-1), jnp.sum(mask, axis=-1, dtype=jnp.int32)


# =============================================================================================
# Model-facing parts: pair log-probs, reference log-probs, the jitted sharded train step.
# Everything above this line is pure array math; everything below takes an NNX model.
# =============================================================================================



Batch = Mapping[str, Any]
# Parameter groups that DPO trains (METHOD.md §5): the projector and the language model (and the
# LLaVA-NeXT image_newline). The vision tower is frozen: it gets no gradient and no optimizer state.
TRAINABLE_PREFIXES: tuple[str, ...] = ("multi_modal_projector", "language_model", "image_newline")


def default_trainable(path: tuple, var: Any) -> bool:
    """NNX filter of trainable variables: ``Param``s outside ``vision_tower`` (a text-only model: all)."""
    return isinstance(var, nnx.Param) and (not path or path[0] != "vision_tower")


def path_key(path: tuple) -> str:
    """``('language_model', 'layers', 0, 'mlp', 'up_proj', 'kernel')`` → ``'language_model/layers/0/...'``."""
    return "/".join(str(p) for p in path)


def flat_values(state: nnx.State) -> dict[str, jax.Array]:
    """A flat ``{path_key: array}`` dict of an NNX state (what the optimizer and Orbax see)."""
    return {path_key(p): v.get_value() for p, v in nnx.to_flat_state(state)}


def unflat_values(template: nnx.State, values: Mapping[str, Any]) -> nnx.State:
    """Inverse of ``flat_values``: ``template``'s variables (metadata kept) holding ``values``."""
    return nnx.from_flat_state([(p, v.replace(values[path_key(p)])) for p, v in nnx.to_flat_state(template)])


def pair_logps(model: nnx.Module, batch: Batch, *, image_sizes: Any = None,
               answer_window: int | None = None) -> dict[str, jax.Array]:
    """Summed answer log-probs of the chosen and rejected responses of a pair batch.

    ``batch``: ``chosen_tokens``/``rejected_tokens`` ``[B, L]`` (right-padded; image placeholders
    expanded), ``answer_start``, ``chosen_len``, ``rejected_len`` ``[B]`` and, for a multimodal model,
    ``pixel_values`` ``[B, C, H, W]`` (one image per pair). Each image is encoded ONCE: its features
    are tiled over the chosen and the rejected rows, which run as one ``2B`` batch. The vision tower
    runs under ``stop_gradient`` (frozen); the projector is differentiable. Positions are
    ``arange(L)`` and the key mask comes from lengths (``t < answer_start + len``), never from ids.

    With ``answer_window = W`` (static, ≥ every answer length) the LM head and log-softmax run only
    on the ``W + 1`` positions from ``answer_start - 1`` on, instead of all ``L``.

    Returns ``{"chosen": [B], "rejected": [B], "chosen_len": [B], "rejected_len": [B]}`` (float32
    sums, int32 counts of answer tokens inside the window).
    """
    chosen, rejected = jnp.asarray(batch["chosen_tokens"]), jnp.asarray(batch["rejected_tokens"])
    b, length = chosen.shape
    tokens = jnp.concatenate([chosen, rejected], axis=0)
    start = jnp.asarray(batch["answer_start"], jnp.int32)
    lens = jnp.concatenate([jnp.asarray(batch["chosen_len"], jnp.int32), jnp.asarray(batch["rejected_len"], jnp.int32)])
    starts = jnp.concatenate([start, start])
    feats = None
    if batch.get("pixel_values") is not None:
        feats = _frozen_image_features(model, jnp.asarray(batch["pixel_values"]), image_sizes)
        feats = jnp.concatenate([feats, feats], axis=0)  # rows: chosen pairs, then rejected pairs
    x = model.embed(tokens, feats)
    positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32)[None], tokens.shape)
    key_mask = positions < (starts + lens)[:, None]
    hidden, _ = model.forward_embeds(x, positions=positions, key_mask=key_mask)
    if answer_window is not None:  # gather the window; the answer then starts at window index 1
        idx = jnp.clip(starts[:, None] - 1 + jnp.arange(answer_window + 1)[None], 0, length - 1)
        hidden = jnp.take_along_axis(hidden, idx[..., None], axis=1)
        tokens, starts = jnp.take_along_axis(tokens, idx, axis=1), jnp.ones_like(starts)
    sums, counts = answer_logps(model.logits(hidden), tokens, starts, lens)
    return {"chosen": sums[:b], "rejected": sums[b:], "chosen_len": counts[:b], "rejected_len": counts[b:]}


def _frozen_image_features(model: nnx.Module, pixel_values: jax.Array, image_sizes: Any) -> jax.Array:
    """``model.image_features`` with the vision tower's output under ``stop_gradient``."""
    tower = getattr(model, "vision_tower", None)
    if tower is None:
        raise ValueError("pixel_values given to a text-only model")
    if hasattr(model, "image_newline"):
        # LLaVA-NeXT (anyres packing on the host): the tower is frozen by DPOStep, which passes the
        # frozen state through stop_gradient, so no gradient reaches it either way.
        return model.image_features(pixel_values, image_sizes)
    c = model.config
    hidden = jax.lax.stop_gradient(tower(pixel_values.astype(model.dtype), c.vision_feature_layer))
    if c.vision_feature_select_strategy == "default":
        hidden = hidden[:, 1:]
    feats = model.multi_modal_projector(hidden)
    return feats.reshape(-1, feats.shape[-1])


def _pad_batch(batch: Batch, size: int) -> dict[str, np.ndarray]:
    n = len(next(iter(batch.values())))
    if n == size:
        return dict(batch)
    return {k: np.concatenate([np.asarray(v), np.repeat(np.asarray(v)[:1], size - n, axis=0)]) for k, v in batch.items()}


@functools.partial(jax.jit, static_argnums=0)
def _pair_logps_jit(graphdef: nnx.GraphDef, state: nnx.State, batch: Batch) -> dict[str, jax.Array]:
    # Module-level so the compiled forward is reused across calls (keyed by graphdef and shapes).
    return pair_logps(nnx.merge(graphdef, state), batch)


def reference_logps(model: nnx.Module, batches: Iterable[Batch], *, mesh: Mesh | None = None,
                    rules: shd.Rules = shd.TRAIN_RULES, batch_size: int | None = None) -> dict[str, np.ndarray]:
    """Reference log-probs of the frozen policy ``model`` in one pass over ``batches``.

    Returns host arrays ``{"ref_chosen_logps": [N], "ref_rejected_logps": [N]}`` in batch order
    (N = total rows). Every batch is padded to ``batch_size`` (default: the first batch's size) and
    the padding rows dropped, so repeated calls with one ``batch_size`` reuse one compiled forward.
    ``model`` is not modified. Store the result beside the pairs and feed it to the train step as
    batch keys ``ref_chosen_logps`` / ``ref_rejected_logps``.
    """
    graphdef, state = nnx.split(model)
    out: dict[str, list[np.ndarray]] = {"ref_chosen_logps": [], "ref_rejected_logps": []}
    size = batch_size
    for batch in batches:
        batch = {k: np.asarray(v) for k, v in batch.items() if k in _MODEL_KEYS}
        n = len(batch["chosen_tokens"])
        size = size or n
        if n > size:
            raise ValueError(f"a batch of {n} pairs exceeds batch_size={size}")
        padded = _pad_batch(batch, size)
        if mesh is not None:
            padded = {k: jax.device_put(v, shd.batch_sharding(mesh, v.ndim, rules)) for k, v in padded.items()}
        res = jax.device_get(_pair_logps_jit(graphdef, state, padded))
        out["ref_chosen_logps"].append(np.asarray(res["chosen"])[:n])
        out["ref_rejected_logps"].append(np.asarray(res["rejected"])[:n])
    return {k: (np.concatenate(v) if v else np.zeros((0,), np.float32)) for k, v in out.items()}


_MODEL_KEYS = ("pixel_values", "chosen_tokens", "rejected_tokens", "answer_start", "chosen_len", "rejected_len")
STEP_KEYS = _MODEL_KEYS + ("ref_chosen_logps", "ref_rejected_logps", "weights")


# ----------------------------------------------------------------------------- optimizer
@dataclasses.dataclass(frozen=True)
class OptimConfig:
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


def make_schedule(cfg: OptimConfig) -> optax.Schedule:
    warmup = math.ceil(cfg.warmup_ratio * cfg.total_steps)
    if cfg.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, cfg.learning_rate, warmup, max(cfg.total_steps, warmup + 1), 0.0)
    if cfg.schedule == "constant":
        return optax.join_schedules([optax.linear_schedule(0.0, cfg.learning_rate, warmup),
                                     optax.constant_schedule(cfg.learning_rate)], [warmup]) if warmup else \
            optax.constant_schedule(cfg.learning_rate)
    raise ValueError(f"schedule must be 'cosine' or 'constant', got {cfg.schedule!r}")


def make_optimizer(cfg: OptimConfig) -> tuple[optax.GradientTransformation, optax.Schedule]:
    schedule = make_schedule(cfg)
    decay_mask = lambda params: jax.tree.map(lambda x: x.ndim >= 2, params)  # noqa: E731
    parts = [optax.clip_by_global_norm(cfg.max_grad_norm)] if cfg.max_grad_norm > 0 else []
    parts.append(optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                             mask=decay_mask))
    return optax.chain(*parts), schedule


# ----------------------------------------------------------------------------- train step
@dataclasses.dataclass(frozen=True)
class LossConfig:
    """Options of ``dpo_pair_terms`` plus gradient accumulation."""

    beta: float = 0.1
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0
    sft_weight: float = 0.0
    average: bool = False
    grad_accum: int = 1  # micro-batches per optimizer step; the result equals the one big batch
    answer_window: int | None = None  # if set, max answer tokens: the LM head runs on that window only


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
    flat ``{path: float32 array}`` dict (the master weights; the forward casts to the module's
    compute ``dtype``, e.g. bfloat16). ``step(state, batch) -> (state, metrics)`` is one optimizer
    step on the whole batch (``grad_accum`` micro-batches, exact), jitted with explicit in/out
    shardings and the state donated. One compile per batch structure; ``compiles`` counts traces.
    """

    def __init__(self, model: nnx.Module, optim: OptimConfig, loss: LossConfig = LossConfig(), *,
                 mesh: Mesh | None = None, rules: shd.Rules = shd.TRAIN_RULES,
                 trainable: Callable = default_trainable,
                 prepare: Callable[[nnx.Module, jax.Array, bool], None] | None = None):
        self.mesh = mesh or shd.make_mesh(1, 1, 1, devices=jax.devices()[:1])
        self.rules = rules
        self.optim, self.loss = optim, loss
        self.tx, self.schedule = make_optimizer(optim)
        self.prepare = prepare  # hook(model, rng, train) run on the merged model (LoRA dropout keys)
        self.graphdef, self.trainable_template, self.frozen_template = nnx.split(model, trainable, ...)
        self.replicated = NamedSharding(self.mesh, P())
        t_sh = shd.state_shardings(self.trainable_template, self.mesh, rules)
        f_sh = shd.state_shardings(self.frozen_template, self.mesh, rules)
        self.param_shardings = {path_key(p): v.get_value() for p, v in nnx.to_flat_state(t_sh)}
        self.frozen_shardings = {path_key(p): v.get_value() for p, v in nnx.to_flat_state(f_sh)}
        self.frozen = jax.device_put(flat_values(self.frozen_template), self.frozen_shardings)
        abstract_params = {k: jax.ShapeDtypeStruct(v.shape, v.dtype)
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
        # A copy (never an alias of the model's buffers): the state is donated to the step.
        params = jax.device_put(flat_values(self.trainable_template), self.param_shardings, may_alias=False)
        params = {k: x.astype(jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating) else x for k, x in params.items()}
        opt_state = jax.jit(self.tx.init, out_shardings=self.state_shardings["opt_state"])(params)
        return {"step": jax.device_put(jnp.zeros((), jnp.int32), self.replicated), "params": params,
                "opt_state": opt_state,
                "rng": jax.device_put(jax.random.key_data(jax.random.key(seed)).astype(jnp.uint32), self.replicated)}

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
        lp = pair_logps(model, batch, answer_window=c.answer_window)
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

    def _step(self, state, frozen, batch):
        self.compiles += 1  # runs at trace time only
        grads, sums = self._grads(state, frozen, batch)
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = self.tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        metrics = metrics_from_sums(sums)
        metrics["grad_norm"] = grad_norm
        metrics["learning_rate"] = jnp.asarray(self.schedule(state["step"]), jnp.float32)
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

    def __call__(self, state: dict[str, Any], batch: Batch) -> tuple[dict[str, Any], dict[str, jax.Array]]:
        batch = {k: v for k, v in batch.items() if k in STEP_KEYS}
        window = self.loss.answer_window
        if window is not None:
            longest = max(int(np.max(batch["chosen_len"])), int(np.max(batch["rejected_len"])))
            if longest > window:
                raise ValueError(f"an answer of {longest} tokens exceeds loss.answer_window={window}")
        key = tuple(sorted((k, np.shape(v), str(np.asarray(v).dtype) if not isinstance(v, jax.Array) else str(v.dtype))
                           for k, v in batch.items()))
        b_sh = self.batch_shardings(batch)
        fn = self._jitted.get(key)
        if fn is None:
            metric_sh = {name: self.replicated for name in METRIC_NAMES + ("grad_norm", "learning_rate", "pairs")}
            fn = jax.jit(self._step, in_shardings=(self.state_shardings, self.frozen_shardings, b_sh),
                         out_shardings=(self.state_shardings, metric_sh), donate_argnums=(0,))
            self._jitted[key] = fn
        if jax.process_count() > 1:  # each host holds its share of the global batch
            batch = {k: jax.make_array_from_process_local_data(b_sh[k], np.asarray(v)) for k, v in batch.items()}
        else:
            batch = jax.device_put(batch, b_sh)
        with jax.set_mesh(self.mesh):
            return fn(state, self.frozen, batch)
