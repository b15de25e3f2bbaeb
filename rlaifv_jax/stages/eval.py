"""Exact evaluation on held-out toy images: CHAIR and recall of greedy captions, yes/no accuracy."""
from __future__ import annotations

from typing import Any, Callable

from rlaifv_jax.engine import generate
from rlaifv_jax.data import toy_world
from rlaifv_jax.eval import chair
from rlaifv_jax.data.chat import labeler_question
from rlaifv_jax.engine.score import Labeler
from rlaifv_jax.feedback.verdicts import accept_claim


def evaluate(policy, tokenizer, labeler: Labeler, records: list[dict[str, Any]], encode: Callable[[dict], dict], *,
             world: toy_world.WorldConfig, max_new_tokens: int, batch_size: int,
             stop_token_ids: list[int]) -> dict[str, Any]:
    """CHAIR (response, mention), recall and yes/no accuracy of ``policy`` on ``records``; ``labeler``
    is a ``Labeler`` over ``policy`` (kept across calls so it compiles once)."""
    captions = []
    for lo in range(0, len(records), batch_size):
        chunk = records[lo:lo + batch_size]
        outs = generate.generate(policy, [encode(r) for r in chunk], num_samples=1,
                                 max_new_tokens=max_new_tokens, temperature=0.0,
                                 stop_token_ids=stop_token_ids, batch_size=batch_size, progress=False)
        captions += [tokenizer.decode(o["tokens"][0], skip_special_tokens=True).strip() for o in outs]
    metrics = chair.chair_metrics([chair.toy_mentions(c, world) for c in captions],
                                  [{tuple(o) for o in r["objects"]} for r in records])
    suffix = labeler_question("")  # the labeler appends it itself
    items = [{"questions": [q.removesuffix(suffix) for q, _ in r["yesno"]], **_image(encode(r))} for r in records]
    scores = labeler.score(items)
    said = [accept_claim(py, pn) for per in scores for py, pn in per]
    yesno = chair.yesno_metrics(said, [a for r in records for _, a in r["yesno"]])
    metrics.update({"yesno_accuracy": yesno["accuracy"], "yesno_f1": yesno["f1"]})
    metrics["examples"] = captions[:3]
    return metrics


def _image(enc: dict[str, Any]) -> dict[str, Any]:
    return {"pixel_values": enc.get("pixel_values"), "image_sizes": enc.get("image_sizes")}
