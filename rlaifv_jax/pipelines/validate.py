"""Configs in, typed stage settings out, in one place: every bad or contradictory field is named
at start-up, then ``online_spec`` / ``offline_spec`` turn config subtrees into the dataclasses the
stages take (stages never read a ConfigDict)."""
from __future__ import annotations

import dataclasses
import os

import ml_collections

from rlaifv_jax.models import hf
from rlaifv_jax.stages.bundle import ModelSpec
from rlaifv_jax.stages.claims import ClaimSettings
from rlaifv_jax.stages.dpo import DPOSettings, LoraSettings
from rlaifv_jax.stages.eval import EvalSettings
from rlaifv_jax.stages.label import LabelSettings
from rlaifv_jax.stages.pairs import PairSettings
from rlaifv_jax.stages.sample import SampleSettings
from rlaifv_jax.training.loop import TrainConfig
from rlaifv_jax.training.step import LossConfig, OptimConfig

_CHOICES = {
    "source": ("toy", "files"),
    "policy.dtype": ("float32", "bfloat16"),
    "policy.param_dtype": ("float32", "bfloat16"),
    "policy.template": ("llava_v1", "chat"),
    "labeler.template": ("llava_v1", "chat"),
    "claims.kind": ("rule", "llm"),
    "labeler.kind": ("self", "model", "toy"),
    "dpo.loss_type": ("sigmoid", "ipo", "hinge", "robust"),
}
_POSITIVE = ("iterations", "sampling.num_samples", "sampling.max_new_tokens", "sampling.batch_size",
             "claims.batch_size", "labeler.batch_size", "pairs.per_prompt", "pairs.min_score_gap",
             "dpo.batch_size", "dpo.grad_accum", "dpo.epochs", "dpo.max_length", "eval.max_new_tokens",
             "eval.batch_size", "dpo.beta", "dpo.learning_rate")


def _get(c: ml_collections.ConfigDict, field: str):
    for part in field.split("."):
        c = c[part]
    return c


def _hf_dir(field: str, path: str, errors: list[str], multimodal: bool, trainable: bool = False) -> None:
    if not path:
        errors.append(f"{field} is empty")
        return
    try:
        arch, _ = hf.read_config(path)
    except (OSError, ValueError) as e:
        errors.append(f"{field}: {e}")
        return
    if multimodal and not arch.startswith("Llava"):
        errors.append(f"{field}: {arch} is not a multimodal (LLaVA) model")
    if trainable and arch != "LlavaForConditionalGeneration":
        errors.append(f"{field}: {arch} cannot be the policy yet (DPO trains LlavaForConditionalGeneration; "
                      "LLaVA-NeXT works as a labeler)")


def validate(c: ml_collections.ConfigDict) -> None:
    """Raise ``ValueError`` listing every invalid field of an online config."""
    errors = []
    for field, choices in _CHOICES.items():
        if _get(c, field) not in choices:
            errors.append(f"{field}={_get(c, field)!r} must be one of {choices}")
    for field in _POSITIVE:
        if not _get(c, field) > 0:
            errors.append(f"{field}={_get(c, field)!r} must be > 0")
    if c.sampling.temperature < 0:
        errors.append(f"sampling.temperature={c.sampling.temperature} must be >= 0")
    for field in ("prompts.per_iteration", "sampling.top_k"):
        if _get(c, field) < 0:
            errors.append(f"{field}={_get(c, field)} must be >= 0 (0: off / all)")
    for field in ("sampling.repetition_penalty", "labeler.repetition_penalty"):
        if not _get(c, field) > 0:
            errors.append(f"{field}={_get(c, field)} must be > 0 (1.0: off)")
    if not 0 < c.sampling.top_p <= 1:
        errors.append(f"sampling.top_p={c.sampling.top_p} must be in (0, 1]")
    r = c.pairs.length_ratio
    if r != -1 and not (0 <= r < 1 and abs(r * 50 - round(r * 50)) < 1e-6):
        errors.append(f"pairs.length_ratio={r} must be -1 (search) or one of 0, 0.02, ..., 0.98")
    if c.sampling.num_samples < 2:
        errors.append("sampling.num_samples must be >= 2: pairs come from a prompt's different responses")
    if c.source == "toy":
        if c.claims.kind != "rule":
            errors.append("source='toy' uses claims.kind='rule' (the toy language has its rule-based splitter)")
        if c.policy.path:
            errors.append("source='toy' builds its own policy; policy.path must be empty")
        if "chat" in (c.policy.template, c.labeler.template):
            errors.append("source='toy' uses the llava_v1 template (the toy tokenizer has no chat template)")
    else:
        if not os.path.isfile(c.prompts.path):
            errors.append(f"prompts.path={c.prompts.path!r} is not a file")
        _hf_dir("policy.path", c.policy.path, errors, multimodal=True, trainable=True)
        if c.claims.kind == "rule":
            errors.append("source='files' needs claims.kind='llm' (the rule-based splitter reads only the toy language)")
        else:
            _hf_dir("claims.split_path", c.claims.split_path, errors, multimodal=False)
            if c.claims.convert_path:
                _hf_dir("claims.convert_path", c.claims.convert_path, errors, multimodal=False)
    if c.labeler.kind == "model":
        _hf_dir("labeler.path", c.labeler.path, errors, multimodal=True)
    elif c.labeler.path:
        errors.append(f"labeler.kind={c.labeler.kind!r} builds its labeler; labeler.path must be empty")
    if c.labeler.kind == "toy" and c.source != "toy":
        errors.append("labeler.kind='toy' (a larger toy labeler) needs source='toy'")
    if errors:
        raise ValueError("invalid config:\n  " + "\n  ".join(errors))


