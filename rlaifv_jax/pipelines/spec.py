"""Config subtrees in, the typed settings every stage takes out: ``online_spec`` / ``offline_spec`` /
``plan_spec`` (each validates first, ``validate.validate``). Stages and the planner never read a ConfigDict."""
from __future__ import annotations

import dataclasses
import os

import ml_collections

from rlaifv_jax.pipelines.inputs import PromptFileSettings, ToyModelSettings, ToySettings, WarmstartSettings
from rlaifv_jax.core.errors import ConfigError
from rlaifv_jax.pipelines.validate import Checked, data_paths, field_value, validate
from rlaifv_jax.stages.bundle import ModelSettings
from rlaifv_jax.stages.claims import ClaimSettings
from rlaifv_jax.stages.dpo import DPOSettings, LoraSettings
from rlaifv_jax.stages.measure import DIRECTIONS, RECORD_KEYS, MeasureSettings, SuiteSettings
from rlaifv_jax.stages.label import LabelSettings
from rlaifv_jax.stages.pairs import PairSettings
from rlaifv_jax.stages.sample import SampleSettings
from rlaifv_jax.stages.select import SelectSettings
from rlaifv_jax.training.loop import TrainSettings
from rlaifv_jax.training.step import LossSettings, OptimSettings


def _off(value, off):
    """A config value whose ``off`` sentinel means "not used" → None."""
    return None if value == off else value


def _slots(c: ml_collections.ConfigDict, section: str) -> int | None:
    """``<section>.decode_rows``: continuous-batching slots, None when 0 or absent (off)."""
    return field_value(c, f"{section}.decode_rows", 0) or None


def _select(c: ml_collections.ConfigDict, record_keys: dict[str, str]) -> SelectSettings | None:
    """``eval.every_epochs`` / ``select_metric`` / ``select_mode`` → checkpoint selection (None: off);
    ``record_keys`` maps a metric name to the key the run's evaluation records hold it under."""
    every = field_value(c, "eval.every_epochs", 0)
    if not every:
        return None
    metric = field_value(c, "eval.select_metric", "mention_hall")
    return SelectSettings(every_epochs=float(every), metric=record_keys.get(metric, metric),
                          mode=field_value(c, "eval.select_mode", "") or DIRECTIONS.get(metric, "min"))


def _optim_dtypes(c: ml_collections.ConfigDict) -> dict[str, str]:
    """``dpo.master_dtype`` / ``dpo.optimizer_state_dtype`` as ``OptimSettings`` fields (online and offline)."""
    return dict(master_dtype=field_value(c, "dpo.master_dtype", "float32"),
                state_dtype=field_value(c, "dpo.optimizer_state_dtype", "float32"))


def _wandb_project(c: ml_collections.ConfigDict) -> str:
    return field_value(c, "log.wandb_project", "rlaifv_jax") if field_value(c, "log.wandb", False) else ""


@dataclasses.dataclass(frozen=True)
class OnlineSpec:
    """Everything an online run needs, typed; built by ``online_spec`` from a validated config."""

    seed: int
    iterations: int
    progress: bool
    mesh: tuple[int, int, int]  # (data, fsdp, tensor)
    toy: bool
    policy: ModelSettings  # the initial policy (later iterations overlay their Orbax checkpoint)
    labeler: ModelSettings
    sample: SampleSettings
    claims: ClaimSettings
    label: LabelSettings
    pairs: PairSettings
    dpo: DPOSettings
    eval: MeasureSettings
    inputs: ToySettings | PromptFileSettings  # where prompts come from (and the toy models' warm start)
    on_input_change: str = "refuse"  # a rerun's records whose inputs changed: "refuse" or "recompute"


def _toy_model(m: ml_collections.ConfigDict) -> ToyModelSettings:
    return ToyModelSettings(hidden=m.hidden, layers=m.layers, heads=m.heads, kv_heads=m.kv_heads,
                        vision_hidden=m.vision_hidden, vision_layers=m.vision_layers, patch=m.patch)


def _warmstart(w: ml_collections.ConfigDict) -> WarmstartSettings:
    return WarmstartSettings(steps=w.steps, batch_size=w.batch_size, learning_rate=w.learning_rate)


def _inputs(c: ml_collections.ConfigDict, checked: Checked) -> ToySettings | PromptFileSettings:
    if c.source != "toy":
        return PromptFileSettings(*checked.prompts, per_iteration=c.prompts.per_iteration)
    labeler = ((_toy_model(c.toy_labeler.model), _warmstart(c.toy_labeler.warmstart))
               if c.labeler.kind == "toy" else None)
    return ToySettings(seed=c.seed, progress=c.progress, caption_partner_rate=c.world.caption_partner_rate,
                   n_warmstart=c.world.n_warmstart, n_prompts=c.world.n_prompts, n_eval=c.world.n_eval,
                   model=_toy_model(c.model), warmstart=_warmstart(c.warmstart), labeler=labeler,
                   labeler_data=c.toy_labeler.data)


