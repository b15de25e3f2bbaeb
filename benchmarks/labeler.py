"""Labeler claims/s: shared image prefix (ours) vs one full forward per question (the official way).

A LLaVA-shaped model of ~30M parameters (LM: hidden 512, 6 layers, MHA 8 heads, vocab 32000, tied
embeddings; vision: a cheap 2-layer CLIP tower on 96 px images with patch 4 → 576 image tokens), the
llava_v1 prompt, ~20-token questions, 10 responses × 5 claims = 50 questions per image. All three ways
are jitted, padded to the same length buckets and read only the answer position's logits:

* official: each question is its own full prompt, image included (vision tower run per question),
  batch 1 — as the official pipeline labels claims;
* batched full: all 50 full prompts of an image in one batch, image features computed once;
* shared prefix: ``Labeler.score`` (image + chat prefix prefilled once, questions in batches).

Every way is warmed up (compiled) on a separate image first. Run:

    python benchmarks/labeler.py [--images 4] [--baseline-images 1] [--batch-size 8] [--full-batch 50]
    python benchmarks/labeler.py --shape next   # the paper's labeler shape: LLaVA-NeXT's ~2,340 image
                                                # tokens (here 192 px / patch 4: 2,304) and 80 questions

Each ratio is printed beside its token-count limit: the tokens the official way runs (every question's
full prompt) over those the shared prefix runs (the prefix once plus every continuation). A ratio near
the limit means the shared prefix costs little beyond the tokens it must run.

Each ratio is also printed beside its FLOP-count limit: the FLOPs XLA counts in the compiled programs
(``cost_analysis``) of the official way (a full forward per question, padded to the prompts' bucket)
over those of the shared prefix (vision tower and prefix prefill once, then the question batches).
Question tokens attend over the whole image prefix, twice the keys of an average prompt token, so
this limit sits below the token-count one.

Prompt tokenization is inside the shared-prefix timing (``Labeler.score`` tokenizes) but done ahead of
time for both baselines, which favours the baselines.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import PreTrainedTokenizerFast  # noqa: E402

from rlaifv_jax.core import aot, sharding  # noqa: E402
from rlaifv_jax.data.chat import LLAVA_V1_SYSTEM, encode_prompt  # noqa: E402
from rlaifv_jax.data.chat import labeler_question  # noqa: E402
from rlaifv_jax.data.yesno import split_prompts  # noqa: E402
from rlaifv_jax.engine import score, vision  # noqa: E402
from rlaifv_jax.engine.score import ImageQuestions, Labeler, yes_no_probs  # noqa: E402
from rlaifv_jax.models.llava import Llava, LlavaConfig  # noqa: E402

VOCAB = 32000
IMAGE_TOKEN = VOCAB - 1


SHAPES = {  # name -> (image px, patch, responses, claims per response, rows per batched full forward)
    "v15": (96, 4, 10, 5, 50),  # LLaVA-1.5: 576 image tokens, 50 questions per image, all in one batch
    "next": (192, 4, 10, 8, 8),  # LLaVA-NeXT anyres: ~2,340 image tokens, 80 questions (the paper's labeler);
    # 80 full prompts of 2,400 tokens in one batch would need ~45 GB of attention scores
}


def build_model(image_size: int = 96, patch: int = 4) -> Llava:
    cfg = LlavaConfig.from_hf(dict(
        model_type="llava", image_token_index=IMAGE_TOKEN, vision_feature_layer=-2,
        vision_feature_select_strategy="default", tie_word_embeddings=True,
        text_config=dict(model_type="llama", vocab_size=VOCAB, hidden_size=512, intermediate_size=1024,
                         num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=8,
                         max_position_embeddings=2048),
        vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                           image_size=image_size, patch_size=patch)))
    return Llava(cfg, rngs=nnx.Rngs(0))


def build_tokenizer() -> PreTrainedTokenizerFast:
    words = sorted(set((LLAVA_V1_SYSTEM + " USER ASSISTANT Please answer yes Yes or no No Is there")
                       .replace(".", " ").replace(",", " ").replace("'", " ").split()))
    vocab = ["<unk>", "<s>", "</s>", ".", ",", "'", ":", "?", "\n"] + words
    vocab += [f"w{i}" for i in range(VOCAB - 1 - len(vocab))] + ["<image>"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens([AddedToken("<image>", special=True)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def make_images(rng, n_images, n_questions, question_words, image_size=96):
    items = []
    for _ in range(n_images):
        qs = []
        for _ in range(n_questions):
            n = int(rng.integers(question_words - 4, question_words + 5))
            qs.append("Is there " + " ".join(f"w{int(i)}" for i in rng.integers(100, 30000, n - 3)) + " ?")
        items.append(ImageQuestions(qs, rng.normal(size=(1, 3, image_size, image_size)).astype(np.float32)))
    return items


def full_forward_fn(model, answer_ids):
    """Jitted full forward of right-padded prompts ``ids [B, T]`` with the image's features merged."""
    graphdef, state = nnx.split(model)

    def run(state, px, ids, lengths, tile_features):
        m = nnx.merge(graphdef, state)
        feats = m.image_features(px)
        if tile_features:  # batched: one image's features for every row
            feats = jnp.tile(feats, (ids.shape[0], 1))
        x = m.embed(ids, feats)
        slots = jnp.arange(ids.shape[1])[None]
        key_mask = slots < lengths[:, None]
        hidden, _ = m.forward_embeds(x, positions=jnp.broadcast_to(slots, ids.shape), key_mask=key_mask)
        last = hidden[jnp.arange(ids.shape[0]), lengths - 1]
        return yes_no_probs(m.logits(last), answer_ids)

    jitted = jax.jit(run, static_argnums=4)
    forward = lambda *a: jitted(state, *a)  # noqa: E731
    forward.flops = lambda *a: jitted.lower(state, *a).compile().cost_analysis()["flops"]
    return forward


