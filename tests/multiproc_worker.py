"""One process of a multi-process test (started by tests/multiproc.py); prints one JSON line.

Tasks:
* ``psum``: a jitted global psum over a mesh of every device of every process.
* ``hf_load``: load ``--checkpoint`` fsdp-sharded over all devices, counting the bytes this process
  reads; compare each local shard with this process's own single-device load of the same checkpoint;
  then export the sharded model to ``--export`` (every process calls, process 0 writes).
"""
from __future__ import annotations

import argparse
import json

from rlaifv_jax.core import distributed


def psum(args) -> dict:
    import jax
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P

    n = jax.device_count()
    mesh = jax.make_mesh((n,), ("x",), devices=jax.devices())
    x = jax.make_array_from_callback((n,), NamedSharding(mesh, P("x")),
                                     lambda index: np.arange(1, n + 1, dtype=np.float32)[index])
    total = jax.jit(jax.shard_map(lambda v: jax.lax.psum(v, "x"), mesh=mesh, in_specs=P("x"), out_specs=P()))(x)
    return {"process_index": jax.process_index(), "process_count": jax.process_count(),
            "device_count": n, "local_device_count": jax.local_device_count(),
            "psum": float(np.asarray(total.addressable_data(0))[0])}


def hf_load(args) -> dict:
    import jax
    import numpy as np
    from flax import nnx

    from rlaifv_jax.core import sharding
    from rlaifv_jax.models import hf

    read = [0]
    original = hf.read_slice

    def counting(tensor, index):
        out = original(tensor, index)
        read[0] += out.nbytes
        return out

    hf.read_slice = counting
    mesh = sharding.make_mesh(1, -1, 1)  # fsdp over all devices of both processes
    model = hf.load_pretrained(args.checkpoint, shardings=lambda s: sharding.state_shardings(s, mesh))
    hf.read_slice = original
    full = dict(nnx.to_flat_state(nnx.state(hf.load_pretrained(args.checkpoint))))
    mismatches, split = [], 0
    for path, var in nnx.to_flat_state(nnx.state(model)):
        arr, want = var.get_value(), np.asarray(full[path].get_value())
        split += not arr.is_fully_addressable
        for shard in arr.addressable_shards:
            if not np.array_equal(np.asarray(shard.data), want[shard.index]):
                mismatches.append("/".join(map(str, path)))
    hf.save_pretrained(model, args.export, shard_bytes=args.shard_bytes)
    return {"process_index": jax.process_index(), "read_bytes": read[0],
            "total_bytes": int(sum(v.get_value().nbytes for v in full.values())),
            "params": len(full), "split_across_processes": split, "mismatches": mismatches}


TASKS = {"psum": psum, "hf_load": hf_load}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--process_id", type=int, required=True)
    ap.add_argument("--num_processes", type=int, required=True)
    ap.add_argument("--task", choices=sorted(TASKS), required=True)
    ap.add_argument("--checkpoint")
    ap.add_argument("--export")
    ap.add_argument("--shard_bytes", type=int, default=20_000)
    args = ap.parse_args()
    distributed.initialize(coordinator_address=f"127.0.0.1:{args.port}", num_processes=args.num_processes,
                           process_id=args.process_id)
    print(json.dumps(TASKS[args.task](args)), flush=True)


if __name__ == "__main__":
    main()
