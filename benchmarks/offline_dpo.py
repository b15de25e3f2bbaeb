"""Offline DPO throughput: fixed padding to max_length vs length buckets + the automatic answer window.

Same model, same pairs, same process. Every variant runs the real data path (``make_pair_dataset``
with ``pair_example_fn``: PNG decode + LLaVA preprocessing per pair, grain batching) and the real
``DPOStep``; each variant runs two epochs, the first compiles (programs counted), the second is timed.

Length distribution (RLAIF-V-Dataset-like, scaled by 1/4 for CPU): ``max_length`` 2048 → 512;
prompt = BOS + 8 text tokens + 576/4 = 144 image tokens + question ~ lognormal(median 12, σ 0.4);
answers ~ lognormal(median 100/4 = 25 tokens, σ 0.6), chosen and rejected drawn independently
(5-95%: ~9-67 tokens); pairs longer than ``max_length`` are left out (none at these settings).

Variants: ``fixed/full-head`` (every batch padded to max_length, LM head on every position: the old
default), ``fixed/window`` (the step's automatic answer window, now the default), ``buckets/window``
(the same batches, each cut to its length bucket; identical results), ``sorted/window`` (batches
sorted by length within windows of 16 batches, then bucketed).

    python benchmarks/offline_dpo.py [--pairs 64] [--batch 4]
    python benchmarks/offline_dpo.py --memory 200,2000     # peak RSS of the TFDS/grain data path
"""
from __future__ import annotations

import argparse
import io
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np
from PIL import Image

SCALE = 4
MAX_LENGTH = 2048 // SCALE
IMAGE_TOKENS = 576 // SCALE  # 96 px / 8 px patches = 12 x 12


def _png(rng, size=96) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def synthetic_pairs(n: int, vocab: int, image_token: int, seed: int = 0):
    """``PreferenceRecord``s with token features drawn from the distribution in the module docstring."""
    from rlaifv_jax.data.pairs import PreferenceRecord
    rng = np.random.default_rng(seed)
    records, too_long = [], 0
    image = _png(rng)
    while len(records) < n:
        question = max(2, int(rng.lognormal(np.log(12), 0.4)))
        prompt = np.asarray([1, *rng.integers(3, vocab - 2, 8), *[image_token] * IMAGE_TOKENS,
                             *rng.integers(3, vocab - 2, question)], np.int32)
        answers = [np.asarray([*rng.integers(3, vocab - 2, max(1, int(rng.lognormal(np.log(100 / SCALE), 0.6))) - 1), 2],
                              np.int32) for _ in range(2)]
        if len(prompt) + max(map(len, answers)) > MAX_LENGTH:
            too_long += 1
            continue
        records.append(PreferenceRecord("q", "c", "r", image, f"pair{len(records)}", features={
            "prompt_ids": prompt, "chosen_ids": answers[0], "rejected_ids": answers[1],
            "ref_chosen_logps": np.float32(-3.0 * len(answers[0])), "ref_rejected_logps": np.float32(-3.0 * len(answers[1]))}))
    return records, too_long


def model_dir(args) -> str:
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration
    torch.manual_seed(0)
    text = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3,
                       num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                       num_key_value_heads=args.hidden // 64, max_position_embeddings=MAX_LENGTH,
                       bos_token_id=1, eos_token_id=2, pad_token_id=0)
    vision = CLIPVisionConfig(hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                              image_size=96, patch_size=8)
    path = tempfile.mkdtemp()
    LlavaForConditionalGeneration(LlavaConfig(text_config=text, vision_config=vision,
                                              image_token_index=args.vocab - 1)).save_pretrained(path)
    return path


def throughput(args) -> None:
    import jax
    from flax import nnx

    from rlaifv_jax.data import buckets
    from rlaifv_jax.data.chat import llava_image_preprocess
    from rlaifv_jax.data.pairs import make_iterator, make_pair_dataset, pair_example_fn, pair_lengths
    from rlaifv_jax.models import hf
    from rlaifv_jax.training import step as step_lib

    model = hf.load_pretrained(model_dir(args))
    n_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    records, too_long = synthetic_pairs(args.pairs, args.vocab, args.vocab - 1)
    lengths = pair_lengths(records)
    pad = pair_example_fn(lambda im: llava_image_preprocess(im, size=96), max_length=MAX_LENGTH, pad_id=0)

    def example_fn(record):
        return pad(record) | {k: record.features[k] for k in ("ref_chosen_logps", "ref_rejected_logps")}

    grid = buckets.length_buckets(MAX_LENGTH)
    variants = {
        "fixed/full-head": (dict(), step_lib.LossSettings(answer_window=MAX_LENGTH - 1)),
        "fixed/window": (dict(), step_lib.LossSettings()),
        "buckets/window": (dict(buckets=grid), step_lib.LossSettings()),
        "sorted/window": (dict(buckets=grid, sort_window=16), step_lib.LossSettings()),
    }
    opt = step_lib.OptimSettings(learning_rate=1e-5, total_steps=1000, warmup_ratio=0.0)
    runs = {}
    for name, (data_kw, loss) in variants.items():  # epoch 1: data path + every compile
        ds = make_pair_dataset(records, example_fn=example_fn, batch_size=args.batch, seed=0, shard_index=0,
                               shard_count=1, **data_kw)
        t0 = time.perf_counter()
        batches = list(make_iterator(ds))
        dpo = step_lib.DPOStep(model, opt, loss)
        state = dpo.init_state(0)
        for batch in batches:
            state, metrics = dpo(state, batch)
        jax.block_until_ready(metrics["loss"])
        runs[name] = {"dpo": dpo, "state": state, "batches": batches, "first_s": time.perf_counter() - t0,
                      "seconds": 0.0, "width": np.mean([b["chosen_tokens"].shape[1] for b in batches])}
    steps = len(runs["fixed/full-head"]["batches"])
    for i in range(steps):  # epoch 2, timed; steps interleaved across variants so machine load hits all alike
        for run in runs.values():
            t0 = time.perf_counter()
            run["state"], metrics = run["dpo"](run["state"], run["batches"][i])
            jax.block_until_ready(metrics["loss"])
            run["seconds"] += time.perf_counter() - t0

    print(f"\nOffline DPO, LLaVA-shaped model {n_params / 1e6:.1f}M params (LM {args.layers}x{args.hidden}, "
          f"vocab {args.vocab}, {IMAGE_TOKENS} image tokens), {len(records)} pairs, batch {args.batch}, "
          f"max_length {MAX_LENGTH}, float32, {os.cpu_count()} CPU cores; timed: the second epoch's steps")
    print(f"pair lengths (prompt + longer answer): median {np.median(lengths):.0f}, p90 {np.percentile(lengths, 90):.0f}, "
          f"max {lengths.max()}; too long: {too_long}")
    base = steps * args.batch / runs["fixed/full-head"]["seconds"]
    print(f"{'variant':<18}{'pairs/s':>9}{'vs fixed':>10}{'padded len':>12}{'compiles':>10}{'epoch 1 s':>11}")
    for name, run in runs.items():
        pps = steps * args.batch / run["seconds"]
        print(f"{name:<18}{pps:>9.2f}{pps / base:>9.2f}x{run['width']:>12.0f}{run['dpo'].compiles:>10}"
              f"{run['first_s']:>11.1f}")


