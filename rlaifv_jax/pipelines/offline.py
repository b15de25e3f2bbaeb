"""Offline DPO on RLAIF-V-Dataset files: read → reference log-probs → train → export (METHOD.md §5).

``run(config, workdir)`` (config: ``configs/offline_dpo.py``):

1. loads the policy (``config.policy.path``: a local Hugging Face LLaVA directory that also holds the
   tokenizer and image processor) onto the mesh, in ``compute_dtype`` with ``param_dtype`` masters;
2. reads ``config.data.path`` (parquet / JSONL, RLAIF-V-Dataset schema; bad records skipped and
   counted), tokenizing with the LLaVA chat format;
3. computes the reference log-probs of every pair in one pass with the frozen starting policy and
   stores them in ``workdir/ref_logps.npz`` keyed by record (reused on rerun);
4. trains with ``train.train`` (checkpoints every ¼ epoch in ``workdir/checkpoints``; rerunning the
   same command resumes);
5. exports the trained policy in Hugging Face format plus the tokenizer / processor files to
   ``workdir/export``.
"""
from __future__ import annotations

import glob
import json
import logging
import os
from typing import Any

import jax
import numpy as np

from rlaifv_jax.engine import logps
from rlaifv_jax.training import step as dpo_step
from rlaifv_jax.core import sharding
from rlaifv_jax.training import loop as train
from rlaifv_jax.data.chat import llava_image_preprocess
from rlaifv_jax.data.rlaifv_dataset import make_pair_dataset, pair_example_fn, pair_text_fn, read_rlaifv
from rlaifv_jax.models import hf
from rlaifv_jax.models.llava import Llava, LlavaNext
from rlaifv_jax.core.workdir import check_or_save_config



def data_paths(spec: str) -> list[str]:
    """Comma-separated paths / globs → sorted existing files (an unmatched pattern is an error)."""
    out: list[str] = []
    for part in [p.strip() for p in spec.split(",") if p.strip()]:
        matches = sorted(glob.glob(part)) if any(ch in part for ch in "*?[") else [part]
        if not matches:
            raise FileNotFoundError(f"config.data.path: {part!r} matches no file")
        out.extend(matches)
    if not out:
        raise ValueError("config.data.path is empty: give the RLAIF-V-Dataset parquet/JSONL file(s)")
    return out


def check_config(config) -> None:
    if config.mode != "offline_dpo":
        raise ValueError(f"offline.run got config.mode={config.mode!r}")
    if not config.policy.path:
        raise ValueError("config.policy.path is empty: give a local Hugging Face LLaVA directory")
    if config.train.global_batch_size % jax.process_count():
        raise ValueError(f"global_batch_size {config.train.global_batch_size} is not a multiple of "
                         f"{jax.process_count()} hosts")
    if config.train.global_batch_size % config.train.grad_accum:
        raise ValueError("global_batch_size must be a multiple of grad_accum")
    hf.parse_dtype(config.policy.compute_dtype, "policy.compute_dtype")
    hf.parse_dtype(config.policy.param_dtype, "policy.param_dtype")


def _ref_logps(model, records, example_fn, batch_size, path, mesh) -> None:
    """Fill ``record.features['ref_*_logps']``; cached in ``path`` (keyed by record source)."""
    keys = [r.source for r in records]
    cached: dict[str, tuple[float, float]] = {}
    if os.path.exists(path):
        z = np.load(path)
        cached = {k: (c, r) for k, c, r in zip(z["keys"].tolist(), z["chosen"], z["rejected"])}
    todo = [r for r in records if r.source not in cached]
    if todo:
        def batches():
            for i in range(0, len(todo), batch_size):
                exs = [example_fn(r) for r in todo[i:i + batch_size]]
                yield {k: np.stack([e[k] for e in exs]) for k in exs[0]}

        print(f"reference log-probs: {len(todo)} pairs ({len(records) - len(todo)} cached)")
        out = logps.reference_logps(model, batches(), mesh=mesh)
        for r, c, rj in zip(todo, out["ref_chosen_logps"], out["ref_rejected_logps"]):
            cached[r.source] = (float(c), float(rj))
        if jax.process_index() == 0:
            tmp = path + ".tmp.npz"
            np.savez(tmp, keys=np.asarray(list(cached)), chosen=np.asarray([v[0] for v in cached.values()], np.float32),
                     rejected=np.asarray([v[1] for v in cached.values()], np.float32))
            os.replace(tmp, path)
    for r, k in zip(records, keys):
        r.features["ref_chosen_logps"], r.features["ref_rejected_logps"] = (np.float32(x) for x in cached[k])


