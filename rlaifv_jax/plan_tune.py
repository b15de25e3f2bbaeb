"""``plan --tune``: the decode batch of a generating stage (prompts per prefill, continuous slots)
that the planner estimates fastest among those that fit the chip (pure functions).

Peak HBM of a decode batch is modelled from the compiled program at the config's own batch:
``weights + prefix caches (prompts) + own caches (rows or slots) + the rest``, the rest (logits,
sampling and attention temporaries) scaled with the rows a step decodes (rows or slots). The planner then compiles the winner, so XLA, not
this model, has the last word on whether it fits.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

PROMPT_BATCHES = (8, 16, 32, 64, 128, 256, 512, 1024)
SLOT_COUNTS = (128, 256, 384, 512, 640, 768, 1024, 1536, 2048)
HEADROOM = 0.9  # use at most this fraction of HBM by the model's estimate (XLA's layout varies)


@dataclasses.dataclass(frozen=True)
class Candidate:
    batch: int  # prompts per prefill
    slots: int  # continuous decode slots (0: the static decoder, batch × num_samples rows)

    def rows(self, num_samples: int) -> int:
        """Rows one decode step decodes: the slots, or every (prompt, sample) row of the batch."""
        return self.slots or self.batch * num_samples


@dataclasses.dataclass(frozen=True)
class Footprint:
    """Per-chip bytes of one decode batch, from the compiled program at the config's batch."""

    weights: float
    prefix_per_prompt: float  # prefix caches held per prompt of the batch
    own_per_row: float  # own-token caches per decode row (slot)
    rest_per_row: float  # the rest of the compiled peak per row a step decodes


def footprint(peak: float, weights: float, prefix_all: float, own: float, *, batch: int,
              decode_rows: int) -> Footprint:
    """Split a compiled decode program's ``peak`` (``batch`` prompts, ``decode_rows`` rows or slots a
    step decodes) into the parts that scale differently."""
    rest = max(peak - weights - prefix_all - own, 0.0)
    return Footprint(weights=weights, prefix_per_prompt=prefix_all / batch, own_per_row=own / decode_rows,
                     rest_per_row=rest / decode_rows)


def peak_bytes(f: Footprint, c: Candidate, num_samples: int) -> float:
    """Estimated peak per chip of candidate ``c``."""
    return f.weights + f.prefix_per_prompt * c.batch + (f.own_per_row + f.rest_per_row) * c.rows(num_samples)


def claims_shard(messages: int, num_samples: int) -> int:
    """Prompts per claims shard (``claims.batch_size``) whose ``num_samples`` responses each fill whole
    claims-LLM calls of ``messages`` (``claims.llm_batch_size``): the fewest such prompts."""
    return messages // math.gcd(messages, num_samples)


def candidates(num_samples: int, prompts: int) -> list[Candidate]:
    """Prompt batches up to the stage's prompts, each with the static decoder and with fewer slots than rows."""
    batches = [b for b in PROMPT_BATCHES if b <= max(prompts, PROMPT_BATCHES[0])]
    return [Candidate(b, s) for b in batches for s in (0,) + SLOT_COUNTS if s < b * num_samples]


def ranked(cands: list[Candidate], seconds: Callable[[Candidate], float], fits: Callable[[Candidate], bool]
           ) -> list[Candidate]:
    """The fitting candidates, fastest first (ties: the smaller batch, then fewer slots)."""
    return sorted((c for c in cands if fits(c)), key=lambda c: (seconds(c), c.batch, c.slots))
