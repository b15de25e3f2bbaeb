"""``workdir/summary.json`` (one entry per evaluation point) and ``summary.jsonl``, rewritten
atomically, plus the numeric fields as TensorBoard scalars under ``workdir/tensorboard``."""
from __future__ import annotations

import json
import logging
import math
import os
from typing import Any

import jax

from rlaifv_jax.core import records

log = logging.getLogger(__name__)


def finite(value: Any, where: str = "") -> Any:
    """``value`` with every non-finite float replaced by None (JSON has no NaN), each one logged."""
    if isinstance(value, dict):
        return {k: finite(v, f"{where}.{k}" if where else str(k)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, float) and not math.isfinite(value):
        log.warning("summary: %s is %s; stored as null", where, value)
        return None
    return value


class Summary:
    def __init__(self, workdir: str):
        self.workdir = workdir
        self.path = os.path.join(workdir, "summary.json")
        self.entries: list[dict[str, Any]] = []
        if os.path.exists(self.path):
            with open(self.path) as f:
                self.entries = json.load(f)

    def put(self, entry: dict[str, Any]) -> None:
        """Add (or replace) the entry of ``entry["iteration"]``; process 0 writes (non-finite numbers
        become null: the files are strict JSON)."""
        entry = finite(entry)
        self.entries = [e for e in self.entries if e["iteration"] != entry["iteration"]] + [entry]
        self.entries.sort(key=lambda e: e["iteration"])
        if jax.process_index() != 0:
            return
        records.atomic_write_text(self.path, json.dumps(self.entries, indent=2, allow_nan=False))
        records.atomic_write_text(os.path.join(self.workdir, "summary.jsonl"),
                                  "".join(json.dumps(e, allow_nan=False) + "\n" for e in self.entries))
        from tensorboardX import SummaryWriter
        with SummaryWriter(os.path.join(self.workdir, "tensorboard")) as tb:
            for key, value in entry.items():
                if isinstance(value, (int, float)) and key != "iteration":
                    tb.add_scalar(f"eval/{key}", value, entry["iteration"])

    def has(self, iteration: int) -> bool:
        return any(e["iteration"] == iteration for e in self.entries)
