"""Run a worker script as N jax.distributed processes on 127.0.0.1 (multi-host without hosts).

``run_workers(script, args, n=2, local_devices=4)`` starts ``python script --port P --process_id I
--num_processes N *args`` N times, each with its own ``XLA_FLAGS`` device count, and returns every
process's last stdout line parsed as JSON (in process order). A worker that fails or hangs fails
the test with its stderr tail.
"""
from __future__ import annotations

import json
import socket
import subprocess
import sys

from smoke_runs import child_env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_workers(script: str, args: list[str] = (), *, n: int = 2, local_devices: int = 4,
                timeout: float = 900) -> list[dict]:
    port = free_port()
    procs = [subprocess.Popen([sys.executable, script, "--port", str(port), "--process_id", str(i),
                               "--num_processes", str(n), *args],
                              env=child_env(local_devices), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in reversed(range(n))][::-1]  # process n-1 first, process 0 (the coordinator) last
    outs = []
    try:
        for i, p in enumerate(procs):
            out, err = p.communicate(timeout=timeout)
            if p.returncode != 0:
                raise AssertionError(f"worker {i} exited with {p.returncode}:\n{err[-3000:]}")
            # The result is the worker's last JSON line; libraries (gloo, progress bars) may print too,
            # even onto the end of that line, so only the JSON object at its start is read.
            lines = [line for line in out.splitlines() if line.startswith("{")]
            if not lines:
                raise AssertionError(f"worker {i} printed no JSON result:\n{out[-2000:]}\n{err[-2000:]}")
            outs.append(json.JSONDecoder().raw_decode(lines[-1])[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return outs
