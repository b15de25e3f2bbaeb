"""Stage 3, conquer: the labeler MLLM answers every claim's yes/no question about the image; all of a
prompt's questions are scored against one cached image prefix (``engine.score``); the next chunk's
images are preprocessed on a helper thread meanwhile (``records.Prefetched``)."""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable

import numpy as np

from rlaifv_jax.core import records
from rlaifv_jax.data.yesno import AUTO, assistant_prompt, resolve_answer_ids
from rlaifv_jax.engine.score import Labeler
from rlaifv_jax.engine.vision import layout_key
from rlaifv_jax.feedback.claims import ClaimResult
from rlaifv_jax.stages import bundle, runner


@dataclasses.dataclass(frozen=True)
class LabelSettings:
    repetition_penalty: float | None = None  # on the yes/no logits, as the official code (None = off)
    batch_size: int = 64  # questions per scoring batch against one cached prefix
    chunk_size: int = 32  # prompts per record shard
    answer_prefix: str = AUTO  # text before the labeler's yes/no word ("auto": data.yesno.resolve_answer_ids)


def check_answer_tokens(labeler: bundle.ModelSettings, settings: LabelSettings) -> dict[str, int]:
    """The labeler's yes/no token ids from its own tokenizer and template (before any stage runs: a
    labeler whose answers cannot be read is refused at start with one line)."""
    tok = bundle.tokenizer(labeler.path)
    prompt, template_prefix = assistant_prompt(tok, labeler.template)
    ids, _ = resolve_answer_ids(tok, prompt, template_prefix=template_prefix, answer_prefix=settings.answer_prefix)
    return ids


def run(stage_dir: str, claims: list[dict[str, Any]], image_of: Callable[[str], np.ndarray],
        labeler: bundle.ModelSettings, settings: LabelSettings, *, mesh, progress: bool) -> list[dict[str, Any]]:
    """``{"key", "labels": [[[p_yes, p_no] per question] per response]}`` per prompt.

    ``image_of(key)`` is the RGB image of the prompt whose claims record has that key."""

    @contextlib.contextmanager
    def open_fn():
        with bundle.loaded(labeler, mesh) as b:
            scorer = Labeler(b.model, b.tokenizer, template=b.template, word_prefix=settings.answer_prefix,
                             repetition_penalty=settings.repetition_penalty, batch_size=settings.batch_size)

            def prepare(chunk):  # host work (image preprocessing), on the helper thread
                items, spans = [], []
                for rec in chunk:
                    results = [ClaimResult.from_dict(c) for c in rec["claims"]]
                    pixel_values, image_sizes = b.encode_image(image_of(rec["key"]))
                    items.append({"questions": [q for c in results for q in c.questions],
                                  "pixel_values": pixel_values, layout_key(b.model): image_sizes})
                    spans.append([len(c.questions) for c in results])
                return items, spans

            def run_chunk(prepared):
                items, spans = prepared
                out = []
                for per_prompt, counts in zip(scorer.score(items), spans):
                    labels, start = [], 0
                    for n in counts:
                        labels.append([[float(py), float(pn)] for py, pn in per_prompt[start:start + n]])
                        start += n
                    out.append({"labels": labels})
                return out
            yield records.Prefetched(prepare, run_chunk)

    return runner.run(stage_dir, claims, open_fn, chunk_size=settings.chunk_size, desc="labels", progress=progress)
