"""Stage 7: DPO on the encoded pairs with their reference log-probs (METHOD.md §5), resumable from
its own checkpoints; the trained policy is handed to ``save`` before the stage frees it."""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any, Callable

import jax
import numpy as np
from flax import nnx

from rlaifv_jax.data.rlaifv_dataset import make_pair_dataset
from rlaifv_jax.stages import bundle, encode
from rlaifv_jax.training import lora as lora_lib
from rlaifv_jax.training.loop import TrainConfig, train

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class LoraSettings:
    rank: int = 64
    alpha: float = 16.0
    dropout: float = 0.05


@dataclasses.dataclass(frozen=True)
class DPOSettings:
    train: TrainConfig  # optimizer, loss, logging; total_steps and save_every are set from the data
    batch_size: int  # pairs per optimizer step over all hosts
    epochs: int
    max_length: int  # tokens per sequence (prompt + image + answer)
    checkpoints_per_epoch: int = 4  # a resumable train checkpoint every 1/N epoch (and at the end)
    lora: LoraSettings | None = None  # train LoRA adapters instead of the full language model


def run(train_dir: str, examples: list[dict[str, Any]], image_of: Callable[[str], np.ndarray],
        policy: bundle.ModelSpec, settings: DPOSettings, *, seed: int, mesh, desc: str,
        save: Callable[[nnx.Module], None]) -> dict[str, Any]:
    """Train ``policy`` on ``examples`` (encoded pairs carrying ``ref_*_logps``), call ``save`` with
    the trained model (LoRA merged), free it; returns ``{"steps", "resumed_from", "history"}``.
    With no examples the policy is saved unchanged."""
    with bundle.loaded(policy, mesh) as b:
        if not examples:
            log.warning("%s: no preference pairs; the policy is unchanged", desc)
            save(b.model)
            return {"steps": 0, "resumed_from": None, "history": []}
        batch = min(settings.batch_size, len(examples)) // jax.process_count()
        data = make_pair_dataset(examples, example_fn=encode.example_fn(image_of, b, settings.max_length),
                                 batch_size=batch, seed=seed, num_epochs=settings.epochs)
        per_epoch = len(data) // settings.epochs
        cfg = dataclasses.replace(settings.train, save_every=max(1, per_epoch // max(settings.checkpoints_per_epoch, 1)))
        extra = {}
        if settings.lora is not None:
            lora_lib.apply_lora(b.model, rank=settings.lora.rank, alpha=settings.lora.alpha,
                                dropout=settings.lora.dropout, seed=settings.train.seed, mesh=mesh)
            extra = dict(trainable=lora_lib.lora_trainable, prepare=lora_lib.prepare)
        result = train(b.model, data, cfg, train_dir, mesh=mesh, desc=desc, **extra)
        save(lora_lib.merge_lora(result.model) if settings.lora is not None else result.model)
        return {"steps": result.step, "resumed_from": result.resumed_from, "history": result.history,
                "steps_per_epoch": per_epoch, "checkpoint_every": cfg.save_every}


def summary(train_dir: str) -> dict[str, float]:
    """Reward accuracy, margin and loss over the last quarter of the DPO steps (from
    ``metrics.jsonl``, which a resumed run keeps exact)."""
    path = os.path.join(train_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    last = rows[-max(1, len(rows) // 4):]
    return {f"dpo_{name}": float(np.mean([r[key] for r in last]))
            for name, key in (("reward_accuracy", "rewards/accuracies"), ("reward_margin", "rewards/margins"),
                              ("loss", "loss"))}
