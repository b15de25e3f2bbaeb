"""Prompts for the online loop: a JSONL file of (image, question) records, or the toy world.

File format (the official pipeline's, METHOD.md §8): one JSON object per line with an id
(``id`` or ``ds_question_id``; default the line number), ``question``, and the image as
``image_path`` (relative to the file) or ``image`` (base64). Bad lines are skipped, counted by
reason and named (line number + reason) in a report; nothing is dropped silently. Images are held
encoded (or as a path) and decoded when a record's ``"image"`` is read.
"""
from __future__ import annotations

import base64
import collections
import collections.abc
import dataclasses
import io
import json
import os
from typing import Any, Callable

import numpy as np
from PIL import Image

from rlaifv_jax.core import paths as core_paths
from rlaifv_jax.data import chat, toy_world


@dataclasses.dataclass
class PromptReport:
    """What happened to every line of a prompt file."""

    path: str
    kept: int = 0
    skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    problems: list[str] = dataclasses.field(default_factory=list)  # "line N: reason"

    def skip(self, line: int, reason: str, detail: str = "") -> None:
        self.skipped[reason] += 1
        self.problems.append(f"line {line}: {reason}" + (f" ({detail})" if detail else ""))

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "kept": self.kept, "skipped": dict(self.skipped), "problems": self.problems}


