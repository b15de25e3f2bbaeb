"""Figures of ahead-of-time compiled programs: per-device bytes of sharded abstract arguments, peak
HBM, FLOPs and the compiler's time estimate, and XLA:TPU's out-of-HBM verdict.

Measured with jax 0.10.2 / libtpu (see STACK.md): ``memory_analysis()`` and ``cost_analysis()``
describe ONE device's SPMD program, and the cost analysis counts the body of a loop (``while``,
``scan``, ``fori_loop``, whatever its trip count) once.
"""
from __future__ import annotations

import math
import re
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


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


_OOM = re.compile(r"Used ([\d.]+)([KMGT]) of ([\d.]+)([KMGT]) hbm")
_UNIT = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def hbm_overflow(message: str) -> tuple[int, int] | None:
    """``(needed, available)`` bytes from XLA:TPU's "Ran out of memory in memory space hbm. Used X of
    Y hbm" compile error, else None."""
    m = _OOM.search(message)
    if not m:
        return None
    return int(float(m.group(1)) * _UNIT[m.group(2)]), int(float(m.group(3)) * _UNIT[m.group(4)])
