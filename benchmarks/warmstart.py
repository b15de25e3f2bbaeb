"""The toy warm start's step: ``pipelines.warmstart.train_sft`` against the plain loop it replaced
(``tests/test_warmstart.py::reference_train``: one jitted step per batch, rows indexed on the host,
whole right-padded sequences, one per record, the LM head at every position), the same records per
step (``train_sft`` packs each image's records into one row), same model, same AdamW, one run.

Each is timed for ``--steps`` and for twice as many steps from the same initial model; the
difference over ``--steps`` is the seconds per step without compilation. Also prints the loss of
the last step of each (they train on the same batches, so they match to float rounding).

    python -m benchmarks.warmstart [--images 5000] [--steps 100]
"""
from __future__ import annotations

import argparse
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=5000)
    ap.add_argument("--steps", type=int, default=100, help="a multiple of 50 (train_sft's scan length)")
    args = ap.parse_args()
    from flax import nnx

    from configs import default
    from rlaifv_jax.data import toy_world
    from rlaifv_jax.models import hf
    from rlaifv_jax.pipelines import warmstart
    from tests.test_warmstart import reference_train

    c = default.get_config()
    world = toy_world.WorldSettings(caption_partner_rate=c.world.caption_partner_rate)
    tokenizer = toy_world.build_tokenizer(world)
    model = hf.build_model("LlavaForConditionalGeneration", warmstart.toy_model_config(tokenizer, world, c.model), seed=0)
    records = toy_world.warmstart_split(world, args.images, 0)
    examples = warmstart.encode_examples(records, tokenizer, model.num_image_tokens(), model.config.image_token_id)
    keys = [r["image_id"] for r in records]  # an image's caption and yes/no records in one tree
    graphdef, initial = nnx.split(model)
    opt = dict(batch_size=c.warmstart.batch_size, learning_rate=c.warmstart.learning_rate, seed=0)

    def plain(steps):
        return reference_train(nnx.merge(graphdef, initial), examples, keys, steps=steps, **opt)[1][-1]

    def ours(steps):
        return warmstart.train_sft(nnx.merge(graphdef, initial), examples, steps=steps, keys=keys, progress=False,
                                   **opt)[-1]

    per_step = {}
    for name, fn in (("plain (before)", plain), ("train_sft", ours)):
        walls = []
        for steps in (args.steps, 2 * args.steps):
            t = time.perf_counter()
            loss = fn(steps)
            walls.append(time.perf_counter() - t)
        per_step[name] = (walls[1] - walls[0]) / args.steps
        print(f"{name:>15}: {per_step[name]:.3f} s/step  (wall {walls[0]:.1f} s / {walls[1]:.1f} s for "
              f"{args.steps} / {2 * args.steps} steps)  last loss {loss:.6f}")
    (before, after) = per_step.values()
    print(f"ratio: {before / after:.2f}x faster per step")


if __name__ == "__main__":
    main()
