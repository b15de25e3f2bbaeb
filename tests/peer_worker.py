"""One process of the lost-peer test (test_faults.py): ``python peer_worker.py PORT ID``. Both join,
meet at a barrier, then process 1 SIGKILLs itself while process 0 waits in the next barrier."""
import os
import signal
import sys
import time

from rlaifv_jax.core import distributed

port, pid = int(sys.argv[1]), int(sys.argv[2])
distributed.initialize(f"127.0.0.1:{port}", 2, pid, peer_timeout_s=5)
distributed.barrier("both joined")
print(f"joined {time.time():.3f}", flush=True)
if pid == 1:
    os.kill(os.getpid(), signal.SIGKILL)
try:
    distributed.barrier("never reached by process 1")  # waits for the dead peer
except Exception as e:  # noqa: BLE001 - as main does: a lost peer is a fault, in one line
    from rlaifv_jax.core.errors import fault_message
    distributed.exit_after_fault(fault_message(e, multi_process=True) or f"{type(e).__name__}: {e}".splitlines()[0])
print("passed the barrier (wrong)", flush=True)
