"""Continuous vs static batching on responses of very different lengths, one run, same weights.

Model and prompts: ``benchmarks.common`` (LLaVA-shaped, ~32M parameters, ~610-token prompts).
Decoding: plain sampling at temperature 1 (so that the random model's rows draw from the whole
vocabulary and stop tokens can be told apart), n = 10 samples × up to 128 new tokens per prompt. A pilot run
without stop tokens fixes every (prompt, sample) row's tokens (they depend only on (seed, prompt,
sample)); stop tokens are then chosen so that samples 0-4 of every prompt stop within their first 8
tokens and samples 5-9 never stop (run to ``max_new_tokens``). Static: ``--batch-size`` prompts
per batch, each batch decoding until its longest row ends. Continuous: all prompts in one pool
through the same number of decode slots (``decode_rows = batch_size × n``), a finished row's slot
taking the next waiting row. Both are compiled first; tokens must be identical. Run:

    python -m benchmarks.mixed_lengths [--prompts 4] [--batch-size 1] [--repeats 3]
"""
from __future__ import annotations

import argparse
import os
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402

from benchmarks import common  # noqa: E402
from rlaifv_jax.engine import generate  # noqa: E402

N, NEW, SHORT = 10, 128, 8


def stop_tokens(outs: list[dict]) -> list[int]:
    """Token ids that end samples 0..N/2-1 of every prompt within ``SHORT`` tokens and never occur in
    samples N/2..N-1 (from a pilot run without stops)."""
    forbidden = {t for o in outs for toks in o["tokens"][N // 2:] for t in toks}
    stop = set()
    for o in outs:
        for toks in o["tokens"][:N // 2]:
            if not stop.intersection(toks[:SHORT]):
                stop.add(next(t for t in toks[:SHORT] if t not in forbidden))
    return sorted(stop)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=1, help="static prompts per batch")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        _, ours, n_params = common.build(tmp)
    rng = np.random.RandomState(0)
    prompts = [common.prompt(rng) for _ in range(args.prompts)]
    kw = dict(num_samples=N, max_new_tokens=NEW, temperature=1.0, seed=0, progress=False)
    pilot = generate.generate(ours, prompts, stop_token_ids=[2], batch_size=args.batch_size, **kw)
    kw["stop_token_ids"] = stop_tokens(pilot)
    rows = args.batch_size * N
    static = dict(batch_size=args.batch_size, **kw)
    continuous = dict(batch_size=args.prompts, decode_rows=rows, **kw)
    results = {"static": generate.generate(ours, prompts, **static),  # compile
               "continuous": generate.generate(ours, prompts, **continuous)}
    lengths = [len(t) for o in results["static"] for t in o["tokens"]]
    assert [o["tokens"] for o in results["static"]] == [o["tokens"] for o in results["continuous"]]
    times = common.median_times({"static": lambda: generate.generate(ours, prompts, **static),
                                 "continuous": lambda: generate.generate(ours, prompts, **continuous)},
                                args.repeats)
    made = sum(lengths)
    print(f"LLaVA-shaped model, {n_params / 1e6:.1f}M params, {args.prompts} prompts x {N} samples, "
          f"up to {NEW} new tokens ({sum(x <= SHORT for x in lengths)} rows stop within {SHORT} tokens, "
          f"{sum(x == NEW for x in lengths)} run to {NEW}; {made} tokens), {rows} decode rows, "
          f"median of {args.repeats}; {common.threads()}; identical tokens: yes")
    print("| batching | s per repeat | tokens/s | ratio |")
    print("|---|---|---|---|")
    for name in ("static", "continuous"):
        print(f"| {name} | {times[name]:.2f} | {made / times[name]:.0f} | {times['static'] / times[name]:.2f} |")


if __name__ == "__main__":
    main()
