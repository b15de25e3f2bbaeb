"""Stage 5: tokenize each pair once (prompt with image placeholders, chosen and rejected answers).

The reference pass and every DPO epoch read these ids; pixels are produced from the pair's image
when a batch is built (``example``). Pairs longer than ``max_length`` are kept out and counted
(``too_long``), never truncated.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable

import numpy as np

from rlaifv_jax.data.rlaifv_dataset import PreferenceRecord, SkipRecord, pair_text_fn
from rlaifv_jax.stages import bundle, runner

ID_FIELDS = ("prompt_ids", "chosen_ids", "rejected_ids")


def run(stage_dir: str, pairs: list[dict[str, Any]], policy: bundle.ModelSpec, *, max_length: int,
        progress: bool, chunk_size: int = 256) -> list[dict[str, Any]]:
    """``{"key", "image_key", "prompt_ids", "chosen_ids", "rejected_ids"}`` per pair (or a
    ``too_long`` warning). ``pairs`` carry ``key``, ``image_key``, ``question``, ``chosen``, ``rejected``."""

    @contextlib.contextmanager
    def open_fn():
        model = bundle.abstract_model(policy.path)  # the architecture only: no weights are read
        text_fn = pair_text_fn(bundle.tokenizer(policy.path), image_token_count=model.num_image_tokens(),
                               image_token_id=model.config.image_token_id, max_length=max_length,
                               template=policy.template)

        def fn(chunk):
            out = []
            for p in chunk:
                try:
                    ids = text_fn(PreferenceRecord(p["question"], p["chosen"], p["rejected"], b"", source=p["key"]))
                except SkipRecord as skip:
                    out.append({"image_key": p["image_key"], "warnings": [skip.reason]})
                    continue
                out.append({"image_key": p["image_key"], **{k: np.asarray(ids[k]).tolist() for k in ID_FIELDS}})
            return out
        yield fn

    return runner.run(stage_dir, pairs, open_fn, chunk_size=chunk_size, desc="encode", progress=progress)


def example(record: dict[str, Any], pixel_values: np.ndarray, *, max_length: int, pad_id: int) -> dict[str, np.ndarray]:
    """Fixed-shape arrays of one encoded pair: ``pixel_values``, ``chosen_tokens``/``rejected_tokens``
    ``[max_length]`` (prompt + answer, then ``pad_id``), ``answer_start``, ``chosen_len``,
    ``rejected_len`` (the inputs of ``engine.logps.pair_logps``), ``weights`` (1, or 0 for a padding
    row), plus any ``ref_*`` log-probs."""
    out: dict[str, np.ndarray] = {"pixel_values": pixel_values}
    prompt = record["prompt_ids"]
    for name in ("chosen", "rejected"):
        ids = prompt + record[f"{name}_ids"]
        tokens = np.full((max_length,), pad_id, np.int32)
        tokens[: len(ids)] = ids
        out[f"{name}_tokens"] = tokens
        out[f"{name}_len"] = np.int32(len(record[f"{name}_ids"]))
    out["answer_start"] = np.int32(len(prompt))
    out["weights"] = np.float32(record.get("weight", 1.0))  # 0 for padding rows
    for key in ("ref_chosen_logps", "ref_rejected_logps"):
        if key in record:
            out[key] = np.float32(record[key])
    return out


def example_fn(image_of: Callable[[str], np.ndarray], b: "bundle.Bundle", max_length: int
               ) -> Callable[[dict[str, Any]], dict[str, np.ndarray]]:
    """``example`` with the pair's pixels from ``image_of(image_key)`` through the bundle's encoder."""
    pad_id = bundle.pad_id(b.tokenizer)
    return lambda rec: example(rec, b.encode_image(image_of(rec["image_key"]))[0][0], max_length=max_length,
                               pad_id=pad_id)
