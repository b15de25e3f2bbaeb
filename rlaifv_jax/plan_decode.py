"""Decode time of a sampling / claims stage integrated over the filled KV cache, under a stated
response-length assumption (pure functions; ``rlaifv_jax.plan`` feeds them compiled figures).

A decode step is bound by HBM traffic: it reads the resident weights, the prefix caches of the
prompts its rows hold and the *filled* part of the rows' own-token caches (``layers.decode_attention``
walks them in blocks up to the longest filled row), so its cost grows with the step index. XLA's
cost analysis counts that block loop once, so the planner takes the step's FLOPs from the compiled
program and its bytes from the cache layout (``generate.decode_cache_bytes``), and sums the roofline
``max(bytes / HBM bandwidth, FLOPs / peak)`` over the steps a batch runs:

* static decoder (``decode_rows`` off): a batch of ``B × n`` rows runs until its longest row ends
  (``lengths.longest`` steps); rows that stopped still take their slot;
* continuous decoder (``decode_rows = D``): the batch's ``B × n`` rows pass through ``D`` slots, one
  step per token plus one for a fresh slot's first token, then the last rows' tail
  (``longest - mean`` steps); every step is charged at the longest fill (a conservative bound: the
  block walk reads up to the deepest slot). With the ragged kernel (``StepCost.ragged``: the Pallas
  own-cache kernel on TPU, ``models.ragged_kernel``) each slot reads its own filled blocks only, so
  the steps while slots are refilled are charged at the mean response length (a slot's row is
  somewhere between 0 and its length deep: the mean fill is about half the mean length for equal
  lengths and the mean length for exponentially spread ones, so the mean length is the cautious
  end) and the tail, whose rows are the longest ones, still at the longest fill.
"""
from __future__ import annotations

import dataclasses
import math

from rlaifv_jax.core.hardware import Chip


@dataclasses.dataclass(frozen=True)
class Lengths:
    """Generated tokens per response: the assumption the decode time rests on (printed with it)."""

    mean: float  # average response length
    longest: int  # the longest response of a batch (at most max_new_tokens)


@dataclasses.dataclass(frozen=True)
class StepCost:
    """One decode step's traffic and arithmetic per chip, independent of the filled length except
    through ``own_bytes``."""

    weight_bytes: float  # resident weights read every step
    prefix_bytes: float  # prefix caches read every step
    own_bytes: float  # the rows' own-token caches at all ``own_slots`` slots
    own_slots: int
    block: int  # own-cache slots one block of the attention walk reads
    flops: float  # the compiled step's FLOPs (one block of the walk)
    attention_flops_per_slot: float  # FLOPs one more own-cache slot adds (QK and PV of every row)
    ragged: bool = False  # each row reads its own filled blocks (the Pallas kernel), not the deepest row's


def filled_slots(cost: StepCost, filled: int) -> int:
    """Own-cache slots a step reads when its deepest row holds ``filled`` tokens (whole blocks)."""
    return min(cost.own_slots, max(cost.block, -(-filled // cost.block) * cost.block))


def step_seconds(cost: StepCost, chip: Chip, filled: int) -> float:
    """Roofline seconds of one decode step whose deepest row holds ``filled`` generated tokens."""
    slots = filled_slots(cost, filled)
    traffic = cost.weight_bytes + cost.prefix_bytes + cost.own_bytes * slots / cost.own_slots
    flops = cost.flops + cost.attention_flops_per_slot * max(slots - cost.block, 0)
    return max(traffic / chip.hbm_bytes_per_s, flops / chip.peak_bf16_flops)


@dataclasses.dataclass(frozen=True)
class DecodeTime:
    seconds: float  # per online iteration
    steps: float  # decode steps per online iteration
    tokens: float  # generated tokens per online iteration


def decode_time(cost: StepCost, chip: Chip, lengths: Lengths, *, prompts: int, num_samples: int, batch: int,
                slots: int) -> DecodeTime:
    """Decode seconds, steps and generated tokens of ``prompts`` prompts × ``num_samples`` responses in
    batches of ``batch`` prompts, through ``slots`` continuous slots (0: the static decoder)."""
    batches = math.ceil(prompts / batch)
    rows = batch * num_samples
    longest = max(1, min(lengths.longest, cost.own_slots + 1))
    mean = min(lengths.mean, longest)
    if slots and slots < rows:
        refill, tail = math.ceil(rows * (mean + 1) / slots), longest - mean
        steps = refill + tail
        fill = math.ceil(mean) if cost.ragged else longest
        per_batch = refill * step_seconds(cost, chip, fill) + tail * step_seconds(cost, chip, longest)
    else:
        steps = longest
        per_batch = sum(step_seconds(cost, chip, t) for t in range(1, longest + 1))
    return DecodeTime(seconds=batches * per_batch, steps=batches * steps, tokens=prompts * num_samples * mean)


def tokens_per_second_per_chip(t: DecodeTime, chips: int) -> float:
    """Generated tokens per second per chip over a whole stage."""
    return t.tokens / t.seconds / chips if t.seconds else 0.0
