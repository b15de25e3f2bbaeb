"""Tiny random transformers checkpoints built in code (no hub), shared by the parity tests."""
from __future__ import annotations

import torch
from transformers import (CLIPVisionConfig, LlamaConfig, LlamaForCausalLM, LlavaConfig,
                          LlavaForConditionalGeneration, LlavaNextConfig,
                          LlavaNextForConditionalGeneration)

VOCAB = 97
IMAGE_TOKEN = 96
PINPOINTS = [[28, 28], [28, 56], [56, 28], [56, 56]]


def text_config(**kw) -> LlamaConfig:
    base = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                bos_token_id=1, eos_token_id=2, pad_token_id=0)
    base.update(kw)
    return LlamaConfig(**base)


def vision_config(**kw) -> CLIPVisionConfig:
    base = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                image_size=28, patch_size=14)
    base.update(kw)
    return CLIPVisionConfig(**base)


def save(model, path: str):
    """Save ``model`` (eval mode) to ``path`` and return it."""
    model = model.eval()
    model.save_pretrained(str(path))
    return model


def llama(path, seed: int = 0, **kw) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return save(LlamaForCausalLM(text_config(**kw)), path)


def llava(path, seed: int = 0, text=None, vision=None, **kw) -> LlavaForConditionalGeneration:
    torch.manual_seed(seed)
    cfg = LlavaConfig(text_config=text_config(**(text or {})), vision_config=vision_config(**(vision or {})),
                      image_token_index=IMAGE_TOKEN, **kw)
    return save(LlavaForConditionalGeneration(cfg), path)


def llava_next(path, seed: int = 0, text=None, vision=None, **kw) -> LlavaNextForConditionalGeneration:
    torch.manual_seed(seed)
    cfg = LlavaNextConfig(text_config=text_config(**(text or {})), vision_config=vision_config(**(vision or {})),
                          image_token_index=IMAGE_TOKEN, image_grid_pinpoints=PINPOINTS, **kw)
    return save(LlavaNextForConditionalGeneration(cfg), path)


WORDS = (["<pad>", "<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(75)]
         + ["describe", "the", "image", "USER:", "ASSISTANT:", "yes", "Yes", "no", "No", "Please", "answer", "or", "."])


def word_level(vocab: dict[str, int], unk: str, pre_tokenizer=None, specials=(), **tokens):
    """The tests' one word-level fast tokenizer builder: ``vocab`` word -> id, unknown words -> ``unk``,
    split by ``pre_tokenizer`` (default: whitespace and punctuation), ``specials`` added as special
    tokens, ``tokens`` (bos_token=, eos_token=, pad_token=) passed to ``PreTrainedTokenizerFast``."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.WordLevel(vocab, unk_token=unk))
    tok.pre_tokenizer = pre_tokenizer or pre_tokenizers.Whitespace()
    if specials:
        tok.add_special_tokens([AddedToken(t, special=True) for t in specials])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=unk, **tokens)


def word_tokenizer(path, words=WORDS, image_token: int | None = IMAGE_TOKEN):
    """A word-level fast tokenizer saved to ``path``: ``words`` in order (the first four are pad, bos,
    eos, unk), ``<image>`` at ``image_token`` (None: no image token), a one-line chat template."""
    from tokenizers import pre_tokenizers
    vocab = {w: i for i, w in enumerate(words)}
    if image_token is not None:
        vocab["<image>"] = image_token
    fast = word_level(vocab, "<unk>", pre_tokenizers.WhitespaceSplit(), bos_token="<s>", eos_token="</s>",
                      pad_token="<pad>")
    fast.chat_template = "{% for m in messages %}USER: {{ m['content'] }} {% endfor %}ASSISTANT:"
    fast.save_pretrained(str(path))
