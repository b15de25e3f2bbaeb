"""Figures of ahead-of-time compiled programs: per-device bytes of sharded abstract arguments, peak
HBM, FLOPs and the compiler's time estimate, XLA:TPU's out-of-HBM verdict, and :class:`Stage`, one
program's row in ``rlaifv_jax.plan``.

Measured with jax 0.10.2 / libtpu (see STACK.md): ``memory_analysis()`` and ``cost_analysis()``
describe ONE device's SPMD program, and the cost analysis counts the body of a loop (``while``,
``scan``, ``fori_loop``, whatever its trip count) once.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import re
import time
from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from rlaifv_jax.core.hardware import Slice
from rlaifv_jax.core.sharding import Rules, state_shardings

log = logging.getLogger(__name__)


def per_chip_bytes(tree: Any) -> int:
    """Bytes one device holds of the sharded ``jax.ShapeDtypeStruct`` leaves of ``tree`` (others: 0)."""
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
               for x in jax.tree.leaves(tree) if isinstance(x, jax.ShapeDtypeStruct))


def replicated(mesh: Mesh, shape: tuple[int, ...], dtype) -> jax.ShapeDtypeStruct:
    """An abstract array replicated over ``mesh``."""
    return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, P()))


def peak_bytes(compiled: Any) -> int:
    """Peak memory of a compiled program per device: arguments + outputs − donated aliases + temporaries."""
    m = compiled.memory_analysis()
    return m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes


def costs(compiled: Any) -> tuple[float, float | None, float | None]:
    """``(flops, bytes accessed, optimal seconds)`` per device; seconds is None where the backend
    has no estimate (CPU)."""
    cost = compiled.cost_analysis()
    cost = (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}
    seconds = cost.get("optimal_seconds")
    return float(cost.get("flops", 0.0)), cost.get("bytes accessed"), (seconds if seconds and seconds > 0 else None)


_UNIT = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_NUM = r"\(?([\d.]+)([KMGT])i?B?\)?"
# XLA:TPU's out-of-HBM compile errors (libtpu 0.0.42): the program's need, or its temporaries' alone.
_USED = re.compile(rf"Used {_NUM} of {_NUM} hbm")
_TEMPS = re.compile(rf"required for HLO temporaries {_NUM} exceeds available HBM {_NUM}")


def hbm_overflow(message: str, argument_bytes: int = 0) -> tuple[int | None, int | None] | None:
    """``(needed, available)`` bytes from an XLA:TPU out-of-HBM compile error ("... Used X of Y hbm",
    or "... required for HLO temporaries (X) exceeds available HBM (Y)", where the need is X plus the
    ``argument_bytes``), ``(None, None)`` for another RESOURCE_EXHAUSTED error, else None."""
    def size(value, unit):
        return int(float(value) * _UNIT[unit])

    if m := _USED.search(message):
        return size(*m.group(1, 2)), size(*m.group(3, 4))
    if m := _TEMPS.search(message):
        return size(*m.group(1, 2)) + argument_bytes, size(*m.group(3, 4))
    return (None, None) if "RESOURCE_EXHAUSTED" in message else None


def sharded(state: Any, mesh: Mesh, rules: Rules) -> Any:
    """An (abstract or concrete) NNX state as ``jax.ShapeDtypeStruct``s carrying their shardings under ``rules``."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state,
                        state_shardings(state, mesh, rules))


@dataclasses.dataclass
class Stage:
    """One compiled program's figures, per chip."""

    name: str
    kind: str  # "serve" | "train": which knobs help
    bytes_per_chip: int | None = None
    resident_bytes: int = 0  # weights (+ optimizer state) among the arguments
    flops_per_chip: float | None = None
    seconds: float | None = None  # compiler's estimate for one call (one decode step for decode)
    bytes_accessed: float | None = None
    tokens_per_step: int = 0
    calls: float = 0  # per online iteration (decode: steps)
    fits: bool = True
    variant: bool = False  # an alternative setting shown for comparison, not part of the run
    note: str = ""
    error: str = ""  # XLA's message when the program does not compile
    mfu: float | None = None
    hbm_roofline: float | None = None
    total_seconds: float | None = None  # per iteration when not seconds × calls (decode: summed over its steps)
    upper_seconds: float | None = None  # decode: every response max_new_tokens long
    tokens_per_s_chip: float | None = None  # decode: generated tokens per second per chip over the stage

    def public(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def measure(stage: Stage, compiled, topo: Slice, *, loop_trips: int = 1) -> Stage:
    """Fill ``stage`` from a compiled program. ``loop_trips``: XLA's cost analysis counts a loop body
    once, so a program whose work is a ``loop_trips``-times loop (grad accumulation) is scaled."""
    flops, stage.bytes_accessed, secs = costs(compiled)
    stage.bytes_per_chip = peak_bytes(compiled)
    stage.flops_per_chip = flops * loop_trips
    chip = topo.chip
    if secs is None and chip is not None:  # XLA gave no estimate (v5e decode loops): the roofline
        secs = max(flops / chip.peak_bf16_flops, (stage.bytes_accessed or 0.0) / chip.hbm_bytes_per_s)
        stage.note = (stage.note + "; " if stage.note else "") + "time: roofline (XLA gave no estimate)"
    stage.seconds = None if secs is None else secs * loop_trips
    if chip is not None and stage.seconds:
        stage.mfu = stage.flops_per_chip / stage.seconds / chip.peak_bf16_flops
        if stage.name.endswith("decode") and stage.bytes_accessed:
            stage.hbm_roofline = stage.bytes_accessed / chip.hbm_bytes_per_s / stage.seconds
    return stage


def run_stage(stages: list[Stage], topo: Slice, template: Stage, build: Callable[[], dict[str, Any]],
              args: Any, names: tuple[str, ...], extra: dict[str, dict] | None = None, loop_trips: int = 1) -> None:
    """Compile ``build()`` (a dict of compiled programs named like ``names``) unless its arguments
    alone exceed HBM, and append one :class:`Stage` per program (an XLA out-of-HBM error is a result)."""
    hbm = topo.hbm_bytes
    started = time.perf_counter()
    arg_bytes = per_chip_bytes(args)
    out = [dataclasses.replace(template, name=f"{template.name}/{n}" if len(names) > 1 else template.name,
                               **(extra or {}).get(n, {})) for n in names]
    if hbm is not None and arg_bytes > hbm:
        for s in out:
            s.bytes_per_chip, s.fits, s.note = arg_bytes, False, "arguments alone exceed HBM (not compiled)"
    else:
        try:
            programs = build()
        except jax.errors.JaxRuntimeError as e:  # XLA's verdict on the program is a result
            overflow = hbm_overflow(str(e), arg_bytes)
            for s in out:
                s.fits = False
                if overflow and overflow[0]:
                    s.bytes_per_chip, s.note = overflow[0], "XLA: out of HBM"
                else:  # another resource error, or a compiler failure: the program cannot run here
                    s.error = str(e).splitlines()[0][:300]
                    s.note = "XLA: " + ("out of memory" if overflow else "does not compile")
        else:
            for s, n in zip(out, names):
                measure(s, programs[n], topo, loop_trips=loop_trips)
                s.fits = hbm is None or s.bytes_per_chip <= hbm
    log.info("%s: %.0f s", template.name, time.perf_counter() - started)
    stages.extend(out)
