"""Offline DPO on RLAIF-V-Dataset files (METHOD.md §5), through the same stages as the online loop:
read → ``encoded`` (tokenized once) → ``ref_logps`` (chunked, resumable) → ``train`` (DPO with
checkpoints every 1/N epoch) → ``export`` (Hugging Face format with tokenizer and processor).

Pairs are keyed by their content (image bytes, question, chosen, rejected, reference model identity),
never by file position, so editing the data between runs can never attach one pair's reference
log-probs to another. Every input is checked before the workdir is touched; skipped rows are
counted and named (``file:row: reason``) in ``data_report.json``.
"""
from __future__ import annotations

import collections
import hashlib
import json
import logging
import os
from typing import Any

import jax
import numpy as np

from rlaifv_jax.core import paths, records, sharding, vocabulary
from rlaifv_jax.core.errors import InputError
from rlaifv_jax.core.workdir import check_or_save_config
from rlaifv_jax.data.pairs import PreferenceRecord, SkipRecord, open_image
from rlaifv_jax.data.rlaifv_dataset import DatasetFileError, data_files, iter_rows, validate_row
from rlaifv_jax.models import hf
from rlaifv_jax.pipelines import export
from rlaifv_jax.pipelines.spec import offline_spec
from rlaifv_jax.stages import dpo, encode, measure, ref, select

log = logging.getLogger(__name__)
SHOWN_SKIPS = 10  # skipped rows named on the console (all of them go to data_report.json)


