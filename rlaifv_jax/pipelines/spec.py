"""Config subtrees in, the typed settings every stage takes out: ``online_spec`` / ``offline_spec``
(each validates first, ``validate.validate``). Stages never read a ConfigDict."""
from __future__ import annotations

import dataclasses
import os

import ml_collections

from rlaifv_jax.pipelines.validate import _get, data_paths, validate
from rlaifv_jax.stages.bundle import ModelSpec
from rlaifv_jax.stages.claims import ClaimSettings
from rlaifv_jax.stages.dpo import DPOSettings, LoraSettings
from rlaifv_jax.stages.eval import DIRECTIONS, EvalSettings, SuiteSettings
from rlaifv_jax.stages.label import LabelSettings
from rlaifv_jax.stages.pairs import PairSettings
from rlaifv_jax.stages.sample import SampleSettings
from rlaifv_jax.stages.select import SelectSettings
from rlaifv_jax.training.loop import TrainConfig
from rlaifv_jax.training.step import LossConfig, OptimConfig


def _off(value, off):
    """A config value whose ``off`` sentinel means "not used" → None."""
    return None if value == off else value


def _select(c: ml_collections.ConfigDict) -> SelectSettings | None:
    """``eval.every_epochs`` / ``select_metric`` / ``select_mode`` → checkpoint selection (None: off)."""
    every = _get(c, "eval.every_epochs", 0)
    if not every:
        return None
    metric = _get(c, "eval.select_metric", "chair_mention")
    return SelectSettings(every_epochs=float(every), metric=metric,
                          mode=_get(c, "eval.select_mode", "") or DIRECTIONS.get(metric, "min"))


def _wandb_project(c: ml_collections.ConfigDict) -> str:
    return _get(c, "log.wandb_project", "rlaifv_jax") if _get(c, "log.wandb", False) else ""


@dataclasses.dataclass(frozen=True)
class OnlineSpec:
    """Everything an online run needs, typed; built by ``online_spec`` from a validated config."""

    seed: int
    iterations: int
    progress: bool
    mesh: tuple[int, int, int]  # (data, fsdp, tensor)
    toy: bool
    policy: ModelSpec  # the initial policy (later iterations overlay their Orbax checkpoint)
    labeler: ModelSpec
    sample: SampleSettings
    claims: ClaimSettings
    label: LabelSettings
    pairs: PairSettings
    dpo: DPOSettings
    eval: EvalSettings


def online_spec(c: ml_collections.ConfigDict, workdir: str) -> OnlineSpec:
    """Validate ``c`` (``validate``) and build the run's typed settings."""
    validate(c, "online")
    toy = c.source == "toy"
    policy_path = os.path.join(workdir, "warmstart") if toy else c.policy.path
    labeler_path = {"self": policy_path, "model": c.labeler.path,
                    "toy": os.path.join(workdir, "labeler_warmstart")}[c.labeler.kind]
    s, d = c.sampling, c.dpo
    return OnlineSpec(
        seed=c.seed, iterations=c.iterations, progress=c.progress, mesh=(c.mesh.data, c.mesh.fsdp, c.mesh.tensor),
        toy=toy,
        policy=ModelSpec(policy_path, c.policy.template, c.policy.dtype, c.policy.param_dtype, toy),
        labeler=ModelSpec(labeler_path, c.labeler.template, c.policy.dtype, None, toy),
        sample=SampleSettings(num_samples=s.num_samples, max_new_tokens=s.max_new_tokens, temperature=s.temperature,
                              top_k=s.top_k or None, top_p=_off(s.top_p, 1.0),
                              repetition_penalty=_off(s.repetition_penalty, 1.0), batch_size=s.batch_size,
                              decode_rows=s.get("decode_rows", 0) or None),
        claims=ClaimSettings(kind=c.claims.kind, split_path=c.claims.split_path, convert_path=c.claims.convert_path,
                             dtype=c.policy.dtype, batch_size=c.claims.batch_size,
                             llm_batch_size=c.claims.llm_batch_size),
        label=LabelSettings(repetition_penalty=_off(c.labeler.repetition_penalty, 1.0),
                            batch_size=c.labeler.batch_size, chunk_size=s.batch_size),
        pairs=PairSettings(per_prompt=c.pairs.per_prompt, min_score_gap=c.pairs.min_score_gap,
                           balance_lengths=c.pairs.balance_lengths, length_ratio=_off(c.pairs.length_ratio, -1)),
        dpo=DPOSettings(
            train=TrainConfig(
                optim=OptimConfig(learning_rate=d.learning_rate, warmup_ratio=d.warmup_ratio,
                                  weight_decay=d.weight_decay, max_grad_norm=d.max_grad_norm, total_steps=0),
                loss=LossConfig(beta=d.beta, loss_type=d.loss_type, label_smoothing=d.label_smoothing,
                                grad_accum=d.grad_accum, remat=_get(c, "dpo.remat", "none")),
                seed=c.seed, progress=c.progress, max_to_keep=1, async_checkpoint=False,
                max_steps=_get(c, "dpo.max_steps", 0), wandb_project=_wandb_project(c)),
            batch_size=d.batch_size, epochs=d.epochs, max_length=d.max_length, select=_select(c)),
        eval=EvalSettings(max_new_tokens=c.eval.max_new_tokens, batch_size=c.eval.batch_size))


