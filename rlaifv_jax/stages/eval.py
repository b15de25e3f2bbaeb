"""Stage 8: exact evaluation on held-out toy images: CHAIR and recall of greedy captions, and the
policy's yes/no accuracy (scored like the labeler), stored as a one-record stage."""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

from rlaifv_jax.data import toy_world
from rlaifv_jax.data.chat import labeler_question
from rlaifv_jax.engine.generate import generate
from rlaifv_jax.engine.score import Labeler
from rlaifv_jax.eval import chair
from rlaifv_jax.feedback.verdicts import accept_claim
from rlaifv_jax.stages import bundle, runner

NO_GROUND_TRUTH = {"chair_response": None, "chair_mention": None, "recall": None, "yesno_accuracy": None}


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    max_new_tokens: int = 40  # greedy captions
    batch_size: int = 64


def evaluate(b: bundle.Bundle, records: list[dict[str, Any]], world: toy_world.WorldConfig,
             settings: EvalSettings, mesh=None) -> dict[str, Any]:
    """CHAIR (response, mention), recall and yes/no accuracy of the bundle's model on ``records``."""
    captions = []
    for lo in range(0, len(records), settings.batch_size):
        outs = generate(b.model, [b.prompt(r) for r in records[lo:lo + settings.batch_size]], num_samples=1,
                        max_new_tokens=settings.max_new_tokens, temperature=0.0, stop_token_ids=b.stop_ids(),
                        batch_size=settings.batch_size, mesh=mesh, progress=False)
        captions += [b.tokenizer.decode(o["tokens"][0], skip_special_tokens=True).strip() for o in outs]
    metrics = chair.chair_metrics([chair.toy_mentions(c, world) for c in captions],
                                  [{tuple(o) for o in r["objects"]} for r in records])
    suffix = labeler_question("")  # the labeler appends it itself
    labeler = Labeler(b.model, b.tokenizer, template=b.template, batch_size=settings.batch_size)
    items = []
    for r in records:
        prompt = b.prompt(r)
        items.append({"questions": [q.removesuffix(suffix) for q, _ in r["yesno"]],
                      "pixel_values": prompt["pixel_values"], "image_sizes": prompt["image_sizes"]})
    said = [accept_claim(py, pn) for per in labeler.score(items) for py, pn in per]
    yesno = chair.yesno_metrics(said, [a for r in records for _, a in r["yesno"]])
    metrics.update({"yesno_accuracy": yesno["accuracy"], "yesno_f1": yesno["f1"]})
    metrics["examples"] = captions[:3]
    return metrics


def run(stage_dir: str, policy: bundle.ModelSpec, records: list[dict[str, Any]],
        world: toy_world.WorldConfig | None, settings: EvalSettings, *, mesh) -> dict[str, Any]:
    """The evaluation of ``policy`` (one record, computed once and reused on rerun); without a
    ground-truth world the metrics are None."""

    @contextlib.contextmanager
    def open_fn():
        if world is None:
            yield lambda chunk: [dict(NO_GROUND_TRUTH)]
            return
        with bundle.loaded(policy, mesh) as b:
            yield lambda chunk: [evaluate(b, records, world, settings, mesh)]

    out = runner.run(stage_dir, [{"key": "eval"}], open_fn, chunk_size=1, desc="eval", progress=False)
    return {k: v for k, v in out[0].items() if k != "key"}
