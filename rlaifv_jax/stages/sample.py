"""Stage 1, deconfounded sampling: n responses per (image, instruction) from the policy, same
decoding settings, one PRNG stream per (prompt, sample). Empty responses are kept and counted."""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

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


def run(stage_dir: str, prompts: list[dict[str, Any]], policy: bundle.ModelSpec, settings: SampleSettings, *,
        seed: int, mesh, progress: bool) -> list[dict[str, Any]]:
    """``{"key": prompt id, "question", "responses": [n texts], "num_tokens"}`` per prompt."""

    @contextlib.contextmanager
    def open_fn():
        with bundle.loaded(policy, mesh) as b:
            def fn(chunk):
                outs = generate(b.model, [b.prompt(p) for p in chunk], num_samples=settings.num_samples,
                                max_new_tokens=settings.max_new_tokens, temperature=settings.temperature,
                                top_k=settings.top_k, top_p=settings.top_p,
                                repetition_penalty=settings.repetition_penalty, stop_token_ids=b.stop_ids(),
                                seed=seed, batch_size=settings.batch_size, mesh=mesh,
                                decode_rows=settings.decode_rows, progress=False)
                result = []
                for p, out in zip(chunk, outs):
                    texts = [b.tokenizer.decode(t, skip_special_tokens=True).strip() for t in out["tokens"]]
                    result.append({"question": p["question"], "responses": texts,
                                   "num_tokens": [len(t) for t in out["tokens"]],
                                   "warnings": ["empty_response"] * sum(not t for t in texts)})
                return result
            yield fn

    return runner.run(stage_dir, prompts, open_fn, chunk_size=settings.batch_size, desc="samples",
                      progress=progress, key_fn=lambda p: p["id"])
