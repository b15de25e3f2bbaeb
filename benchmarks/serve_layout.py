"""Sampler tokens/s with the serving layout against the training layout, same model, same run.

The online loop serves sampling, labeling and the reference pass with ``SERVE_RULES`` on each host's
own devices (weights replicated over ``data``: no collective per decode step) and trains with
``TRAIN_RULES`` (weights sharded over ``fsdp``: every decode step all-gathers them). Both layouts
run the same prompts on 8 fake CPU devices (``--xla_force_host_platform_device_count=8``), rows
split over the mesh. Model: the LLaVA-shaped ~32M benchmark model (``benchmarks/common.py``). Run:

    python -m benchmarks.serve_layout [--prompts 8] [--samples 2] [--new 32] [--repeats 3]
"""
from __future__ import annotations

import argparse
import os
import tempfile

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402

from benchmarks import common  # noqa: E402
from rlaifv_jax.core import sharding  # noqa: E402
from rlaifv_jax.engine import generate  # noqa: E402
from rlaifv_jax.models import hf  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--new", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    layouts = {"train (fsdp=8, TRAIN_RULES)": (sharding.make_mesh(1, 8, 1), sharding.TRAIN_RULES),
               "serve (data=8, SERVE_RULES)": (sharding.serve_mesh(), sharding.SERVE_RULES)}
    rng = np.random.RandomState(0)
    prompts = [common.prompt(rng) for _ in range(args.prompts)]
    kw = dict(num_samples=args.samples, max_new_tokens=args.new, temperature=0.7, top_k=50, stop_token_ids=[2],
              batch_size=args.prompts, progress=False)
    with tempfile.TemporaryDirectory() as tmp:
        _, _, n_params = common.build(tmp)
        models = {name: hf.load_pretrained(tmp, shardings=lambda s, m=mesh, r=rules: sharding.state_shardings(s, m, r))
                  for name, (mesh, rules) in layouts.items()}
    made: dict[str, list[int]] = {name: [] for name in layouts}

    def runner(name):
        def run():
            out = generate.generate(models[name], prompts, seed=len(made[name]), mesh=layouts[name][0], **kw)
            made[name].append(sum(len(t) for o in out for t in o["tokens"]))
        return run

    fns = {name: runner(name) for name in layouts}
    for fn in fns.values():
        fn()  # compile
    times = common.median_times(fns, args.repeats)
    print(f"LLaVA-shaped model, {n_params / 1e6:.1f}M params, {args.prompts} prompts x {args.samples} samples x "
          f"{args.new} new tokens, 8 fake CPU devices, median of {args.repeats}")
    print("| layout | s per repeat | tokens/s | ratio |")
    print("|---|---|---|---|")
    base = None
    for name, t in times.items():
        tps = float(np.median(made[name])) / t
        base = base or tps
        print(f"| {name} | {t:.2f} | {tps:.0f} | {tps / base:.2f} |")


if __name__ == "__main__":
    main()
