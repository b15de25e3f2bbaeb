"""Device memory held by live arrays: logged at every stage boundary, so that a run shows that a
stage's models are freed before the next stage loads its own."""
from __future__ import annotations

import collections

import jax


def resident_bytes() -> dict[str, int]:
    """Bytes held by live arrays on each of this process's devices."""
    per: collections.Counter = collections.Counter({str(d): 0 for d in jax.local_devices()})
    for array in jax.live_arrays():
        if array.is_deleted():
            continue
        for shard in array.addressable_shards:
            per[str(shard.device)] += shard.data.nbytes
    return dict(per)


def describe() -> str:
    """``"1.23 GiB max / 0.98 GiB mean per device"`` of the live arrays now."""
    values = list(resident_bytes().values()) or [0]
    return f"{max(values) / 2**30:.3f} GiB max / {sum(values) / len(values) / 2**30:.3f} GiB mean per device"
