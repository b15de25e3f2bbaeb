"""Entry point: ``python -m rlaifv_jax.main --config configs/<name>.py[:arg] --workdir DIR``.

``--config.field=value`` overrides any field; unknown fields are refused by ml_collections.
The config's ``mode`` picks the job: ``online`` (the RLAIF-V loop) or ``offline_dpo``.
Multi-host: ``--distributed`` (Cloud TPU, Slurm auto-detection), or explicit
``--coordinator_address=HOST:PORT --num_processes=N --process_id=I`` (any machines, also several
processes on one machine); every process runs the same command.
"""
from __future__ import annotations

import logging

from absl import app, flags
from ml_collections import config_flags

from rlaifv_jax.core import distributed

_CONFIG = config_flags.DEFINE_config_file("config", None, "Python config file (get_config).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for every output; rerun with the same one to resume.")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "jax.distributed with cluster auto-detection "
                                 "(Cloud TPU slice, Slurm).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0 (explicit multi-host).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (explicit multi-host).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (explicit multi-host).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.getLogger().setLevel(logging.INFO)
    distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value, auto=_DISTRIBUTED.value)
    config = _CONFIG.value
    if config.mode == "online":
        from rlaifv_jax.pipelines import online
        online.run(config, _WORKDIR.value)
    elif config.mode == "offline_dpo":
        from rlaifv_jax.pipelines import offline
        offline.run(config, _WORKDIR.value)
    else:
        raise app.UsageError(f"config.mode={config.mode!r}: expected 'online' or 'offline_dpo'")


if __name__ == "__main__":
    app.run(main)
