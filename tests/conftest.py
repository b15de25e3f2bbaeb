"""Test set-up: 8 fake CPU devices and full-precision matmuls, before jax is imported anywhere; a
persistent compilation cache shared by the tests and the runs they start; session fixtures for the
tiny models, built once per test process, and for the smoke config's warm start and uninterrupted
run, built once per session whichever test process (pytest-xdist worker) needs them first."""
import contextlib
import fcntl
import os
import shutil
import tempfile

import smoke_runs  # imports no jax

# One XLA thread per test process, the older fusion emitters (smoke_runs.XLA_FLAGS).
os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count=8 {smoke_runs.XLA_FLAGS}")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# XLA's optimizations mostly off (LLVM at -O0), here and in the runs the tests start: the tests' tiny
# programs run in microseconds, so compiling is nearly all of their time, and this halves it (BENCHMARKS.md);
# results agree to float rounding (the smoke run: the same metrics, DPO loss within 2e-7). Users' runs
# compile fully; so do the planner's tests for TPU slices (test_plan.py), which report compiled memory and cost.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
# The tests and the runs they start (``python -m rlaifv_jax.main``) compile through this cache, not
# the user's: tests that build the same program on the same tiny model (sampler, labeler, DPO step)
# compile it once per session, whichever test process or run got there first.
os.environ.setdefault("RLAIFV_JAX_CACHE", os.path.join(tempfile.gettempdir(), f"rlaifv_jax_test_cache_{os.getuid()}"))

import jax  # noqa: E402
import pytest  # noqa: E402

import tiny_hf  # noqa: E402
from rlaifv_jax.core import compile_cache  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
compile_cache.enable()


# Seconds each of the longest files took (``--durations=0``, 2 workers, 7 December; BENCHMARKS.md).
# With ``--dist loadfile`` these start first and the short files fill in behind them, so neither
# worker is left running a long file alone at the end.
LONGEST_FILES = {"test_online.py": 331, "test_plan.py": 256, "test_multihost.py": 161, "test_qwen_online.py": 76,
                 "test_checkpoint.py": 69, "test_qwen_engine.py": 63, "test_warmstart.py": 57, "test_dpo_train.py": 56,
                 "test_faults.py": 46, "test_sampling.py": 45, "test_eval_beam.py": 42, "test_models.py": 33,
                 "test_ux_preempt.py": 24}


def pytest_configure(config):
    # The planner's executables for a named TPU topology land in that cache too but cannot be read
    # back without a TPU client; JAX says so and compiles them again, which is all the planner needs.
    config.addinivalue_line("filterwarnings", "ignore:Error reading persistent compilation cache entry:UserWarning")
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False  # pytest-xdist: hand files out in the order below, not by test count


def pytest_collection_modifyitems(items):
    items.sort(key=lambda item: -LONGEST_FILES.get(item.path.name, 0))  # stable: the rest keep their order


@pytest.fixture(scope="session")
def tiny_llava(tmp_path_factory):
    """A tiny random LLaVA-1.5 checkpoint directory and its transformers model: ``(path, torch_model)``."""
    path = tmp_path_factory.mktemp("llava")
    return str(path), tiny_hf.llava(path)


@pytest.fixture(scope="session")
def tiny(tiny_llava):
    """The tiny LLaVA-1.5 checkpoint directory (read-only for tests)."""
    return tiny_llava[0]


@pytest.fixture(scope="session")
def tiny_next(tmp_path_factory):
    """A tiny random LLaVA-NeXT checkpoint directory and its transformers model."""
    path = tmp_path_factory.mktemp("next")
    return str(path), tiny_hf.llava_next(path)


@contextlib.contextmanager
def built_once(tmp_path_factory, name: str):
    """``with built_once(f, name) as (path, todo)``: a directory shared by all of the session's test
    processes. The first to get here finds ``todo`` true and builds ``path`` while holding a file lock;
    the others wait for it, then find it done. A build that raised leaves it to the next one."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the session's directory above every worker's own
    path, done = root / name, root / f"{name}.done"
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            shutil.rmtree(path, ignore_errors=True)
        yield path, not done.exists()
        done.touch()


@pytest.fixture(scope="session")
def smoke_warmstart(tmp_path_factory):
    """``seed(workdir)``: put the smoke config's warm-started policy (``configs/default.py:smoke``, seed 0),
    trained once per session, into ``workdir/warmstart``, where a run finds it done and skips training."""
    from configs import default
    from rlaifv_jax.data import toy_world
    from rlaifv_jax.pipelines import warmstart

    with built_once(tmp_path_factory, "smoke_warmstart") as (built, todo):
        if todo:
            c = default.get_config("smoke")
            world = toy_world.WorldSettings(caption_partner_rate=c.world.caption_partner_rate)
            records = toy_world.warmstart_split(world, c.world.n_warmstart, c.seed)
            warmstart.warm_start(c.model, c.warmstart, world, records, str(built), seed=c.seed, progress=False)

    def seed(workdir) -> None:
        shutil.copytree(built, os.path.join(workdir, "warmstart"))
    return seed


@pytest.fixture(scope="session")
def smoke_reference(tmp_path_factory, smoke_warmstart):
    """``(workdir, stdout)`` of the smoke config run to the end uninterrupted (1 process, 1 CPU device),
    once per session: the tests that kill, restart or spread a run over processes compare against it.
    Read-only for tests."""
    with built_once(tmp_path_factory, "smoke_reference") as (workdir, todo):
        if todo:
            workdir.mkdir()
            smoke_warmstart(workdir)
            (workdir.parent / "smoke_reference.stdout").write_text(smoke_runs.run_to_end(workdir))
    return workdir, (workdir.parent / "smoke_reference.stdout").read_text()
