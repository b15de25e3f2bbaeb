"""Test set-up: 8 fake CPU devices and full-precision matmuls, before jax is imported anywhere; a
persistent compilation cache shared by the tests and the runs they start; session fixtures for the
tiny models and the smoke config's warm start, each built once per test process."""
import os
import shutil
import tempfile

# One thread per test process: the suite runs one process per core (``-n 2``), and XLA's own thread
# pool in each would only make them take turns (9 % slower on 2 cores, BENCHMARKS.md).
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_cpu_multi_thread_eigen=false "
                                   "intra_op_parallelism_threads=1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
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


def pytest_configure(config):
    # The planner's executables for a named TPU topology land in that cache too but cannot be read
    # back without a TPU client; JAX says so and compiles them again, which is all the planner needs.
    config.addinivalue_line("filterwarnings", "ignore:Error reading persistent compilation cache entry:UserWarning")


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


@pytest.fixture(scope="session")
def smoke_warmstart(tmp_path_factory):
    """``seed(workdir)``: put the smoke config's warm-started policy (``configs/default.py:smoke``, seed 0),
    trained once per session, into ``workdir/warmstart``, where a run finds it done and skips training."""
    from configs import default
    from rlaifv_jax.data import toy_world
    from rlaifv_jax.pipelines import warmstart

    c = default.get_config("smoke")
    world = toy_world.WorldSettings(caption_partner_rate=c.world.caption_partner_rate)
    built = warmstart.warm_start(c.model, c.warmstart, world, toy_world.warmstart_split(world, c.world.n_warmstart, c.seed),
                                 str(tmp_path_factory.mktemp("smoke") / "warmstart"), seed=c.seed, progress=False)

    def seed(workdir) -> None:
        shutil.copytree(built, os.path.join(workdir, "warmstart"))
    return seed
