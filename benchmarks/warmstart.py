"""The toy warm start's step: ours (``pipelines.warmstart``: shared chat prefix run once, two length
groups, LM head on the answer window) vs the plain step it replaced (every row padded to the longest
whole sequence, logits at every position), same rows, same toy model, same AdamW update, one run.

Prints GFLOP per step (XLA's cost analysis) and seconds per step (median of ``--repeats`` timed
steps after compilation) for both, and the ratios.

    python benchmarks/warmstart.py [--images 5000] [--batch 64] [--repeats 10]
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np


def full_sequence_loss(model, records, tokenizer, extra_pad: int = 0):
    """Mean answer NLL of whole right-padded sequences through ``model(...)`` (the textbook formula):
    ``(loss_fn(model) -> loss, arrays)`` for ``records`` (warm-start records), rows padded to the
    longest plus ``extra_pad``."""
    import jax.numpy as jnp
    from rlaifv_jax.data import chat, toy_world
    from rlaifv_jax.engine.logps import answer_logps
    n_img, img_id = model.num_image_tokens(), model.config.image_token_id
    encs = [chat.encode_prompt_answer(tokenizer, r["question"], r["answer"], n_img, image_token_id=img_id)
            for r in records]
    rows = [np.concatenate([e.prompt_ids, e.answer_ids]) for e in encs]
    tokens = np.full((len(rows), max(map(len, rows)) + extra_pad), tokenizer.pad_token_id, np.int32)
    for i, r in enumerate(rows):
        tokens[i, :len(r)] = r
    arrays = dict(tokens=tokens, start=np.asarray([len(e.prompt_ids) for e in encs], np.int32),
                  lens=np.asarray([len(e.answer_ids) for e in encs], np.int32),
                  pixels=toy_world.encode_image(np.stack([r["image"] for r in records])))

    def loss(m, a=arrays):
        logits = m(jnp.asarray(a["tokens"]), pixel_values=jnp.asarray(a["pixels"]))
        total, count = answer_logps(logits, jnp.asarray(a["tokens"]), jnp.asarray(a["start"]), jnp.asarray(a["lens"]))
        return -jnp.sum(total) / jnp.sum(count)
    return loss, arrays


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=5000)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx
    from configs import default
    from rlaifv_jax.data import toy_world
    from rlaifv_jax.models import hf
    from rlaifv_jax.pipelines import warmstart

    c = default.get_config()
    world = toy_world.WorldConfig()
    records = toy_world.warmstart_split(world, args.images, 0)
    tokenizer = toy_world.build_tokenizer(world)
    model = hf.build_model("LlavaForConditionalGeneration", warmstart.toy_model_config(tokenizer, world, c.model), seed=0)
    graphdef, params = nnx.split(model)
    ex = warmstart.encode_examples(records, tokenizer, model.num_image_tokens(), model.config.image_token_id)
    rng = np.random.default_rng(0)
    counts = warmstart.group_counts([len(g["tokens"]) for g in ex["groups"]], args.batch)
    picked = [rng.choice(len(g["tokens"]), n, replace=False) for g, n in zip(ex["groups"], counts)]
    ours = [{"pixel_values": ex["pixel_values"][g["image"][r]], **{k: g[k][r] for k in ("tokens", "answer_start", "answer_len")}}
            for g, r in zip(ex["groups"], picked)]
    windows = [int(g["answer_len"].max()) for g in ex["groups"]]
    prefix = jnp.asarray(ex["prefix"])
    # the same rows as whole sequences, padded to the longest sequence of all records (as before)
    longest = max(len(ex["prefix"]) + g["tokens"].shape[1] for g in ex["groups"])
    whole = [jnp.concatenate([jnp.broadcast_to(prefix, (len(b["tokens"]), len(prefix))), b["tokens"]], 1) for b in ours]
    tokens = np.concatenate([np.pad(np.asarray(w), ((0, 0), (0, longest - w.shape[1])), constant_values=tokenizer.pad_token_id)
                             for w in whole])
    plain = dict(tokens=tokens, start=np.concatenate([b["answer_start"] + len(prefix) for b in ours]),
                 lens=np.concatenate([b["answer_len"] for b in ours]), pixels=np.concatenate([b["pixel_values"] for b in ours]))
    reference, _ = full_sequence_loss(model, records[:1], tokenizer)
    tx = optax.adamw(1e-3)

    def step_of(loss_fn):
        @jax.jit
        def step(params, opt_state, batch):
            loss, grads = jax.value_and_grad(lambda p: loss_fn(nnx.merge(graphdef, p), batch))(params)
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, loss
        return step

    steps = {"plain (before)": (step_of(lambda m, b: reference(m, b)), plain),
             "ours": (step_of(lambda m, b: warmstart.sft_loss(m, prefix, b, windows)), ours)}
    results = {}
    for name, (step, batch) in steps.items():
        opt_state = tx.init(params)
        compiled = step.lower(params, opt_state, batch).compile()
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        _, _, loss = step(params, opt_state, batch)
        times = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            jax.block_until_ready(step(params, opt_state, batch))
            times.append(time.perf_counter() - t)
        results[name] = (cost.get("flops", 0.0) / 1e9, statistics.median(times), float(loss))
        print(f"{name:>15}: {results[name][0]:6.2f} GFLOP/step  {results[name][1]:.3f} s/step  loss {results[name][2]:.6f}")
    (f0, t0, l0), (f1, t1, l1) = results.values()
    print(f"ratio: {f0 / f1:.2f}x fewer FLOPs, {t0 / t1:.2f}x faster per step; |loss difference| {abs(l0 - l1):.1e}")


if __name__ == "__main__":
    main()
