"""The online RLAIF-V loop: per iteration sample → claims → labels → pairs → reference log-probs →
DPO → Orbax checkpoint → evaluation, every stage atomic and resumable under ``workdir/iter_KK/``.

Rerunning the same command after a crash (at any moment) skips finished stages, resumes the
half-done one, and ends with the same pairs and metrics as an uninterrupted run.
"""
from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import shutil
import time
import zlib
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
from flax import nnx
from PIL import Image

from rlaifv_jax.core import tree
from rlaifv_jax.engine import logps
from rlaifv_jax.training import step as dpo_step
from rlaifv_jax.core import records
from rlaifv_jax.core import sharding
from rlaifv_jax.training import loop as train
from rlaifv_jax.pipelines import warmstart
from rlaifv_jax.core.checkpoint import Checkpointer
from rlaifv_jax.data import chat, prompts as prompts_lib, toy_world
from rlaifv_jax.data.rlaifv_dataset import (PreferenceRecord, SkipRecord, make_pair_dataset, pair_example_fn,
                                            pair_text_fn)
from rlaifv_jax.stages import eval as toy_eval
from rlaifv_jax.stages import driver
from rlaifv_jax.feedback.claims import LLMClaimExtractor
from rlaifv_jax.engine.score import Labeler
from rlaifv_jax.feedback.toy_claims import RuleClaimExtractor
from rlaifv_jax.models import hf
from rlaifv_jax.pipelines.validate import validate
from rlaifv_jax.pipelines.report import write_report


@dataclasses.dataclass
class Side:
    """A model with what it needs to read prompts: tokenizer, chat format, image encoder."""

    model: nnx.Module
    tokenizer: Any
    template: str
    encode_image: prompts_lib.ImageEncoder

    def prompt(self, record: dict[str, Any]) -> dict[str, Any]:
        """Sampler/labeler input for a prompt record: ids with the image placeholder expanded."""
        pixel_values, image_sizes = self.encode_image(record["image"])
        size = None if image_sizes is None else tuple(np.asarray(image_sizes)[0])
        ids = chat.encode_prompt(self.tokenizer, record["question"], self.model.num_image_tokens(size),
                                 image_token_id=self.model.config.image_token_id, template=self.template)
        return {"id": zlib.crc32(str(record["id"]).encode()), "input_ids": ids.tolist(),
                "pixel_values": pixel_values, "image_sizes": image_sizes}

    def stop_ids(self) -> list[int]:
        return [chat.end_of_turn_id(self.tokenizer, self.template)]


def _tokenizer(path: str):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def _load_side(path: str, template: str, dtype: str, mesh, toy: bool, param_dtype: str | None = None) -> Side:
    architecture, _ = hf.read_config(path)
    model = hf.load_pretrained(path, dtype=hf.parse_dtype(dtype), param_dtype=hf.parse_dtype(param_dtype or dtype), mesh=mesh)
    encoder = prompts_lib.toy_image_encoder if toy else prompts_lib.hf_image_encoder(path, architecture)
    return Side(model, _tokenizer(path), template, encoder)


@dataclasses.dataclass
class Setup:
    """What one run works on: prompts per iteration, evaluation records, the initial policy path."""

    policy_path: str
    labeler_path: str  # a separate labeler's checkpoint ("" for self-feedback)
    prompts_for: Callable[[int], list[dict[str, Any]]]
    eval_records: list[dict[str, Any]]
    world: toy_world.WorldConfig | None
    prompt_report: dict[str, Any] | None


def _setup(config: ml_collections.ConfigDict, workdir: str) -> Setup:
    if config.source == "toy":
        world = toy_world.WorldConfig(caption_partner_rate=config.world.caption_partner_rate)
        warm = toy_world.warmstart_split(world, config.world.n_warmstart, config.seed)
        path = warmstart.warm_start(config.model, config.warmstart, world, warm, os.path.join(workdir, "warmstart"),
                                    seed=config.seed, progress=config.progress)
        if config.labeler.kind == "toy":
            labeler_path = warmstart.warm_start(config.toy_labeler.model, config.toy_labeler.warmstart, world, warm,
                                                os.path.join(workdir, "labeler_warmstart"), seed=config.seed + 1,
                                                progress=config.progress)
        n = config.world.n_prompts

        def prompts_for(k: int) -> list[dict[str, Any]]:
            return toy_world.prompt_split(world, n, config.seed, name=f"iter{k}", stream=100 + k)

        return Setup(path, labeler_path if config.labeler.kind == "toy" else config.labeler.path, prompts_for,
                     toy_world.eval_split(world, config.world.n_eval, config.seed), world, None)
    good, report = prompts_lib.read_prompt_file(config.prompts.path)
    logging.info("prompts: kept %d, skipped %s", report.kept, dict(report.skipped))
    for line in report.problems:
        logging.warning("prompt file %s", line)
    per = config.prompts.per_iteration or len(good)

    def file_prompts(k: int) -> list[dict[str, Any]]:
        start = (k * per) % len(good)
        return [good[(start + i) % len(good)] for i in range(min(per, len(good)))]

    return Setup(config.policy.path, config.labeler.path, file_prompts, [], None, report.to_dict())


