"""Start-up validation of an online-loop config: every bad or contradictory field is named."""
from __future__ import annotations

import os

import ml_collections

from rlaifv_jax.models import hf

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