# ----------------------------------------------------------------------------- memory
def _memory_child(n: int, work: str, mode: str) -> dict:
    """One process: build (mode=build) or read + batch one epoch (tfds / parquet); peak RSS in MiB."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from rlaifv_jax.data import buckets, rlaifv_tfds
    from rlaifv_jax.data.chat import llava_image_preprocess
    from rlaifv_jax.data.pairs import (make_iterator, make_pair_dataset, pair_example_fn, pair_text_fn,
                                       tokenize_records)
    from rlaifv_jax.data.rlaifv_dataset import read_rlaifv
    words = "a the red blue cat dog is on in of image what ? describe".split()
    shards = os.path.join(work, f"shards{n}")
    if mode == "build":
        rng = np.random.default_rng(n)
        os.makedirs(shards, exist_ok=True)
        for s in range(0, n, 500):
            rows = [{"ds_name": "bench", "image": {"bytes": _png(rng, 128), "path": None},
                     "question": "describe the image ?", "origin_dataset": "bench", "origin_split": "{}",
                     "idx": i, "image_path": None,
                     "chosen": " ".join(rng.choice(words, max(1, int(rng.lognormal(np.log(25), 0.6))))),
                     "rejected": " ".join(rng.choice(words, max(1, int(rng.lognormal(np.log(25), 0.6)))))}
                    for i in range(s, min(s + 500, n))]
            pq.write_table(pa.Table.from_pylist(rows), os.path.join(shards, f"part-{s:06d}.parquet"))
        rlaifv_tfds.prepare(shards, os.path.join(work, "tfds"), config=f"n{n}")
        return {}
    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", "<image>", "<pad>", *words, "USER", "ASSISTANT", ":"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                        pad_token="<pad>")
    text_fn = pair_text_fn(tokenizer, image_token_count=IMAGE_TOKENS, image_token_id=3, max_length=MAX_LENGTH)
    if mode == "tfds":
        records = rlaifv_tfds.load_split(os.path.join(work, "tfds"), "train", config=f"n{n}")
        pairs, _ = tokenize_records(records, text_fn, num_threads=2, verbose=False)
    else:
        pairs, _ = read_rlaifv(shards, text_fn=text_fn, verbose=False)
    example_fn = pair_example_fn(lambda im: llava_image_preprocess(im, size=96), max_length=MAX_LENGTH, pad_id=4)
    ds = make_pair_dataset(pairs, example_fn=example_fn, batch_size=8, seed=0, shard_index=0, shard_count=1,
                           buckets=buckets.length_buckets(MAX_LENGTH), sort_window=16)
    for _ in make_iterator(ds):
        pass
    return {"pairs": len(pairs), "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def memory(sizes: list[int]) -> None:
    work = tempfile.mkdtemp()
    out = {}
    for n in sizes:
        for mode in ("build", "tfds", "parquet"):
            res = subprocess.run([sys.executable, __file__, "--memory-child", f"{n},{work},{mode}"],
                                 capture_output=True, text=True, check=True)
            out[(n, mode)] = json.loads(res.stdout.strip().splitlines()[-1])
    print("\nPeak host RSS of reading + batching one epoch (fresh process each; 128 px PNG images, "
          "buckets + sort window; tokenization in grain threads)")
    print(f"{'rows':>6}{'pairs':>7}{'TFDS+grain MiB':>16}{'parquet reader MiB':>20}")
    for n in sizes:
        t, p = out[(n, "tfds")], out[(n, "parquet")]
        print(f"{n:>6}{t['pairs']:>7}{t['peak_rss_mib']:>16.0f}{p['peak_rss_mib']:>20.0f}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=64)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=2000)
    ap.add_argument("--memory", type=str, default="", help="comma-separated row counts, e.g. 200,2000")
    ap.add_argument("--memory-child", type=str, default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_child:
        n, work, mode = args.memory_child.split(",")
        print(json.dumps(_memory_child(int(n), work, mode)))
    elif args.memory:
        memory([int(x) for x in args.memory.split(",")])
    else:
        throughput(args)


if __name__ == "__main__":
    main()
