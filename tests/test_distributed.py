"""core.distributed: 2 processes × 4 CPU devices on 127.0.0.1 join through ``initialize`` and run a
global psum; bad flag combinations fail in one line before anything starts."""
import os

import pytest

import multiproc
from rlaifv_jax.core import distributed

WORKER = os.path.join(os.path.dirname(__file__), "multiproc_worker.py")


def test_two_processes_global_psum():
    outs = multiproc.run_workers(WORKER, ["--task", "psum"], n=2, local_devices=4)
    assert [o["process_index"] for o in outs] == [0, 1]
    for o in outs:
        assert (o["process_count"], o["device_count"], o["local_device_count"]) == (2, 8, 4)
        assert o["psum"] == sum(range(1, 9))


@pytest.mark.parametrize("kwargs,match", [
    (dict(coordinator_address="127.0.0.1:1", num_processes=2), "missing: --process_id"),
    (dict(coordinator_address="127.0.0.1:1", num_processes=2, process_id=0, auto=True), "not both"),
    (dict(coordinator_address="127.0.0.1:1", num_processes=2, process_id=2), r"outside \[0, --num_processes=2\)"),
])
def test_bad_flags_fail_in_one_line(kwargs, match):
    with pytest.raises(ValueError, match=match) as e:
        distributed.initialize(**kwargs)
    assert "\n" not in str(e.value)


def test_no_flags_stays_one_process():
    assert distributed.initialize() is False
