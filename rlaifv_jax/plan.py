"""Ahead-of-time plan of an online RLAIF-V iteration on a TPU slice: does the config fit, how fast
should it run? Nothing runs and no weights are read: models are built abstractly from their
``config.json`` (``nnx.eval_shape``; ``configs/arch/`` holds presets of the paper's models), and
every stage's jitted programs are compiled for the named slice from abstract arguments.

python -m rlaifv_jax.plan --config configs/llava15_7b_self.py \\
  --config.policy.path=configs/arch/llava-1.5-7b --config.claims.split_path=configs/arch/llama-3-8b-instruct \\
  --topology v5p-8 [--json plan.json] [--stages sample,dpo_step]

Per program: peak HBM per chip (arguments + outputs - donated aliases + temporaries, from
``memory_analysis``), FLOPs per chip and the compiler's time estimate (``cost_analysis``), implied
MFU against the chip's peak bf16 FLOP/s, the HBM-roofline fraction of decode steps, the resident
weights (+ optimizer state), and an estimated wall time per online iteration from the config's
counts. Exits 1 when a stage does not fit, naming it and the knobs that help. See docs/PLAN.md.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from rlaifv_jax.core import hardware, sharding as shd
from rlaifv_jax.core.hardware import GIB
from rlaifv_jax.engine import generate, logps, score, vision
from rlaifv_jax.engine.logits import SamplingConfig
from rlaifv_jax.feedback.claims import CLAIM_LLM_DECODING
from rlaifv_jax.models import anyres, hf
from rlaifv_jax.models.llava import Llava, LlavaNext
from rlaifv_jax.training import step as dpo

KNOBS = {
    "train": ("a larger fsdp axis (--config.mesh.fsdp, or a bigger slice)", "a tensor axis (--config.mesh.tensor)",
              "bf16 master weights (dpo.master_dtype=bfloat16)", "bf16 optimizer state (dpo.optimizer_state_dtype=bfloat16)",
              "remat (dpo.remat=full)", "a smaller dpo.batch_size with dpo.grad_accum", "LoRA"),
    "serve": ("a tensor axis (--config.mesh.tensor)", "bf16 weights (--config.policy.param_dtype=bfloat16)",
              "a smaller batch (sampling.batch_size / labeler.batch_size)", "a bigger slice"),
}


@dataclasses.dataclass(frozen=True)
class Assumptions:
    """What a config does not say but the plan needs (shapes of typical inputs)."""

    image_size: tuple[int, int] = (480, 640)  # (height, width) of a prompt image (anyres token count)
    prompt_text_tokens: int = 64  # sampler prompt tokens besides the image (system prompt, question)
    prefix_text_tokens: int = 48  # labeler image-prefix tokens besides the image
    question_tokens: int = 32  # labeler question + "Please answer yes or no." + assistant tag
    claims_per_response: int = 8  # yes/no questions per response
    claims_prompt_tokens: int = 160  # split/convert instructions, question; the answer adds its tokens


@dataclasses.dataclass
class Stage:
    """One compiled program's figures, per chip."""

    name: str
    kind: str  # "serve" | "train": which knobs help
    bytes_per_chip: int | None = None
    resident_bytes: int = 0  # weights (+ optimizer state) among the arguments
    flops_per_chip: float | None = None
    seconds: float | None = None  # compiler's estimate for one call (one decode step for decode)
    bytes_accessed: float | None = None
    tokens_per_step: int = 0
    calls: float = 0  # per online iteration (decode: steps)
    fits: bool = True
    variant: bool = False  # an alternative setting shown for comparison, not part of the run
    note: str = ""
    mfu: float | None = None
    hbm_roofline: float | None = None

    def public(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------- models
def architecture(config: ml_collections.ConfigDict, role: str) -> tuple[str, dict[str, Any]]:
    """``(architecture, config.json dict)`` of ``role``: policy, labeler, claims_split, claims_convert."""
    if config.source == "toy" and role in ("policy", "labeler"):
        from rlaifv_jax.data import toy_world
        from rlaifv_jax.pipelines.warmstart import toy_model_config
        world = toy_world.WorldConfig(caption_partner_rate=config.world.caption_partner_rate)
        size = config.toy_labeler.model if role == "labeler" and config.labeler.kind == "toy" else config.model
        return "LlavaForConditionalGeneration", toy_model_config(toy_world.build_tokenizer(world), world, size)
    field = {"policy": "policy.path", "labeler": "labeler.path", "claims_split": "claims.split_path",
             "claims_convert": "claims.convert_path"}[role]
    section, name = field.split(".")
    path = config[section][name]
    if not path:
        raise ValueError(f"{field} is empty: point it at a checkpoint or an architecture preset "
                         f"(e.g. configs/arch/llava-1.5-7b, configs/arch/llama-3-8b-instruct)")
    return hf.read_config(path)


def abstract_model(arch: tuple[str, dict], dtype: str, param_dtype: str) -> nnx.Module:
    """The module of ``arch`` with ``jax.ShapeDtypeStruct`` leaves: no memory, no devices."""
    return nnx.eval_shape(lambda: hf.build_model(arch[0], arch[1], dtype=hf.parse_dtype(dtype),
                                                 param_dtype=hf.parse_dtype(param_dtype)))


def sharded_state(model: nnx.Module, mesh, rules) -> nnx.State:
    state = nnx.state(model)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state,
                        shd.state_shardings(state, mesh, rules))


