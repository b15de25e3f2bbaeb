"""What the planner builds from a config without weights: the abstract models (from ``config.json``
files or the architecture presets in ``configs/arch/``), and the shapes of typical inputs
(:class:`Assumptions`: prompt images, prompt and question lengths, response lengths)."""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

import jax
import numpy as np
from flax import nnx

from rlaifv_jax.core import aot
from rlaifv_jax.data import buckets
from rlaifv_jax.engine import generate, logps, vision
from rlaifv_jax.models import anyres, hf
from rlaifv_jax.models.llava import LlavaNext
from rlaifv_jax.pipelines.spec import PlanSpec
from rlaifv_jax.training import step as dpo

# The architecture presets of the paper's models (config.json only; no weights).
ARCH_PRESETS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "arch")


@dataclasses.dataclass(frozen=True)
class Assumptions:
    """What a config does not say but the plan needs (shapes of typical inputs)."""

    image_size: tuple[int, int] = (480, 640)  # (height, width) of a prompt image (anyres token count)
    prompt_text_tokens: int = 64  # sampler prompt tokens besides the image (system prompt, question)
    prefix_text_tokens: int = 48  # labeler image-prefix tokens besides the image
    question_tokens: int = 32  # labeler question + "Please answer yes or no." + assistant tag
    claims_per_response: int = 8  # yes/no questions per response
    response_tokens: float = 160.0  # mean generated tokens per response, policy and claims LLM alike (not
    # measured here: a stated assumption, --response_tokens; the upper bound beside it takes max_new_tokens)
    longest_response: int = 0  # the longest response of a batch (0: the stage's max_new_tokens)
    claims_prompt_tokens: int = 160  # split/convert instructions, question; the answer adds its tokens
    min_image_tokens: int = 4  # Qwen-VL image processor's resize bounds in image tokens (the pixel bounds are
    max_image_tokens: int = 1280  # these × (patch · merge)²): the hub's min_pixels, and the max_pixels (Qwen2.5-VL,
    # 1280·28·28) / longest_edge (Qwen3-VL, 1280·32·32) that configs/qwen*_self.py recommend

    def pixel_bounds(self, vision_config: Any) -> tuple[int, int]:
        """``(min_pixels, max_pixels)`` of a Qwen-VL image processor for this tower's patch and merge."""
        unit = (vision_config.patch_size * getattr(vision_config, "spatial_merge_size", 1)) ** 2
        return self.min_image_tokens * unit, self.max_image_tokens * unit


# ----------------------------------------------------------------------------- models
def architecture(spec: PlanSpec, role: str) -> tuple[str, dict[str, Any]]:
    """``(architecture, config.json dict)`` of ``role``: policy, labeler, claims_split, claims_convert."""
    if spec.toy is not None and role in ("policy", "labeler"):
        from rlaifv_jax.data import toy_world
        from rlaifv_jax.pipelines.warmstart import toy_model_config
        world = toy_world.WorldSettings(caption_partner_rate=spec.toy.caption_partner_rate)
        size = spec.toy.labeler[0] if role == "labeler" and spec.labeler_kind == "toy" else spec.toy.model
        return "LlavaForConditionalGeneration", toy_model_config(toy_world.build_tokenizer(world), world, size)
    path = model_dir(*spec.archs[role])
    if not path:
        section = "claims." + role.split("_")[1] + "_" if role.startswith("claims") else role + "."
        raise ValueError(f"{section}path and {section}arch are empty: name a checkpoint directory or an "
                         f"architecture preset ({', '.join(sorted(os.listdir(ARCH_PRESETS)))})")
    return hf.read_config(path)


def model_dir(path: str, preset: str) -> str:
    """The directory whose ``config.json`` describes a model: the checkpoint ``path``, else the
    ``preset`` in ``configs/arch/`` (a preset with a ``/`` is taken as a path); "" if neither."""
    if path or not preset:
        return path
    return preset if os.sep in preset else os.path.join(ARCH_PRESETS, preset)


def abstract_model(arch: tuple[str, dict], dtype: str, param_dtype: str) -> nnx.Module:
    """The module of ``arch`` with ``jax.ShapeDtypeStruct`` leaves: no memory, no devices."""
    return nnx.eval_shape(lambda: hf.build_model(arch[0], arch[1], dtype=hf.parse_dtype(dtype),
                                                 param_dtype=hf.parse_dtype(param_dtype)))