def _off(value, off):
    """A config value whose ``off`` sentinel means "not used" → None."""
    return None if value == off else value


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
    validate(c)
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
                              repetition_penalty=_off(s.repetition_penalty, 1.0), batch_size=s.batch_size),
        claims=ClaimSettings(kind=c.claims.kind, split_path=c.claims.split_path, convert_path=c.claims.convert_path,
                             dtype=c.policy.dtype, batch_size=c.claims.batch_size),
        label=LabelSettings(repetition_penalty=_off(c.labeler.repetition_penalty, 1.0),
                            batch_size=c.labeler.batch_size, chunk_size=s.batch_size),
        pairs=PairSettings(per_prompt=c.pairs.per_prompt, min_score_gap=c.pairs.min_score_gap,
                           balance_lengths=c.pairs.balance_lengths, length_ratio=_off(c.pairs.length_ratio, -1)),
        dpo=DPOSettings(
            train=TrainConfig(
                optim=OptimConfig(learning_rate=d.learning_rate, warmup_ratio=d.warmup_ratio,
                                  weight_decay=d.weight_decay, max_grad_norm=d.max_grad_norm, total_steps=0),
                loss=LossConfig(beta=d.beta, loss_type=d.loss_type, label_smoothing=d.label_smoothing,
                                grad_accum=d.grad_accum),
                seed=c.seed, progress=c.progress, max_to_keep=1, async_checkpoint=False),
            batch_size=d.batch_size, epochs=d.epochs, max_length=d.max_length),
        eval=EvalSettings(max_new_tokens=c.eval.max_new_tokens, batch_size=c.eval.batch_size))


@dataclasses.dataclass(frozen=True)
class OfflineSpec:
    seed: int
    mesh: tuple[int, int, int]
    policy: ModelSpec
    data_path: str
    ref_batch_size: int
    dpo: DPOSettings
    export_dtype: str  # "" = the master dtype


def offline_spec(c: ml_collections.ConfigDict) -> OfflineSpec:
    """Validate an offline-DPO config and build its typed settings."""
    errors = []
    if c.mode != "offline_dpo":
        errors.append(f"mode={c.mode!r} must be 'offline_dpo'")
    if not c.data.path:
        errors.append("data.path is empty: give the RLAIF-V-Dataset parquet/JSONL file(s) or a directory of them")
    _hf_dir("policy.path", c.policy.path, errors, multimodal=True, trainable=True)
    for field in ("policy.compute_dtype", "policy.param_dtype") + (("export.dtype",) if c.export.dtype else ()):
        if _get(c, field) not in hf.DTYPES:
            errors.append(f"{field}={_get(c, field)!r} must be one of {sorted(hf.DTYPES)}")
    if c.dpo.loss_type not in _CHOICES["dpo.loss_type"]:
        errors.append(f"dpo.loss_type={c.dpo.loss_type!r} must be one of {_CHOICES['dpo.loss_type']}")
    if c.data.template not in ("llava_v1", "chat"):
        errors.append(f"data.template={c.data.template!r} must be one of ('llava_v1', 'chat')")
    t = c.train
    for field in ("train.global_batch_size", "train.grad_accum", "train.num_epochs", "train.ref_batch_size",
                  "data.max_length", "dpo.beta", "train.learning_rate"):
        if not _get(c, field) > 0:
            errors.append(f"{field}={_get(c, field)!r} must be > 0")
    if t.grad_accum > 0 and t.global_batch_size % t.grad_accum:
        errors.append(f"train.global_batch_size={t.global_batch_size} must be a multiple of train.grad_accum={t.grad_accum}")
    if errors:
        raise ValueError("invalid config:\n  " + "\n  ".join(errors))
    return OfflineSpec(
        seed=c.seed, mesh=(c.mesh.data, c.mesh.fsdp, c.mesh.tensor),
        policy=ModelSpec(c.policy.path, c.data.template, c.policy.compute_dtype, c.policy.param_dtype),
        data_path=c.data.path, ref_batch_size=t.ref_batch_size,
        dpo=DPOSettings(
            train=TrainConfig(
                optim=OptimConfig(learning_rate=t.learning_rate, total_steps=0, warmup_ratio=t.warmup_ratio,
                                  weight_decay=t.weight_decay, max_grad_norm=t.max_grad_norm, b1=t.adam_b1,
                                  b2=t.adam_b2, eps=t.adam_eps, schedule=t.schedule),
                loss=LossConfig(beta=c.dpo.beta, loss_type=c.dpo.loss_type, label_smoothing=c.dpo.label_smoothing,
                                sft_weight=c.dpo.sft_weight, average=c.dpo.average, grad_accum=t.grad_accum),
                seed=c.seed, max_to_keep=t.max_to_keep or None, log_every=t.log_every),
            batch_size=t.global_batch_size, epochs=t.num_epochs, max_length=c.data.max_length,
            checkpoints_per_epoch=t.checkpoints_per_epoch,
            lora=LoraSettings(c.lora.rank, c.lora.alpha, c.lora.dropout) if c.lora.enabled else None),
        export_dtype=c.export.dtype)
