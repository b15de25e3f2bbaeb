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

from typing import Literal

import jax
import jax.numpy as jnp

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