# ----------------------------------------------------------------------------- stages
def prompt_bucket(tokens: int) -> int:
    """The sampler's length bucket of a prompt of ``tokens`` tokens (``generate.DEFAULT_BUCKETS``, then 512s)."""
    return next((b for b in generate.DEFAULT_BUCKETS if b >= tokens), -(-tokens // 512) * 512)


def prompt_image(model: nnx.Module, assume: Assumptions) -> tuple[np.ndarray, Any, int]:
    """Zero ``pixel_values`` of one ``assume.image_size`` prompt image as ``model``'s image processor
    shapes them, their layout (Qwen2.5-VL: ``image_grid_thw``; LLaVA-NeXT: ``image_sizes``; LLaVA-1.5:
    None) and the image tokens they give."""
    v = model.config.vision
    if vision.layout_key(model) == "image_grid_thw":  # the processor's resize to its pixel bounds
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize
        low, high = assume.pixel_bounds(v)
        h, w = smart_resize(*assume.image_size, factor=v.patch_size * v.spatial_merge_size,
                            min_pixels=low, max_pixels=high)
        grid = np.array([[1, h // v.patch_size, w // v.patch_size]])
        return np.zeros((int(grid.prod()), v.patch_dim), np.float32), grid, model.num_image_tokens(grid)
    if isinstance(model, LlavaNext):
        tiles = anyres.num_patches(assume.image_size, model.config.image_grid_pinpoints, v.image_size)
        pixels = np.zeros((1, tiles, v.num_channels, v.image_size, v.image_size), np.float32)
        return pixels, np.array([assume.image_size]), model.num_image_tokens(assume.image_size)
    return np.zeros((1, v.num_channels, v.image_size, v.image_size), np.float32), None, model.num_image_tokens()


def tower_input(model: nnx.Module, mesh: Any, pixels: np.ndarray, layout: Any) -> Any:
    """The abstract argument of ``engine.vision.lower_features`` for one image, as ``engine.vision``
    builds it: the model's own ``vision_inputs`` (Qwen2.5-VL's bucketed tower layout) or the pixels."""
    x = model.vision_inputs(pixels, layout) if hasattr(model, "vision_inputs") else pixels
    return jax.tree.map(lambda a: aot.replicated(mesh, np.shape(a), np.asarray(a).dtype), x)


def pair_image(model: nnx.Module, assume: Assumptions, length: int) -> dict[str, np.ndarray]:
    """The image arrays of one DPO pair padded to ``length`` tokens (``engine.logps.pair_image_arrays``,
    as the DPO stage encodes them; Qwen-VL: padded to the patches of ``assume.max_image_tokens``)."""
    pixels, layout, tokens = prompt_image(model, assume)
    text = assume.prompt_text_tokens // 2
    prompt = np.zeros(tokens + assume.prompt_text_tokens, np.int32)
    prompt[text:text + tokens] = model.config.image_token_id
    return logps.pair_image_arrays(model, pixels, layout, prompt, length,
                                   max_patches=assume.pixel_bounds(model.config.vision)[1]
                                   // model.config.vision.patch_size ** 2)


def dpo_settings(spec: PlanSpec, steps: int) -> tuple[dpo.OptimSettings, dpo.LossSettings]:
    """The train step's settings as the online loop builds them, for ``steps`` optimizer steps."""
    return dataclasses.replace(spec.dpo.train.optim, total_steps=max(steps, 1)), spec.dpo.train.loss


def dpo_window(spec: PlanSpec) -> int | None:
    """The automatic LM-head window (``data.buckets``) of a batch of ``dpo.max_length`` tokens whose
    longest answer is a full sampled response (``sampling.max_new_tokens`` + the end-of-turn token)."""
    return buckets.answer_window(spec.sample.max_new_tokens + 1, spec.dpo.max_length)


def iteration_counts(spec: PlanSpec, assume: Assumptions) -> dict[str, int]:
    """Prompts, responses, questions, pairs and optimizer steps of one online iteration (upper bounds:
    every prompt gives ``pairs.per_prompt`` pairs)."""
    pairs = spec.prompts * spec.pairs.per_prompt
    return {"prompts": spec.prompts, "responses": spec.prompts * spec.sample.num_samples,
            "questions_per_prompt": spec.sample.num_samples * assume.claims_per_response, "pairs": pairs,
            "dpo_steps": math.ceil(pairs / spec.dpo.batch_size) * spec.dpo.epochs}
