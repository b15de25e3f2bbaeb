"""Stage 5: tokenize each pair once (prompt with image placeholders, chosen and rejected answers).

The reference pass and every DPO epoch read these ids; pixels are produced from the pair's image
when a batch is built (``bundle.pair_example_fn``). Pairs longer than ``max_length`` are kept out and
counted (``too_long``), never truncated; so are pairs whose texts still map to image placeholder ids
(``image_token_in_text``). Pairs whose texts hold special-token strings (``<image>``, ``</s>``) are
encoded with those strings as text and counted (``special_token_text``).
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable

import numpy as np

from rlaifv_jax.data.chat import has_special_text
from rlaifv_jax.data.pairs import PreferenceRecord, SkipRecord, pair_text_fn
from rlaifv_jax.stages import bundle, runner

ID_FIELDS = ("prompt_ids", "chosen_ids", "rejected_ids")
SPECIAL_TEXT = "special_token_text"  # a kept pair whose texts hold special-token strings (encoded as text)


def run(stage_dir: str, pairs: list[dict[str, Any]], policy: bundle.ModelSettings, *, max_length: int,
        progress: bool, chunk_size: int = 256, image_of: Callable[[str], np.ndarray] | None = None
        ) -> list[dict[str, Any]]:
    """``{"key", "image_key", "prompt_ids", "chosen_ids", "rejected_ids"}`` per pair (or a
    ``too_long`` warning). ``pairs`` carry ``key``, ``image_key``, ``question``, ``chosen``, ``rejected``;
    ``image_of(image_key)`` (the RGB image) is needed when the policy's image token count depends on
    the image (Qwen2.5-VL)."""

    @contextlib.contextmanager
    def open_fn():
        model = bundle.abstract_model(policy.path)  # the architecture only: no weights are read
        tokenizer = bundle.tokenizer(policy.path)
        count = _image_token_count(model, policy, image_of)

        def fn(chunk):
            out = []
            for p in chunk:
                text_fn = pair_text_fn(tokenizer, image_token_count=count(p["image_key"]),
                                       image_token_id=model.config.image_token_id, max_length=max_length,
                                       template=policy.template)
                try:
                    ids = text_fn(PreferenceRecord(p["question"], p["chosen"], p["rejected"], b"", source=p["key"]))
                except SkipRecord as skip:
                    out.append({"image_key": p["image_key"], "warnings": [skip.reason]})
                    continue
                special = any(has_special_text(tokenizer, p[k]) for k in ("question", "chosen", "rejected"))
                out.append({"image_key": p["image_key"], **{k: np.asarray(ids[k]).tolist() for k in ID_FIELDS},
                            **({"warnings": [SPECIAL_TEXT]} if special else {})})
            return out
        yield fn

    return runner.run(stage_dir, pairs, open_fn, chunk_size=chunk_size, desc="encode", progress=progress)


def _image_token_count(model, policy: bundle.ModelSettings, image_of: Callable[[str], np.ndarray] | None
                       ) -> Callable[[str], int]:
    """``image_key -> image tokens`` of the policy: a constant, or (Qwen2.5-VL) the count of each
    image's layout from the policy's image encoder."""
    try:
        fixed = model.num_image_tokens()
        return lambda key: fixed
    except ValueError:  # the count depends on the image
        pass
    if image_of is None:
        raise ValueError(f"{policy.path}: the image token count depends on the image; encode.run needs image_of")
    encoder = bundle.image_encoder(policy)
    return lambda key: int(model.num_image_tokens(tuple(np.asarray(encoder(image_of(key))[1])[0])))
