"""Stage 2, divide: split every response into atomic claims and turn each into a yes/no question,
with the paper's split/convert prompts through local chat LLMs, or the rule twin of the toy world.
The next chunk's split messages are tokenized on a helper thread while the current chunk decodes
(``records.Prefetched``)."""
from __future__ import annotations

import contextlib
import dataclasses
import zlib
from typing import Any, Iterator

from rlaifv_jax.core import records
from rlaifv_jax.data import chat, toy_world
from rlaifv_jax.engine.generate import generate
from rlaifv_jax.feedback.claims import CLAIM_LLM_DECODING as DECODING, ClaimExtractor, LLMClaimExtractor
from rlaifv_jax.feedback.toy_claims import RuleClaimExtractor
from rlaifv_jax.stages import bundle, runner


@dataclasses.dataclass(frozen=True)
class ClaimSettings:
    kind: str  # "rule" (toy language) or "llm"
    split_path: str = ""  # HF dir of the split LLM (kind="llm")
    convert_path: str = ""  # HF dir of the convert LLM ("" = the split LLM)
    dtype: str = "float32"
    batch_size: int = 16  # prompts per shard; all their responses go to the LLM in one call
    llm_batch_size: int = 64  # messages the LLM prefills together (rows of one generate batch)
    decode_rows: int | None = None  # continuous batching of those rows through this many slots (None: off)


class _ChatLLM:
    """``generate_text`` of a loaded chat LLM: user messages → completions (the chat template, the claims
    decoding). ``prepare`` tokenizes messages ahead (another thread may call it); a later call takes
    those ids instead of tokenizing again."""

    def __init__(self, b: bundle.Bundle, settings: ClaimSettings, mesh, seed: int):
        self.b, self.settings, self.mesh, self.seed = b, settings, mesh, seed
        self.stop = sorted({chat.end_of_turn_id(b.tokenizer, "chat"), int(b.tokenizer.eos_token_id)})
        self.ready: dict[str, list[int]] = {}  # message → prompt ids, from prepare

    def _encode(self, message: str) -> list[int]:
        with self.b.tokenizer_lock:
            return chat.encode_prompt(self.b.tokenizer, message, 0, template="chat").tolist()

    def prepare(self, messages: list[str]) -> None:
        """Tokenize ``messages`` now (host work a helper thread does while the device decodes)."""
        ids = {m: self._encode(m) for m in messages}
        with self.b.tokenizer_lock:
            self.ready.update(ids)

    def __call__(self, messages: list[str]) -> list[str]:
        with self.b.tokenizer_lock:
            ahead = [self.ready.pop(m, None) for m in messages]
        batch = [{"id": zlib.crc32(m.encode()), "pixel_values": None, "image_sizes": None,
                  "input_ids": ids if ids is not None else self._encode(m)} for m, ids in zip(messages, ahead)]
        s = self.settings
        outs = generate(self.b.model, batch, num_samples=1, max_new_tokens=DECODING.max_new_tokens,
                        temperature=DECODING.temperature, top_k=DECODING.top_k, top_p=DECODING.top_p,
                        stop_token_ids=self.stop, seed=self.seed, batch_size=s.llm_batch_size, mesh=self.mesh,
                        decode_rows=s.decode_rows, progress=False)
        with self.b.tokenizer_lock:
            return [self.b.tokenizer.decode(o["tokens"][0], skip_special_tokens=True) for o in outs]


def _llm(path: str, settings: ClaimSettings, mesh, seed: int, stack: contextlib.ExitStack) -> _ChatLLM:
    b = stack.enter_context(bundle.loaded(bundle.ModelSettings(path, template="chat", dtype=settings.dtype), mesh))
    return _ChatLLM(b, settings, mesh, seed)


@contextlib.contextmanager
def extractor(settings: ClaimSettings, world: toy_world.WorldSettings | None, mesh, seed: int) -> Iterator[ClaimExtractor]:
    """The configured claim extractor, its LLMs loaded for the ``with`` block only."""
    if settings.kind == "rule":
        yield RuleClaimExtractor(world or toy_world.WorldSettings())
        return
    with contextlib.ExitStack() as stack:
        split = _llm(settings.split_path, settings, mesh, seed, stack)
        convert = (_llm(settings.convert_path, settings, mesh, seed, stack)
                   if settings.convert_path else None)
        yield LLMClaimExtractor(split, convert)


def run(stage_dir: str, samples: list[dict[str, Any]], settings: ClaimSettings, *, world, mesh, seed: int,
        progress: bool) -> list[dict[str, Any]]:
    """``{"key", "claims": [ClaimResult dict per response]}`` per prompt (status per response)."""

    def items(chunk):
        return [(rec["question"], r) for rec in chunk for r in rec["responses"]]

    @contextlib.contextmanager
    def open_fn():
        with extractor(settings, world, mesh, seed) as ex:
            def prepare(chunk):  # the next chunk's split messages tokenized while this one decodes
                if hasattr(ex, "prepare"):
                    ex.prepare(items(chunk))
                return chunk

            def fn(chunk):
                outs = ex.extract(items(chunk))
                result, start = [], 0
                for rec in chunk:
                    mine = outs[start:start + len(rec["responses"])]
                    start += len(rec["responses"])
                    result.append({"claims": [c.to_dict() for c in mine],
                                   "warnings": [c.status for c in mine if c.status != "ok"]})
                return result
            yield records.Prefetched(prepare, fn)

    return runner.run(stage_dir, samples, open_fn, chunk_size=settings.batch_size, desc="claims", progress=progress)
