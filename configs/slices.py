"""Decode batches per TPU slice for the paper configs: what ``python -m rlaifv_jax.plan --tune``
chose on each slice of docs/PLAN.md, picked by the config's argument.

    python -m rlaifv_jax.main --config configs/llava15_7b_self.py:v6e-8 ...   # v6e-8's batches
    python -m rlaifv_jax.main --config configs/llava15_7b_self.py ...         # the config's default slice

A slice's entry sets every field in ``FIELDS``: the sampler's prompts per call and continuous decode
slots, the claims LLM's messages per call (and prompts per claims shard, so that a shard's
``batch_size × num_samples`` responses fill whole calls), and the mesh the batches were planned
on. ``--config.<field>=…`` flags still override any of them. ``config.slice`` names the slice; a run
on another TPU slice logs a warning (``core.hardware.slice_mismatch``).
"""
from __future__ import annotations

import ml_collections

from rlaifv_jax.plan_tune import claims_shard

FIELDS = ("sampling.batch_size", "sampling.decode_rows", "claims.batch_size", "claims.llm_batch_size",
          "claims.decode_rows", "mesh.data", "mesh.fsdp", "mesh.tensor")

Table = dict[str, dict[str, int]]


def entry(*, sample: tuple[int, int], claims: tuple[int, int], mesh: tuple[int, int, int] = (1, -1, 1),
          num_samples: int = 10) -> dict[str, int]:
    """One slice's fields: ``sample = (prompts per call, decode slots or 0)``, ``claims = (messages per
    call, decode slots or 0)``, ``mesh = (data, fsdp, tensor)``. The claims shard is the fewest
    prompts whose ``num_samples`` responses each fill whole claims calls."""
    values = (*sample, claims_shard(claims[0], num_samples), *claims, *mesh)
    return dict(zip(FIELDS, values))


def apply(c: ml_collections.ConfigDict, arg: str | None, table: Table, default: str = "v5p-8"
          ) -> ml_collections.ConfigDict:
    """Set ``table[arg or default]``'s fields on ``c`` and ``c.slice``; an unknown slice is a one-line
    error naming the known ones."""
    name = arg or default
    if name not in table:
        raise ValueError(f"no decode batches for slice {name!r} in this config (known: {', '.join(sorted(table))}); "
                         f"plan them with python -m rlaifv_jax.plan --config <this config> --topology {name} "
                         f"--tune and pass the --config.* overrides it prints")
    for key, value in table[name].items():
        section, field = key.split(".")
        c[section][field] = value
    c.slice = name
    return c
