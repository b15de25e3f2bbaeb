"""Forward-pass time: our jitted LLaVA forward vs transformers (``torch.no_grad``, eval), same weights,
same CPU, one run.

Model: the LLaVA-shaped ~32M-parameter benchmark model (``benchmarks/common.py``); input: one
600-token sequence (576 image tokens + text) and its 96 px image; output: logits for every position
(vision tower included on both sides). Ours is warmed up (compiled) first. Run:

    python -m benchmarks.forward [--repeats 5] [--batch 1]
"""
from __future__ import annotations

import argparse
import os
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from flax import nnx  # noqa: E402

from benchmarks import common  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        ref, ours, n_params = common.build(tmp)
    rng = np.random.RandomState(0)
    prompts = [common.prompt(rng, text_tokens=23) for _ in range(args.batch)]  # 1 + 576 + 23 = 600
    ids = np.asarray([p["input_ids"] for p in prompts])
    px = np.concatenate([p["pixel_values"] for p in prompts])
    graphdef, state = nnx.split(ours)
    forward = jax.jit(lambda s, i, p: nnx.merge(graphdef, s)(i, pixel_values=p))
    ids_j, px_j = jnp.asarray(ids), jnp.asarray(px)
    ids_t, px_t = torch.tensor(ids), torch.tensor(px)
    ours_logits = np.asarray(forward(state, ids_j, px_j))  # compile
    with torch.no_grad():
        ref_logits = ref(input_ids=ids_t, pixel_values=px_t).logits.numpy()
    diff = float(np.max(np.abs(ours_logits - ref_logits)))

    def run_hf():
        with torch.no_grad():
            ref(input_ids=ids_t, pixel_values=px_t)

    times = common.median_times({"ours": lambda: forward(state, ids_j, px_j).block_until_ready(),
                                 "hf": run_hf}, args.repeats)
    t_ours, t_hf = times["ours"], times["hf"]
    print(f"LLaVA-shaped model, {n_params / 1e6:.1f}M params, batch {args.batch} x {ids.shape[1]} tokens "
          f"(576 image), median of {args.repeats}; {common.threads()}; max |logit diff| {diff:.1e}")
    print("| forward | ms | ratio |")
    print("|---|---|---|")
    print(f"| transformers (no_grad, eval) | {t_hf * 1e3:.1f} | 1.00 |")
    print(f"| rlaifv_jax (jit) | {t_ours * 1e3:.1f} | {t_hf / t_ours:.2f} |")


if __name__ == "__main__":
    main()
