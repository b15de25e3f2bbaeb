"""Stage 6: reference log-probs of every encoded pair under the frozen reference policy (the
iteration's starting policy online, the initial policy offline), chunked and resumable."""
from __future__ import annotations

import contextlib
from typing import Any, Callable

import numpy as np

from rlaifv_jax.core import records
from rlaifv_jax.engine.logps import reference_logps
from rlaifv_jax.stages import bundle, runner


def run(stage_dir: str, encoded: list[dict[str, Any]], image_of: Callable[[str], np.ndarray],
        reference: bundle.ModelSettings, *, batch_size: int, max_length: int, mesh, progress: bool
        ) -> list[dict[str, Any]]:
    """``{"key", "ref_chosen_logps", "ref_rejected_logps"}`` per encoded pair, in one compiled
    forward (every chunk padded to ``batch_size``; the next chunk's arrays built on a helper thread
    meanwhile)."""

    @contextlib.contextmanager
    def open_fn():
        with bundle.loaded(reference, mesh) as b:
            make = bundle.pair_example_fn(image_of, b, max_length)

            def prepare(chunk):  # host work (images, arrays), on the helper thread
                return [make(r) for r in chunk]

            def run_chunk(batch):
                ref = reference_logps(b.model, [{k: np.stack([e[k] for e in batch]) for k in batch[0]}],
                                      mesh=mesh, batch_size=batch_size)
                return [{"ref_chosen_logps": float(c), "ref_rejected_logps": float(r)}
                        for c, r in zip(ref["ref_chosen_logps"], ref["ref_rejected_logps"])]
            yield records.Prefetched(prepare, run_chunk)

    return runner.run(stage_dir, encoded, open_fn, chunk_size=batch_size, desc="ref_logps", progress=progress)
