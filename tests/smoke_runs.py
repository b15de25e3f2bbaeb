"""How the tests start child processes: their environment, and ``python -m rlaifv_jax.main`` on the
smoke config."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def smoke_command(workdir, *extra) -> list:
    """``python -m rlaifv_jax.main`` on the smoke config in ``workdir``, without progress bars."""
    return [sys.executable, "-m", "rlaifv_jax.main", "--config", "configs/default.py:smoke", "--workdir", str(workdir),
            "--config.progress=False", *extra]


def child_env(devices: int = 1) -> dict:
    """The environment of a process the tests start: ``devices`` fake CPU devices, one XLA thread (as
    the test processes: the other core runs the other test process), this checkout and ``tests/``
    importable."""
    flags = f"--xla_force_host_platform_device_count={devices} --xla_cpu_multi_thread_eigen=false " \
            "intra_op_parallelism_threads=1"
    return dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu",
                PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "tests")]))


def run_to_end(workdir) -> str:
    """Run the smoke config in ``workdir`` (1 device) to the end; returns its stdout."""
    proc = subprocess.run(smoke_command(workdir), cwd=ROOT, env=child_env(), capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout
