"""Append-only JSON-lines files (``metrics.jsonl``, ``config_history.jsonl``) that survive a kill.

A process killed while appending can leave a half-written last line. :func:`read` drops such a
torn last line (with a warning naming the file) and, with ``repair=True``, truncates the file to its
last complete line, so the next append starts on a clean line. A bad line that is not the last
one is corruption, not a torn write: it is an :class:`~rlaifv_jax.core.errors.InputError` naming
the file and the line.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any

from rlaifv_jax.core import paths
from rlaifv_jax.core.errors import InputError

log = logging.getLogger(__name__)


def read(path: str, *, repair: bool = False) -> list[dict[str, Any]]:
    """The rows of ``path`` (none if it does not exist); a torn last line is dropped (and cut off
    the file when ``repair``)."""
    if not paths.exists(path):
        return []
    text = paths.read_text(path)
    lines = text.split("\n")
    rows, good_chars = [], 0
    for n, line in enumerate(lines, 1):
        if not line.strip():
            good_chars += len(line) + 1
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError("not a JSON object")
        except ValueError as e:
            if any(rest.strip() for rest in lines[n:]):
                raise InputError(f"{path} line {n}: not a JSON object ({e}); the file is corrupt") from None
            log.warning("%s: dropped a torn last line (line %d, %d characters) left by an interrupted write",
                        path, n, len(line))
            if repair:
                paths.atomic_write_text(path, text[:good_chars])
            return rows
        rows.append(row)
        good_chars += len(line) + 1
    return rows


def rewrite(path: str, rows: list[dict[str, Any]]) -> None:
    """Replace ``path`` with ``rows``, atomically."""
    paths.atomic_write_text(path, "".join(json.dumps(r, allow_nan=False) + "\n" for r in rows))


def append(path: str, row: dict[str, Any]) -> None:
    """Append ``row`` as one line (``allow_nan=False``: a NaN never reaches the file). Local files are
    appended in place; a cloud object is rewritten (object stores cannot append)."""
    line = json.dumps(row, allow_nan=False) + "\n"
    if paths.is_remote(path):
        paths.atomic_write_text(path, (paths.read_text(path) if paths.exists(path) else "") + line)
        return
    with open(path, "a", encoding="utf-8") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())