@dataclasses.dataclass(frozen=True)
class OfflineSpec:
    seed: int
    mesh: tuple[int, int, int]
    policy: ModelSpec
    data_paths: list[str]  # the data files and directories (``data.path`` resolved)
    max_pairs: int  # use only the first N usable pairs (0: all)
    ref_batch_size: int
    progress: bool
    dpo: DPOSettings
    export_dtype: str  # "" = the master dtype
    suite: SuiteSettings | None = None  # the suite that scores each checkpoint (eval.every_epochs > 0)


def offline_spec(c: ml_collections.ConfigDict) -> OfflineSpec:
    """Validate an offline-DPO config and build its typed settings."""
    validate(c, "offline_dpo")
    t = c.train
    return OfflineSpec(
        seed=c.seed, mesh=(c.mesh.data, c.mesh.fsdp, c.mesh.tensor),
        policy=ModelSpec(c.policy.path, c.data.template, c.policy.compute_dtype, c.policy.param_dtype),
        data_paths=data_paths(c.data.path), max_pairs=_get(c, "data.max_pairs", 0), ref_batch_size=t.ref_batch_size,
        progress=_get(c, "progress", True),
        dpo=DPOSettings(
            train=TrainConfig(
                optim=OptimConfig(learning_rate=t.learning_rate, total_steps=0, warmup_ratio=t.warmup_ratio,
                                  weight_decay=t.weight_decay, max_grad_norm=t.max_grad_norm, b1=t.adam_b1,
                                  b2=t.adam_b2, eps=t.adam_eps, schedule=t.schedule),
                loss=LossConfig(beta=c.dpo.beta, loss_type=c.dpo.loss_type, label_smoothing=c.dpo.label_smoothing,
                                sft_weight=c.dpo.sft_weight, average=c.dpo.average, grad_accum=t.grad_accum),
                seed=c.seed, max_to_keep=t.max_to_keep or None, log_every=t.log_every,
                best_metric=_get(c, "train.best_metric", ""), best_mode=_get(c, "train.best_mode", "min"),
                max_steps=_get(c, "train.max_steps", 0), progress=_get(c, "progress", True),
                wandb_project=_wandb_project(c)),
            batch_size=t.global_batch_size, epochs=t.num_epochs, max_length=c.data.max_length,
            checkpoints_per_epoch=t.checkpoints_per_epoch,
            lora=LoraSettings(c.lora.rank, c.lora.alpha, c.lora.dropout) if c.lora.enabled else None,
            export=_get(c, "export.checkpoints", "last"), select=_select(c)),
        export_dtype=c.export.dtype, suite=_suite(c))


def _suite(c: ml_collections.ConfigDict) -> SuiteSettings | None:
    """``eval.suite`` and its files (offline checkpoint selection), or None when selection is off."""
    if not _get(c, "eval.every_epochs", 0):
        return None
    e = c.eval
    return SuiteSettings(name=e.suite, data=e.data, images=e.images or None, num_beams=e.num_beams,
                         max_new_tokens=e.max_new_tokens, batch_size=e.batch_size, limit=e.limit)