def reference_identity(path: str) -> str:
    """The reference model's identity: its absolute path, ``config.json`` and the names, sizes and
    modification times of its weight files (replaced weights give new keys, never stale log-probs)."""
    h = hashlib.sha256(os.path.abspath(path).encode())
    for name in sorted(os.listdir(path)):
        full = os.path.join(path, name)
        if name == "config.json":
            with open(full, "rb") as f:
                h.update(f.read())
        elif name.endswith((".safetensors", ".safetensors.index.json")):
            st = os.stat(full)
            h.update(f"{name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()


def content_key(record: PreferenceRecord, reference: str) -> str:
    """A pair's identity: sha256 of its image bytes, texts and the reference model's identity."""
    h = hashlib.sha256()
    if isinstance(record.image, bytes):
        image = record.image
    else:
        with open(record.image, "rb") as f:
            image = f.read()
    for part in (image, record.question.encode(), record.chosen.encode(), record.rejected.encode(), reference.encode()):
        h.update(hashlib.sha256(part).digest())
    return h.hexdigest()[:32]


def read_pairs(data: list[str], max_pairs: int = 0, image_root: str = "", allow_outside_root: bool = False
               ) -> tuple[list[PreferenceRecord], collections.Counter, list[str]]:
    """Usable pairs of the data files (directories read whole), the skip counts by reason and one
    ``"file:row: reason"`` line per skipped row; ``max_pairs`` > 0 keeps only the first N pairs.
    Image paths resolve against ``image_root`` (default: each data file's folder); a path outside
    it is skipped (``image_outside_root``) unless ``allow_outside_root``.
    ``InputError`` when a file cannot be read or no pair is usable."""
    records: list[PreferenceRecord] = []
    skipped: collections.Counter = collections.Counter()
    named: list[str] = []
    try:
        files = data_files(data)
        for path in files:
            base_dir = os.path.abspath(image_root) if image_root else os.path.dirname(os.path.abspath(path))
            for row, raw in enumerate(iter_rows(path)):
                source = f"{path}:{row}"
                result = raw if isinstance(raw, SkipRecord) else validate_row(
                    raw, source, base_dir, allow_outside_root=allow_outside_root)
                if isinstance(result, SkipRecord):
                    skipped[result.reason] += 1
                    named.append(f"{source}: {result.reason}")
                    continue
                records.append(result)
                if max_pairs and len(records) >= max_pairs:
                    break
            if max_pairs and len(records) >= max_pairs:
                break
    except DatasetFileError as e:
        raise InputError(f"data.path: {e}") from None
    if not records:
        raise InputError(f"data.path: no usable pair in {len(files)} file(s) (skipped: {dict(skipped)})")
    log.info("data: %d pairs from %d file(s)%s", len(records), len(files),
             f"; skipped {sum(skipped.values())} rows {dict(skipped)}" if skipped else "")
    for line in named[:SHOWN_SKIPS]:
        log.warning("skipped %s", line)
    if len(named) > SHOWN_SKIPS:
        log.warning("... and %d more skipped rows (all listed in data_report.json)", len(named) - SHOWN_SKIPS)
    return records, skipped, named


def reopen_stage(stage_dir: str, keys: set[str]) -> None:
    """A finished stage whose records miss some of ``keys`` (the data file was edited since) is
    reopened: this process's completion marker is removed, so the stage computes only the missing
    keys; records of pairs no longer in the data stay on disk and are ignored by the caller."""
    marker = os.path.join(stage_dir, records.marker_name(jax.process_index()))
    if paths.exists(marker) and not keys <= records.existing_keys(stage_dir):
        log.info("%s: the data changed; computing the new pairs only", stage_dir)
        paths.remove(marker)


def suite_measure(spec) -> select.Measure | None:
    """The checkpoint evaluation of offline selection (``eval.every_epochs``): the suite's questions are
    read and ``eval.select_metric`` checked against its metrics now, before anything trains."""
    if spec.dpo.select is None:
        return None
    try:
        bench = measure.load_suite(spec.suite)
    except (OSError, ValueError) as e:
        raise InputError(f"eval.data: {e}") from None
    names = measure.suite_metric_names(bench)
    if spec.dpo.select.metric not in names:
        raise InputError(f"eval.select_metric={spec.dpo.select.metric!r} is not a metric of {spec.suite.name}; "
                         f"choose one of {', '.join(names)}")
    return lambda policy, stage_dir: measure.run_suite(stage_dir, policy, bench, spec.suite,
                                                          mesh=sharding.serve_mesh())


def run(config, workdir: str) -> dict[str, Any]:
    """Offline DPO (see module docstring). Returns a summary dict (also printed)."""
    config = vocabulary.canonicalize(config)  # deprecated field names -> the canonical ones
    spec = offline_spec(config)  # every field, path and checkpoint config checked: nothing written yet
    records, skipped, named = read_pairs(spec.data_paths, spec.max_pairs, spec.image_root, spec.allow_outside_root)
    measure_fn = suite_measure(spec)
    check_or_save_config(config, workdir)
    mesh = sharding.make_mesh(*spec.mesh)
    reference = reference_identity(spec.policy.path)
    keyed: dict[str, PreferenceRecord] = {}
    for r in records:
        key = content_key(r, reference)
        if key in keyed:
            skipped["duplicate_pair"] += 1
            named.append(f"{r.source}: duplicate_pair (same as {keyed[key].source})")
            continue
        keyed[key] = r
    paths.atomic_write_text(os.path.join(workdir, "data_report.json"), json.dumps(
        {"pairs": len(keyed), "skipped": dict(skipped), "skipped_rows": named}, indent=1))
    progress = spec.progress
    reopen_stage(os.path.join(workdir, "encoded"), set(keyed))
    encoded = encode.run(os.path.join(workdir, "encoded"), [
        {"key": k, "image_key": k, "question": r.question, "chosen": r.chosen, "rejected": r.rejected}
        for k, r in keyed.items()], spec.policy, max_length=spec.dpo.max_length, progress=progress,
        image_of=lambda key: np.asarray(open_image(keyed[key].image)))
    encoded = [e for e in encoded if e["key"] in keyed]  # records of edited-away pairs are ignored
    usable = [e for e in encoded if "prompt_ids" in e]
    noted = collections.Counter(w for e in encoded for w in e.get("warnings", ()))
    for reason in ("image_token_in_text", encode.SPECIAL_TEXT):
        names = [keyed[e["key"]].source for e in encoded if reason in e.get("warnings", ())]
        if names:
            log.warning("%d pairs %s: %s", len(names), "skipped (their text maps to the image token)"
                        if reason == "image_token_in_text" else "hold special-token strings, encoded as text",
                        ", ".join(names[:SHOWN_SKIPS]) + (" ..." if len(names) > SHOWN_SKIPS else ""))
    if not usable:
        raise InputError(f"data.path: none of the {len(encoded)} pairs fits dpo.max_length={spec.dpo.max_length} "
                         "tokens (prompt + image + the longer answer); raise dpo.max_length")
    image = lambda key: np.asarray(open_image(keyed[key].image))  # noqa: E731
    reopen_stage(os.path.join(workdir, "ref_logps"), {e["key"] for e in usable})
    refs = {r["key"]: r for r in ref.run(os.path.join(workdir, "ref_logps"), usable, image, spec.policy,
                                         batch_size=spec.ref_batch_size, max_length=spec.dpo.max_length,
                                         mesh=sharding.serve_mesh(), progress=progress)}
    examples = [{**e, **refs[e["key"]]} for e in usable]
    export_dir = os.path.join(workdir, "export")
    dtype = np.dtype(hf.parse_dtype(spec.export_dtype, "export.dtype")) if spec.export_dtype else None

    def save(model, directory=export_dir):
        export.save(model, directory, dtype=dtype, assets_from=spec.policy.path)

    train_dir = os.path.join(workdir, "train")
    result = dpo.run(train_dir, examples, image, spec.policy, spec.dpo, seed=spec.seed, mesh=mesh, desc="dpo",
                     save=save, save_step=lambda m, s: save(m, os.path.join(export_dir, f"step_{s}")))
    if measure_fn is not None:
        result = select.run(os.path.join(train_dir, "select"), result, spec.policy, measure_fn, spec.dpo.select,
                            mesh=mesh, save=save)
    encode_skips = {k: noted[k] for k in ("too_long", "image_token_in_text") if noted[k]}
    history = result["history"]
    first, last = (history[0], history[-1]) if history else ({}, {})
    summary = {"pairs": len(examples), "skipped": {**dict(skipped), **encode_skips},
               "special_token_text": noted[encode.SPECIAL_TEXT],
               "steps": result["steps"], "steps_per_epoch": result.get("steps_per_epoch"),
               "checkpoint_every": result.get("checkpoint_every"), "resumed_from": result["resumed_from"],
               "kept_checkpoints": result.get("kept_steps"), "best_checkpoint": result.get("best_step"),
               "exported_step": result.get("exported_step"),
               "first": {k: first.get(k) for k in ("loss", "rewards/accuracies", "rewards/margins")},
               "last": {k: last.get(k) for k in ("loss", "rewards/accuracies", "rewards/margins")},
               "export": export_dir, **select.summary(os.path.join(train_dir, "select"))}
    print(json.dumps(summary, indent=2, allow_nan=False))
    return summary
