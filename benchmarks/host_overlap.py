"""Does the device wait on Python? A sampling stage's chunks with real host work, run serially
(each chunk's images decoded and preprocessed, then sampled) against ``records.Prefetched`` (the
next chunk's host work on a helper thread while the current one samples), same records, one run.

Host work per prompt, as a LLaVA-1.5 run does it: decode a 640×480 JPEG (PIL), resize, crop and
normalize it to 336 px with transformers' ``CLIPImageProcessor``. The model is LLaVA-shaped with
the real image side (336 px, 14 px patches: 576 image tokens, ~610-token prompts) but a tiny LM
(2 layers, 64 wide, 32,000-token vocabulary), so that the device's share is small, as on an
accelerator, where a 7B model decodes a chunk in seconds while the host's work stays what it is.
Device work: ``engine.generate``, n = 10 samples × ``--new-tokens`` tokens (plain sampling) per
prompt, ``--chunk`` prompts per chunk. Reported: wall seconds, device seconds
(``core.device_time``) and the device idle fraction of each way; the tokens must be identical. Run:

    python -m benchmarks.host_overlap [--prompts 64] [--chunk 8] [--new-tokens 16] [--repeats 3]
"""
from __future__ import annotations

import argparse
import io
import os
import statistics
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402
import torch  # noqa: E402
from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,  # noqa: E402
                          LlavaForConditionalGeneration)

from benchmarks import common  # noqa: E402
from rlaifv_jax.core import device_time, records  # noqa: E402
from rlaifv_jax.engine import generate  # noqa: E402
from rlaifv_jax.models import hf  # noqa: E402

N, SIDE = 10, 336


def build(path: str):
    """A random LLaVA with a 336 px / 14 px tower and a tiny LM, saved to ``path``; (our model, #params)."""
    torch.manual_seed(0)
    text = LlamaConfig(**{**common.TEXT, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                          "num_attention_heads": 4, "num_key_value_heads": 4})
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                              image_size=SIDE, patch_size=14)
    ref = LlavaForConditionalGeneration(LlavaConfig(text_config=text, vision_config=vision,
                                                    image_token_index=common.IMAGE_TOKEN)).eval()
    ref.save_pretrained(path)
    return hf.load_pretrained(path), sum(p.numel() for p in ref.parameters())


def jpegs(count: int, rng: np.random.RandomState) -> list[bytes]:
    """``count`` 640×480 JPEG files (smooth random images, as photos compress)."""
    out = []
    for _ in range(count):
        small = rng.randint(0, 256, (30, 40, 3), np.uint8)
        buf = io.BytesIO()
        Image.fromarray(small).resize((640, 480), Image.BILINEAR).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--chunk", type=int, default=8, help="prompts per chunk (one sampler batch)")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model, n_params = build(tmp)
    rng = np.random.RandomState(0)
    files = jpegs(args.prompts, rng)
    ids = [common.prompt(rng)["input_ids"] for _ in range(args.prompts)]
    inputs = [{"key": f"p{i:04d}", "jpeg": files[i], "input_ids": ids[i], "id": i} for i in range(args.prompts)]
    processor = CLIPImageProcessor(size={"shortest_edge": SIDE}, crop_size={"height": SIDE, "width": SIDE})
    kw = dict(num_samples=N, max_new_tokens=args.new_tokens, temperature=1.0, stop_token_ids=[2],
              batch_size=args.chunk, progress=False)

    def prepare(chunk):  # host work: decode, resize, normalize
        out = []
        for x in chunk:
            image = np.asarray(Image.open(io.BytesIO(x["jpeg"])).convert("RGB"))
            pixels = processor(images=image, return_tensors="np")["pixel_values"]
            out.append({"id": x["id"], "input_ids": x["input_ids"], "pixel_values": pixels})
        return out

    def run_chunk(prepared):
        return [{"tokens": o["tokens"]} for o in generate.generate(model, prepared, **kw)]

    ways = {"serial": lambda c: run_chunk(prepare(c)), "prefetched": records.Prefetched(prepare, run_chunk)}
    run_chunk(prepare(inputs[:args.chunk]))  # compile
    t = time.perf_counter()
    for _ in range(3):
        prepare(inputs[:args.chunk])
    host = (time.perf_counter() - t) / 3
    results: dict[str, list[tuple[float, float]]] = {w: [] for w in ways}
    made = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for name, fn in ways.items():
                stage = os.path.join(tmp, f"{name}{r}")
                dev0 = device_time.seconds()
                t = time.perf_counter()
                records.run_stage(stage, inputs, fn, key_fn=lambda x: x["key"], chunk_size=args.chunk, progress=False)
                results[name].append((time.perf_counter() - t, device_time.seconds() - dev0))
                made[name] = [rec["tokens"] for rec in records.read_stage(stage)]
    assert made["serial"] == made["prefetched"], "the two ways sampled different tokens"
    print(f"LLaVA-shaped model (336 px tower, tiny LM), {n_params / 1e6:.1f}M params; {args.prompts} prompts in "
          f"chunks of {args.chunk}, {N} samples x {args.new_tokens} new tokens; host work {host * 1e3:.0f} ms per "
          f"chunk (640x480 JPEG decode + CLIPImageProcessor to 336 px); median of {args.repeats}; {common.threads()}")
    print("| chunks | wall s | device s | device idle | wall ratio |")
    print("|---|---|---|---|---|")
    base = statistics.median(w for w, _ in results["serial"])
    for name, runs in results.items():
        wall = statistics.median(w for w, _ in runs)
        dev = statistics.median(d for _, d in runs)
        print(f"| {name} | {wall:.2f} | {dev:.2f} | {100 * device_time.idle_fraction(dev, wall):.1f} % | "
              f"{base / wall:.2f}x |")


if __name__ == "__main__":
    main()