def per_chip_bytes(tree: Any) -> int:
    """Bytes one device holds of the sharded abstract arrays in ``tree``."""
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
               for x in jax.tree.leaves(tree) if isinstance(x, jax.ShapeDtypeStruct))


def replicated(mesh, shape, dtype) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(shape, dtype, sharding=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))


# ----------------------------------------------------------------------------- measuring
_OOM = re.compile(r"Used ([\d.]+)([KMGT]) of ([\d.]+)([KMGT]) hbm")


def _hbm_overflow(message: str) -> tuple[int, int] | None:
    """``(needed, available)`` bytes from an XLA:TPU "ran out of memory in memory space hbm" error."""
    m = _OOM.search(message)
    if not m:
        return None
    unit = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    return int(float(m.group(1)) * unit[m.group(2)]), int(float(m.group(3)) * unit[m.group(4)])


def peak_bytes(compiled) -> int:
    """Peak HBM of a compiled program per device: arguments + outputs - donated aliases + temporaries."""
    m = compiled.memory_analysis()
    return m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes


def measure(stage: Stage, compiled, topo: hardware.Slice, *, loop_trips: int = 1) -> Stage:
    """Fill ``stage`` from a compiled program. ``loop_trips``: XLA's cost analysis counts a loop body
    once, so a program whose work is a ``loop_trips``-times loop (grad accumulation) is scaled."""
    cost = compiled.cost_analysis()
    cost = (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}
    stage.bytes_per_chip = peak_bytes(compiled)
    stage.flops_per_chip = cost.get("flops", 0.0) * loop_trips
    stage.bytes_accessed = cost.get("bytes accessed")
    secs = cost.get("optimal_seconds")
    stage.seconds = None if secs is None or secs <= 0 else secs * loop_trips
    chip = topo.chip
    if chip is not None and stage.seconds:
        stage.mfu = stage.flops_per_chip / stage.seconds / chip.peak_bf16_flops
        if stage.name.endswith("decode") and stage.bytes_accessed:
            stage.hbm_roofline = stage.bytes_accessed / chip.hbm_bytes_per_s / stage.seconds
    return stage


def run_stage(stages: list[Stage], topo: hardware.Slice, template: Stage, build: Callable[[], dict[str, Any]],
              args: Any, names: tuple[str, ...], extra: dict[str, dict] | None = None, loop_trips: int = 1) -> None:
    """Compile ``build()`` (a dict of compiled programs named like ``names``) unless its arguments
    alone exceed HBM, and append one :class:`Stage` per program (an XLA out-of-HBM error is a result)."""
    hbm = topo.hbm_bytes
    started = time.perf_counter()
    arg_bytes = per_chip_bytes(args)
    out = [dataclasses.replace(template, name=f"{template.name}/{n}" if len(names) > 1 else template.name,
                               **(extra or {}).get(n, {})) for n in names]
    if hbm is not None and arg_bytes > hbm:
        for s in out:
            s.bytes_per_chip, s.fits, s.note = arg_bytes, False, "arguments alone exceed HBM (not compiled)"
    else:
        try:
            programs = build()
        except Exception as e:  # noqa: BLE001 — only XLA's out-of-HBM verdict is a result
            overflow = _hbm_overflow(str(e))
            if overflow is None:
                raise
            for s in out:
                s.bytes_per_chip, s.fits, s.note = overflow[0], False, "XLA: out of HBM"
        else:
            for s, n in zip(out, names):
                measure(s, programs[n], topo, loop_trips=loop_trips if n == names[-1] else 1)
                s.fits = hbm is None or s.bytes_per_chip <= hbm
    print(f"  compiled {template.name} in {time.perf_counter() - started:.0f}s", file=sys.stderr, flush=True)
    stages.extend(out)
