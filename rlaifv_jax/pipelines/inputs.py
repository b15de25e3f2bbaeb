"""What an online run works on: prompts per iteration, evaluation records and the initial models
(the toy world warm-starts them; a prompt file and Hugging Face checkpoints are read as given)."""
from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Callable

from rlaifv_jax.core.errors import InputError
from rlaifv_jax.data import prompts as prompts_lib, toy_world
from rlaifv_jax.pipelines import warmstart

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Inputs:
    prompts_for: Callable[[int], list[dict[str, Any]]]  # iteration -> its prompts
    eval_records: list[dict[str, Any]]
    world: toy_world.WorldSettings | None  # ground truth for exact evaluation (toy only)
    prompt_report: dict[str, Any] | None  # what happened to every line of a prompt file


@dataclasses.dataclass(frozen=True)
class ToyModelSettings:
    """A toy policy's (or toy labeler's) size: ``model.*`` / ``toy_labeler.model.*``."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    vision_hidden: int
    vision_layers: int
    patch: int


@dataclasses.dataclass(frozen=True)
class WarmstartSettings:
    """The supervised warm start of a toy model: ``warmstart.*`` / ``toy_labeler.warmstart.*``."""

    steps: int
    batch_size: int
    learning_rate: float


@dataclasses.dataclass(frozen=True)
class ToySettings:
    """The embedded world (``source="toy"``): its sizes and the toy models to warm-start."""

    seed: int
    progress: bool
    caption_partner_rate: float
    n_warmstart: int
    n_prompts: int
    n_eval: int
    model: ToyModelSettings
    warmstart: WarmstartSettings
    labeler: tuple[ToyModelSettings, WarmstartSettings] | None  # labeler.kind="toy": its size and warm start
    labeler_data: str = "clean"  # the toy labeler's warm-start data (toy_labeler.data): toy_world.LABELER_DATA


@dataclasses.dataclass(frozen=True)
class PromptFileSettings:
    """A prompt JSONL (``source="files"``), read once by validation."""

    records: list[prompts_lib.PromptRecord]  # the usable lines
    report: prompts_lib.PromptReport  # what happened to every line
    per_iteration: int  # prompts per iteration (0: all)


def toy(spec: ToySettings, workdir: str) -> Inputs:
    """The embedded world: warm-start the policy (and a toy labeler) into ``workdir``."""
    world = toy_world.WorldSettings(caption_partner_rate=spec.caption_partner_rate)
    warm = toy_world.warmstart_split(world, spec.n_warmstart, spec.seed)
    warmstart.warm_start(spec.model, spec.warmstart, world, warm, os.path.join(workdir, "warmstart"),
                         seed=spec.seed, progress=spec.progress)
    if spec.labeler is not None:
        labeler_records = toy_world.labeler_records(world, spec.labeler_data, spec.n_warmstart, spec.seed)
        warmstart.warm_start(*spec.labeler, world, labeler_records, os.path.join(workdir, "labeler_warmstart"),
                             seed=spec.seed + 1, progress=spec.progress)
    n = spec.n_prompts

    def prompts_for(k: int) -> list[dict[str, Any]]:
        return toy_world.prompt_split(world, n, spec.seed, name=f"iter{k}", stream=100 + k)

    return Inputs(prompts_for, toy_world.eval_split(world, spec.n_eval, spec.seed), world, None)


def read_prompts(path: str, image_root: str = "", allow_outside_root: bool = False
                 ) -> tuple[list[prompts_lib.PromptRecord], prompts_lib.PromptReport]:
    """The prompt file's usable records and report (image paths confined to ``image_root``, default
    the file's folder, unless ``allow_outside_root``). ``InputError`` if it cannot be used."""
    try:
        return prompts_lib.read_prompt_file(path, image_root, allow_outside_root)
    except ValueError as e:
        raise InputError(f"prompts.path: {e}") from None


def prompt_file(spec: PromptFileSettings) -> Inputs:
    """A prompt JSONL (bad lines skipped and reported); ``per_iteration`` prompts per iteration, taken
    in turn."""
    good, report = spec.records, spec.report
    log.info("prompts: kept %d, skipped %s", report.kept, dict(report.skipped))
    for line in report.problems:
        log.warning("prompt file %s", line)
    per = spec.per_iteration or len(good)

    def prompts_for(k: int) -> list[dict[str, Any]]:
        start = (k * per) % len(good)
        return [good[(start + i) % len(good)] for i in range(min(per, len(good)))]

    return Inputs(prompts_for, [], None, report.to_dict())
