"""Answering benchmark questions with a local model through the shared engine.

``Policy`` loads a Hugging Face multimodal directory (LLaVA-1.5, LLaVA-NeXT or Qwen2.5-VL: weights
with ``models.hf.load_pretrained``, its tokenizer, its image preprocessing), turns questions into
sampler prompts (``data.chat.encode_prompt``; ``llava_v1`` by default, the tokenizer's chat template
for Qwen2.5-VL) and answers them greedily (``engine.generate``) or by beam search (``engine.beam``),
in chunks so that only a chunk's images are decoded at a time. ``best_of_n`` samples N answers per
question and keeps the one with the highest reward: ``ImplicitReward`` (``engine.reward``, against a
reference model) or any other ``Reward`` (the claim-verification reward is
``feedback.claim_reward.ClaimReward``).
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from rlaifv_jax.data import chat, prompts as prompts_lib
from rlaifv_jax.engine import beam, generate, reward, vision
from rlaifv_jax.eval.questions import Question, load_image
from rlaifv_jax.models import hf


def load_tokenizer(path: str):
    """The checkpoint's own tokenizer, never downloaded."""
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot load its tokenizer ({str(e).splitlines()[0]})") from None


class Policy:
    """A multimodal model that answers benchmark questions."""

    def __init__(self, path: str, *, dtype: str = "bfloat16", template: str | None = None):
        """``template``: ``llava_v1`` or ``chat``; None picks ``chat`` for Qwen2.5-VL, else ``llava_v1``."""
        if template is not None and template not in chat.TEMPLATES:
            raise ValueError(f"template must be one of {chat.TEMPLATES}, got {template!r}")
        architecture, _ = hf.read_config(path)
        self.path = path
        self.model = hf.load_pretrained(path, dtype=hf.parse_dtype(dtype))
        if not hasattr(self.model, "image_features"):
            raise ValueError(f"{path}: {architecture} is text-only; the suites need a multimodal model")
        self.template = template or ("chat" if vision.uses_mrope(self.model) else "llava_v1")
        self.tokenizer = load_tokenizer(path)
        self.encode_image = prompts_lib.hf_image_encoder(path, architecture)

    def stop_ids(self) -> list[int]:
        """The end-of-turn token of the chat format."""
        return [chat.end_of_turn_id(self.tokenizer, self.template)]

    def decode(self, tokens: Sequence[int]) -> str:
        return self.tokenizer.decode(list(tokens), skip_special_tokens=True).strip()

    def prompt(self, q: Question, image: np.ndarray, suffix: str = "") -> dict[str, Any]:
        """The sampler input for a question (image placeholder expanded; ``image`` kept for rewards
        that read it with another model)."""
        pixel_values, layout = self.encode_image(image)
        size = None if layout is None else tuple(np.asarray(layout)[0])
        ids = chat.encode_prompt(self.tokenizer, q.question + suffix, self.model.num_image_tokens(size),
                                 image_token_id=self.model.config.image_token_id, template=self.template)
        return {"id": q.id, "input_ids": ids.tolist(), "pixel_values": pixel_values,
                vision.layout_key(self.model): layout, "image": image}

    def chunks(self, questions: Sequence[Question], size: int, suffix: str = "") -> Iterator[list[dict]]:
        """Sampler prompts ``size`` questions at a time (a shared image is decoded once per chunk)."""
        for lo in range(0, len(questions), size):
            images: dict[Any, np.ndarray] = {}
            out = []
            for q in questions[lo:lo + size]:
                key = q.image if not q.image_is_base64 else id(q)
                if key not in images:
                    images[key] = load_image(q)
                out.append(self.prompt(q, images[key], suffix))
            yield out

    def answer(self, questions: Sequence[Question], *, num_beams: int, max_new_tokens: int, batch_size: int = 8,
               suffix: str = "", progress: bool = True) -> list[str]:
        """One answer per question: greedy (``num_beams=1``) or beam search."""
        with tqdm(total=len(questions), unit="question", disable=not progress,
                  desc="greedy" if num_beams == 1 else f"beam search ({num_beams})") as bar:
            return answer_chunks(self.model, self.chunks(questions, 4 * batch_size, suffix), stop_ids=self.stop_ids(),
                                 decode=self.decode, num_beams=num_beams, max_new_tokens=max_new_tokens,
                                 batch_size=batch_size, on_chunk=bar.update)