def _extractor(config: ml_collections.ConfigDict, world, mesh):
    if config.claims.kind == "rule":
        return RuleClaimExtractor(world or toy_world.WorldConfig())
    from rlaifv_jax.engine import generate
    from rlaifv_jax.feedback.claims import CLAIM_LLM_DECODING as dec

    def llm(path: str) -> Callable[[list[str]], list[str]]:
        model = hf.load_pretrained(path, dtype=hf.parse_dtype(config.policy.dtype), mesh=mesh)
        tok = _tokenizer(path)
        stop = sorted({chat.end_of_turn_id(tok, "chat"), int(tok.eos_token_id)})

        def generate_text(messages: list[str]) -> list[str]:
            batch = [{"id": zlib.crc32(m.encode()), "input_ids": chat.encode_prompt(tok, m, 0, template="chat").tolist(),
                      "pixel_values": None, "image_sizes": None} for m in messages]
            outs = generate.generate(model, batch, num_samples=1, max_new_tokens=dec.max_new_tokens,
                                     temperature=dec.temperature, top_k=dec.top_k, top_p=dec.top_p, stop_token_ids=stop,
                                     seed=config.seed, progress=False)
            return [tok.decode(o["tokens"][0], skip_special_tokens=True) for o in outs]

        return generate_text

    split = llm(config.claims.split_path)
    convert = llm(config.claims.convert_path) if config.claims.convert_path else None
    return LLMClaimExtractor(split, convert)


def _png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def _preference_records(pairs: list[dict[str, Any]], images: dict[str, np.ndarray], side: Side,
                        max_length: int) -> list[PreferenceRecord]:
    """Tokenized pairs for DPO; pairs too long for ``max_length`` are left out (the ref_logps stage
    records each as a ``too_long`` warning)."""
    text_fn = pair_text_fn(side.tokenizer, image_token_count=side.model.num_image_tokens(),
                           image_token_id=side.model.config.image_token_id, max_length=max_length,
                           template=side.template)
    out = []
    for p in pairs:
        rec = PreferenceRecord(p["question"], p["chosen"], p["rejected"], _png(images[p["prompt_id"]]),
                               source=p["pair_id"], meta={k: p[k] for k in p if k.startswith("ref_")})
        try:
            rec.features = text_fn(rec)
        except SkipRecord:  # too long for max_length
            continue
        out.append(rec)
    return out


def _example_fn(side: Side, max_length: int):
    base = pair_example_fn(lambda im: side.encode_image(np.asarray(im.convert("RGB")))[0][0],
                           max_length=max_length, pad_id=side.tokenizer.pad_token_id)

    def fn(rec: PreferenceRecord) -> dict[str, np.ndarray]:
        out = base(rec)
        for k, v in rec.meta.items():
            out[k] = np.float32(v)
        return out

    return fn


def _ref_stage(stage_dir: str, pairs: list[dict[str, Any]], images, side: Side, config, mesh) -> list[dict]:
    """Reference log-probs of the iteration's starting policy, stored with each pair."""
    example = _example_fn(side, config.dpo.max_length)

    def fn(chunk):
        recs = _preference_records(chunk, images, side, config.dpo.max_length)
        kept = {r.source for r in recs}
        batch = [example(r) for r in recs]
        ref = (logps.reference_logps(side.model, [{k: np.stack([b[k] for b in batch]) for k in batch[0]}], mesh=mesh,
                                   batch_size=config.dpo.batch_size)
               if batch else {"ref_chosen_logps": [], "ref_rejected_logps": []})
        vals = iter(zip(ref["ref_chosen_logps"], ref["ref_rejected_logps"]))
        out = []
        for p in chunk:
            if p["pair_id"] in kept:
                c, r = next(vals)
                out.append({**p, "ref_chosen_logps": float(c), "ref_rejected_logps": float(r)})
            else:
                out.append({**p, "warnings": ["too_long"]})
        return out

    return driver.run(stage_dir, pairs, fn, chunk_size=config.dpo.batch_size, desc="ref_logps",
                      progress=config.progress, key_fn=lambda p: p["pair_id"])


