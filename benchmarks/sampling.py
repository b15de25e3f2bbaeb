"""Sampler tokens/s: ours (one prefill per prompt, n rows in one jitted while_loop) vs transformers
``generate(num_return_sequences=n, do_sample=True)``, same weights, same CPU, one run.

Model: LLaVA-shaped, ~32M parameters (LM hidden 512, 6 layers, vocab 32000, tied embeddings; a
2-layer CLIP tower on 96 px images, patch 4 → 576 image tokens), ~610-token prompts. Decoding:
temperature 0.7, top-k 50 (the RLAIF-V policy settings), n = 10 samples × 128 new tokens per prompt
(transformers forced to 128 by ``min_new_tokens``; ours counts the tokens it actually produced).
Ours is compiled on a warm-up run first. Run:

    python -m benchmarks.sampling [--prompts 1] [--repeats 3] [--batch-size 1]
"""
from __future__ import annotations

import argparse
import os
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks import common  # noqa: E402
from rlaifv_jax.engine import generate

N, NEW, TEMPERATURE, TOP_K = 10, 128, 0.7, 50


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=1, help="prompts per timed repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=1, help="our prompts per prefill/decode batch")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        ref, ours, n_params = common.build(tmp)
    rng = np.random.RandomState(0)
    warmup = [common.prompt(rng) for _ in range(args.prompts)]
    prompts = [common.prompt(rng) for _ in range(args.prompts)]
    kw = dict(num_samples=N, max_new_tokens=NEW, temperature=TEMPERATURE, top_k=TOP_K, stop_token_ids=[2],
              batch_size=args.batch_size, progress=False)
    generate.generate(ours, warmup, **kw)  # compile
    made = []

    def run_ours():
        out = generate.generate(ours, prompts, seed=len(made), **kw)
        made.append(sum(len(t) for o in out for t in o["tokens"]))

    def run_hf():
        with torch.no_grad():
            for p in prompts:
                ref.generate(input_ids=torch.tensor([p["input_ids"]]), pixel_values=torch.tensor(p["pixel_values"]),
                             do_sample=True, num_return_sequences=N, max_new_tokens=NEW, min_new_tokens=NEW,
                             temperature=TEMPERATURE, top_k=TOP_K, pad_token_id=0)

    times = common.median_times({"ours": run_ours, "hf": run_hf}, args.repeats)
    t_ours, t_hf = times["ours"], times["hf"]
    ours_tps = float(np.median(made)) / t_ours
    hf_tps = args.prompts * N * NEW / t_hf
    print(f"LLaVA-shaped model, {n_params / 1e6:.1f}M params, prompt {len(prompts[0]['input_ids'])} tokens "
          f"(576 image), {N} samples x {NEW} new tokens, {args.prompts} prompts per repeat, "
          f"median of {args.repeats}; {common.threads()}; compiled {generate.compiled_programs()}")
    print("| sampler | s per repeat | tokens/s | ratio |")
    print("|---|---|---|---|")
    print(f"| transformers generate(num_return_sequences={N}) | {t_hf:.2f} | {hf_tps:.0f} | 1.00 |")
    print(f"| rlaifv_jax.engine.generate (batch {args.batch_size}) | {t_ours:.2f} | {ours_tps:.0f} | "
          f"{ours_tps / hf_tps:.2f} |")


if __name__ == "__main__":
    main()
