"""Stage 7: DPO on the encoded pairs with their reference log-probs (METHOD.md §5), resumable from
its own checkpoints; the trained policy is handed to ``save`` before the stage frees it."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
from typing import Any, Callable

import jax
import numpy as np
from flax import nnx

from rlaifv_jax.core import jsonl, paths
from rlaifv_jax.core.errors import InputError
from rlaifv_jax.data.buckets import length_buckets
from rlaifv_jax.data.pairs import make_pair_dataset
from rlaifv_jax.stages import bundle, select as select_lib
from rlaifv_jax.training import lora as lora_lib
from rlaifv_jax.training.loop import TrainSettings, train

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class LoraSettings:
    rank: int = 64
    alpha: float = 16.0
    dropout: float = 0.05


@dataclasses.dataclass(frozen=True)
class DPOSettings:
    train: TrainSettings  # optimizer, loss, logging; total_steps and save_every are set from the data
    batch_size: int  # pairs per optimizer step over all hosts
    epochs: int
    max_length: int  # tokens per sequence (prompt + image + answer)
    checkpoints_per_epoch: int = 4  # a resumable train checkpoint every 1/N epoch (and at the end)
    lora: LoraSettings | None = None  # train LoRA adapters instead of the full language model
    export: str = "last"  # what ``save`` gets: "last" (final step), "best" (best kept checkpoint by
    # train.best_metric), "all" (the final step, and every other kept checkpoint through ``save_step``)
    select: select_lib.SelectSettings | None = None  # write a candidate policy every 1/N epoch instead of
    # calling ``save``; the caller picks one (``stages/select.run``; overrides ``export``)


def run(train_dir: str, examples: list[dict[str, Any]], image_of: Callable[[str], np.ndarray],
        policy: bundle.ModelSettings, settings: DPOSettings, *, seed: int, mesh, desc: str,
        save: Callable[[nnx.Module], None], save_step: Callable[[nnx.Module, int], None] | None = None
        ) -> dict[str, Any]:
    """Train ``policy`` on ``examples`` (encoded pairs carrying ``ref_*_logps``), call ``save`` with
    the trained model (LoRA merged; ``settings.export`` says which step) and, for ``export="all"``,
    ``save_step(model, step)`` with every other kept checkpoint; free it. Returns ``{"steps",
    "resumed_from", "history", "exported_step", "kept_steps", "best_step", ...}``. With no examples
    the policy is saved unchanged.

    With ``settings.select`` a checkpoint is kept every ``select.every_epochs`` and its policy written
    as a candidate (``train_dir/select/candidates``, ``stages/select.py``) instead of calling ``save``;
    the train state is freed and the result lists ``candidate_steps`` for the caller's selection
    (``select.run``)."""
    selecting = settings.select is not None
    with bundle.loaded(policy, mesh, training=True) as b:
        if not examples:
            log.warning("%s: no preference pairs; the policy is unchanged", desc)
            save(b.model)
            return {"steps": 0, "resumed_from": None, "history": []}
        check_data(train_dir, examples, settings)
        if len(examples) < settings.batch_size:  # one step on fewer pairs: zero-weight padding rows (exact)
            examples = examples + [dict(examples[i % len(examples)], weight=0.0)
                                   for i in range(settings.batch_size - len(examples))]
        batch = settings.batch_size // jax.process_count()
        # Each batch is cut to the length bucket of its longest pair (same batches, same results,
        # far fewer padded positions); the step's LM head runs on the batch's answer window only.
        data = make_pair_dataset(examples, example_fn=bundle.pair_example_fn(image_of, b, settings.max_length),
                                 batch_size=batch, seed=seed, num_epochs=settings.epochs,
                                 buckets=length_buckets(settings.max_length))
        per_epoch = len(data) // settings.epochs
        cfg = dataclasses.replace(settings.train, save_every=max(1, per_epoch // max(settings.checkpoints_per_epoch, 1)))
        candidates: list[int] = []
        if selecting:  # exact 1/N-epoch steps, every one kept until it is evaluated
            total = min(len(data), cfg.max_steps) if cfg.max_steps > 0 else len(data)
            candidates = select_lib.candidate_steps(per_epoch, settings.epochs, settings.select.every_epochs, total)
            cfg = dataclasses.replace(cfg, save_every=0, save_steps=tuple(candidates), max_to_keep=None)
        extra = {}
        if settings.lora is not None:
            lora_lib.apply_lora(b.model, rank=settings.lora.rank, alpha=settings.lora.alpha,
                                dropout=settings.lora.dropout, seed=settings.train.seed, mesh=mesh)
            extra = dict(trainable=lora_lib.lora_trainable, prepare=lora_lib.prepare)
        result = train(b.model, data, cfg, train_dir, mesh=mesh, desc=desc, **extra)

        def merged(model: nnx.Module) -> nnx.Module:
            return lora_lib.merge_lora(model) if settings.lora is not None else model

        info = {"steps": result.step, "resumed_from": result.resumed_from, "history": result.history,
                "steps_per_epoch": per_epoch, "checkpoint_every": cfg.save_every, "kept_steps": result.kept_steps}
        if selecting:
            select_lib.write_candidates(os.path.join(train_dir, "select"), candidates,
                                        lambda s: merged(result.model_at(s)))
            for leaf in jax.tree.leaves(result.state):  # the optimizer state goes before evaluation starts
                if isinstance(leaf, jax.Array) and not leaf.is_deleted():
                    leaf.delete()
            return {**info, "candidate_steps": candidates}
        exported = result.step
        if settings.export == "best" and result.best_step not in (None, result.step):
            exported = result.best_step
            log.info("%s: exporting the best checkpoint, step %d of %d (%s)", desc, exported, result.step,
                     settings.train.best_metric)
            save(merged(result.model_at(exported)))
        else:
            save(merged(result.model))
        if settings.export == "all" and save_step is not None:
            for s in result.kept_steps:
                if s != result.step:
                    save_step(merged(result.model_at(s)), s)
        return {**info, "exported_step": exported, "best_step": result.best_step}


def discard_checkpoints(train_dir: str) -> None:
    """Delete the stage's train-state checkpoints (process 0), once the trained policy is saved elsewhere."""
    if jax.process_index() == 0:
        shutil.rmtree(os.path.join(train_dir, "checkpoints"), ignore_errors=True)


