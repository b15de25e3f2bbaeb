"""How the tests start child processes: their environment, and ``python -m rlaifv_jax.main`` on the
smoke config."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# XLA flags of the test processes and of the processes they start:
# - one XLA thread per process: the suite runs one process per core (``-n 2``), and XLA's own thread
#   pool in each would only make them take turns (9 % slower on 2 cores, BENCHMARKS.md);
# - XLA:CPU's older (non-MLIR) fusion emitters: with most optimizations off (conftest.py) they compile
#   a training step in about 40 % of the time, to the same results (``python -m benchmarks.compile_options``).
# (Until 7 December a bare ``intra_op_parallelism_threads=1`` followed the first flag: not an XLA flag,
# and XLA ignored every flag after it.)
XLA_FLAGS = "--xla_cpu_multi_thread_eigen=false --xla_cpu_use_fusion_emitters=false"


def smoke_command(workdir, *extra) -> list:
    """``python -m rlaifv_jax.main`` on the smoke config in ``workdir``, without progress bars."""
    return [sys.executable, "-m", "rlaifv_jax.main", "--config", "configs/default.py:smoke", "--workdir", str(workdir),
            "--config.progress=False", *extra]


def child_env(devices: int = 1) -> dict:
    """The environment of a process the tests start: ``devices`` fake CPU devices, the test processes'
    ``XLA_FLAGS``, this checkout and ``tests/`` importable, and ``child_site/sitecustomize.py`` run at
    start-up (no torch)."""
    path = [os.path.join(ROOT, "tests", "child_site"), ROOT, os.path.join(ROOT, "tests")]
    return dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} {XLA_FLAGS}",
                JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join(path))


def run_to_end(workdir) -> str:
    """Run the smoke config in ``workdir`` (1 device) to the end; returns its stdout."""
    proc = subprocess.run(smoke_command(workdir), cwd=ROOT, env=child_env(), capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout
