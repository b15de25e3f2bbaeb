"""A tiny random Qwen2.5-VL checkpoint built in code (no hub): model, ChatML tokenizer with Qwen's
special tokens and chat template, and the image processor, for the engine and online-loop tests."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (PreTrainedTokenizerFast, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration,
                          Qwen2VLImageProcessorPil)

SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>")
WORDS = (["<unk>", "system", "user", "assistant", "You", "are", "a", "helpful", "assistant.", "describe", "the",
          "image", ".", "yes", "Yes", "no", "No", "Please", "answer", "or", "-"] + [f"w{i}" for i in range(60)])
VOCAB = {w: i for i, w in enumerate(WORDS + list(SPECIAL))}
IMAGE, START, END = VOCAB["<|image_pad|>"], VOCAB["<|vision_start|>"], VOCAB["<|vision_end|>"]
IM_END, EOS = VOCAB["<|im_end|>"], VOCAB["<|endoftext|>"]
# Qwen2.5-VL's chat template (default system message; string content as is, list content with
# {"type": "image"} rendered as <|vision_start|><|image_pad|><|vision_end|>).
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\n"
    "You are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n{% else %}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
TEXT = dict(vocab_size=len(VOCAB), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=2048, bos_token_id=None, eos_token_id=IM_END,
            pad_token_id=EOS, rope_parameters={"rope_type": "default", "mrope_section": [2, 1, 1], "rope_theta": 10000.0})
# 56 px windows (2 x 2 merged units), block 1 of 3 attends fully.
VISION = dict(depth=3, hidden_size=32, intermediate_size=48, num_heads=4, out_hidden_size=32, window_size=56,
              fullatt_block_indexes=[1])
MIN_PIXELS, MAX_PIXELS = 28 * 28 * 4, 28 * 28 * 40


def tokenizer(path=None) -> PreTrainedTokenizerFast:
    """WordLevel over ``WORDS`` (whitespace split) with Qwen's special tokens and chat template."""
    tok = Tokenizer(models.WordLevel(VOCAB, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", additional_special_tokens=list(SPECIAL[1:]))
    fast.chat_template = CHAT_TEMPLATE
    if path is not None:
        fast.save_pretrained(str(path))
    return fast


def processor(path=None) -> Qwen2VLImageProcessorPil:
    proc = Qwen2VLImageProcessorPil(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    if path is not None:
        proc.save_pretrained(str(path))
    return proc


def model(path, seed: int = 0, text: dict | None = None, **kw) -> Qwen2_5_VLForConditionalGeneration:
    """A random transformers Qwen2.5-VL saved to ``path`` (the root-level size fields set as well as
    the text-config ones; ``text`` overrides some) with tokenizer and image processor."""
    torch.manual_seed(seed)
    text = {**TEXT, **(text or {})}
    root = {k: v for k, v in text.items() if k != "rope_parameters"}
    cfg = Qwen2_5_VLConfig(text_config=text, vision_config=dict(VISION), image_token_id=IMAGE,
                           vision_start_token_id=START, vision_end_token_id=END, **root, **kw)
    ref = Qwen2_5_VLForConditionalGeneration(cfg).eval()
    ref.generation_config.pad_token_id = EOS
    ref.save_pretrained(str(path))
    tokenizer(path)
    processor(path)
    return ref


def image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A random RGB image ``[H, W, 3]`` uint8."""
    return np.random.RandomState(seed).randint(0, 255, (height, width, 3)).astype(np.uint8)


def encode(img: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(pixel_values, image_grid_thw)`` of the tiny processor."""
    out = processor()(images=Image.fromarray(img), return_tensors="np")
    return np.asarray(out["pixel_values"], np.float32), np.asarray(out["image_grid_thw"])


# ----------------------------------------------------------------------------- Qwen3-VL
# Two tiny layouts that differ in DeepStack blocks, position-table side, head_dim / M-RoPE sections,
# decoder depth and tied embeddings (patch 16, 2 x 2 merge: 32 px per image token side).
QWEN3 = {
    "a": dict(text=dict(num_hidden_layers=3, head_dim=16, rope_parameters={
                  "rope_type": "default", "mrope_section": [2, 3, 3], "mrope_interleaved": True, "rope_theta": 10000.0}),
              vision=dict(depth=3, num_position_embeddings=16, deepstack_visual_indexes=[0, 2]), tie=True),
    "b": dict(text=dict(num_hidden_layers=2, head_dim=8, rope_parameters={
                  "rope_type": "default", "mrope_section": [2, 1, 1], "mrope_interleaved": True, "rope_theta": 10000.0}),
              vision=dict(depth=4, num_position_embeddings=36, deepstack_visual_indexes=[1]), tie=False),
}
QWEN3_TEXT = dict(vocab_size=len(VOCAB), hidden_size=32, intermediate_size=64, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=2048, bos_token_id=None, eos_token_id=IM_END,
                  pad_token_id=EOS)
QWEN3_VISION = dict(hidden_size=32, intermediate_size=48, num_heads=4, out_hidden_size=32)
QWEN3_MIN_PIXELS, QWEN3_MAX_PIXELS = 32 * 32 * 4, 32 * 32 * 40


def processor3(path=None) -> Qwen2VLImageProcessorPil:
    """Qwen3-VL's image processor without torchvision (patch 16, merge 2, mean = std = 0.5)."""
    proc = Qwen2VLImageProcessorPil(patch_size=16, merge_size=2, image_mean=[0.5] * 3, image_std=[0.5] * 3,
                                    min_pixels=QWEN3_MIN_PIXELS, max_pixels=QWEN3_MAX_PIXELS)
    if path is not None:
        proc.save_pretrained(str(path))
    return proc


def model3(path, variant: str = "a", seed: int = 0, text: dict | None = None):
    """A random transformers Qwen3-VL of layout ``variant`` saved to ``path`` (the root-level size
    fields set as well as the text-config ones; ``text`` overrides some) with tokenizer and image processor."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration
    torch.manual_seed(seed)
    spec = QWEN3[variant]
    text = {**QWEN3_TEXT, **spec["text"], **(text or {})}
    root = {k: v for k, v in text.items() if k != "rope_parameters"}
    cfg = Qwen3VLConfig(text_config=text, vision_config={**QWEN3_VISION, **spec["vision"]}, image_token_id=IMAGE,
                        vision_start_token_id=START, vision_end_token_id=END, tie_word_embeddings=spec["tie"], **root)
    ref = Qwen3VLForConditionalGeneration(cfg).eval()
    ref.generation_config.pad_token_id = EOS
    ref.save_pretrained(str(path))
    tokenizer(path)
    processor3(path)
    return ref


def encode3(img: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(pixel_values, image_grid_thw)`` of the tiny Qwen3-VL processor."""
    out = processor3()(images=Image.fromarray(img), return_tensors="np")
    return np.asarray(out["pixel_values"], np.float32), np.asarray(out["image_grid_thw"])


def image_features(model, px: np.ndarray, grid: np.ndarray):
    """``model.image_features(px, grid)`` compiled as one program (``grid`` fixes the shapes): run op
    by op, every op of the tower compiles on its own."""
    from flax import nnx
    return nnx.jit(lambda m, p: m.image_features(p, grid))(model, px)


def cached_greedy(model, ids: np.ndarray, mask: np.ndarray, grid: np.ndarray, features, steps: int) -> list[int]:
    """``steps`` greedy tokens of one row through ``forward_embeds`` with a cache: prefill (image
    ``features`` in the embeddings) at the model's ``position_ids``, then decode plain text at ``real
    tokens before the slot + rope_deltas``, as transformers does."""
    import jax
    import jax.numpy as jnp
    from flax import nnx
    n = ids.shape[1]
    graphdef, state = nnx.split(model)

    @jax.jit
    def step(state, x, positions, key_mask, cache, index):
        m = nnx.merge(graphdef, state)
        hidden, cache = m.forward_embeds(x, positions=positions, key_mask=key_mask, cache=cache, cache_index=index)
        return jnp.argmax(m.logits(hidden[:, -1]), axis=-1), cache

    positions, deltas = model.position_ids(ids, mask, grid)
    key_mask = jnp.zeros((1, n + steps), bool).at[:, :n].set(True)
    cache = model.init_cache(1, n + steps)
    token, cache = step(state, model.embed(jnp.asarray(ids), features), positions, key_mask, cache, 0)
    tokens = [int(token[0])]
    for slot in range(n, n + steps - 1):
        key_mask = key_mask.at[:, slot].set(True)
        token, cache = step(state, model.embed(token[:, None]), jnp.asarray([[slot + deltas[0]]]), key_mask,
                            cache, slot)
        tokens.append(int(token[0]))
    return tokens


def prompt_ids(rng, grids, *, image: int, start: int, end: int, words: tuple[int, int], text=(5, 7, 4)) -> list[int]:
    """Random text ids in ``[words[0], words[1])``, then per image ``<|vision_start|>``, its merged image
    tokens (``prod(grid) / 4``) and ``<|vision_end|>``, each followed by more text (lengths from ``text``)."""
    ids = list(rng.randint(*words, text[0]))
    for i, g in enumerate(grids):
        ids += [start] + [image] * (int(np.prod(g)) // 4) + [end] + list(rng.randint(*words, text[1 + i % 2]))
    return ids


def left_padded(rows: list[list[int]], pad: int) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded ids (with ``pad``) and their mask."""
    width = max(map(len, rows))
    ids = np.array([[pad] * (width - len(r)) + r for r in rows])
    mask = np.array([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask
