"""XLA compile options of the test processes and the processes they start, for the programs they
compile for the CPU with most optimizations off (``JAX_DISABLE_MOST_OPTIMIZATIONS``, conftest.py):
XLA:CPU's older (non-MLIR) fusion emitters.

With optimizations off they compile a training step in about 40 % of the time, and the tests' tiny
programs run about as fast, to the same float32 results (BENCHMARKS.md); with full optimization
(the planner's tests) they compile slower, so those keep the default. XLA takes this option only per
compilation (``jax.jit(..., compiler_options=)``; in ``XLA_FLAGS`` it has no effect), so ``install``
adds it to the options JAX builds for each compilation."""
import functools

import jax

CPU_OPTIONS = {"xla_cpu_use_fusion_emitters": False}


def install() -> None:
    """Add ``CPU_OPTIONS`` to this process's CPU compilations with most optimizations off (options a
    caller sets win)."""
    from jax._src import compiler
    build = compiler.get_compile_options
    if getattr(build, "cpu_options", None) is not None:
        return

    @functools.wraps(build)
    def with_cpu_options(*args, env_options_overrides=None, backend=None, **kwargs):
        if backend is not None and backend.platform == "cpu" and jax.config.read("jax_disable_most_optimizations"):
            env_options_overrides = {**CPU_OPTIONS, **(env_options_overrides or {})}
        return build(*args, env_options_overrides=env_options_overrides, backend=backend, **kwargs)

    with_cpu_options.cpu_options = CPU_OPTIONS
    compiler.get_compile_options = with_cpu_options
