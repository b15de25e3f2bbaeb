"""Conversation formats, prompt/answer tokenization and LLaVA-1.5 image preprocessing.

LLaVA-1.5 ``llava_v1`` (``conv_llava_v1`` in the official LLaVA ``conversation.py``: roles
``USER``/``ASSISTANT``, ``SeparatorStyle.TWO``, ``sep=" "``, ``sep2="</s>"``). For one question the
generation prompt is, byte for byte::

    {SYSTEM} USER: <image>\\n{question} ASSISTANT:

and a training conversation continues it with `` {answer}</s>``. Token-wise we follow LLaVA's
``tokenizer_image_token``: the prompt is split at ``<image>``, each side is tokenized on its own (so
SentencePiece tokenizers add their word-start marker after the image exactly as LLaVA does), one BOS
leads the sequence, and the placeholder becomes ``image_token_count`` copies of ``image_token_id``.
The answer tokens are the tokens that `` {answer}`` adds after the prompt's last text chunk, followed
by the end-of-turn token: for ``llava_v1`` that is ``sep2 = "</s>"``, i.e. the tokenizer's EOS id
(appended as an id, never parsed from text). The answer text is stripped first, as LLaVA's generation
code strips its outputs.

Chat-template models (e.g. Llama-3-Instruct): ``template="chat"`` renders one user message, no system
message, with ``add_generation_prompt=True`` through ``tokenizer.apply_chat_template``; the answer
is the tokens of ``{answer}`` after that prompt followed by the template's own end-of-turn token
(read off the template, e.g. ``<|eot_id|>``), unless ``eos_id`` is given. The user message shows the
image as ``<image>\n{question}``; for Qwen-VL tokenizers (ChatML, which know ``<|vision_start|>`` and
``<|vision_end|>``) as ``<|vision_start|><image><|vision_end|>{question}``, exactly what Qwen's
processor renders for an image followed by text, ``<image>`` becoming the ``<|image_pad|>`` run.

Special tokens are data, never control: questions, answers, sampled responses and claims are
tokenized so that a string such as ``<image>``, ``</s>`` or ``<|im_end|>`` in them stays text
(``split_special_tokens``); the image placeholder appears only where the template puts it. A
question's own leading ``<image>\\n`` (LLaVA data) is dropped, not doubled. Every encoded row's image
ids are counted on the host (``check_placeholders``): a vocabulary that still maps such text to the
image id raises ``PlaceholderMismatch``, which callers count as a named skip.
"""
from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Sequence

import numpy as np
from PIL import Image

LLAVA_V1_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
IMAGE_PLACEHOLDER = "<image>"
VISION_MARKERS: tuple[str, str] = ("<|vision_start|>", "<|vision_end|>")  # Qwen-VL's image block delimiters
TEMPLATES: tuple[str, ...] = ("llava_v1", "chat")

# OpenAI CLIP normalisation constants (CLIPImageProcessor defaults, used by LLaVA-1.5).
CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)


@dataclasses.dataclass(frozen=True)
class EncodedPrompt:
    """Token ids of a prompt (image placeholder expanded) and of one answer (incl. end-of-turn)."""

    prompt_ids: np.ndarray  # [P] int32
    answer_ids: np.ndarray  # [A] int32, last id is the end-of-turn token


def llava_v1_prompt(question: str, with_image: bool = True) -> str:
    """The ``llava_v1`` generation prompt for one question, ending in ``ASSISTANT:``."""
    user = f"{IMAGE_PLACEHOLDER}\n{question}" if with_image else question
    return f"{LLAVA_V1_SYSTEM} USER: {user} ASSISTANT:"


def image_markup(tokenizer) -> str:
    """How a chat-template user message shows its image before the question: wrapped in
    ``VISION_MARKERS`` when the tokenizer has both as added tokens (Qwen-VL), else ``<image>\n``."""
    added = tokenizer.get_added_vocab() if hasattr(tokenizer, "get_added_vocab") else {}
    if all(marker in added for marker in VISION_MARKERS):
        return f"{VISION_MARKERS[0]}{IMAGE_PLACEHOLDER}{VISION_MARKERS[1]}"
    return f"{IMAGE_PLACEHOLDER}\n"


