"""The host-side feedback loop: samples → claims → labels → pairs, one resumable stage each.

Every stage reads the previous stage's records, writes its own through ``records.run_stage``
(atomic shards, a completion marker, resume without loss or duplication, work split by
``jax.process_index()``) and counts what went wrong (empty responses, count mismatches,
unparseable outputs) in its marker. On many hosts a barrier follows each stage.
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import os
from typing import Any, Callable, Sequence

import jax
from jax.experimental import multihost_utils

from rlaifv_jax.core import records
from rlaifv_jax.engine import generate
from rlaifv_jax.feedback import pairs as pairs_lib
from rlaifv_jax.feedback.claims import ClaimExtractor, ClaimResult
from rlaifv_jax.engine.score import Labeler

PromptEncoder = Callable[[dict[str, Any]], dict[str, Any]]


@dataclasses.dataclass(frozen=True)
class SamplingSettings:
    """Decoding settings shared by all of a prompt's samples (deconfounded sampling)."""

    num_samples: int
    max_new_tokens: int
    temperature: float
    top_k: int | None
    top_p: float | None
    repetition_penalty: float | None
    stop_token_ids: tuple[int, ...]


def run(stage_dir: str, inputs: Sequence[Any], fn, *, chunk_size: int, desc: str, progress: bool,
        key_fn=lambda r: r["key"]) -> list[dict[str, Any]]:
    """Run one stage over this host's share, wait for every host, return all of its records."""
    summary = records.run_stage(stage_dir, inputs, fn, key_fn=key_fn, chunk_size=chunk_size,
                                process_index=jax.process_index(), process_count=jax.process_count(),
                                desc=desc, progress=progress)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(stage_dir)
    if summary.get("warnings"):
        logging.warning("%s: %s", desc, summary["warnings"])
    return records.read_stage(stage_dir)


def sample_stage(stage_dir: str, prompts: list[dict[str, Any]], *, model, tokenizer, encode: PromptEncoder,
                 settings: SamplingSettings, seed: int, batch_size: int, progress: bool) -> list[dict[str, Any]]:
    """n responses per prompt from the policy; empty responses are kept and counted."""

    def fn(chunk):
        outs = generate.generate(model, [encode(p) for p in chunk], num_samples=settings.num_samples,
                                 max_new_tokens=settings.max_new_tokens, temperature=settings.temperature,
                                 top_k=settings.top_k, top_p=settings.top_p,
                                 repetition_penalty=settings.repetition_penalty,
                                 stop_token_ids=list(settings.stop_token_ids), seed=seed,
                                 batch_size=batch_size, progress=False)
        result = []
        for p, out in zip(chunk, outs):
            texts = [tokenizer.decode(t, skip_special_tokens=True).strip() for t in out["tokens"]]
            result.append({"question": p["question"], "responses": texts,
                           "num_tokens": [len(t) for t in out["tokens"]],
                           "warnings": ["empty_response"] * sum(not t for t in texts)})
        return result

    return run(stage_dir, prompts, fn, chunk_size=batch_size, desc="samples", progress=progress,
               key_fn=lambda p: p["id"])


def claims_stage(stage_dir: str, samples: list[dict[str, Any]], *, extractor: ClaimExtractor,
                 batch_size: int, progress: bool) -> list[dict[str, Any]]:
    """Split every response into claims and yes/no questions (status per response)."""

    def fn(chunk):
        outs = extractor.extract([(rec["question"], r) for rec in chunk for r in rec["responses"]])
        result, start = [], 0
        for rec in chunk:
            mine = outs[start:start + len(rec["responses"])]
            start += len(rec["responses"])
            result.append({"claims": [c.to_dict() for c in mine],
                           "warnings": [c.status for c in mine if c.status != "ok"]})
        return result

    return run(stage_dir, samples, fn, chunk_size=batch_size, desc="claims", progress=progress)


def label_stage(stage_dir: str, claims: list[dict[str, Any]], *, labeler: Labeler,
                images: Callable[[dict[str, Any]], tuple[Any, Any]], batch_size: int,
                progress: bool) -> list[dict[str, Any]]:
    """(p_yes, p_no) for every claim question, all of a prompt's questions against one image prefix.

    ``images(record)`` gives the labeler's ``(pixel_values, image_sizes)`` for a claims record."""

    def fn(chunk):
        items, spans = [], []
        for rec in chunk:
            results = [ClaimResult.from_dict(c) for c in rec["claims"]]
            questions = [q for c in results for q in c.questions]
            pixel_values, image_sizes = images(rec)
            items.append({"questions": questions, "pixel_values": pixel_values, "image_sizes": image_sizes})
            spans.append([len(c.questions) for c in results])
        scores = labeler.score(items)
        result = []
        for per_prompt, counts in zip(scores, spans):
            labels, start = [], 0
            for n in counts:
                labels.append([[float(py), float(pn)] for py, pn in per_prompt[start:start + n]])
                start += n
            result.append({"labels": labels})
        return result

    return run(stage_dir, claims, fn, chunk_size=batch_size, desc="labels", progress=progress)


def pair_stage(stage_dir: str, samples: list[dict[str, Any]], claims: list[dict[str, Any]],
               labels: list[dict[str, Any]], *, seed: int, per_prompt: int, min_gap: int,
               progress: bool) -> list[dict[str, Any]]:
    """Scores and at most ``per_prompt`` seeded pairs per prompt, each with its audit trail."""
    by_key = {r["key"]: r for r in claims}
    lab = {r["key"]: r for r in labels}

    def fn(chunk):
        result = []
        for rec in chunk:
            k = rec["key"]
            made = pairs_lib.build_pair_records(
                {"id": k, "question": rec["question"]}, rec["responses"],
                [ClaimResult.from_dict(c) for c in by_key[k]["claims"]], lab[k]["labels"],
                seed=seed, k=per_prompt, min_diff=min_gap)
            result.append({"pairs": made, "warnings": [] if made else ["no_pair"]})
        return result

    return run(stage_dir, samples, fn, chunk_size=64, desc="pairs", progress=progress)


def balanced_pairs(pair_records: list[dict[str, Any]], balance: bool, ratio: float | None = None
                   ) -> tuple[list[dict[str, Any]], float | None]:
    """All pairs of the iteration, length-balanced at dataset level (METHOD.md §4) when asked, with
    the searched threshold (``ratio=None``) or a fixed one."""
    flat = [p for r in pair_records for p in r["pairs"]]
    if not balance or not flat:
        return flat, None
    return pairs_lib.balance_lengths(flat, chosen_key="chosen", rejected_key="rejected", ratio=ratio)


def stage_warnings(stage_dirs: Sequence[str]) -> dict[str, dict[str, int]]:
    """The warning counts of every finished stage, by stage name."""
    out = {}
    for d in stage_dirs:
        counts: collections.Counter = collections.Counter()
        if os.path.isdir(d):
            counts.update(records.warning_counts(records.read_stage(d)))
        out[os.path.basename(d)] = dict(counts)
    return out

