"""Multi-process start-up: ``jax.distributed`` from explicit coordinates or from the cluster.

``initialize(coordinator_address="host:port", num_processes=N, process_id=I)`` joins N processes
anywhere (also several on one machine); ``initialize(auto=True)`` lets JAX read the cluster
(Cloud TPU slice metadata, Slurm, Open MPI). With neither, the run stays one process. Call it
before anything touches a device.
"""
from __future__ import annotations

import logging
import os

import jax


def _may_run_on_cpu() -> bool:
    platforms = jax.config.jax_platforms or os.environ.get("JAX_PLATFORMS") or ""
    return not platforms or "cpu" in platforms.split(",")


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, auto: bool = False) -> bool:
    """Join the processes of a multi-process run; returns whether ``jax.distributed`` was started.

    Explicit mode needs all three of ``coordinator_address``, ``num_processes`` and ``process_id``;
    ``auto`` uses JAX's cluster auto-detection. On the CPU platform, cross-process collectives go
    through gloo (so 2 processes × 4 fake CPU devices run the real multi-host code paths).
    """
    given = {"coordinator_address": coordinator_address, "num_processes": num_processes,
             "process_id": process_id}
    explicit = any(v is not None for v in given.values())
    if explicit and auto:
        raise ValueError("give either --distributed (auto-detection) or --coordinator_address/"
                         "--num_processes/--process_id, not both")
    if explicit:
        missing = [k for k, v in given.items() if v is None]
        if missing:
            raise ValueError(f"--coordinator_address, --num_processes and --process_id go together; "
                             f"missing: {', '.join('--' + m for m in missing)}")
        if not 0 <= process_id < num_processes:
            raise ValueError(f"--process_id={process_id} outside [0, --num_processes={num_processes})")
    elif not auto:
        return False
    if _may_run_on_cpu():
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if explicit:
        jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                                   process_id=process_id)
    else:
        jax.distributed.initialize()
    logging.info("jax.distributed: process %d of %d on %s, %d local / %d global devices",
                 jax.process_index(), jax.process_count(), jax.default_backend(),
                 jax.local_device_count(), jax.device_count())
    return True


def barrier(name: str) -> None:
    """Every process waits here until all have arrived (a no-op in a one-process run)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def writer_first(fn, name: str):
    """``fn()`` on process 0 (the one writer), a barrier, then ``fn()`` on the others, which find
    process 0's output in place (e.g. a finished warm start) and only read it."""
    out = fn() if jax.process_index() == 0 else None
    barrier(name)
    return out if jax.process_index() == 0 else fn()