def _stage_settings(c: ml_collections.ConfigDict) -> dict:
    """The online stages' typed settings (shared by ``online_spec`` and ``plan_spec``: the planner
    compiles with exactly what the run uses)."""
    s, d = c.sampling, c.dpo
    return dict(
        sample=SampleSettings(num_samples=s.num_samples, max_new_tokens=s.max_new_tokens, temperature=s.temperature,
                              top_k=s.top_k or None, top_p=_off(s.top_p, 1.0),
                              repetition_penalty=_off(s.repetition_penalty, 1.0), batch_size=s.batch_size,
                              decode_rows=_slots(c, "sampling")),
        claims=ClaimSettings(kind=c.claims.kind, split_path=c.claims.split_path, convert_path=c.claims.convert_path,
                             dtype=c.policy.dtype, batch_size=c.claims.batch_size,
                             llm_batch_size=c.claims.llm_batch_size,
                             decode_rows=_slots(c, "claims")),
        label=LabelSettings(repetition_penalty=_off(c.labeler.repetition_penalty, 1.0),
                            batch_size=c.labeler.batch_size, chunk_size=s.batch_size,
                            answer_prefix=field_value(c, "labeler.answer_prefix", "auto")),
        pairs=PairSettings(per_prompt=c.pairs.per_prompt, min_score_gap=c.pairs.min_score_gap,
                           balance_lengths=c.pairs.balance_lengths, length_ratio=_off(c.pairs.length_ratio, -1)),
        dpo=DPOSettings(
            train=TrainSettings(
                optim=OptimSettings(learning_rate=d.learning_rate, warmup_ratio=d.warmup_ratio,
                                  weight_decay=d.weight_decay, max_grad_norm=d.max_grad_norm, total_steps=0,
                                  **_optim_dtypes(c)),
                loss=LossSettings(beta=d.beta, loss_type=d.loss_type, label_smoothing=d.label_smoothing,
                                sft_weight=field_value(c, "dpo.sft_weight", 0.0), grad_accum=d.grad_accum,
                                remat=field_value(c, "dpo.remat", "none")),
                seed=c.seed, progress=c.progress, max_to_keep=1, async_checkpoint=False,
                max_steps=field_value(c, "dpo.max_steps", 0), wandb_project=_wandb_project(c)),
            batch_size=d.batch_size, epochs=d.epochs, max_length=d.max_length,
            checkpoints_per_epoch=field_value(c, "dpo.checkpoints_per_epoch", DPOSettings.checkpoints_per_epoch),
            select=_select(c, RECORD_KEYS)))


def online_spec(c: ml_collections.ConfigDict, workdir: str) -> OnlineSpec:
    """Validate ``c`` (``validate``) and build the run's typed settings."""
    checked = validate(c, "online")
    toy = c.source == "toy"
    policy_path = os.path.join(workdir, "warmstart") if toy else c.policy.path
    labeler_path = {"self": policy_path, "model": c.labeler.path,
                    "toy": os.path.join(workdir, "labeler_warmstart")}[c.labeler.kind]
    return OnlineSpec(
        seed=c.seed, iterations=c.iterations, progress=c.progress, mesh=(c.mesh.data, c.mesh.fsdp, c.mesh.tensor),
        toy=toy,
        policy=ModelSettings(policy_path, c.policy.template, c.policy.dtype, c.policy.param_dtype, toy),
        labeler=ModelSettings(labeler_path, c.labeler.template, c.policy.dtype, None, toy),
        eval=MeasureSettings(max_new_tokens=c.eval.max_new_tokens, batch_size=c.eval.batch_size,
                             decode_rows=_slots(c, "eval")),
        inputs=_inputs(c, checked), on_input_change=field_value(c, "resume.on_input_change", "refuse"),
        **_stage_settings(c))


@dataclasses.dataclass(frozen=True)
class PlanSpec:
    """What ``rlaifv_jax.plan`` compiles: the run's own stage settings, each model's architecture
    source and the prompts of one iteration; built by ``plan_spec`` without reading any file."""

    mesh: tuple[int, int, int]
    dtype: str  # the policy's compute dtype (every served model runs in it)
    param_dtype: str  # the policy's stored weights (the DPO step's master copy follows dpo settings)
    labeler_kind: str  # "self" | "model" | "toy"
    archs: dict[str, tuple[str, str]]  # role → (checkpoint path, configs/arch preset): policy, labeler,
    # claims_split, claims_convert (convert's empty pair: the split model answers both calls)
    sample: SampleSettings
    claims: ClaimSettings
    label: LabelSettings
    pairs: PairSettings
    dpo: DPOSettings
    prompts: int  # prompts per online iteration
    toy: ToySettings | None  # the embedded world's sizes (source="toy")