def chat_template_prompt(tokenizer, question: str, with_image: bool = False) -> str:
    """The tokenizer's own chat template: one user message, no system message, generation prompt."""
    content = image_markup(tokenizer) + question if with_image else question
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
    )


class PlaceholderMismatch(ValueError):
    """An encoded row whose image placeholder ids do not match its image features (e.g. a word-level
    vocabulary that maps the text ``<image>`` in a question or answer to the image id)."""


def _ids(tokenizer, text: str, data: bool = False) -> list[int]:
    """``text``'s ids, no BOS/EOS. ``data=True``: special-token strings in ``text`` stay text
    (``split_special_tokens``), so user/model text can never produce a special id."""
    kwargs = {"split_special_tokens": True} if data else {}
    return list(tokenizer(text, add_special_tokens=False, **kwargs)["input_ids"])


@functools.lru_cache(maxsize=16)
def _special_pattern(tokenizer) -> re.Pattern:
    """A regex matching every string the tokenizer parses as an added/special token, plus the
    template's own markers (``<image>``, Qwen's vision markers)."""
    added = tokenizer.get_added_vocab() if hasattr(tokenizer, "get_added_vocab") else {}
    strings = set(added) | set(getattr(tokenizer, "all_special_tokens", ()))
    strings |= {IMAGE_PLACEHOLDER, *VISION_MARKERS}
    return re.compile("|".join(re.escape(t) for t in sorted(strings, key=len, reverse=True) if t))


def has_special_text(tokenizer, text: str) -> bool:
    """Whether ``text`` contains a string the tokenizer would otherwise read as a special token."""
    return _special_pattern(tokenizer).search(text) is not None


Parts = Sequence[tuple[str, bool]]  # (text, is_data): the template's own text, or user/model text


def _mode(tokenizer, parts: Parts) -> str:
    if not any(data and has_special_text(tokenizer, t) for t, data in parts):
        return "whole"  # clean data: exactly the tokenization of the whole text
    if not any(not data and has_special_text(tokenizer, t) for t, data in parts):
        return "whole_data"
    return "by_part"


def encode_parts(tokenizer, parts: Parts, mode: str | None = None) -> list[int]:
    """Ids of ``parts`` concatenated, where data parts can never produce a special token.

    Clean data (no special-token strings): the whole text is tokenized at once, exactly as before.
    Data with such strings: tokenized with ``split_special_tokens``, the whole text at once when the
    template's parts hold no special tokens themselves (``llava_v1``), else part by part. ``mode``
    forces one of these (``"whole"``, ``"whole_data"``, ``"by_part"``)."""
    mode = mode or _mode(tokenizer, parts)
    if mode == "by_part":
        return [i for t, data in parts if t for i in _ids(tokenizer, t, data=data)]
    return _ids(tokenizer, "".join(t for t, _ in parts), data=mode == "whole_data")


def strip_image_marker(question: str) -> str:
    """A question without LLaVA data's own image marker (a leading ``<image>`` and the newline after
    it, or a trailing one): the template puts the image where it belongs. Any other ``<image>`` is text."""
    q = question
    if q.startswith(IMAGE_PLACEHOLDER):
        q = q[len(IMAGE_PLACEHOLDER):].lstrip("\n")
    elif q.endswith(IMAGE_PLACEHOLDER):
        q = q[: -len(IMAGE_PLACEHOLDER)].rstrip("\n")
    return q


_QUESTION = "\x00QUESTION\x00"


def prompt_parts(tokenizer, question: str, with_image: bool, template: str) -> list[tuple[str, bool]]:
    """The generation prompt as ``(text, is_data)`` parts: template text around the question (as the
    template renders it, e.g. trimmed). ``<image>`` occurs only in the template's parts."""
    if template not in TEMPLATES:
        raise ValueError(f"template must be one of {TEMPLATES}, got {template!r}")
    if with_image:
        question = strip_image_marker(question)
    render = (lambda q: llava_v1_prompt(q, with_image)) if template == "llava_v1" else (
        lambda q: chat_template_prompt(tokenizer, q, with_image))
    skeleton = render(_QUESTION)
    if skeleton.count(_QUESTION) != 1:
        raise ValueError(f"the {template} prompt does not contain the question exactly once: {skeleton!r}")
    head, tail = skeleton.split(_QUESTION)
    full = render(question)
    if not (full.startswith(head) and full.endswith(tail) and len(full) >= len(head) + len(tail)):
        raise ValueError(f"the {template} template renders the question unexpectedly: {full!r}")
    return [(head, False), (full[len(head): len(full) - len(tail)], True), (tail, False)]


