"""TPU generations and slice names: per-chip HBM, peak bf16 FLOP/s and HBM bandwidth, and Cloud TPU
accelerator types (``v5p-8``, ``v5litepod-16``, ...) mapped onto XLA topology descriptions, so a
program can be compiled ahead of time for a slice this machine does not have.

Per-chip figures (Cloud TPU system-architecture pages, "key chip specifications"):

* v4:  https://cloud.google.com/tpu/docs/v4  — 275 TFLOP/s bf16, 32 GiB HBM2, 1200 GB/s
* v5e: https://cloud.google.com/tpu/docs/v5e — 197 TFLOP/s bf16, 16 GB HBM2, 819 GB/s
* v5p: https://cloud.google.com/tpu/docs/v5p — 459 TFLOP/s bf16, 95 GB HBM2e, 2765 GB/s
* v6e: https://cloud.google.com/tpu/docs/v6e — 918 TFLOP/s bf16, 32 GB HBM, 1640 GB/s

HBM capacities are taken as GiB (the chips carry 16/32/96 GiB; the runtime keeps a little back).
Accelerator types count TensorCores for v4/v5p (two per chip, one "megacore" device) and chips for
v5e/v6e; slice shapes follow Cloud TPU's (and MaxText's ``accelerator_to_spec_map``) conventions.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import re
from typing import Any

GIB = 1 << 30


@dataclasses.dataclass(frozen=True)
class Chip:
    """One TPU generation: what a chip holds and how fast it computes and reads memory."""

    generation: str  # "v5p"
    xla_name: str  # prefix of the XLA topology name ("v5" for v5p)
    hbm_bytes: int
    peak_bf16_flops: float  # FLOP/s
    hbm_bytes_per_s: float
    cores_in_name: int  # accelerator types count TensorCores (2) or chips (1)
    dims: int  # 3-D torus (v4, v5p) or 2-D (v5e, v6e)


CHIPS: dict[str, Chip] = {
    "v4": Chip("v4", "v4", 32 * GIB, 275e12, 1200e9, 2, 3),
    "v5p": Chip("v5p", "v5", 95 * GIB, 459e12, 2765e9, 2, 3),
    "v5litepod": Chip("v5e", "v5e", 16 * GIB, 197e12, 819e9, 1, 2),
    "v6e": Chip("v6e", "v6e", 32 * GIB, 918e12, 1640e9, 1, 2),
}

INSTALL_HINT = ("ahead-of-time TPU compilation needs libtpu: pip install -e '.[tpu]' "
                "(or pip install \"jax[tpu]==<your jax version>\")")


class MissingLibtpu(RuntimeError):
    """A named TPU topology was asked for without libtpu installed."""


@dataclasses.dataclass(frozen=True)
class Slice:
    """A TPU slice (or ``local``: this machine's devices) to plan for."""

    name: str
    chips: int
    chip: Chip | None  # None for ``local``
    shape: tuple[int, ...] = ()

    @property
    def xla_topology(self) -> str:
        return f"{self.chip.xla_name}:{'x'.join(map(str, self.shape))}" if self.chip else "local"

    @property
    def hbm_bytes(self) -> int | None:
        return self.chip.hbm_bytes if self.chip else _local_memory()

    def topology_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``jax.experimental.topologies.get_topology_desc`` for this slice."""
        # Wrap-around links: every axis of a 3-D slice from a full 4x4x4 cube up; a 2-D axis of 16.
        wrap = tuple(self.chips >= 64 if self.chip.dims == 3 else s >= 16 for s in self.shape)
        wrap += (False,) * (3 - len(wrap))
        return dict(topology_name=self.xla_topology, platform="tpu",
                    chip_config_name="megacore" if self.chip.cores_in_name == 2 else "default",
                    chips_per_host_bounds=(1, 1, 1) if self.chips == 1 else (2, 2, 1), num_slices=1, wrap=wrap)


def _grid(chips: int, dims: int) -> tuple[int, ...]:
    """Slice shape for a power-of-two chip count (Cloud TPU's: 2x2x1, 2x2x2, 2x2x4, 2x4x4, ...; 2x2, 2x4, 4x4, 4x8, ...)."""
    if dims == 2:
        shape = [1, 1]
        while math.prod(shape) < chips:
            shape[shape.index(min(shape))] *= 2
        return tuple(sorted(shape))
    shape = [2, 2, 1]
    while math.prod(shape) < chips:
        shape[shape.index(min(shape))] *= 2
    return tuple(sorted(shape)) if chips > 4 else (2, 2, 1)


def parse_topology(name: str) -> Slice:
    """``v4-8`` / ``v5p-16`` / ``v5litepod-8`` / ``v6e-8`` / ``local`` → a :class:`Slice`."""
    if name == "local":
        import jax
        return Slice("local", len(jax.devices()), None)
    m = re.fullmatch(r"(v4|v5p|v5litepod|v6e)-(\d+)", name)
    if not m:
        raise ValueError(f"topology {name!r}: expected local or <type>-<size> with type one of "
                         f"{sorted(CHIPS)} (e.g. v5p-8, v5litepod-16, v6e-8, v4-32)")
    chip, size = CHIPS[m.group(1)], int(m.group(2))
    chips = size // chip.cores_in_name
    smallest = 4 if chip.dims == 3 else 1
    if size % chip.cores_in_name or chips < smallest or chips & (chips - 1):
        raise ValueError(f"topology {name!r}: {m.group(1)} slices here are {m.group(1)}-N with N/"
                         f"{chip.cores_in_name} a power of two >= {smallest} chips")
    return Slice(name, chips, chip, _grid(chips, chip.dims))


# ``jax.Device.device_kind`` of each generation's chips (lower case) → its ``CHIPS`` key.
DEVICE_KINDS = {"tpu v4": "v4", "tpu v5": "v5p", "tpu v5p": "v5p", "tpu v5 lite": "v5litepod",
                "tpu v5e": "v5litepod", "tpu v6 lite": "v6e", "tpu v6e": "v6e"}


def chip_of(device_kind: str) -> Chip | None:
    """The TPU generation of a ``device_kind`` ("TPU v5 lite"), None for other devices."""
    key = DEVICE_KINDS.get(device_kind.lower())
    return CHIPS[key] if key else None


def slice_name(device_kind: str, chips: int) -> str | None:
    """The Cloud TPU accelerator type of ``chips`` devices of ``device_kind`` ("TPU v5", 4 → "v5p-8"),
    None when they are not TPUs of a known generation."""
    key = DEVICE_KINDS.get(device_kind.lower())
    return f"{key}-{chips * CHIPS[key].cores_in_name}" if key else None


def slice_mismatch(tuned_for: str, device_kind: str, chips: int) -> str | None:
    """A one-line warning when a config's decode batches were tuned for slice ``tuned_for`` and the run
    is on another TPU slice (None when they agree, the config names none, or this is no TPU)."""
    here = slice_name(device_kind, chips)
    if not tuned_for or here is None or here == tuned_for:
        return None
    return (f"the config's decode batches and mesh are tuned for {tuned_for}, this is {here}: they may not fit "
            f"or may be slow here; pass --config <file>.py:{here} if configs/slices.py lists it, else plan "
            f"the batches with python -m rlaifv_jax.plan --topology {here} --tune")


def _local_memory() -> int | None:
    import jax
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("bytes_limit")


def devices(topology: Slice) -> list:
    """The devices to build a mesh from: this machine's, or compile-only TPU device descriptions."""
    import jax
    if topology.chip is None:
        return list(jax.devices())
    if importlib.util.find_spec("libtpu") is None:
        raise MissingLibtpu(f"topology {topology.name}: {INSTALL_HINT}")
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # no metadata server on a machine without TPUs
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # compile-only: no claim on /tmp/libtpu_lockfile
    from jax.experimental import topologies
    return list(topologies.get_topology_desc(**topology.topology_kwargs()).devices)
