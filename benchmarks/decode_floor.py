"""How close a sampled decode step is to what XLA can do with the step's weights at all.

The *floor* is a jitted ``fori_loop`` that runs only the step's weight matmuls on the benchmark
model's own parameters (per layer q, k, v, o, gate, up, down; then the tied LM head, an arg-max and
the embedding of the chosen token) for the same number of rows: no attention, no cache, no
sampling. Our step is ``engine.generate``'s (T 0.7, top-k 50), timed as the difference between 128
and 8 new tokens per row (so the prefill cancels). Both in one run; the ratio is what the rest of
the step costs on top of the weights. Run:

    python -m benchmarks.decode_floor [--prompts 1] [--repeats 3]
"""
from __future__ import annotations

import argparse
import os
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import common  # noqa: E402
from rlaifv_jax.engine import generate

N = 10  # samples per prompt: rows = prompts x N


def weights(model) -> tuple[list[list[jax.Array]], jax.Array]:
    """Per layer the seven projection kernels as ``[in, out]`` matrices, and the tied embedding."""
    text = model.language_model

    def matrix(linear):
        w = linear.kernel[...]
        return w.reshape(int(np.prod(w.shape[:linear.n_in])), -1)

    layers = [[matrix(x) for x in (a.q_proj, a.k_proj, a.v_proj, a.o_proj, m.gate_proj, m.up_proj, m.down_proj)]
              for a, m in ((layer.self_attn, layer.mlp) for layer in text.layers)]
    return layers, text.embed_tokens.embedding[...]


def floor_loop(layers, table, x, steps):
    """``steps`` steps of the weight matmuls alone (normalised so values stay finite)."""
    def one(_, x):
        for q, k, v, o, g, u, d in layers:
            a = x @ q + 0.1 * (x @ k) + 0.1 * (x @ v)
            x = x + a @ o
            x = x / jnp.linalg.norm(x, axis=-1, keepdims=True)
            x = x + (jax.nn.silu(x @ g) * (x @ u)) @ d
            x = x / jnp.linalg.norm(x, axis=-1, keepdims=True)
        return jnp.take(table, jnp.argmax(jnp.einsum("rd,vd->rv", x, table), axis=-1), axis=0)
    return jax.lax.fori_loop(0, steps, one, x)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=1, help="prompts per batch (rows = prompts x 10)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        ours = common.build(tmp)[1]
    rng = np.random.RandomState(0)
    prompts = [common.prompt(rng) for _ in range(args.prompts)]
    layers, table = weights(ours)
    floor = jax.jit(floor_loop, static_argnums=3)
    x = jnp.asarray(rng.randn(args.prompts * N, table.shape[1]).astype(np.float32))

    def timed(steps: int) -> dict:
        return {"floor": lambda: floor(layers, table, x, steps).block_until_ready(),
                "ours": lambda: generate.generate(ours, prompts, num_samples=N, max_new_tokens=steps, temperature=0.7,
                                                  top_k=50, stop_token_ids=[2], batch_size=args.prompts, progress=False)}

    for steps in (8, 128):  # compile
        for fn in timed(steps).values():
            fn()
    short, long = (common.median_times(timed(steps), args.repeats) for steps in (8, 128))
    per_step = {name: (long[name] - short[name]) / 120 * 1e3 for name in long}
    mb = (sum(w.nbytes for ws in layers for w in ws) + table.nbytes) / 1e6
    print(f"LLaVA-shaped benchmark model, {args.prompts * N} decode rows ({args.prompts} prompts x {N}), "
          f"{mb:.0f} MB of step weights, median of {args.repeats}; {common.threads()}")
    print("| decode step | ms | ratio |")
    print("|---|---|---|")
    print(f"| weight matmuls alone (floor) | {per_step['floor']:.1f} | 1.00 |")
    print(f"| rlaifv_jax.engine.generate | {per_step['ours']:.1f} | {per_step['ours'] / per_step['floor']:.2f} |")


if __name__ == "__main__":
    main()
