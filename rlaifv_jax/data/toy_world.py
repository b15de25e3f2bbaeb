"""The embedded toy world: generated images, a caption language, yes/no questions and a tokenizer.

Images are small RGB pictures (default 32×32) of 1–4 solid shapes on a dark background, one object
per cell of a ``grid × grid`` layout, each object a (colour, shape) pair; every image carries its exact
ground-truth object list.

The language has one claim per sentence, words and punctuation separated by single spaces::

    caption   := ("there is a {colour} {shape} ." )+          e.g. "there is a red circle . there is a blue square ."
    question  := "is there a {colour} {shape} in the image ?"
    labeler   := question + " Please answer yes or no."        (METHOD.md §3, byte for byte)

Object hallucination is built in the way it arises in real data, and is controlled by two rates:

* ``pair_rate`` — the world's co-occurrence bias: some objects come in pairs (``WorldSettings.pairs``,
  e.g. red circle ↔ blue square). When a pair member is drawn and the image has room, its partner is
  drawn too with this probability.
* ``caption_partner_rate`` — the annotators' bias: a training caption of an image that shows a pair
  member without its partner also mentions the absent partner (right after the member) with this
  probability, like a human caption naming an object that is usually there.

A captioner trained on these captions learns to mention absent partners at about
``caption_partner_rate``; the yes/no training data is answered from ground truth (balanced yes/no,
negatives preferring exactly those absent partners), so the same model can tell, when asked, that the
partner is not there. That gap is what RLAIF-V self-feedback exploits. Ground truth is only in the
records; nothing in the feedback path (claims, labeler) reads it.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from rlaifv_jax.data.chat import labeler_question

Obj = tuple[str, str]  # (colour, shape)

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 90, 235),
    "yellow": (235, 215, 40),
    "purple": (150, 60, 200),
    "white": (235, 235, 235),
}
SHAPE_NAMES = ("circle", "square", "triangle", "cross", "diamond")

CAPTION_INSTRUCTIONS = (
    "describe the image .",
    "what objects are in the image ?",
    "list the objects in the image .",
)
# Words of the chat templates (LLaVA-1.5 `llava_v1` system prompt, USER:/ASSISTANT: roles), so any
# of them tokenizes without <unk>.
_CHAT_TEXT = (
    "A chat between a curious human and an artificial intelligence assistant. The assistant gives "
    "helpful, detailed, and polite answers to the human's questions. USER: ASSISTANT:"
)
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>", "<image>")


@dataclasses.dataclass(frozen=True)
class WorldSettings:
    """Everything that defines the toy world; all rates are probabilities in [0, 1]."""

    image_size: int = 32
    grid: int = 2
    colours: tuple[str, ...] = ("red", "green", "blue", "yellow")
    shapes: tuple[str, ...] = ("circle", "square", "triangle", "cross")
    pairs: tuple[tuple[Obj, Obj], ...] = (
        (("red", "circle"), ("blue", "square")),
        (("green", "triangle"), ("yellow", "cross")),
        (("yellow", "circle"), ("green", "square")),
        (("blue", "triangle"), ("red", "cross")),
        (("green", "circle"), ("red", "square")),
        (("yellow", "triangle"), ("blue", "cross")),
    )
    min_objects: int = 1
    max_objects: int = 4
    pair_rate: float = 0.8
    caption_partner_rate: float = 0.7
    hard_negative_rate: float = 0.8
    object_fill: float = 0.75
    jitter: int = 2
    background: tuple[int, int, int] = (20, 20, 20)
    noise: int = 6

    def __post_init__(self) -> None:
        unknown = [c for c in self.colours if c not in PALETTE] + [s for s in self.shapes if s not in SHAPE_NAMES]
        if unknown:
            raise ValueError(f"unknown colours/shapes {unknown}; known: {sorted(PALETTE)}, {SHAPE_NAMES}")
        members = [o for pair in self.pairs for o in pair]
        if len(set(members)) != len(members):
            raise ValueError("an object may belong to at most one pair")
        bad = [o for o in members if o[0] not in self.colours or o[1] not in self.shapes]
        if bad:
            raise ValueError(f"pair members {bad} are not objects of this world")
        if not 1 <= self.min_objects <= self.max_objects <= self.grid * self.grid:
            raise ValueError("need 1 <= min_objects <= max_objects <= grid * grid")
        if self.image_size % self.grid:
            raise ValueError("image_size must be a multiple of grid")


def all_objects(cfg: WorldSettings) -> list[Obj]:
    """Every (colour, shape) of the world, colour-major."""
    return [(c, s) for c in cfg.colours for s in cfg.shapes]


def partner_map(cfg: WorldSettings) -> dict[Obj, Obj]:
    """Object → its usual partner, both directions, for objects that belong to a pair."""
    return {**{a: b for a, b in cfg.pairs}, **{b: a for a, b in cfg.pairs}}


def claim_sentence(obj: Obj) -> str:
    """The atomic fact for one object: ``"there is a red circle"`` (no final period)."""
    return f"there is a {obj[0]} {obj[1]}"


def yesno_question(obj: Obj) -> str:
    """The existence question for one object: ``"is there a red circle in the image ?"``."""
    return f"is there a {obj[0]} {obj[1]} in the image ?"


def labeler_prompt(question: str) -> str:
    """The text the labeler (and the yes/no warm-start data) sees: question + METHOD.md §3 suffix."""
    return labeler_question(question)


def caption_text(objects: list[Obj]) -> str:
    """Caption of a list of objects in the given order: one ``"there is a … ."`` sentence each."""
    return " ".join(claim_sentence(o) + " ." for o in objects)


def sample_objects(rng: np.random.Generator, cfg: WorldSettings) -> list[Obj]:
    """Draw the distinct objects of one image, with the co-occurrence bias.

    The count k is uniform in [min_objects, max_objects]; objects are drawn uniformly among those not
    yet in the image, and after each draw of a pair member whose partner is absent, the partner is
    added with probability ``pair_rate`` if fewer than k objects are placed.
    """
    k = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    partners = partner_map(cfg)
    types = all_objects(cfg)
    chosen: list[Obj] = []
    while len(chosen) < k:
        free = [t for t in types if t not in chosen]
        obj = free[int(rng.integers(len(free)))]
        chosen.append(obj)
        partner = partners.get(obj)
        if partner is not None and partner not in chosen and len(chosen) < k and rng.random() < cfg.pair_rate:
            chosen.append(partner)
    return chosen


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], rgb: tuple[int, int, int]) -> None:
    """Draw one solid shape filling the inclusive pixel box (x0, y0, x1, y1)."""
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(box, fill=rgb)
    elif shape == "square":
        draw.rectangle(box, fill=rgb)
    elif shape == "triangle":
        draw.polygon([((x0 + x1) / 2, y0), (x0, y1), (x1, y1)], fill=rgb)
    elif shape == "diamond":
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=rgb)
    elif shape == "cross":
        t = max(1, (x1 - x0 + 1) // 3)
        mx, my = (x0 + x1 + 1 - t) // 2, (y0 + y1 + 1 - t) // 2
        draw.rectangle((mx, y0, mx + t - 1, y1), fill=rgb)
        draw.rectangle((x0, my, x1, my + t - 1), fill=rgb)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def render(objects: list[Obj], cells: list[int], rng: np.random.Generator, cfg: WorldSettings) -> tuple[np.ndarray, list[tuple[int, int, int, int]]]:
    """Draw objects into their grid cells → (uint8 [H, W, 3] image, inclusive pixel box per object)."""
    cell = cfg.image_size // cfg.grid
    size = max(3, int(round(cell * cfg.object_fill)))
    canvas = Image.new("RGB", (cfg.image_size, cfg.image_size), cfg.background)
    draw = ImageDraw.Draw(canvas)
    boxes = []
    for obj, index in zip(objects, cells):
        row, col = divmod(index, cfg.grid)
        dx, dy = rng.integers(-cfg.jitter, cfg.jitter + 1, size=2)
        x0 = col * cell + int(np.clip((cell - size) // 2 + dx, 0, cell - size))
        y0 = row * cell + int(np.clip((cell - size) // 2 + dy, 0, cell - size))
        box = (x0, y0, x0 + size - 1, y0 + size - 1)
        _draw_shape(draw, obj[1], box, PALETTE[obj[0]])
        boxes.append(box)
    image = np.asarray(canvas, dtype=np.int16)
    if cfg.noise:
        image = image + rng.integers(-cfg.noise, cfg.noise + 1, size=image.shape)
    return np.clip(image, 0, 255).astype(np.uint8), boxes


def noisy_caption(objects: list[Obj], rng: np.random.Generator, cfg: WorldSettings) -> tuple[str, list[Obj]]:
    """Training caption: the objects in order, each absent partner mentioned right after its present
    pair member with probability ``caption_partner_rate`` → (caption, hallucinated objects)."""
    partners = partner_map(cfg)
    mentioned: list[Obj] = []
    hallucinated: list[Obj] = []
    for obj in objects:
        mentioned.append(obj)
        partner = partners.get(obj)
        if partner is not None and partner not in objects and rng.random() < cfg.caption_partner_rate:
            mentioned.append(partner)
            hallucinated.append(partner)
    return caption_text(mentioned), hallucinated


def negative_object(objects: list[Obj], rng: np.random.Generator, cfg: WorldSettings) -> Obj:
    """An absent object to ask about: with probability ``hard_negative_rate`` (when one exists) the
    absent partner of a present object, else a uniformly drawn absent object."""
    partners = partner_map(cfg)
    hard = sorted({partners[o] for o in objects if o in partners and partners[o] not in objects})
    if hard and rng.random() < cfg.hard_negative_rate:
        return hard[int(rng.integers(len(hard)))]
    absent = [o for o in all_objects(cfg) if o not in objects]
    return absent[int(rng.integers(len(absent)))]


def sample_image(rng: np.random.Generator, cfg: WorldSettings, image_id: str) -> dict[str, Any]:
    """One image record: ``{"id", "image", "objects", "cells", "boxes"}``; objects in reading order."""
    objects = sample_objects(rng, cfg)
    cells = [int(c) for c in rng.permutation(cfg.grid * cfg.grid)[: len(objects)]]
    order = np.argsort(cells, kind="stable")
    objects = [objects[i] for i in order]
    cells = [cells[i] for i in order]
    image, boxes = render(objects, cells, rng, cfg)
    return {"id": image_id, "image": image, "objects": objects, "cells": cells, "boxes": boxes}


def warmstart_split(cfg: WorldSettings, n_images: int, seed: int) -> list[dict[str, Any]]:
    """Supervised warm-start records: per image one noisy caption record and one "yes" + one "no"
    record (the no a hard negative at ``hard_negative_rate``), so yes/no answers are balanced and
    exact. Each record: ``{"id", "image_id", "image", "objects", "kind": "caption"|"yesno",
    "question", "answer"}`` plus ``"hallucinated"`` (caption) or ``"target"`` (yes/no)."""
    rng = np.random.default_rng([seed, 0])
    records = []
    for i in range(n_images):
        base = sample_image(rng, cfg, f"warm-{i}")
        shared = {"image_id": base["id"], "image": base["image"], "objects": base["objects"]}
        caption, hallucinated = noisy_caption(base["objects"], rng, cfg)
        instruction = CAPTION_INSTRUCTIONS[int(rng.integers(len(CAPTION_INSTRUCTIONS)))]
        records.append({"id": f"{base['id']}-cap", **shared, "kind": "caption", "question": instruction,
                        "answer": caption, "hallucinated": hallucinated})
        positive = base["objects"][int(rng.integers(len(base["objects"])))]
        negative = negative_object(base["objects"], rng, cfg)
        for j, (target, answer) in enumerate([(positive, "yes"), (negative, "no")]):
            records.append({"id": f"{base['id']}-yn{j}", **shared, "kind": "yesno",
                            "question": labeler_prompt(yesno_question(target)), "answer": answer, "target": target})
    return records


def labeler_split(cfg: WorldSettings, n_images: int, seed: int) -> list[dict[str, Any]]:
    """Yes/no records for a separate labeler (``warmstart_split``'s record format and random stream,
    but drawn differently per image, so from the second image on the images are not
    ``warmstart_split``'s): per image a "yes" for every object in it, a "no" for every absent usual
    partner of one of them (the co-occurrence bias the policy's captions carry) and a "no" for other
    absent objects, as many as make the no's at least as many as the yes's (at least one). No
    captions: the labeler only answers questions, and noisy captions teach the partner bias."""
    rng = np.random.default_rng([seed, 0])
    partners = partner_map(cfg)
    records = []
    for i in range(n_images):
        base = sample_image(rng, cfg, f"warm-{i}")
        shared = {"image_id": base["id"], "image": base["image"], "objects": base["objects"]}
        present = base["objects"]
        hard = sorted({partners[o] for o in present if o in partners and partners[o] not in present})
        other = [o for o in all_objects(cfg) if o not in present and o not in hard]
        n_other = min(len(other), max(1, len(present) - len(hard)))
        asked = ([(o, "yes") for o in present] + [(o, "no") for o in hard]
                 + [(other[int(j)], "no") for j in rng.choice(len(other), n_other, replace=False)])
        for j, (target, answer) in enumerate(asked):
            records.append({"id": f"{base['id']}-yn{j}", **shared, "kind": "yesno",
                            "question": labeler_prompt(yesno_question(target)), "answer": answer, "target": target})
    return records


LABELER_DATA = ("yesno", "clean", "policy")


def labeler_records(cfg: WorldSettings, data: str, n_images: int, seed: int) -> list[dict[str, Any]]:
    """A separate toy labeler's warm-start records (``toy_labeler.data``): ``"yesno"``, ``labeler_split``;
    ``"clean"``, ``warmstart_split``'s captions as annotators without the partner bias write them
    (``caption_partner_rate`` 0: every caption names exactly the objects shown) plus ``labeler_split``;
    ``"policy"``, the policy's own records (``warmstart_split``: biased captions + 2 yes/no)."""
    if data not in LABELER_DATA:
        raise ValueError(f"toy labeler data must be one of {LABELER_DATA}, got {data!r}")
    if data == "policy":
        return warmstart_split(cfg, n_images, seed)
    yesno = labeler_split(cfg, n_images, seed)
    if data == "yesno":
        return yesno
    unbiased = dataclasses.replace(cfg, caption_partner_rate=0.0)
    return [r for r in warmstart_split(unbiased, n_images, seed) if r["kind"] == "caption"] + yesno


def prompt_split(cfg: WorldSettings, n_images: int, seed: int, name: str = "prompt", stream: int = 1) -> list[dict[str, Any]]:
    """Caption prompts: ``{"id", "image", "objects", "cells", "boxes", "question"}``, instruction drawn
    per image. ``objects``/``cells``/``boxes`` are ground truth, for evaluation only; the RLAIF-V loop
    must not read them."""
    rng = np.random.default_rng([seed, stream])
    records = []
    for i in range(n_images):
        base = sample_image(rng, cfg, f"{name}-{i}")
        instruction = CAPTION_INSTRUCTIONS[int(rng.integers(len(CAPTION_INSTRUCTIONS)))]
        records.append({**base, "question": instruction})
    return records


def eval_split(cfg: WorldSettings, n_images: int, seed: int) -> list[dict[str, Any]]:
    """Held-out evaluation records: a caption prompt plus ``"yesno"``: one (labeler prompt, "yes") and
    one (labeler prompt, "no") pair per image, the no a hard negative at ``hard_negative_rate``."""
    records = prompt_split(cfg, n_images, seed, name="eval", stream=2)
    rng = np.random.default_rng([seed, 3])
    for rec in records:
        positive = rec["objects"][int(rng.integers(len(rec["objects"])))]
        negative = negative_object(rec["objects"], rng, cfg)
        rec["yesno"] = [(labeler_prompt(yesno_question(positive)), "yes"),
                        (labeler_prompt(yesno_question(negative)), "no")]
    return records


def make_splits(cfg: WorldSettings = WorldSettings(), n_warm: int = 4000, n_prompts: int = 512, n_eval: int = 256,
                seed: int = 0) -> dict[str, list[dict[str, Any]]]:
    """The three splits of one world, each from its own seeded stream: ``warmstart``, ``prompts``, ``eval``."""
    return {"warmstart": warmstart_split(cfg, n_warm, seed),
            "prompts": prompt_split(cfg, n_prompts, seed),
            "eval": eval_split(cfg, n_eval, seed)}


def vocabulary(cfg: WorldSettings = WorldSettings()) -> list[str]:
    """All tokens in id order: special tokens, then the (lower-case) words of the language and chat."""
    texts = [caption_text(all_objects(cfg)), *(labeler_prompt(yesno_question(o)) for o in all_objects(cfg)),
             *CAPTION_INSTRUCTIONS, _CHAT_TEXT]
    words: list[str] = list(SPECIAL_TOKENS)
    pre = pre_tokenizers.Whitespace()
    for text in texts:
        for word, _ in pre.pre_tokenize_str(text.lower()):
            if word not in words:
                words.append(word)
    return words


def build_tokenizer(cfg: WorldSettings = WorldSettings()) -> PreTrainedTokenizerFast:
    """Word-level tokenizer of the world: lower-cases, splits words from punctuation, adds ``<s>`` in
    front (like Llama); ``<image>`` is one special token; decoding joins tokens with single spaces,
    so a caption of the language round-trips exactly."""
    vocab = {w: i for i, w in enumerate(vocabulary(cfg))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.add_special_tokens(list(SPECIAL_TOKENS))
    core.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])])
    return PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        additional_special_tokens=["<image>"], clean_up_tokenization_spaces=False, model_max_length=512)


IMAGE_MEAN = 0.5
IMAGE_STD = 0.5


def encode_image(image: np.ndarray | Image.Image) -> np.ndarray:
    """uint8 RGB ``[..., H, W, 3]`` (or a PIL image) → float32 ``[..., 3, H, W]`` in [-1, 1]."""
    pixels = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, dtype=np.float32)
    return np.moveaxis((pixels / 255.0 - IMAGE_MEAN) / IMAGE_STD, -1, -3)
