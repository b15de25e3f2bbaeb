"""Stage 1, deconfounded sampling: n responses per (image, instruction) from the policy, same
decoding settings, one PRNG stream per (prompt, sample). Empty responses are kept and counted; a
prompt whose question text still maps to the image token (``chat.PlaceholderMismatch``) gets no
responses and the warning ``image_token_in_text``. Tokenizing and image preprocessing of the next
chunk run on a helper thread while the current chunk decodes (``records.Prefetched``)."""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

from rlaifv_jax.core import records
from rlaifv_jax.data.chat import PlaceholderMismatch
from rlaifv_jax.engine.generate import generate
from rlaifv_jax.stages import bundle, runner


@dataclasses.dataclass(frozen=True)
class SampleSettings:
    """Decoding settings shared by all of a prompt's samples."""

    num_samples: int
    max_new_tokens: int
    temperature: float
    top_k: int | None
    top_p: float | None
    repetition_penalty: float | None
    batch_size: int  # prompts per sampler call (and per record shard)
    decode_rows: int | None = None  # continuous batching through this many decode slots (None: off)


def run(stage_dir: str, prompts: list[dict[str, Any]], policy: bundle.ModelSettings, settings: SampleSettings, *,
        seed: int, mesh, progress: bool, fingerprints: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """``{"key": prompt id, "question", "responses": [n texts], "num_tokens", "fingerprint"}`` per
    prompt (``fingerprints``: prompt id → ``provenance.prompt_fingerprint``)."""
    fingerprints = fingerprints or {}

    @contextlib.contextmanager
    def open_fn():
        with bundle.loaded(policy, mesh) as b:
            stop_ids = b.stop_ids()

            def prepare(chunk):  # host work, on the helper thread while the previous chunk decodes
                inputs, skipped = [], {}
                for i, p in enumerate(chunk):
                    try:
                        inputs.append(b.prompt(p))  # the tokenizer under b.tokenizer_lock
                    except PlaceholderMismatch:  # the question's text maps to the image token: a named skip
                        skipped[i] = {"question": p["question"], "responses": [], "num_tokens": [],
                                      "fingerprint": fingerprints.get(str(p["id"])),
                                      "warnings": ["image_token_in_text"]}
                return chunk, inputs, skipped

            def run_chunk(prepared):
                chunk, inputs, skipped = prepared
                outs = iter(generate(b.model, inputs, num_samples=settings.num_samples,
                                     max_new_tokens=settings.max_new_tokens, temperature=settings.temperature,
                                     top_k=settings.top_k, top_p=settings.top_p,
                                     repetition_penalty=settings.repetition_penalty, stop_token_ids=stop_ids,
                                     seed=seed, batch_size=settings.batch_size, mesh=mesh,
                                     decode_rows=settings.decode_rows, progress=False))
                result = []
                with b.tokenizer_lock:
                    for i, p in enumerate(chunk):
                        if i in skipped:
                            result.append(skipped[i])
                            continue
                        out = next(outs)
                        texts = [b.tokenizer.decode(t, skip_special_tokens=True).strip() for t in out["tokens"]]
                        result.append({"question": p["question"], "responses": texts,
                                       "fingerprint": fingerprints.get(str(p["id"])),
                                       "num_tokens": [len(t) for t in out["tokens"]],
                                       "warnings": ["empty_response"] * sum(not t for t in texts)})
                return result
            yield records.Prefetched(prepare, run_chunk)

    return runner.run(stage_dir, prompts, open_fn, chunk_size=settings.batch_size, desc="samples",
                      progress=progress, key_fn=lambda p: p["id"])
