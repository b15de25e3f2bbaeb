"""A local chat LLM as the judge, in place of the official scorers' OpenAI models.

The judge answers text prompts greedily through the shared sampler (``engine.generate``). Each
prompt is sent as one user message through the tokenizer's chat template (a tokenizer without one
gets the ``llava_v1`` text format); the official Object HalBench scorer sends its extraction prompt
as a system message instead, which many local chat templates do not accept on its own.
"""
from __future__ import annotations

import logging

from rlaifv_jax.data import chat
from rlaifv_jax.engine import generate
from rlaifv_jax.eval.policy import load_tokenizer
from rlaifv_jax.models import hf


class Judge:
    """``judge(prompts) → replies`` with a local Hugging Face model directory."""

    def __init__(self, path: str, *, dtype: str = "bfloat16", max_new_tokens: int = 512, batch_size: int = 8,
                 progress: bool = True):
        self.path = path
        self.model = hf.load_pretrained(path, dtype=hf.parse_dtype(dtype))
        self.tokenizer = load_tokenizer(path)
        self.template = "chat" if getattr(self.tokenizer, "chat_template", None) else "llava_v1"
        if self.template == "llava_v1":
            logging.warning("judge %s: the tokenizer has no chat template; using the llava_v1 text format", path)
        stops = {chat.end_of_turn_id(self.tokenizer, self.template)}
        if self.tokenizer.eos_token_id is not None:
            stops.add(int(self.tokenizer.eos_token_id))
        self.stop_ids = sorted(stops)
        self.max_new_tokens, self.batch_size, self.progress = max_new_tokens, batch_size, progress

    def settings(self) -> dict:
        """What OUT.json records about this judge."""
        return {"kind": "local", "path": self.path, "template": self.template, "max_new_tokens": self.max_new_tokens}

    def encode(self, prompt: str) -> list[int]:
        """Prompt ids: the text as one user turn. Unlike ``chat.encode_prompt``, a literal ``<image>``
        in the text (the extraction prompt has one) stays text: the judge sees no image."""
        if self.template == "chat":
            text, ids = chat.chat_template_prompt(self.tokenizer, prompt), []
        else:
            bos = self.tokenizer.bos_token_id
            text, ids = chat.llava_v1_prompt(prompt, with_image=False), ([] if bos is None else [int(bos)])
        return ids + list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def __call__(self, prompts: list[str]) -> list[str]:
        batch = [{"id": i, "input_ids": self.encode(p)} for i, p in enumerate(prompts)]
        outs = generate.generate(self.model, batch, max_new_tokens=self.max_new_tokens, stop_token_ids=self.stop_ids,
                                 batch_size=self.batch_size, progress=self.progress)
        return [self.tokenizer.decode(o["tokens"][0], skip_special_tokens=True).strip() for o in outs]