def plan_spec(c: ml_collections.ConfigDict, devices: int | None = None) -> PlanSpec:
    """Validate ``c``'s settings (no file or checkpoint needs to exist: the planner builds models from
    their ``config.json`` or an architecture preset; the mesh must fit ``devices``, the slice's device
    count, default this machine's) and build what the planner compiles."""
    validate(c, "online", paths=False, devices=devices)
    toy = _inputs(c, Checked(prompts=None)) if c.source == "toy" else None
    prompts = c.world.n_prompts if toy else c.prompts.per_iteration
    if not prompts:
        raise ConfigError(["prompts.per_iteration=0 (all prompts): set it to the prompts per iteration to plan"])
    arch = lambda section, path, preset: (c[section][path], field_value(c, f"{section}.{preset}", ""))  # noqa: E731
    return PlanSpec(
        mesh=(c.mesh.data, c.mesh.fsdp, c.mesh.tensor), dtype=c.policy.dtype, param_dtype=c.policy.param_dtype,
        labeler_kind=c.labeler.kind,
        archs={"policy": arch("policy", "path", "arch"), "labeler": arch("labeler", "path", "arch"),
               "claims_split": arch("claims", "split_path", "split_arch"),
               "claims_convert": arch("claims", "convert_path", "convert_arch")},
        prompts=prompts, toy=toy, **_stage_settings(c))


@dataclasses.dataclass(frozen=True)
class OfflineSpec:
    seed: int
    mesh: tuple[int, int, int]
    policy: ModelSettings
    data_paths: list[str]  # the data files and directories (``data.path`` resolved)
    image_root: str  # folder the data's image paths resolve against ("": each data file's folder)
    allow_outside_root: bool  # image paths may leave image_root (otherwise a counted skip)
    max_pairs: int  # use only the first N usable pairs (0: all)
    ref_batch_size: int
    progress: bool
    dpo: DPOSettings
    export_dtype: str  # "" = the master dtype
    suite: SuiteSettings | None = None  # the suite that scores each checkpoint (eval.every_epochs > 0)


def offline_spec(c: ml_collections.ConfigDict) -> OfflineSpec:
    """Validate an offline-DPO config and build its typed settings."""
    validate(c, "offline_dpo")
    d = c.dpo
    return OfflineSpec(
        seed=c.seed, mesh=(c.mesh.data, c.mesh.fsdp, c.mesh.tensor),
        policy=ModelSettings(c.policy.path, c.policy.template, c.policy.dtype, c.policy.param_dtype),
        data_paths=data_paths(c.data.path), image_root=field_value(c, "data.image_root", ""),
        allow_outside_root=field_value(c, "data.allow_outside_root", False),
        max_pairs=field_value(c, "data.max_pairs", 0), ref_batch_size=d.ref_batch_size,
        progress=field_value(c, "progress", True),
        dpo=DPOSettings(
            train=TrainSettings(
                optim=OptimSettings(learning_rate=d.learning_rate, total_steps=0, warmup_ratio=d.warmup_ratio,
                                  weight_decay=d.weight_decay, max_grad_norm=d.max_grad_norm, b1=d.adam_b1,
                                  b2=d.adam_b2, eps=d.adam_eps, schedule=d.schedule,
                                  **_optim_dtypes(c)),
                loss=LossSettings(beta=d.beta, loss_type=d.loss_type, label_smoothing=d.label_smoothing,
                                sft_weight=d.sft_weight, average=d.average, grad_accum=d.grad_accum,
                                remat=field_value(c, "dpo.remat", "none")),
                seed=c.seed, max_to_keep=d.max_to_keep or None, log_every=d.log_every,
                best_metric=field_value(c, "dpo.best_metric", ""), best_mode=field_value(c, "dpo.best_mode", "min"),
                max_steps=field_value(c, "dpo.max_steps", 0), progress=field_value(c, "progress", True),
                wandb_project=_wandb_project(c)),
            batch_size=d.batch_size, epochs=d.epochs, max_length=d.max_length,
            checkpoints_per_epoch=d.checkpoints_per_epoch,
            lora=LoraSettings(c.lora.rank, c.lora.alpha, c.lora.dropout) if c.lora.enabled else None,
            export=field_value(c, "export.checkpoints", "last"), select=_select(c, {})),
        export_dtype=c.export.dtype, suite=_suite(c))


def _suite(c: ml_collections.ConfigDict) -> SuiteSettings | None:
    """``eval.suite`` and its files (offline checkpoint selection), or None when selection is off."""
    if not field_value(c, "eval.every_epochs", 0):
        return None
    e = c.eval
    return SuiteSettings(name=e.suite, data=e.data, images=e.images or None, num_beams=e.num_beams,
                         max_new_tokens=e.max_new_tokens, batch_size=e.batch_size, limit=e.limit,
                         decode_rows=_slots(c, "eval"))
