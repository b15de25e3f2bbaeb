"""Compile time and run time of one SFT training step under XLA:CPU compile options: full
optimization or most optimizations off (the tests' setting), each with XLA's default (MLIR) fusion
emitters or the older ones (``xla_cpu_use_fusion_emitters=False``; the tests set it in ``XLA_FLAGS``,
``tests/smoke_runs.py``), given as a compile option or in ``XLA_FLAGS``, where a bare word before it
(not an XLA flag) makes XLA ignore it.

Model: the toy world's LLaVA at 32 wide; step: AdamW on the answer NLL of 9 warm-start records (the
warm-start tests' model and plain step, ``tests/test_warmstart.py``). Each setting compiles in a fresh process, after one unrelated warm-up
compilation; prints compile seconds, milliseconds a step (mean of 20) and the loss, then the ratios
against the default of the same optimization level. Run:

    python -m benchmarks.compile_options
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

SETTINGS = {  # name -> (compile options, extra XLA_FLAGS)
    "full optimization": ({}, ""),
    "full optimization, older emitters": ({"xla_cpu_use_fusion_emitters": False}, ""),
    "most optimizations off": ({"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}, ""),
    "most optimizations off, older emitters": ({"xla_backend_optimization_level": 0,
                                                "xla_llvm_disable_expensive_passes": True,
                                                "xla_cpu_use_fusion_emitters": False}, ""),
    "most optimizations off, older emitters in XLA_FLAGS": ({"xla_backend_optimization_level": 0,
                                                             "xla_llvm_disable_expensive_passes": True},
                                                            "--xla_cpu_use_fusion_emitters=false"),
    "the same after a bare word in XLA_FLAGS": ({"xla_backend_optimization_level": 0,
                                                 "xla_llvm_disable_expensive_passes": True},
                                                "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1 "
                                                "--xla_cpu_use_fusion_emitters=false"),
}


def measure(options: dict) -> dict:
    """Compile the step with ``options`` in this process; → compile s, ms per step, loss."""
    import time

    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from tests.test_warmstart import _setup, reference_step

    jax.config.update("jax_default_matmul_precision", "highest")
    model, batch, _ = _setup(3)  # the warm-start tests' model and 3 images' records
    tx = optax.adamw(1e-3, weight_decay=0.01)
    graphdef, params = nnx.split(model)
    opt_state = tx.init(params)
    step = reference_step(graphdef, tx)

    jax.jit(lambda x: jnp.sin(x) @ x).lower(jnp.ones((4, 4))).compile()  # the compiler's one-time start-up
    lowered = jax.jit(step).lower(params, opt_state, batch)
    t = time.perf_counter()
    compiled = lowered.compile(compiler_options=options)
    seconds = time.perf_counter() - t
    out = jax.block_until_ready(compiled(params, opt_state, batch))
    t = time.perf_counter()
    for _ in range(20):
        out = compiled(params, opt_state, batch)
    jax.block_until_ready(out)
    return dict(compile_s=seconds, step_ms=(time.perf_counter() - t) / 20 * 1e3, loss=float(out[2]))


def main() -> None:
    if len(sys.argv) == 2 and sys.argv[1].startswith("{"):
        print(json.dumps(measure(json.loads(sys.argv[1]))))
        return
    results = {}
    for name, (options, flags) in SETTINGS.items():
        env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} {flags}".strip())
        env.pop("JAX_DISABLE_MOST_OPTIMIZATIONS", None)
        proc = subprocess.run([sys.executable, "-m", "benchmarks.compile_options", json.dumps(options)], env=env,
                              capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(f"{name}: {proc.stderr[-2000:]}")
        results[name] = r = json.loads(proc.stdout.strip().splitlines()[-1])
        base = results["full optimization" if name.startswith("full") else "most optimizations off"]
        print(f"{name:53s} compile {r['compile_s']:6.2f} s ({r['compile_s'] / base['compile_s']:.2f}×)  "
              f"step {r['step_ms']:6.1f} ms ({r['step_ms'] / base['step_ms']:.2f}×)  loss {r['loss']:.6f}", flush=True)


if __name__ == "__main__":
    main()