def _rgb(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


class PromptRecord(collections.abc.Mapping):
    """A prompt ``{"id", "question", "image"}`` whose image is decoded lazily: ``record["image"]`` decodes
    the encoded bytes (kept for base64 images) or reads and decodes the file (only its path is kept)
    on every access, giving an RGB uint8 ``[H, W, 3]`` array; nothing decoded is kept."""

    KEYS = ("id", "question", "image")

    def __init__(self, pid: str, question: str, image: bytes | str, where: str):
        self.pid, self.question, self.image, self.where = pid, question, image, where

    def encoded(self) -> bytes:
        """The image's encoded bytes (as stored in the file or the JSONL line)."""
        if isinstance(self.image, bytes):
            return self.image
        with open(self.image, "rb") as f:
            return f.read()

    def __getitem__(self, key: str) -> Any:
        if key == "id":
            return self.pid
        if key == "question":
            return self.question
        if key == "image":
            try:
                return _rgb(self.encoded())
            except (OSError, ValueError, Image.DecompressionBombError) as e:
                raise ValueError(f"{self.where}: cannot decode the image ({e})") from None
        raise KeyError(key)

    def __iter__(self):
        return iter(self.KEYS)

    def __len__(self) -> int:
        return len(self.KEYS)


def _image_source(raw: dict[str, Any], base_dir: str,
                  allow_outside_root: bool = False) -> tuple[bytes | str | None, str, str]:
    """``(encoded bytes | file path | None, reason, detail)``; the image is checked by one full decode.
    ``base_dir`` is the image root that relative ``image_path`` values resolve against."""
    image, path = raw.get("image"), raw.get("image_path")
    if image:
        if not isinstance(image, str):
            return None, "corrupt_image", "image must be a base64 string"
        source = "base64 image"
        try:
            data = keep = base64.b64decode(image, validate=True)
        except ValueError as e:  # binascii.Error
            return None, "corrupt_image", f"base64: {e}"
    elif path:
        if not isinstance(path, str):
            return None, "no_image_field", "image_path must be a string"
        source = keep = core_paths.resolve_under(path, base_dir, allow_outside_root)
        if source is None:
            return None, "outside_image_root", f"{path} (image root {base_dir})"
        if not os.path.exists(source):
            return None, "missing_image", source
        try:
            with open(source, "rb") as f:
                data = f.read()
        except OSError as e:
            return None, "missing_image", f"{source}: {e}"
    else:
        return None, "no_image_field", "needs image_path or image"
    try:
        _rgb(data)
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        return None, "corrupt_image", f"{source}: {e}"
    return keep, "", ""


def read_prompt_file(path: str, image_root: str = "", allow_outside_root: bool = False
                     ) -> tuple[list[PromptRecord], PromptReport]:
    """Good records (``PromptRecord``: ``{"id", "question", "image"}``, image decoded on access) and
    the report of every skipped line. Each image is decoded once here to check it, then dropped.
    ``image_path`` values resolve against ``image_root`` (default: the prompt file's folder); one
    outside it is skipped (``outside_image_root``) unless ``allow_outside_root``. A line that is not
    UTF-8 is skipped (``not_utf8``) and named by its line number."""
    report = PromptReport(path)
    try:
        with open(path, "rb") as f:
            lines = f.read().split(b"\n")
    except OSError as e:
        raise ValueError(f"{path}: cannot read the prompt file ({e})") from None
    root = os.path.abspath(image_root) if image_root else os.path.dirname(os.path.abspath(path))
    records, seen = [], set()
    for n, data in enumerate(lines, 1):
        try:
            line = data.decode("utf-8")
        except UnicodeDecodeError as e:
            report.skip(n, "not_utf8", f"byte {e.start} of the line: {data[e.start:e.start + 4]!r}")
            continue
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
            if not isinstance(raw, dict):
                raise ValueError("not a JSON object")
        except ValueError as e:
            report.skip(n, "malformed_line", str(e)[:80])
            continue
        question = raw.get("question")
        if not isinstance(question, str) or not question.strip():
            report.skip(n, "empty_question")
            continue
        pid = str(raw.get("id", raw.get("ds_question_id", n)))
        if pid in seen:
            report.skip(n, "duplicate_id", pid)
            continue
        image, reason, detail = _image_source(raw, root, allow_outside_root)
        if image is None:
            report.skip(n, reason, detail)
            continue
        seen.add(pid)
        records.append(PromptRecord(pid, question.strip(), image, f"{path} line {n}"))
    report.kept = len(records)
    if not records:
        raise ValueError(f"{path}: no usable prompt ({dict(report.skipped)})")
    return records, report


ImageEncoder = Callable[[np.ndarray], tuple[np.ndarray, Any]]


def toy_image_encoder(image: np.ndarray) -> tuple[np.ndarray, Any]:
    """Toy-world pixels ``[1, 3, H, W]`` (no image_sizes)."""
    return toy_world.encode_image(image)[None], None


class QwenImageEncoder:
    """transformers' ``Qwen2VLImageProcessorPil`` of a checkpoint (resize to its ``min_pixels`` /
    ``max_pixels`` grid, flattened patches): ``(pixel_values [patches, patch_dim], image_grid_thw [1, 3])``.
    ``max_patches``: the most patches an image can give (``max_pixels / patch_size²``)."""

    def __init__(self, model_dir: str):
        from transformers import Qwen2VLImageProcessorPil
        self.processor = Qwen2VLImageProcessorPil.from_pretrained(model_dir, local_files_only=True)
        self.max_patches = int(self.processor.size["longest_edge"]) // self.processor.patch_size ** 2

    def __call__(self, image: np.ndarray) -> tuple[np.ndarray, Any]:
        out = self.processor(images=Image.fromarray(image), return_tensors="np")
        return np.asarray(out["pixel_values"], np.float32), np.asarray(out["image_grid_thw"])


def hf_image_encoder(model_dir: str, architecture: str) -> ImageEncoder:
    """The image preprocessing of a Hugging Face LLaVA checkpoint (``preprocessor_config.json``).

    LLaVA-1.5: pad to square with the processor mean, then CLIP preprocessing (METHOD.md §2).
    LLaVA-NeXT: transformers' anyres image processor (PIL backend), giving ``image_sizes``.
    Qwen2.5-VL and Qwen3-VL: ``QwenImageEncoder``, giving ``image_grid_thw``.
    """
    if architecture in ("Qwen2_5_VLForConditionalGeneration", "Qwen3VLForConditionalGeneration"):
        return QwenImageEncoder(model_dir)
    if architecture == "LlavaNextForConditionalGeneration":
        from transformers import LlavaNextImageProcessor
        processor = LlavaNextImageProcessor.from_pretrained(model_dir, local_files_only=True)

        def encode_next(image: np.ndarray) -> tuple[np.ndarray, Any]:
            out = processor(images=Image.fromarray(image), return_tensors="np")
            return np.asarray(out["pixel_values"]), np.asarray(out["image_sizes"])

        return encode_next
    cfg_path = os.path.join(model_dir, "preprocessor_config.json")
    try:
        with open(cfg_path) as f:
            cfg = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{cfg_path}: missing; the policy directory needs its image processor") from None
    size = cfg.get("crop_size", cfg.get("size"))
    size = size.get("height", size.get("shortest_edge")) if isinstance(size, dict) else size
    mean, std = cfg.get("image_mean", chat.CLIP_MEAN), cfg.get("image_std", chat.CLIP_STD)

    def encode(image: np.ndarray) -> tuple[np.ndarray, Any]:
        return chat.llava_image_preprocess(Image.fromarray(image), size=size, mean=mean, std=std)[None], None

    return encode