def answer_chunks(model: nnx.Module, chunks: Iterable[list[dict]], *, stop_ids: Sequence[int],
                  decode: Callable[[Sequence[int]], str], num_beams: int, max_new_tokens: int, batch_size: int = 8,
                  mesh=None, decode_rows: int | None = None, on_chunk: Callable[[int], Any] | None = None
                  ) -> list[str]:
    """One answer per sampler prompt, a chunk at a time: greedy (``num_beams=1``, ``engine.generate``,
    through ``decode_rows`` continuous-batching slots if given: the same tokens) or beam search
    (``engine.beam``); ``on_chunk(n)`` after each chunk of n prompts."""
    texts: list[str] = []
    for prompts in chunks:
        if num_beams == 1:
            outs = generate.generate(model, prompts, max_new_tokens=max_new_tokens, stop_token_ids=stop_ids,
                                     batch_size=batch_size, mesh=mesh, decode_rows=decode_rows, progress=False)
        else:
            outs = beam.beam_search(model, prompts, num_beams=num_beams, max_new_tokens=max_new_tokens,
                                    stop_token_ids=stop_ids, batch_size=batch_size, progress=False)
        texts += [decode(o["tokens"][0]) for o in outs]
        if on_chunk is not None:
            on_chunk(len(prompts))
    return texts


def load_reference(path: str, policy: Policy, dtype: str = "bfloat16") -> nnx.Module:
    """The pre-alignment model; it must read the policy's prompts (same architecture and vocabulary)."""
    model = hf.load_pretrained(path, dtype=hf.parse_dtype(dtype))
    if type(model) is not type(policy.model) or model.config.text.vocab_size != policy.model.config.text.vocab_size:
        raise ValueError(f"--reference {path} is not the same kind of model as --model {policy.path} "
                         "(architecture and vocabulary must match)")
    return model


Reward = Callable[[Sequence[Question], Sequence[dict], Sequence[dict]], list[list[dict[str, Any]]]]
"""``reward(questions, prompts, samples)``: for each question (its sampler prompt, its samples as
``engine.generate`` returns them plus ``texts``), one dict per sample holding ``reward`` (a float, or
None: not a candidate) and whatever explains it."""


class ImplicitReward:
    """The length-normalised implicit reward ``(β/T) Σ_t [log π_θ − log π_ref]`` (``engine.reward``) of
    the policy against ``reference``; T counts the end-of-turn token of answers that stopped."""

    def __init__(self, policy: Policy, reference: nnx.Module, beta: float, batch_size: int = 8):
        self.policy, self.reference, self.beta, self.batch_size = policy, reference, beta, batch_size

    def __call__(self, questions: Sequence[Question], prompts: Sequence[dict],
                 samples: Sequence[dict]) -> list[list[dict[str, Any]]]:
        eot = self.policy.stop_ids()[0]
        out = []
        for prompt, sample in zip(prompts, samples):
            answers = [toks + [eot] if stopped else toks for toks, stopped in zip(sample["tokens"], sample["stopped"])]
            logp, count = reward.sequence_logps(self.policy.model, prompt, answers, batch_size=self.batch_size)
            ref_logp, _ = reward.sequence_logps(self.reference, prompt, answers, batch_size=self.batch_size)
            rewards = reward.implicit_reward(logp, ref_logp, count, self.beta)
            out.append([{"reward": float(r), "logp": float(lp), "ref_logp": float(rl), "tokens": int(c)}
                        for r, lp, rl, c in zip(rewards, logp, ref_logp, count)])
        return out


def best_index(rewards: Sequence[float | None]) -> int:
    """The sample to keep: the highest reward, the first on ties; samples with no reward (None) are
    not candidates, and the first sample is kept when none has one."""
    scored = [(r, -i) for i, r in enumerate(rewards) if r is not None]
    return -max(scored)[1] if scored else 0


def best_of_n(policy: Policy, questions: Sequence[Question], score: Reward, *, n: int, max_new_tokens: int,
              temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None, seed: int = 0,
              batch_size: int = 8, suffix: str = "", progress: bool = True) -> list[dict[str, Any]]:
    """For each question, ``n`` sampled answers scored by ``score``; returns ``{"answer": best,
    "samples": [{"answer", "reward", ...the reward's details}]}`` (``best_index`` picks)."""
    out: list[dict[str, Any]] = []
    bar = tqdm(total=len(questions), unit="question", disable=not progress, desc=f"best of {n}")
    for lo, prompts in zip(range(0, len(questions), batch_size), policy.chunks(questions, batch_size, suffix)):
        samples = generate.generate(policy.model, prompts, num_samples=n, max_new_tokens=max_new_tokens,
                                    temperature=temperature, top_k=top_k, top_p=top_p,
                                    stop_token_ids=policy.stop_ids(), seed=seed, batch_size=batch_size,
                                    progress=False)
        samples = [{**s, "texts": [policy.decode(t) for t in s["tokens"]]} for s in samples]
        for sample, scored in zip(samples, score(questions[lo:lo + batch_size], prompts, samples)):
            best = best_index([d["reward"] for d in scored])
            out.append({"answer": sample["texts"][best],
                        "samples": [{"answer": t, **d} for t, d in zip(sample["texts"], scored)]})
        bar.update(len(prompts))
    bar.close()
    best = [max((s["reward"] for s in o["samples"] if s["reward"] is not None), default=None) for o in out]
    best = [b for b in best if b is not None]
    logging.info("best of %d: mean best reward %.4f over %d questions with a reward", n,
                 float(np.mean(best)) if best else float("nan"), len(best))
    return out