def _train_config(config, steps: int) -> train.TrainConfig:
    """DPO settings; a checkpoint every quarter epoch so a crash mid-DPO resumes, not restarts."""
    d = config.dpo
    optim = dpo_step.OptimConfig(learning_rate=d.learning_rate, warmup_ratio=d.warmup_ratio, weight_decay=d.weight_decay,
                            max_grad_norm=d.max_grad_norm, total_steps=steps)
    loss = dpo_step.LossConfig(beta=d.beta, loss_type=d.loss_type, label_smoothing=d.label_smoothing,
                          grad_accum=d.grad_accum)
    return train.TrainConfig(optim=optim, loss=loss, seed=config.seed, progress=config.progress,
                             save_every=max(1, steps // (4 * d.epochs)), max_to_keep=1, async_checkpoint=False)


def _policy_state(model: nnx.Module) -> dict[str, jax.Array]:
    return tree.flat_values(nnx.state(model, nnx.Param))


def _dpo_summary(train_dir: str) -> dict[str, float]:
    """Reward accuracy, margin and loss over the last quarter of an iteration's DPO steps (from
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


def _restore_policy(model: nnx.Module, ckpt: Checkpointer, step: int) -> dict[str, Any]:
    state = nnx.state(model, nnx.Param)
    target = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=v.sharding) for k, v in tree.flat_values(state).items()}
    values, extra = ckpt.restore(step, target)
    nnx.update(model, tree.unflat_values(state, values))
    return extra


class Summary:
    """``workdir/summary.json`` (one entry per evaluation point) and ``summary.jsonl``, both rewritten
    atomically, plus the numeric fields as TensorBoard scalars under ``workdir/tensorboard``."""

    def __init__(self, workdir: str):
        self.workdir = workdir
        self.path = os.path.join(workdir, "summary.json")
        self.entries: list[dict[str, Any]] = []
        if os.path.exists(self.path):
            with open(self.path) as f:
                self.entries = json.load(f)

    def put(self, entry: dict[str, Any]) -> None:
        self.entries = [e for e in self.entries if e["iteration"] != entry["iteration"]] + [entry]
        self.entries.sort(key=lambda e: e["iteration"])
        if jax.process_index() == 0:
            records.atomic_write_text(self.path, json.dumps(self.entries, indent=2))
            records.atomic_write_text(os.path.join(self.workdir, "summary.jsonl"),
                                      "".join(json.dumps(e) + "\n" for e in self.entries))
            from tensorboardX import SummaryWriter
            with SummaryWriter(os.path.join(self.workdir, "tensorboard")) as tb:
                for key, value in entry.items():
                    if isinstance(value, (int, float)) and key != "iteration":
                        tb.add_scalar(f"eval/{key}", value, entry["iteration"])

    def has(self, iteration: int) -> bool:
        return any(e["iteration"] == iteration for e in self.entries)


def _evaluate(side: Side, setup: Setup, config, labeler: Labeler | None) -> dict[str, Any]:
    if setup.world is None:  # no ground truth for a prompt file: CHAIR needs annotated images
        return {"chair_response": None, "chair_mention": None, "recall": None, "yesno_accuracy": None}
    return toy_eval.evaluate(side.model, side.tokenizer, labeler, setup.eval_records, side.prompt, world=setup.world,
                             max_new_tokens=config.eval.max_new_tokens, batch_size=config.eval.batch_size,
                             stop_token_ids=side.stop_ids())


def run(config: ml_collections.ConfigDict, workdir: str) -> list[dict[str, Any]]:
    """Run (or resume) the whole online loop; returns the summary entries."""
    t_start = time.time()
    validate(config)
    from rlaifv_jax.core.workdir import check_or_save_config
    check_or_save_config(config, workdir)
    mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
    setup = _setup(config, workdir)
    toy = setup.world is not None
    policy = _load_side(setup.policy_path, config.policy.template, config.policy.dtype, mesh, toy,
                        config.policy.param_dtype)
    labeler_side = _load_side(setup.policy_path if config.labeler.kind == "self" else setup.labeler_path,
                              config.labeler.template, config.policy.dtype, mesh, toy)
    labeler = Labeler(labeler_side.model, labeler_side.tokenizer, template=labeler_side.template,
                      repetition_penalty=config.labeler.repetition_penalty, batch_size=config.labeler.batch_size)
    extractor = _extractor(config, setup.world, mesh)
    settings = driver.SamplingSettings(
        num_samples=config.sampling.num_samples, max_new_tokens=config.sampling.max_new_tokens,
        temperature=config.sampling.temperature, top_k=config.sampling.top_k or None,
        top_p=config.sampling.top_p if config.sampling.top_p < 1.0 else None,
        repetition_penalty=config.sampling.repetition_penalty if config.sampling.repetition_penalty != 1.0 else None,
        stop_token_ids=tuple(policy.stop_ids()))
    summary = Summary(workdir)
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=None, async_save=False)
    done = ckpt.latest_step() or 0
    if done:
        extra = _restore_policy(policy.model, ckpt, done)
        if not summary.has(done):  # killed between the checkpoint and the summary write
            summary.put(extra["summary"])
        logging.info("resuming after iteration %d (checkpoint %s)", done, ckpt.directory)
    eval_labeler = Labeler(policy.model, policy.tokenizer, template=policy.template,
                           batch_size=config.eval.batch_size) if toy else None
    if not summary.has(0):
        summary.put({"iteration": 0, **_evaluate(policy, setup, config, eval_labeler), "pairs": 0,
                     "wall_s": round(time.time() - t_start, 1)})
    for k in range(done, config.iterations):
        it = os.path.join(workdir, f"iter_{k:02d}")
        seed = config.seed * 1000 + k
        prompts = setup.prompts_for(k)
        images = {str(p["id"]): p["image"] for p in prompts}
        by_id = {str(p["id"]): p for p in prompts}
        samples = driver.sample_stage(os.path.join(it, "samples"), prompts, model=policy.model,
                                      tokenizer=policy.tokenizer, encode=policy.prompt, settings=settings,
                                      seed=seed, batch_size=config.sampling.batch_size, progress=config.progress)
        claims = driver.claims_stage(os.path.join(it, "claims"), samples, extractor=extractor,
                                     batch_size=config.claims.batch_size, progress=config.progress)
        labels = driver.label_stage(os.path.join(it, "labels"), claims, labeler=labeler,
                                    images=lambda r: labeler_side.encode_image(by_id[r["key"]]["image"]),
                                    batch_size=config.sampling.batch_size, progress=config.progress)
        pair_recs = driver.pair_stage(os.path.join(it, "pairs"), samples, claims, labels, seed=seed,
                                      per_prompt=config.pairs.per_prompt, min_gap=config.pairs.min_score_gap,
                                      progress=config.progress)
        pairs, ratio = driver.balanced_pairs(pair_recs, config.pairs.balance_lengths,
                                             None if config.pairs.length_ratio < 0 else config.pairs.length_ratio)
        with_ref = [p for p in _ref_stage(os.path.join(it, "ref_logps"), pairs, images, policy, config, mesh)
                    if "ref_chosen_logps" in p]
        if with_ref:
            recs = _preference_records(with_ref, images, policy, config.dpo.max_length)
            batch = min(config.dpo.batch_size, len(recs))
            data = make_pair_dataset(recs, example_fn=_example_fn(policy, config.dpo.max_length), batch_size=batch,
                                     seed=seed, num_epochs=config.dpo.epochs)
            result = train.train(policy.model, data, _train_config(config, len(data)), os.path.join(it, "train"),
                                 mesh=mesh, desc=f"dpo {k + 1}/{config.iterations}")
            nnx.update(policy.model, nnx.state(result.model, nnx.Param))
        else:
            logging.warning("iteration %d: no preference pairs; the policy is unchanged", k + 1)
        entry = {"iteration": k + 1, **_evaluate(policy, setup, config, eval_labeler), "pairs": len(with_ref),
                 "length_ratio": ratio, **_dpo_summary(os.path.join(it, "train")),
                 "warnings": driver.stage_warnings([os.path.join(it, s) for s in
                                                    ("samples", "claims", "labels", "pairs", "ref_logps")]),
                 "wall_s": round(time.time() - t_start, 1)}
        ckpt.save(k + 1, _policy_state(policy.model), {"iteration": k + 1, "summary": entry}, force=True)
        ckpt.wait()
        summary.put(entry)
        shutil.rmtree(os.path.join(it, "train", "checkpoints"), ignore_errors=True)  # superseded by the policy checkpoint
    ckpt.close()
    hf.save_pretrained(policy.model, os.path.join(workdir, "export"), assets_from=setup.policy_path)
    if jax.process_index() == 0:
        write_report(workdir, summary.entries, setup.prompt_report)
    return summary.entries