def _image_chunks(parts: Parts) -> list[list[tuple[str, bool]]]:
    """``parts`` split at each ``<image>`` of the template's own text (data is never split)."""
    chunks: list[list[tuple[str, bool]]] = [[]]
    for text, data in parts:
        pieces = [text] if data else text.split(IMAGE_PLACEHOLDER)
        for i, piece in enumerate(pieces):
            if i:
                chunks.append([])
            chunks[-1].append((piece, data))
    return chunks


def chunks_to_ids(
    tokenizer, text: str | Parts, image_token_count: int, image_token_id: int | None, template: str
) -> tuple[list[int], list[tuple[str, bool]]]:
    """Prompt ids (image expanded) and the parts of the last chunk (the answer's left context).
    ``text``: template text (a str) or ``(text, is_data)`` parts."""
    parts = [(text, False)] if isinstance(text, str) else list(text)
    chunks = _image_chunks(parts)
    if image_token_count and len(chunks) != 2:
        raise ValueError(f"the prompt must contain exactly one {IMAGE_PLACEHOLDER!r}: {parts!r}")
    if image_token_count and image_token_id is None:
        raise ValueError("image_token_id is required when image_token_count > 0")
    ids: list[int] = []
    if template == "llava_v1" and tokenizer.bos_token_id is not None:
        ids.append(int(tokenizer.bos_token_id))
    for i, chunk in enumerate(chunks):
        if i:
            ids.extend([int(image_token_id)] * image_token_count)
        ids.extend(encode_parts(tokenizer, chunk))
    return ids, chunks[-1]


def check_placeholders(prompt_ids: Sequence[int], answer_ids: Sequence[int], image_token_count: int,
                       image_token_id: int | None) -> None:
    """Host-side check before anything is compiled: the prompt holds exactly ``image_token_count``
    image ids (one run) and the answer none. ``PlaceholderMismatch`` otherwise (a named skip)."""
    if image_token_id is None:
        return
    prompt = np.asarray(prompt_ids)
    found = int(np.sum(prompt == image_token_id))
    in_answer = int(np.sum(np.asarray(answer_ids) == image_token_id))
    if found != image_token_count or in_answer:
        where = f"{in_answer} in the answer" if in_answer else f"{found} in the prompt"
        raise PlaceholderMismatch(f"image placeholder ids: {where}, expected {image_token_count} in the prompt "
                                  "(the text itself maps to the image token)")


def encode_prompt(
    tokenizer,
    question: str,
    image_token_count: int,
    *,
    image_token_id: int | None = None,
    template: str = "llava_v1",
) -> np.ndarray:
    """Prompt ids for generation: the template with ``<image>`` expanded to ``image_token_count`` ids.

    ``image_token_count=0`` gives a text-only prompt (no placeholder at all). The question is data:
    special-token strings in it stay text; a leading ``<image>\\n`` (LLaVA data) is dropped, the
    template placing the image. ``PlaceholderMismatch`` if the ids still do not hold exactly the
    expected image ids.
    """
    parts = prompt_parts(tokenizer, question, image_token_count > 0, template)
    ids, _ = chunks_to_ids(tokenizer, parts, image_token_count, image_token_id, template)
    check_placeholders(ids, (), image_token_count, image_token_id)
    return np.asarray(ids, np.int32)


def end_of_turn_id(tokenizer, template: str = "llava_v1") -> int:
    """The id that closes an assistant turn: EOS for ``llava_v1``; for ``chat`` the first token the
    template renders right after an assistant message (falls back to EOS if it renders nothing)."""
    if template == "chat":
        sentinel = "\x00ANSWER\x00"
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": "q"}, {"role": "assistant", "content": sentinel}], tokenize=False
        )
        suffix_ids = _ids(tokenizer, rendered[rendered.index(sentinel) + len(sentinel):])
        if suffix_ids:
            return int(suffix_ids[0])
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token; pass eos_id")
    return int(tokenizer.eos_token_id)


