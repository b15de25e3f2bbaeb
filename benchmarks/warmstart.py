"""The toy warm start's step: ``pipelines.warmstart.train_sft`` against the plain loop it replaced
(``tests/test_warmstart.py::reference_train``: one jitted step per batch, rows indexed on the host,
whole right-padded sequences, one per record, the LM head at every position), the same records per
step (``train_sft`` packs each image's records into one row), same model, same AdamW, one run.

Each is timed for ``--steps`` and for twice as many steps from the same initial model, after a first
run of each has compiled into a fresh compilation cache (the schedule's length is part of the
program); the difference over ``--steps`` is the seconds per step without compilation. Also prints the loss of
the last step of each (they train on the same batches, so they match to float rounding).

Then the floor: XLA's FLOP count of one ``train_sft`` step (loss and gradient) against this machine's
float32 matmul rates measured in the same run, for a large product (2048 x 2048 x 2048) and for the
step's MLP shape with all its decoder positions in one product (positions x hidden x 2 hidden; the
step runs it once per length group), the best of 5 each; so the fraction of them the step reaches, and
the seconds the default's warm start (``--images`` as the default's world) would take at each.

    python -m benchmarks.warmstart [--images 5000] [--steps 100] [--skip-plain]
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=5000)
    ap.add_argument("--steps", type=int, default=100, help="a multiple of 50 (train_sft's scan length)")
    ap.add_argument("--skip-plain", action="store_true", help="time train_sft and the floor only")
    args = ap.parse_args()
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from configs import default
    from rlaifv_jax.core import compile_cache
    from rlaifv_jax.data import toy_world
    from rlaifv_jax.models import hf
    from rlaifv_jax.pipelines import warmstart
    from tests.test_warmstart import reference_train

    cache = tempfile.TemporaryDirectory(prefix="warmstart_bench_cache_")  # removed at exit
    os.environ[compile_cache.ENV] = cache.name
    compile_cache.enable()
    c = default.get_config()
    world = toy_world.WorldSettings(caption_partner_rate=c.world.caption_partner_rate)
    tokenizer = toy_world.build_tokenizer(world)
    model = hf.build_model("LlavaForConditionalGeneration", warmstart.toy_model_config(tokenizer, world, c.model), seed=0)
    records = toy_world.warmstart_split(world, args.images, 0)
    examples = warmstart.encode_examples(records, tokenizer, model.num_image_tokens(), model.config.image_token_id)
    keys = [r["image_id"] for r in records]  # an image's caption and yes/no records in one tree
    graphdef, initial = nnx.split(model)

    def fresh():
        """The initial model with its own arrays: the runs update theirs in place and donate them."""
        return nnx.merge(graphdef, jax.tree.map(jnp.array, initial))
    opt = dict(batch_size=c.warmstart.batch_size, learning_rate=c.warmstart.learning_rate, seed=0)

    def plain(steps):
        return reference_train(fresh(), examples, keys, steps=steps, **opt)[1][-1]

    def ours(steps):
        return warmstart.train_sft(fresh(), examples, steps=steps, keys=keys, progress=False,
                                   **opt)[-1]

    per_step = {}
    for name, fn in (("plain (before)", plain), ("train_sft", ours))[args.skip_plain:]:
        for steps in (args.steps, 2 * args.steps):
            fn(steps)  # compiles into a fresh cache, so that both timed runs load their programs from it
        walls = []
        for steps in (args.steps, 2 * args.steps):
            t = time.perf_counter()
            loss = fn(steps)
            walls.append(time.perf_counter() - t)
        per_step[name] = (walls[1] - walls[0]) / args.steps
        print(f"{name:>15}: {per_step[name]:.3f} s/step  (wall {walls[0]:.1f} s / {walls[1]:.1f} s for "
              f"{args.steps} / {2 * args.steps} steps)  last loss {loss:.6f}")
    if not args.skip_plain:
        print(f"ratio: {per_step['plain (before)'] / per_step['train_sft']:.2f}x faster per step")
    flops, positions = step_flops(fresh(), examples, keys, c.warmstart.batch_size)
    rate, mlp_rate = matmul_rate(2048, 2048, 2048), matmul_rate(positions, c.model.hidden, 2 * c.model.hidden)
    achieved = flops / per_step["train_sft"]
    print(f"floor: {flops / 1e9:.2f} GFLOP a step (XLA's count, loss and gradient; {positions} decoder positions) "
          f"at {achieved / 1e9:.1f} GFLOP/s")
    print(f"dense matmul 2048^3: {rate / 1e9:.1f} GFLOP/s (the step reaches {achieved / rate:.0%} of it); the step's "
          f"MLP shape in one product ({positions} x {c.model.hidden} x {2 * c.model.hidden}): {mlp_rate / 1e9:.1f} GFLOP/s")
    steps = c.warmstart.steps
    print(f"the default's {steps} steps: {steps * per_step['train_sft']:.0f} s at the step's rate, "
          f"{steps * flops / mlp_rate:.0f} s at the MLP shape's, {steps * flops / rate:.0f} s at the dense matmul's")


def step_flops(model, examples: dict, keys: list, batch_size: int) -> tuple[float, int]:
    """XLA's FLOP count of one ``train_sft`` step's loss and gradient, on its first drawn batch (the
    optimizer's few elementwise passes over the parameters left out), and the decoder positions it runs."""
    import jax
    from flax import nnx

    from rlaifv_jax.pipelines import warmstart
    p = warmstart.shared_prefix(examples["tokens"], examples["answer_start"], model.config.image_token_id)
    trees, _, groups, rows = warmstart.sft_batches(examples, keys, p, batch_size=batch_size, steps=1, seed=0)
    data, windows = warmstart.group_arrays(trees, groups)
    batches = [{k: v[r[0]] for k, v in d.items()} for d, r in zip(data, rows)]
    graphdef, params = nnx.split(model)

    def loss(params, batches):
        return warmstart.sft_loss(nnx.merge(graphdef, params), examples["tokens"][0, :p], list(zip(batches, windows)))
    cost = jax.jit(jax.value_and_grad(loss)).lower(params, batches).compile().cost_analysis()
    return float((cost[0] if isinstance(cost, list) else cost)["flops"]), sum(b["tokens"].size for b in batches)


def matmul_rate(m: int, k: int, n: int, repeats: int = 5) -> float:
    """This machine's float32 matmul rate through XLA: FLOP/s of an ``[m, k] x [k, n]`` product, the
    best of ``repeats`` timings of ``2e10 / (2 m k n)`` products each (at least one)."""
    import jax
    import jax.numpy as jnp
    a, b = jnp.ones((m, k), jnp.float32), jnp.ones((k, n), jnp.float32)
    product = jax.jit(jnp.matmul)
    product(a, b).block_until_ready()
    calls = max(1, int(2e10 / (2 * m * k * n)))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            out = product(a, b)
        out.block_until_ready()
        best = min(best, (time.perf_counter() - start) / calls)
    return 2 * m * k * n / best


if __name__ == "__main__":
    main()
