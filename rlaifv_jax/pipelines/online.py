"""The online RLAIF-V loop (METHOD.md §1): per iteration, stages by path under ``workdir/iter_KK/``:
samples → claims → labels → pairs → encoded → ref_logps → train (DPO) → ``checkpoints/K+1`` →
evaluation. Each stage loads its own models and frees them; each is atomic and resumable, so
rerunning the same command after a crash continues where it stopped."""
from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

import jax
import ml_collections

from rlaifv_jax.core import distributed, sharding, vocabulary
from rlaifv_jax.core.workdir import check_or_save_config
from rlaifv_jax.feedback import labeler_truth
from rlaifv_jax.pipelines import export, inputs as inputs_lib
from rlaifv_jax.pipelines.report import write_report
from rlaifv_jax.pipelines.summary import Summary
from rlaifv_jax.pipelines.spec import online_spec
from rlaifv_jax.stages import (bundle, claims, dpo, encode, label, measure, pairs, provenance, ref,
                               runner, sample, select)

STAGES = ("samples", "claims", "labels", "pairs", "encoded", "ref_logps")


def run(config: ml_collections.ConfigDict, workdir: str) -> list[dict[str, Any]]:
    """Run (or resume) the whole online loop; returns the summary entries."""
    t_start = time.time()
    config = vocabulary.canonicalize(config)  # deprecated field names -> the canonical ones
    spec = online_spec(config, workdir)
    if not spec.labeler.toy:  # a labeler whose yes/no answers its tokenizer cannot read: refused now
        label.check_answer_tokens(spec.labeler, spec.label)
    distributed.writer_first(lambda: check_or_save_config(config, workdir), "config")
    mesh = sharding.make_mesh(*spec.mesh)  # training (DPO) over every device of every host
    serve = sharding.serve_mesh(spec.mesh[2])  # inference: each host its own devices (split over tensor), its own share
    inputs = distributed.writer_first(
        lambda: inputs_lib.toy(spec.inputs, workdir) if spec.toy else inputs_lib.prompt_file(spec.inputs), "inputs")
    ckpt_dir = os.path.join(workdir, "checkpoints")
    summary = Summary(workdir)

    def policy_at(k: int) -> bundle.ModelSettings:  # the policy after k iterations
        return dataclasses.replace(spec.policy, checkpoint=ckpt_dir, step=k)

    def measure_policy(policy: bundle.ModelSettings, stage_dir: str) -> dict[str, Any]:
        return measure.run(stage_dir, policy, inputs.eval_records, inputs.world, spec.eval, mesh=serve)

    def measure_at(k: int) -> dict[str, Any]:
        return measure_policy(policy_at(k), os.path.join(workdir, "eval", f"{k:02d}"))

    if not summary.has(0):
        summary.put({"iteration": 0, **measure_at(0), "pairs": 0, "wall_s": round(time.time() - t_start, 1)})
    for k in range(spec.iterations):
        if summary.has(k + 1):
            continue
        it = os.path.join(workdir, f"iter_{k:02d}")
        seed = spec.seed * 1000 + k
        prompts = inputs.prompts_for(k)
        fingerprints = provenance.fingerprints_of(prompts, k)  # the policy after k iterations samples them
        provenance.reconcile(it, fingerprints, spec.on_input_change)
        by_id = {str(p["id"]): p for p in prompts}
        image_of = lambda key: by_id[key]["image"]  # noqa: E731  (the RGB image of a prompt id)
        progress = spec.progress
        samples = sample.run(os.path.join(it, "samples"), prompts, policy_at(k), spec.sample, seed=seed, mesh=serve,
                             progress=progress, fingerprints=fingerprints)
        claim_recs = claims.run(os.path.join(it, "claims"), samples, spec.claims, world=inputs.world, mesh=serve,
                                seed=spec.seed, progress=progress)
        labels = label.run(os.path.join(it, "labels"), claim_recs, image_of, spec.labeler, spec.label, mesh=serve,
                           progress=progress)
        pair_recs = pairs.run(os.path.join(it, "pairs"), samples, claim_recs, labels, spec.pairs, seed=seed,
                              progress=progress)
        chosen, ratio = pairs.balanced(pair_recs, spec.pairs)
        to_encode = pairs.encode_inputs(chosen)
        encoded = encode.run(os.path.join(it, "encoded"), to_encode, policy_at(k), max_length=spec.dpo.max_length,
                             progress=progress, image_of=image_of)
        by_key = {e["key"]: e for e in encoded if "prompt_ids" in e}
        usable = [by_key[p["key"]] for p in to_encode if p["key"] in by_key]
        refs = {r["key"]: r for r in ref.run(os.path.join(it, "ref_logps"), usable, image_of, policy_at(k),
                                             batch_size=spec.dpo.batch_size, max_length=spec.dpo.max_length,
                                             mesh=serve, progress=progress)}
        examples = [{**e, **refs[key]} for key, e in sorted(by_key.items())]
        train_dir = os.path.join(it, "train")
        select_dir = os.path.join(train_dir, "select")
        if k + 1 not in bundle.saved_steps(ckpt_dir):
            desc = f"dpo {k + 1}/{spec.iterations}"
            save = lambda m: bundle.save_params(m, ckpt_dir, k + 1, {"iteration": k + 1})  # noqa: E731
            trained = dpo.run(train_dir, examples, image_of, policy_at(k), spec.dpo, seed=seed, mesh=mesh, desc=desc,
                              save=save)
            if spec.dpo.select is not None:
                select.run(select_dir, trained, policy_at(k), measure_policy, spec.dpo.select, mesh=mesh, save=save,
                           desc=desc)
        dpo.discard_checkpoints(train_dir)  # superseded by the policy checkpoint
        select.discard_candidates(select_dir)
        summary.put({"iteration": k + 1, **measure_at(k + 1), "pairs": len(examples), "length_ratio": ratio,
                     **dpo.summary(train_dir), **select.summary(select_dir),
                     **(labeler_truth.audit(prompts, claim_recs, labels, pair_recs) if spec.toy else {}),
                     "warnings": runner.stage_warnings([os.path.join(it, s) for s in STAGES]),
                     "device_idle": runner.stage_device_idle([os.path.join(it, s) for s in STAGES]),
                     "wall_s": round(time.time() - t_start, 1)})
    with bundle.loaded(policy_at(spec.iterations), mesh, training=True) as final:  # master weights, collectively
        export.save(final.model, os.path.join(workdir, "export"), assets_from=spec.policy.path)
    if jax.process_index() == 0:
        write_report(workdir, summary.entries, inputs.prompt_report)
    return summary.entries
