"""Benchmark questions: the record every suite loads, and reading their images and JSON files."""
from __future__ import annotations

import base64
import dataclasses
import io
import json
import os
from typing import Any

import numpy as np
from PIL import Image


@dataclasses.dataclass
class Question:
    """One benchmark question. ``id`` is the question's own id as a string (``image_id`` for
    Object HalBench, ``question_id`` for POPE/AMBER/MMHal); ``image`` is a file path, base64 text,
    or ``None`` when the images were not given; ``meta`` holds the suite's ground truth."""

    id: str
    question: str
    image: str | None
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)
    image_is_base64: bool = False


def load_image(q: Question) -> np.ndarray:
    """The question's image as RGB uint8 ``[H, W, 3]``; a one-line ``ValueError`` naming the
    question when it is missing or cannot be decoded."""
    if q.image is None:
        raise ValueError(f"question {q.id}: no image (pass --images DIR for this suite)")
    try:
        if q.image_is_base64:
            data = base64.b64decode(q.image, validate=True)
        else:
            with open(q.image, "rb") as f:
                data = f.read()
        with Image.open(io.BytesIO(data)) as im:
            return np.asarray(im.convert("RGB"))
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        where = "base64 image" if q.image_is_base64 else q.image
        raise ValueError(f"question {q.id}: cannot read its image ({where}: {e})") from None


def read_json(path: str, what: str) -> Any:
    """A JSON file, or a one-line ``ValueError`` naming it and ``what`` it should be."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: missing ({what})") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"{path}: cannot read {what} ({e})") from None


def read_jsonl(path: str, what: str) -> list[tuple[int, dict]]:
    """``(line number, object)`` for every non-empty line of a JSONL file; a malformed line is a
    one-line ``ValueError`` naming the file and line."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.readlines()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: missing ({what})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot read {what} ({e})") from None
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as e:
            raise ValueError(f"{path}:{n}: not valid JSON ({e})") from None
        if not isinstance(obj, dict):
            raise ValueError(f"{path}:{n}: expected a JSON object")
        out.append((n, obj))
    return out


def require(obj: dict, fields: dict[str, type | tuple[type, ...]], where: str) -> None:
    """A one-line ``ValueError`` when ``obj`` lacks a field or has one of the wrong type."""
    for name, kind in fields.items():
        if name not in obj:
            raise ValueError(f"{where}: missing field {name!r}")
        if not isinstance(obj[name], kind) or isinstance(obj[name], bool):
            raise ValueError(f"{where}: field {name!r} must be {getattr(kind, '__name__', kind)}, "
                             f"got {type(obj[name]).__name__}")


def check_unique(questions: list[Question], path: str) -> None:
    """A one-line ``ValueError`` naming the first id that two questions share."""
    seen: set[str] = set()
    for q in questions:
        if q.id in seen:
            raise ValueError(f"{path}: question id {q.id} occurs twice")
        seen.add(q.id)


def image_path(images: str | None, name: str) -> str | None:
    """``images/name`` (``None`` when no image directory was given)."""
    return None if images is None else os.path.join(images, name)