def check_data(train_dir: str, examples: list[dict[str, Any]], settings: DPOSettings) -> None:
    """Refuse to resume training on other pairs than it started with (``data.json`` in ``train_dir``
    holds a hash of the pair keys and batch settings): a restored data iterator over changed data
    would silently train on another set in another order."""
    h = hashlib.sha256(json.dumps([sorted(e["key"] for e in examples), settings.batch_size, settings.epochs]).encode())
    fingerprint = {"pairs": len(examples), "sha256": h.hexdigest()}
    path = os.path.join(train_dir, "data.json")
    if paths.exists(path):
        saved = json.loads(paths.read_text(path))
        if saved != fingerprint:
            raise InputError(f"{train_dir}: training started on other pairs ({saved['pairs']}) than this run has "
                             f"({len(examples)}): the data changed since; use a new --workdir or the original data")
        return
    if jax.process_index() == 0:
        paths.makedirs(train_dir)
        paths.atomic_write_text(path, json.dumps(fingerprint))


def summary(train_dir: str) -> dict[str, float]:
    """Reward accuracy, margin and loss over the last quarter of the DPO steps (from
    ``metrics.jsonl``, which a resumed run keeps exact)."""
    rows = jsonl.read(os.path.join(train_dir, "metrics.jsonl"))
    if not rows:
        return {}
    last = rows[-max(1, len(rows) // 4):]
    return {f"dpo_{name}": float(np.mean([r[key] for r in last]))
            for name, key in (("reward_accuracy", "rewards/accuracies"), ("reward_margin", "rewards/margins"),
                              ("loss", "loss"))}
