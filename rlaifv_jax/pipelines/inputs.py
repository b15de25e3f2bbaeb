"""What an online run works on: prompts per iteration, evaluation records and the initial models
(the toy world warm-starts them; a prompt file and Hugging Face checkpoints are read as given)."""
from __future__ import annotations

import dataclasses
import functools
import logging
import os
from typing import Any, Callable

import ml_collections

from rlaifv_jax.core.errors import InputError
from rlaifv_jax.data import prompts as prompts_lib, toy_world
from rlaifv_jax.pipelines import warmstart

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Inputs:
    prompts_for: Callable[[int], list[dict[str, Any]]]  # iteration -> its prompts
    eval_records: list[dict[str, Any]]
    world: toy_world.WorldConfig | None  # ground truth for exact evaluation (toy only)
    prompt_report: dict[str, Any] | None  # what happened to every line of a prompt file


def toy(config: ml_collections.ConfigDict, workdir: str) -> Inputs:
    """The embedded world: warm-start the policy (and a toy labeler) into ``workdir``."""
    world = toy_world.WorldConfig(caption_partner_rate=config.world.caption_partner_rate)
    warm = toy_world.warmstart_split(world, config.world.n_warmstart, config.seed)
    warmstart.warm_start(config.model, config.warmstart, world, warm, os.path.join(workdir, "warmstart"),
                         seed=config.seed, progress=config.progress)
    if config.labeler.kind == "toy":
        labeler_records = (toy_world.labeler_split(world, config.world.n_warmstart, config.seed)
                           if config.toy_labeler.data == "yesno" else warm)
        warmstart.warm_start(config.toy_labeler.model, config.toy_labeler.warmstart, world, labeler_records,
                             os.path.join(workdir, "labeler_warmstart"), seed=config.seed + 1, progress=config.progress)
    n = config.world.n_prompts

    def prompts_for(k: int) -> list[dict[str, Any]]:
        return toy_world.prompt_split(world, n, config.seed, name=f"iter{k}", stream=100 + k)

    return Inputs(prompts_for, toy_world.eval_split(world, config.world.n_eval, config.seed), world, None)


@functools.lru_cache(maxsize=4)
def _read_prompts(path: str, mtime_ns: int, size: int):
    return prompts_lib.read_prompt_file(path)


def read_prompts(path: str) -> tuple[list[prompts_lib.PromptRecord], prompts_lib.PromptReport]:
    """The prompt file's usable records and report, read once per file version (validation reads it
    before the workdir is touched; the run then reuses it). ``InputError`` if it cannot be used."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise InputError(f"prompts.path={path!r}: {e.strerror}") from None
    try:
        return _read_prompts(path, st.st_mtime_ns, st.st_size)
    except ValueError as e:
        raise InputError(f"prompts.path: {e}") from None


def prompt_file(config: ml_collections.ConfigDict) -> Inputs:
    """A prompt JSONL (bad lines skipped and reported); ``prompts.per_iteration`` prompts per
    iteration, taken in turn."""
    good, report = read_prompts(config.prompts.path)
    log.info("prompts: kept %d, skipped %s", report.kept, dict(report.skipped))
    for line in report.problems:
        log.warning("prompt file %s", line)
    per = config.prompts.per_iteration or len(good)

    def prompts_for(k: int) -> list[dict[str, Any]]:
        start = (k * per) % len(good)
        return [good[(start + i) % len(good)] for i in range(min(per, len(good)))]

    return Inputs(prompts_for, [], None, report.to_dict())