def shared_prefix_flops(model, labeler: Labeler, pixel_values, prefix_len: int, conts: list) -> float:
    """FLOPs of ``Labeler.score`` on one image, from its compiled programs: the vision tower and the
    prefix prefill once, then each question batch as the labeler cuts them (rows, padded length)."""
    mesh = sharding.serve_mesh()
    state = aot.sharded(nnx.state(model), mesh, sharding.SERVE_RULES)
    px = jax.ShapeDtypeStruct(np.shape(pixel_values), jnp.float32,
                              sharding=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    pb = score.round_up(prefix_len, labeler.prefix_multiple)
    flops = {}  # (rows, continuation bucket) -> FLOPs of its prefill and score programs, each shape lowered once
    total = vision.lower_features(model, state, px, mesh).cost_analysis()["flops"]
    for _, rows, cb in score.question_batches([len(c) for c in conts], labeler.batch_size,
                                              labeler.continuation_multiple):
        if (rows, cb) not in flops:
            programs = score.lower_programs(model, state, mesh, prefix_bucket=pb, rows=rows, continuation_bucket=cb,
                                            with_image=True, answer_ids=labeler.answer_ids)
            flops[rows, cb] = {k: programs[k].cost_analysis()["flops"] for k in ("prefill", "score")}
        total += flops[rows, cb]["score"]
    return total + next(iter(flops.values()))["prefill"]  # the prefix prefill runs once an image


def padded(prompts, length):
    ids = np.zeros((len(prompts), length), np.int32)
    for r, p in enumerate(prompts):
        ids[r, : len(p)] = p
    return jnp.asarray(ids), jnp.asarray([len(p) for p in prompts], jnp.int32)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=4, help="timed images for the shared prefix")
    ap.add_argument("--baseline-images", type=int, default=1, help="timed images for each baseline")
    ap.add_argument("--full-batch", type=int, default=0, help="rows per batched full forward (0: the shape's)")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="v15",
                    help="image tokens and questions per image (next: the paper's LLaVA-NeXT labeler shape)")
    ap.add_argument("--responses", type=int, default=0, help="responses per image (0: the shape's)")
    ap.add_argument("--claims", type=int, default=0, help="claims per response (0: the shape's)")
    ap.add_argument("--baseline-questions", type=int, default=0,
                    help="time both baselines on this many questions of each image (0: all; a full forward "
                         "costs the same for every question)")
    ap.add_argument("--question-words", type=int, default=20)
    ap.add_argument("--continuation-multiple", type=int, default=0,
                    help="question rows pad to a multiple of this many tokens (0: the labeler's default)")
    ap.add_argument("--batch-size", type=int, default=8,
                    help="labeler questions per batch (8 was faster than 16 or 32 on 2 CPU cores)")
    args = ap.parse_args(argv)
    image_size, patch, responses, claims, rows = SHAPES[args.shape]
    n_q = (args.responses or responses) * (args.claims or claims)

    model = build_model(image_size, patch)
    tok = build_tokenizer()
    params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    labeler = Labeler(model, tok, batch_size=args.batch_size,
                      **({"continuation_multiple": args.continuation_multiple} if args.continuation_multiple else {}))
    n_img = model.num_image_tokens()
    rng = np.random.default_rng(0)
    warm, *timed = make_images(rng, 1 + max(args.images, args.baseline_images), n_q, args.question_words,
                               image_size)
    full_batch = min(args.full_batch or rows, n_q)

    def prompts(item):
        return [encode_prompt(tok, labeler_question(q), n_img, image_token_id=IMAGE_TOKEN) for q in item.questions]

    all_prompts = [prompts(it) for it in [warm] + timed]
    t_len = -(-max(len(p) for ps in all_prompts for p in ps) // 16) * 16
    prefix, conts = split_prompts(tok, warm.questions, n_img, image_token_id=IMAGE_TOKEN)
    forward = full_forward_fn(model, labeler.answer_ids)

    baseline_questions = min(args.baseline_questions or n_q, n_q)

    def official(i, limit=None):
        out = []
        for p in all_prompts[i][:limit or baseline_questions]:
            ids, lens = padded([p], t_len)
            y, n = forward(jnp.asarray(([warm] + timed)[i].pixel_values), ids, lens, False)
            out.append((float(y[0]), float(n[0])))
        return out

    def batched(i, limit=None):
        out = []
        for start in range(0, baseline_questions, full_batch):
            rows = all_prompts[i][start: start + full_batch]
            rows += rows[-1:] * (full_batch - len(rows))  # pad the last batch: one program
            ids, lens = padded(rows, t_len)
            y, n = forward(jnp.asarray(([warm] + timed)[i].pixel_values), ids, lens, True)
            out += list(zip(np.asarray(y).tolist(), np.asarray(n).tolist()))
            if limit:
                break
        return out[:baseline_questions]

    def shared(i, limit=None):
        return labeler.score([([warm] + timed)[i]])[0]  # limit ignored: warm up every bucket

    results, rates = {}, {}
    for name, fn, n_images in [("official (full forward per question, batch 1)", official, args.baseline_images),
                               (f"batched full forwards ({full_batch} rows, features once)", batched,
                                args.baseline_images),
                               ("shared prefix (Labeler.score)", shared, args.images)]:
        t0 = time.perf_counter()
        fn(0, limit=1)  # warm-up: compiles (the labeler compiles all its buckets on a full image)
        compile_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        results[name] = [fn(i) for i in range(1, 1 + n_images)]
        seconds = time.perf_counter() - t0
        done = n_images * (n_q if fn is shared else baseline_questions)
        rates[name] = (done / seconds, seconds, done, compile_s)

    names = list(rates)
    ref = np.asarray(results[names[0]][0])
    diff = max(float(np.max(np.abs(np.asarray(results[n][0][:len(ref)]) - ref))) for n in names[1:])
    full_tokens = sum(map(len, all_prompts[0]))
    limit = full_tokens / (len(prefix) + sum(map(len, conts)))
    ours = rates[names[2]][0]
    ids, lens = padded(all_prompts[0][:1], t_len)
    flops_official = len(all_prompts[0]) * forward.flops(jnp.asarray(warm.pixel_values), ids, lens, False)
    flops_ours = shared_prefix_flops(model, labeler, warm.pixel_values, len(prefix), conts)
    print(f"command: python benchmarks/labeler.py {' '.join(sys.argv[1:] if argv is None else argv)}".rstrip())
    print(f"jax {jax.__version__} on {jax.devices()[0].platform} ({os.cpu_count()} CPUs); model {params / 1e6:.1f}M "
          f"params; {n_img} image tokens; prefix {len(prefix)} tokens; continuations "
          f"{min(map(len, conts))}-{max(map(len, conts))} tokens; full prompts padded to {t_len}; "
          f"{n_q} questions per image; labeler batch {args.batch_size}")
    print(f"{'way (claims/s ratio in one run)':<54}{'claims':>8}{'seconds':>9}{'claims/s':>10}"
          f"{'warm-up s':>11}{'ours is':>9}")
    for name in names:
        rate, seconds, claims, compile_s = rates[name]
        print(f"{name:<54}{claims:>8}{seconds:>9.2f}{rate:>10.1f}{compile_s:>11.2f}{ours / rate:>8.1f}x")
    print(f"token-count limit of shared prefix vs official: {limit:.1f}x ({full_tokens} tokens against "
          f"{len(prefix)} + {sum(map(len, conts))}); ours reaches {ours / rates[names[0]][0] / limit:.0%} of it")
    print(f"FLOP-count limit (XLA's count of the compiled programs): {flops_official / flops_ours:.1f}x "
          f"({flops_official / 1e9:.0f} GFLOP an image the official way against {flops_ours / 1e9:.0f}); ours reaches "
          f"{ours / rates[names[0]][0] / (flops_official / flops_ours):.0%} of it")
    print(f"max |p - p_official| on the first timed image: {diff:.2e}; labeler programs: {labeler.programs()}")


if __name__ == "__main__":
    main()
