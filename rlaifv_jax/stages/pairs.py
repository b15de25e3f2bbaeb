"""Stage 4: response scores (−#rejected claims), at most k seeded pairs of different scores per
prompt with their audit trail, then dataset-level length balancing (METHOD.md §4)."""
from __future__ import annotations

import dataclasses
from typing import Any

from rlaifv_jax.feedback import pairs as pairs_lib
from rlaifv_jax.feedback.claims import ClaimResult
from rlaifv_jax.stages import runner


@dataclasses.dataclass(frozen=True)
class PairSettings:
    per_prompt: int = 2  # at most this many pairs per prompt
    min_score_gap: int = 1  # chosen score - rejected score
    balance_lengths: bool = True  # dataset-level length balancing
    length_ratio: float | None = None  # fixed threshold r; None searches it (METHOD.md §4)


def run(stage_dir: str, samples: list[dict[str, Any]], claims: list[dict[str, Any]], labels: list[dict[str, Any]],
        settings: PairSettings, *, seed: int, progress: bool) -> list[dict[str, Any]]:
    """``{"key", "pairs": [pair records]}`` per prompt (``no_pair`` warning when none)."""
    by_key = {r["key"]: r for r in claims}
    lab = {r["key"]: r for r in labels}

    def fn(chunk):
        result = []
        for rec in chunk:
            k = rec["key"]
            made = pairs_lib.build_pair_records(
                {"id": k, "question": rec["question"]}, rec["responses"],
                [ClaimResult.from_dict(c) for c in by_key[k]["claims"]], lab[k]["labels"],
                seed=seed, k=settings.per_prompt, min_diff=settings.min_score_gap)
            result.append({"pairs": made, "warnings": [] if made else ["no_pair"]})
        return result

    return runner.run(stage_dir, samples, runner.plain(fn), chunk_size=64, desc="pairs", progress=progress)


def balanced(pair_records: list[dict[str, Any]], settings: PairSettings) -> tuple[list[dict[str, Any]], float | None]:
    """All pairs of the iteration, length-balanced when asked, and the threshold used."""
    flat = [p for r in pair_records for p in r["pairs"]]
    if not settings.balance_lengths or not flat:
        return flat, None
    return pairs_lib.balance_lengths(flat, chosen_key="chosen", rejected_key="rejected", ratio=settings.length_ratio)


def encode_inputs(pairs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Pair records as ``stages/encode.run`` takes them: ``key`` (the pair's ``pair_id``), ``image_key``
    (its ``prompt_id``), ``question``, ``chosen``, ``rejected``."""
    return [{"key": p["pair_id"], "image_key": p["prompt_id"], "question": p["question"], "chosen": p["chosen"],
             "rejected": p["rejected"]} for p in pairs]
