"""Offline DPO on RLAIF-V-Dataset files (METHOD.md §5), through the same stages as the online loop:
read → ``encoded`` (tokenized once) → ``ref_logps`` (chunked, resumable) → ``train`` (DPO with
checkpoints every 1/N epoch) → ``export`` (Hugging Face format with tokenizer and processor).

Pairs are keyed by their content (image bytes, question, chosen, rejected), never by file position,
so editing the data between runs can never attach one pair's reference log-probs to another.
"""
from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
from typing import Any

import numpy as np

from rlaifv_jax.core import sharding
from rlaifv_jax.core.workdir import check_or_save_config
from rlaifv_jax.data.rlaifv_dataset import PreferenceRecord, open_image, read_rlaifv
from rlaifv_jax.models import hf
from rlaifv_jax.pipelines.validate import offline_spec
from rlaifv_jax.stages import dpo, encode, ref

log = logging.getLogger(__name__)


def content_key(record: PreferenceRecord, reference: str) -> str:
    """A pair's identity: sha256 of its image bytes, texts and the reference model's path."""
    h = hashlib.sha256()
    if isinstance(record.image, bytes):
        image = record.image
    else:
        with open(record.image, "rb") as f:
            image = f.read()
    for part in (image, record.question.encode(), record.chosen.encode(), record.rejected.encode(), reference.encode()):
        h.update(hashlib.sha256(part).digest())
    return h.hexdigest()[:32]


def data_paths(spec: str) -> list[str]:
    """Comma-separated files, directories or globs → paths (an unmatched glob is an error)."""
    out: list[str] = []
    for part in [p.strip() for p in spec.split(",") if p.strip()]:
        matches = sorted(glob.glob(part)) if any(ch in part for ch in "*?[") else [part]
        if not matches:
            raise FileNotFoundError(f"config.data.path: {part!r} matches no file")
        out.extend(matches)
    return out


def run(config, workdir: str) -> dict[str, Any]:
    """Offline DPO (see module docstring). Returns a summary dict (also printed)."""
    spec = offline_spec(config)
    records, skipped = read_rlaifv(data_paths(spec.data_path))
    check_or_save_config(config, workdir)
    mesh = sharding.make_mesh(*spec.mesh)
    keyed: dict[str, PreferenceRecord] = {}
    for r in records:
        key = content_key(r, os.path.abspath(spec.policy.path))
        if key in keyed:
            skipped["duplicate_pair"] += 1
            log.warning("%s: the same pair as %s; skipped", r.source, keyed[key].source)
            continue
        keyed[key] = r
    encoded = encode.run(os.path.join(workdir, "encoded"), [
        {"key": k, "image_key": k, "question": r.question, "chosen": r.chosen, "rejected": r.rejected}
        for k, r in keyed.items()], spec.policy, max_length=spec.dpo.max_length, progress=True)
    usable = [e for e in encoded if "prompt_ids" in e]
    image = lambda key: np.asarray(open_image(keyed[key].image))  # noqa: E731
    refs = {r["key"]: r for r in ref.run(os.path.join(workdir, "ref_logps"), usable, image, spec.policy,
                                         batch_size=spec.ref_batch_size, max_length=spec.dpo.max_length,
                                         mesh=mesh, progress=True)}
    examples = [{**e, **refs[e["key"]]} for e in usable]
    export_dir = os.path.join(workdir, "export")
    dtype = np.dtype(hf.parse_dtype(spec.export_dtype, "export.dtype")) if spec.export_dtype else None
    result = dpo.run(os.path.join(workdir, "train"), examples, image, spec.policy, spec.dpo, seed=spec.seed,
                     mesh=mesh, desc="dpo",
                     save=lambda m: hf.save_pretrained(m, export_dir, dtype=dtype, assets_from=spec.policy.path))
    too_long = sum("too_long" in e.get("warnings", ()) for e in encoded)
    history = result["history"]
    first, last = (history[0], history[-1]) if history else ({}, {})
    summary = {"pairs": len(examples), "skipped": {**dict(skipped), **({"too_long": too_long} if too_long else {})},
               "steps": result["steps"], "steps_per_epoch": result.get("steps_per_epoch"),
               "checkpoint_every": result.get("checkpoint_every"), "resumed_from": result["resumed_from"],
               "first": {k: first.get(k) for k in ("loss", "rewards/accuracies", "rewards/margins")},
               "last": {k: last.get(k) for k in ("loss", "rewards/accuracies", "rewards/margins")},
               "export": export_dir}
    print(json.dumps(summary, indent=2))
    log.info("offline DPO done: %s", summary)
    return summary