def run(config, workdir: str) -> dict[str, Any]:
    """Offline DPO (see module docstring). Returns a summary dict (also printed)."""
    from transformers import AutoImageProcessor, AutoTokenizer

    check_config(config)
    check_or_save_config(config, workdir)
    mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
    compute, param = hf.parse_dtype(config.policy.compute_dtype, "compute"), hf.parse_dtype(config.policy.param_dtype, "param")
    with jax.set_mesh(mesh):
        model = hf.load_pretrained(config.policy.path, dtype=compute, param_dtype=param, mesh=mesh)
    if not isinstance(model, Llava) or isinstance(model, LlavaNext):
        raise ValueError(f"{config.policy.path}: offline DPO supports LLaVA-1.5 "
                         f"(LlavaForConditionalGeneration); got {type(model).__name__}")
    tokenizer = AutoTokenizer.from_pretrained(config.policy.path, local_files_only=True)
    processor = AutoImageProcessor.from_pretrained(config.policy.path, local_files_only=True)
    mean = tuple(getattr(processor, "image_mean", None) or (0.48145466, 0.4578275, 0.40821073))
    std = tuple(getattr(processor, "image_std", None) or (0.26862954, 0.26130258, 0.27577711))
    size = model.config.vision.image_size

    def image_fn(im):
        return llava_image_preprocess(im, size=size, mean=mean, std=std, pad_to_square=config.data.pad_to_square)

    text_fn = pair_text_fn(tokenizer, image_token_count=model.num_image_tokens(),
                           image_token_id=model.config.image_token_id, max_length=config.data.max_length,
                           template=config.data.template)
    records, skipped = read_rlaifv(data_paths(config.data.path), text_fn=text_fn)
    t = config.train
    per_host = t.global_batch_size // jax.process_count()
    if len(records) // jax.process_count() < per_host:
        raise ValueError(f"{len(records)} usable pairs: fewer than one global batch of {t.global_batch_size}")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    pairs_fn = pair_example_fn(image_fn, max_length=config.data.max_length, pad_id=pad_id)

    if config.lora.enabled:
        from rlaifv_jax.training import lora
        lora.apply_lora(model, rank=config.lora.rank, alpha=config.lora.alpha, dropout=config.lora.dropout,
                        seed=config.seed, mesh=mesh)

    _ref_logps(model, records, pairs_fn, t.ref_batch_size, os.path.join(workdir, "ref_logps.npz"), mesh)

    def example_fn(record):
        out = pairs_fn(record)
        out["ref_chosen_logps"] = record.features["ref_chosen_logps"]
        out["ref_rejected_logps"] = record.features["ref_rejected_logps"]
        return out

    ds = make_pair_dataset(records, example_fn=example_fn, batch_size=per_host, seed=config.seed,
                           num_epochs=t.num_epochs)
    steps_per_epoch = len(ds) // t.num_epochs
    save_every = max(1, steps_per_epoch // max(t.checkpoints_per_epoch, 1))
    tcfg = train.TrainConfig(
        optim=dpo_step.OptimConfig(learning_rate=t.learning_rate, total_steps=len(ds), warmup_ratio=t.warmup_ratio,
                              weight_decay=t.weight_decay, max_grad_norm=t.max_grad_norm, b1=t.adam_b1,
                              b2=t.adam_b2, eps=t.adam_eps, schedule=t.schedule),
        loss=dpo_step.LossConfig(beta=config.dpo.beta, loss_type=config.dpo.loss_type,
                            label_smoothing=config.dpo.label_smoothing, sft_weight=config.dpo.sft_weight,
                            average=config.dpo.average, grad_accum=t.grad_accum),
        seed=config.seed, save_every=save_every, max_to_keep=t.max_to_keep or None, log_every=t.log_every)
    extra = {}
    if config.lora.enabled:
        extra = dict(trainable=lora.lora_trainable, prepare=lora.prepare)
    result = train.train(model, ds, tcfg, workdir, mesh=mesh, **extra)

    export_dir = os.path.join(workdir, "export")
    trained = result.model
    if config.lora.enabled:
        trained = lora.merge_lora(trained)
    dtype = hf.parse_dtype(config.export.dtype, "export.dtype") if config.export.dtype else None
    hf.save_pretrained(trained, export_dir, dtype=None if dtype is None else np.dtype(dtype))
    if jax.process_index() == 0:
        tokenizer.save_pretrained(export_dir)
        processor.save_pretrained(export_dir)
    first = result.history[0] if result.history else {}
    last = result.history[-1] if result.history else {}
    summary = {"pairs": len(records), "skipped": dict(skipped), "steps": result.step,
               "steps_per_epoch": steps_per_epoch, "checkpoint_every": save_every,
               "resumed_from": result.resumed_from,
               "first": {k: first.get(k) for k in ("loss", "rewards/accuracies", "rewards/margins")},
               "last": {k: last.get(k) for k in ("loss", "rewards/accuracies", "rewards/margins")},
               "export": export_dir}
    print(json.dumps(summary, indent=2))
    logging.info("offline DPO done: %s", summary)
    return summary