def encode_prompt_answer(
    tokenizer,
    question: str,
    answer: str,
    image_token_count: int,
    *,
    image_token_id: int | None = None,
    template: str = "llava_v1",
    eos_id: int | None = None,
) -> EncodedPrompt:
    """Prompt ids and answer ids (answer tokens + end-of-turn) such that ``concat`` is the conversation.

    The answer span is exact by construction: its ids are the suffix that the answer adds to the
    prompt's last text chunk (separator ``" "`` for ``llava_v1``, none for ``chat``). Question and
    answer are data (see ``encode_prompt``). Raises ``ValueError`` if the tokenizer merges a token
    across the prompt/answer boundary, ``PlaceholderMismatch`` if the image ids do not match.
    """
    parts = prompt_parts(tokenizer, question, image_token_count > 0, template)
    prompt_ids, last_chunk = chunks_to_ids(tokenizer, parts, image_token_count, image_token_id, template)
    sep = " " if template == "llava_v1" else ""
    answer_part = (sep + answer.strip(), True)
    mode = _mode(tokenizer, [*last_chunk, answer_part])
    context_ids = encode_parts(tokenizer, last_chunk, mode)
    full_ids = encode_parts(tokenizer, [*last_chunk, answer_part], mode)
    if full_ids[: len(context_ids)] != context_ids:
        raise ValueError(f"tokenizer merges across the prompt/answer boundary of {parts!r}")
    eot = end_of_turn_id(tokenizer, template) if eos_id is None else int(eos_id)
    answer_ids = full_ids[len(context_ids):] + [eot]
    check_placeholders(prompt_ids, answer_ids, image_token_count, image_token_id)
    return EncodedPrompt(np.asarray(prompt_ids, np.int32), np.asarray(answer_ids, np.int32))


def background_color(mean: Sequence[float] = CLIP_MEAN) -> tuple[int, ...]:
    """LLaVA's padding colour: ``tuple(int(x * 255) for x in image_processor.image_mean)``."""
    return tuple(int(x * 255) for x in mean)


def expand2square(image: Image.Image, background: tuple[int, ...]) -> Image.Image:
    """Pad to a square canvas of side ``max(w, h)``, image centred (LLaVA's ``expand2square``)."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), background)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def clip_preprocess(
    image: Image.Image,
    *,
    size: int = 336,
    crop_size: int | None = None,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
) -> np.ndarray:
    """CLIPImageProcessor in NumPy/PIL: RGB, bicubic resize of the shortest side to ``size`` (the long
    side to ``int(size * long / short)``), center crop ``crop_size`` (default ``size``), ``/255``,
    ``(x − mean) / std``. Returns ``[3, crop, crop]`` float32 (channels first)."""
    crop = size if crop_size is None else crop_size
    if crop > size:
        raise ValueError(f"crop_size {crop} must not exceed the resize size {size}")
    image = image.convert("RGB")
    width, height = image.size
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(size * long / short)
    new_w, new_h = (size, new_long) if width <= height else (new_long, size)
    pixels = np.asarray(image.resize((new_w, new_h), resample=Image.Resampling.BICUBIC))
    top, left = (new_h - crop) // 2, (new_w - crop) // 2
    pixels = pixels[top: top + crop, left: left + crop]
    scaled = (pixels.astype(np.float64) * (1 / 255)).astype(np.float32)
    normed = (scaled - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(normed.transpose(2, 0, 1))


def llava_image_preprocess(
    image: Image.Image,
    *,
    size: int = 336,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
    pad_to_square: bool = True,
) -> np.ndarray:
    """LLaVA-1.5 image input: ``convert("RGB")``, pad to square with the mean colour, CLIP preprocess."""
    image = image.convert("RGB")
    if pad_to_square:
        image = expand2square(image, background_color(mean))
    return clip_preprocess(image, size=size, mean=mean, std=std)


def labeler_question(q: str) -> str:
    """The labeler's user question for a converted yes/no question."""
    return f"{q} Please answer yes or no."
