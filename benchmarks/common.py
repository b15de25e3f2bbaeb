"""The LLaVA-shaped ~30M-parameter benchmark model (transformers reference + ours) and its prompts."""
from __future__ import annotations

import os
import statistics
import time
from typing import Callable

import numpy as np
import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from rlaifv_jax.models import hf

IMAGE_TOKEN = 31999
TEXT = dict(vocab_size=32000, hidden_size=512, intermediate_size=1024, num_hidden_layers=6,
            num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=2048,
            bos_token_id=1, eos_token_id=2, pad_token_id=0)
# 96 px / 4 px patches = 24 x 24 = 576 image tokens (CLS dropped), like CLIP-L/14 at 336 px.
VISION = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
              image_size=96, patch_size=4)


def build(path: str):
    """Save a random LLaVA-shaped model to ``path``; return (transformers model, our model, #params)."""
    torch.manual_seed(0)
    cfg = LlavaConfig(text_config=LlamaConfig(**TEXT), vision_config=CLIPVisionConfig(**VISION),
                      image_token_index=IMAGE_TOKEN, tie_word_embeddings=True)
    ref = LlavaForConditionalGeneration(cfg).eval()
    ref.save_pretrained(path)
    return ref, hf.load_pretrained(path), sum(p.numel() for p in ref.parameters())


def prompt(rng: np.random.RandomState, text_tokens: int = 30) -> dict:
    """BOS, a few text tokens, 576 image tokens, the rest of the text (``llava_v1``-like layout)."""
    text = rng.randint(3, 31000, text_tokens).tolist()
    ids = [1] + text[:8] + [IMAGE_TOKEN] * 576 + text[8:]
    return {"input_ids": ids, "pixel_values": rng.randn(1, 3, 96, 96).astype(np.float32)}


def median_times(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median wall time of each function over ``repeats`` rounds; rounds interleave the functions so
    that load from other processes on a shared machine hits them alike."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def threads() -> str:
    return f"torch threads {torch.get_num_threads()} (default), XLA CPU: all {os.cpu_count()} cores"
