"""Forward pass and sampler of Qwen2.5-VL and Qwen3-VL: ours (jitted) vs transformers (``torch.no_grad``,
eval), same weights, same CPU, one run.

Models: a Qwen2.5-VL-shaped 48M-parameter model (text: 6 layers of width 512, GQA 8/4 heads,
M-RoPE sections 8/12/12; vision: 4 blocks of width 128, block 3 full attention, the others 112 px
windows, real patch 14 / merge 2). Input: one 448x672 px image (32x48 patches = 384 image tokens,
24 windows: exactly a bucket) in a 420-token ChatML-like sequence. A Qwen3-VL-shaped model of the same
widths (text: q/k RMSNorm, head_dim 64, interleaved M-RoPE 8/12/12; vision: 4 full-attention blocks,
a 48x48 learned position table, DeepStack from blocks 1-3 into decoder layers 0-2, real patch 16 /
merge 2); input: one 448x672 px image (28x42 patches = 294 image tokens) in a 330-token sequence.
Output: logits for every position, vision tower included on both sides. Our timed call includes the host-side work
(``vision_inputs`` layout, ``position_ids``); the program is compiled first.

Sampler: ``engine.generate`` (one prefill, the n samples decode in one jitted ``while_loop`` over the
shared prefix cache, host-side M-RoPE positions) vs transformers ``generate``, the same prompt:
greedy (tokens compared: they must be identical) and RLAIF-V sampling (n = 10, temperature 0.7,
top-k 50, ``num_return_sequences=10``), ``--new`` tokens each (transformers forced by
``min_new_tokens``; ours counts the tokens it produced). Ours is compiled on a warm-up call. Run:

    python -m benchmarks.qwen_forward [--repeats 5] [--new 64] [--family both|qwen2_5|qwen3]
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
from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen3VLConfig,  # noqa: E402
                          Qwen3VLForConditionalGeneration)

from benchmarks import common  # noqa: E402
from rlaifv_jax.engine import generate  # noqa: E402
from rlaifv_jax.models import hf, qwen_vision  # noqa: E402

IMAGE, START, END = 31999, 31997, 31998
TEXT = dict(vocab_size=32000, hidden_size=512, intermediate_size=1024, num_hidden_layers=6,
            num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=4096,
            rope_parameters={"rope_type": "default", "mrope_section": [8, 12, 12], "rope_theta": 1e6})
VISION = dict(depth=4, hidden_size=128, intermediate_size=256, num_heads=4, out_hidden_size=512,
              window_size=112, fullatt_block_indexes=[3])
TEXT3 = dict(TEXT, head_dim=64, rope_parameters={"rope_type": "default", "mrope_section": [8, 12, 12],
                                                  "mrope_interleaved": True, "rope_theta": 5e6})
VISION3 = dict(depth=4, hidden_size=128, intermediate_size=256, num_heads=4, out_hidden_size=512,
               num_position_embeddings=2304, deepstack_visual_indexes=[1, 2, 3])
# family: (config class, model class, text, vision, patch grid of a 448x672 px image)
FAMILIES = {"qwen2_5": ("Qwen2.5-VL", Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, TEXT, VISION, (1, 32, 48)),
            "qwen3": ("Qwen3-VL", Qwen3VLConfig, Qwen3VLForConditionalGeneration, TEXT3, VISION3, (1, 28, 42))}
N, TEMPERATURE, TOP_K = 10, 0.7, 50


def build(path: str, family: str):
    """Save a random model of ``family`` to ``path``; return (transformers model, ours, #params)."""
    _, config_cls, model_cls, text, vision, _ = FAMILIES[family]
    torch.manual_seed(0)
    root = {k: v for k, v in text.items() if k != "rope_parameters"}
    cfg = config_cls(text_config=dict(text), vision_config=dict(vision), image_token_id=IMAGE,
                     vision_start_token_id=START, vision_end_token_id=END, **root)
    ref = model_cls(cfg).eval()
    ref.save_pretrained(path)
    return ref, hf.load_pretrained(path), sum(p.numel() for p in ref.parameters())


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--new", type=int, default=64, help="new tokens per sample")
    parser.add_argument("--family", choices=("both",) + tuple(FAMILIES), default="both")
    args = parser.parse_args()
    for family in FAMILIES if args.family == "both" else (args.family,):
        run(family, args)


def run(family: str, args):
    """Forward and sampler of one family, ours vs transformers."""
    name, *_, shape = FAMILIES[family]
    with tempfile.TemporaryDirectory() as tmp:
        ref, ours, n_params = build(tmp, family)
    rng = np.random.RandomState(0)
    n_img = int(np.prod(shape)) // 4
    text = rng.randint(3, 31000, 34).tolist()
    ids = np.asarray([text[:12] + [START] + [IMAGE] * n_img + [END] + text[12:]])
    grid = np.asarray([shape])
    px = rng.randn(int(np.prod(shape)), ours.config.vision.patch_dim).astype(np.float32)
    graphdef, state = nnx.split(ours)
    forward = jax.jit(lambda s, i, inputs, pos: nnx.merge(graphdef, s)(i, pixel_values=inputs, positions=pos))

    def run_ours():
        positions, _ = ours.position_ids(ids, None, grid)
        return forward(state, jnp.asarray(ids), ours.vision_inputs(px, grid), positions).block_until_ready()

    t = torch.tensor
    kw = dict(input_ids=t(ids), pixel_values=t(px), image_grid_thw=t(grid),
              mm_token_type_ids=t((ids == IMAGE).astype(np.int64)))

    def run_hf():
        with torch.no_grad():
            return ref(**kw).logits

    diff = float(np.max(np.abs(np.asarray(run_ours()) - run_hf().numpy())))  # also compiles ours
    times = common.median_times({"ours": run_ours, "hf": run_hf}, args.repeats)
    t_ours, t_hf = times["ours"], times["hf"]
    windows = (f", {qwen_vision.num_windows(grid, ours.config.vision)} windows"
               if ours.config.vision.window_units else ", full attention")
    print(f"\n{name}-shaped model, {n_params / 1e6:.1f}M params, batch 1 x {ids.shape[1]} tokens ({n_img} image"
          f"{windows}), median of {args.repeats}; {common.threads()}; max |logit diff| {diff:.1e}")
    print("| forward | ms | ratio |")
    print("|---|---|---|")
    print(f"| transformers (no_grad, eval, {ref.config._attn_implementation}) | {t_hf * 1e3:.1f} | 1.00 |")
    print(f"| rlaifv_jax (jit) | {t_ours * 1e3:.1f} | {t_hf / t_ours:.2f} |")
    sampler(ref, ours, ids, px, grid, kw, args)


def sampler(ref, ours, ids, px, grid, hf_inputs, args):
    """Greedy and n-sample decoding, ours vs transformers ``generate`` (see the module docstring)."""
    prompt = [{"id": 0, "input_ids": ids[0].tolist(), "pixel_values": px, "image_grid_thw": grid}]
    new, rows = args.new, {}
    for name, n, sample in (("greedy", 1, {}), (f"{N} samples", N, dict(temperature=TEMPERATURE, top_k=TOP_K))):
        kw = dict(num_samples=n, max_new_tokens=new, stop_token_ids=[END], progress=False, **sample)
        generate.generate(ours, prompt, **kw)  # compile
        made = []

        def run_ours():
            out = generate.generate(ours, prompt, seed=len(made), **kw)
            made.append(out[0]["tokens"])

        def run_hf():
            with torch.no_grad():
                hf_kw = dict(do_sample=True, num_return_sequences=n, **sample) if sample else dict(do_sample=False)
                return ref.generate(**hf_inputs, max_new_tokens=new, min_new_tokens=new, pad_token_id=0, **hf_kw)

        times = common.median_times({"ours": run_ours, "hf": run_hf}, args.repeats)
        if not sample:  # greedy: the same tokens
            want = run_hf()[0, ids.shape[1]:].tolist()
            assert made[-1][0] == want[:len(made[-1][0])], (made[-1][0], want)
        rows[name] = (times["hf"], n * new / times["hf"], times["ours"],
                      float(np.median([sum(map(len, m)) for m in made])) / times["ours"])
    print(f"\nsampler: the same prompt, {new} new tokens per sample, median of {args.repeats}; greedy tokens identical; "
          f"compiled {generate.compiled_programs()}")
    print("| decoding | transformers s | tokens/s | rlaifv_jax s | tokens/s | ratio |")
    print("|---|---|---|---|---|---|")
    for name, (t_hf, hf_tps, t_ours, ours_tps) in rows.items():
        print(f"| {name} | {t_hf:.2f} | {hf_tps:.0f} | {t_ours:.2f} | {ours_tps:.0f} | {ours_tps / hf_tps:.2f} |")


if __name__ == "__main__":
    main()
