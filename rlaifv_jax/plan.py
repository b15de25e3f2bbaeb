"""Ahead-of-time plan of an online RLAIF-V iteration on a TPU slice: does the config fit, how fast
should it run? Nothing runs and no weights are read: models are built abstractly from their
``config.json`` (``nnx.eval_shape``; ``configs/arch/`` holds presets of the paper's models), and
every stage's jitted programs are compiled for the named slice from abstract arguments.

python -m rlaifv_jax.plan --config configs/llava15_7b_self.py --topology v5p-8 \\
  [--json plan.json] [--stages sample,dpo_step]

A model whose checkpoint path is empty is built from the architecture preset the config names
(``policy.arch``, ``labeler.arch``, ``claims.split_arch``, ``claims.convert_arch``: a directory under
``configs/arch/`` holding a ``config.json``); a path wins over a preset.

Per program: peak HBM per chip (arguments + outputs - donated aliases + temporaries, from
``memory_analysis``), FLOPs per chip and the compiler's time estimate (``cost_analysis``), implied
MFU against the chip's peak bf16 FLOP/s, the HBM-roofline fraction of decode steps, the resident
weights (+ optimizer state), and an estimated wall time per online iteration from the config's
counts. Exits 1 when a stage does not fit, naming it and the knobs that help (``plan_report``).
See docs/PLAN.md.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import sys
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from rlaifv_jax.core import aot, hardware, sharding as shd, vocabulary
from rlaifv_jax.data import buckets
from rlaifv_jax import plan_report
from rlaifv_jax.engine import generate, logps, score, vision
from rlaifv_jax.engine.logits import DecodeSettings
from rlaifv_jax.feedback.claims import CLAIM_LLM_DECODING
from rlaifv_jax.models import anyres, hf
from rlaifv_jax.models.llava import LlavaNext
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
    claims_prompt_tokens: int = 160  # split/convert instructions, question; the answer adds its tokens
    min_image_tokens: int = 4  # Qwen-VL image processor's resize bounds in image tokens (the pixel bounds are
    max_image_tokens: int = 1280  # these × (patch · merge)²): the hub's min_pixels, and the max_pixels (Qwen2.5-VL,
    # 1280·28·28) / longest_edge (Qwen3-VL, 1280·32·32) that configs/qwen*_self.py recommend

    def pixel_bounds(self, vision_config: Any) -> tuple[int, int]:
        """``(min_pixels, max_pixels)`` of a Qwen-VL image processor for this tower's patch and merge."""
        unit = (vision_config.patch_size * vision_config.spatial_merge_size) ** 2
        return self.min_image_tokens * unit, self.max_image_tokens * unit


# ----------------------------------------------------------------------------- models
def architecture(config: ml_collections.ConfigDict, role: str) -> tuple[str, dict[str, Any]]:
    """``(architecture, config.json dict)`` of ``role``: policy, labeler, claims_split, claims_convert."""
    if config.source == "toy" and role in ("policy", "labeler"):
        from rlaifv_jax.data import toy_world
        from rlaifv_jax.pipelines.warmstart import toy_model_config
        world = toy_world.WorldConfig(caption_partner_rate=config.world.caption_partner_rate)
        size = config.toy_labeler.model if role == "labeler" and config.labeler.kind == "toy" else config.model
        return "LlavaForConditionalGeneration", toy_model_config(toy_world.build_tokenizer(world), world, size)
    field, preset = {"policy": ("policy.path", "policy.arch"), "labeler": ("labeler.path", "labeler.arch"),
                     "claims_split": ("claims.split_path", "claims.split_arch"),
                     "claims_convert": ("claims.convert_path", "claims.convert_arch")}[role]
    path = model_dir(config, field, preset)
    if not path:
        raise ValueError(f"{field} and {preset} are empty: name a checkpoint directory or an architecture preset "
                         f"({', '.join(sorted(os.listdir(ARCH_PRESETS)))})")
    return hf.read_config(path)


def model_dir(config: ml_collections.ConfigDict, path_field: str, preset_field: str) -> str:
    """The directory whose ``config.json`` describes a model: ``path_field``'s checkpoint, else the
    preset ``preset_field`` names in ``configs/arch/`` (a path with a ``/`` is taken as given); "" if neither."""
    section, name = path_field.split(".")
    path = config[section][name]
    preset = config[section].get(preset_field.split(".")[1], "")
    if path or not preset:
        return path
    return preset if os.sep in preset else os.path.join(ARCH_PRESETS, preset)


def abstract_model(arch: tuple[str, dict], dtype: str, param_dtype: str) -> nnx.Module:
    """The module of ``arch`` with ``jax.ShapeDtypeStruct`` leaves: no memory, no devices."""
    return nnx.eval_shape(lambda: hf.build_model(arch[0], arch[1], dtype=hf.parse_dtype(dtype),
                                                 param_dtype=hf.parse_dtype(param_dtype)))


# ----------------------------------------------------------------------------- stages
def _bucket(tokens: int) -> int:
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


def dpo_settings(config: ml_collections.ConfigDict, steps: int) -> tuple[dpo.OptimSettings, dpo.LossSettings]:
    """The train step's settings as the online loop builds them (plus the remat / dtype options)."""
    d = config.dpo
    optim = dpo.OptimSettings(learning_rate=d.learning_rate, warmup_ratio=d.warmup_ratio, weight_decay=d.weight_decay,
                            max_grad_norm=d.max_grad_norm, total_steps=max(steps, 1),
                            master_dtype=d.get("master_dtype", "float32"),
                            state_dtype=d.get("optimizer_state_dtype", "float32"))
    loss = dpo.LossSettings(beta=d.beta, loss_type=d.loss_type, label_smoothing=d.label_smoothing,
                          grad_accum=d.grad_accum, remat=d.get("remat", "none"))
    return optim, loss


def dpo_window(config: ml_collections.ConfigDict) -> int | None:
    """The automatic LM-head window (``data.buckets``) of a batch of ``dpo.max_length`` tokens whose
    longest answer is a full sampled response (``sampling.max_new_tokens`` + the end-of-turn token)."""
    return buckets.answer_window(config.sampling.max_new_tokens + 1, config.dpo.max_length)


def iteration_counts(config: ml_collections.ConfigDict, assume: Assumptions) -> dict[str, int]:
    """Prompts, responses, questions, pairs and optimizer steps of one online iteration (upper bounds:
    every prompt gives ``pairs.per_prompt`` pairs)."""
    if config.source == "toy":
        prompts = config.world.n_prompts
    elif config.prompts.per_iteration:
        prompts = config.prompts.per_iteration
    else:
        raise ValueError("prompts.per_iteration=0 (all prompts): set it to the prompts per iteration to plan")
    pairs = prompts * config.pairs.per_prompt
    return {"prompts": prompts, "responses": prompts * config.sampling.num_samples,
            "questions_per_prompt": config.sampling.num_samples * assume.claims_per_response, "pairs": pairs,
            "dpo_steps": math.ceil(pairs / config.dpo.batch_size) * config.dpo.epochs}


@dataclasses.dataclass
class Planner:
    """Compiles one config's stages for one mesh and collects their :class:`aot.Stage` rows."""

    config: ml_collections.ConfigDict
    topo: hardware.Slice
    mesh: Any
    assume: Assumptions
    counts: dict[str, int]
    stages: list[aot.Stage] = dataclasses.field(default_factory=list)

    def vision(self, name: str, model: nnx.Module, state: Any) -> int:
        pixels, layout, tokens = prompt_image(model, self.assume)
        px = tower_input(model, self.mesh, pixels, layout)

        aot.run_stage(self.stages, self.topo, aot.Stage(name, "serve", resident_bytes=aot.per_chip_bytes(state),
                                                tokens_per_step=tokens, calls=self.counts["prompts"]),
                  lambda: {"vision": vision.lower_features(model, state, px, self.mesh)}, state, ("vision",))
        return tokens

    def generation(self, name: str, model: nnx.Module, *, batch: int, length: int, num_samples: int, max_new: int,
                   sampling: DecodeSettings, calls: int) -> None:
        state = aot.sharded(nnx.state(model), self.mesh, shd.SERVE_RULES)
        extra = {"prefill": dict(tokens_per_step=batch * length, calls=calls),
                 "decode": dict(tokens_per_step=batch * num_samples, calls=calls * max_new,
                                note="one step; calls = steps at max_new_tokens")}
        aot.run_stage(self.stages, self.topo, aot.Stage(name, "serve", resident_bytes=aot.per_chip_bytes(state)),
                  lambda: generate.lower_programs(model, state, self.mesh, batch=batch, length=length,
                                                  num_samples=num_samples, max_new_tokens=max_new, sampling=sampling),
                  state, ("prefill", "decode"), extra)

    def sample(self, policy: nnx.Module) -> None:
        s = self.config.sampling
        tokens = self.vision("sample/vision", policy, aot.sharded(nnx.state(policy), self.mesh, shd.SERVE_RULES))
        sampling = DecodeSettings(temperature=s.temperature, top_k=s.top_k or None, top_p=s.top_p if s.top_p < 1 else None,
                                  repetition_penalty=s.repetition_penalty if s.repetition_penalty != 1 else None)
        self.generation("sample", policy, batch=s.batch_size, length=_bucket(tokens + self.assume.prompt_text_tokens),
                        num_samples=s.num_samples, max_new=s.max_new_tokens, sampling=sampling,
                        calls=math.ceil(self.counts["prompts"] / s.batch_size))

    def claims(self) -> None:
        """Split and convert calls of the claims LLM(s): each response goes through both."""
        c, dec = self.config, CLAIM_LLM_DECODING
        batch = c.claims.llm_batch_size  # rows the claims stage decodes together
        archs = {"claims/split": architecture(c, "claims_split")}
        if c.claims.convert_path or c.claims.get("convert_arch"):
            archs["claims/convert"] = architecture(c, "claims_convert")
        calls = math.ceil(self.counts["responses"] / batch)
        if len(archs) == 1 or archs["claims/convert"] == archs["claims/split"]:
            archs, calls = {"claims": archs["claims/split"]}, 2 * calls  # one model answers both calls
        for name, arch in archs.items():
            llm = abstract_model(arch, c.policy.dtype, c.policy.dtype)
            self.generation(name, llm, batch=batch, num_samples=1, max_new=dec.max_new_tokens, calls=calls,
                            length=_bucket(self.assume.claims_prompt_tokens + min(c.sampling.max_new_tokens, 400)),
                            sampling=DecodeSettings(temperature=dec.temperature, top_k=dec.top_k, top_p=dec.top_p))

    def label(self, labeler: nnx.Module) -> None:
        c, a, questions = self.config, self.assume, self.counts["questions_per_prompt"]
        state = aot.sharded(nnx.state(labeler), self.mesh, shd.SERVE_RULES)
        tokens = self.vision("label/vision", labeler, state)
        rows = min(c.labeler.batch_size, score.row_bucket(questions))
        pb = score.round_up(tokens + a.prefix_text_tokens, score.PREFIX_MULTIPLE)
        cb = score.round_up(a.question_tokens, score.CONTINUATION_MULTIPLE)
        rep = None if c.labeler.repetition_penalty == 1.0 else c.labeler.repetition_penalty
        aot.run_stage(self.stages, self.topo, aot.Stage("label", "serve", resident_bytes=aot.per_chip_bytes(state)),
                  lambda: score.lower_programs(labeler, state, self.mesh, prefix_bucket=pb, rows=rows,
                                               continuation_bucket=cb, with_image=True, repetition_penalty=rep),
                  state, ("prefill", "score"),
                  {"prefill": dict(tokens_per_step=pb, calls=self.counts["prompts"]),
                   "score": dict(tokens_per_step=rows * cb,
                                 calls=self.counts["prompts"] * math.ceil(questions / rows))})

    def pair_batch(self, model: nnx.Module, with_ref: bool) -> dict[str, jax.ShapeDtypeStruct]:
        """The largest pair batch of the run: ``max_length`` tokens, the answer window of the longest answer."""
        b, length = self.config.dpo.batch_size, self.config.dpo.max_length
        window = dpo_window(self.config)
        image = pair_image(model, self.assume, length)
        shapes = {**{k: ((b,) + a.shape, a.dtype) for k, a in image.items()},
                  "chosen_tokens": ((b, length), jnp.int32), "rejected_tokens": ((b, length), jnp.int32),
                  **{k: ((b,), jnp.int32) for k in ("answer_start", "chosen_len", "rejected_len")},
                  **({buckets.WINDOW_KEY: ((b, window + 1), jnp.int32)} if window is not None else {}),
                  **({k: ((b,), jnp.float32) for k in ("ref_chosen_logps", "ref_rejected_logps")} if with_ref else {})}
        return {k: jax.ShapeDtypeStruct(s, d, sharding=shd.batch_sharding(self.mesh, len(s))) for k, (s, d) in shapes.items()}

    def ref_logps(self, policy: nnx.Module) -> None:
        state, batch = aot.sharded(nnx.state(policy), self.mesh, shd.SERVE_RULES), self.pair_batch(policy, False)

        aot.run_stage(self.stages, self.topo, aot.Stage(
            "ref_logps", "serve", resident_bytes=aot.per_chip_bytes(state),
            tokens_per_step=2 * math.prod(batch["chosen_tokens"].shape),
            calls=math.ceil(self.counts["pairs"] / self.config.dpo.batch_size)),
            lambda: {"ref": logps.lower_reference(policy, state, batch, self.mesh)}, (state, batch), ("ref",))

    def dpo_step(self, policy: nnx.Module, variants: bool) -> None:
        """The train step as configured and, with ``variants``, with remat / bf16 optimizer state /
        bf16 master weights to show what each saves."""
        optim, loss = dpo_settings(self.config, self.counts["dpo_steps"])
        runs = [("dpo_step", optim, loss)]
        if variants:  # remat on when it is off, off when it is on
            other = "full" if loss.remat == "none" else "none"
            runs.append((f"dpo_step[remat={other}]", optim, dataclasses.replace(loss, remat=other)))
        if variants and optim.state_dtype == "float32":
            runs.append(("dpo_step[opt_state=bf16]", dataclasses.replace(optim, state_dtype="bfloat16"), loss))
        if variants and optim.master_dtype == "float32":
            runs.append(("dpo_step[master+opt_state=bf16]",
                         dataclasses.replace(optim, master_dtype="bfloat16", state_dtype="bfloat16"), loss))
        batch = self.pair_batch(policy, True)
        for i, (name, o, l) in enumerate(runs):
            step = dpo.DPOStep(policy, o, l, mesh=self.mesh)
            args = (step.abstract_state(), step.frozen, batch)
            aot.run_stage(self.stages, self.topo, aot.Stage(
                name, "train", resident_bytes=aot.per_chip_bytes(args[:2]), variant=i > 0,
                tokens_per_step=2 * math.prod(batch["chosen_tokens"].shape), calls=self.counts["dpo_steps"]),
                lambda: {"step": step.lower(batch).compile()}, args, ("step",), loop_trips=l.grad_accum)


def plan(config: ml_collections.ConfigDict, topology: str, *, only: tuple[str, ...] = (), variants: bool = True,
         assume: Assumptions = Assumptions()) -> dict[str, Any]:
    """Compile every stage of ``config`` (or those named in ``only``) for ``topology``; the report."""
    topo = hardware.parse_topology(topology)
    mesh = shd.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor, devices=hardware.devices(topo))
    p = Planner(config, topo, mesh, assume, iteration_counts(config, assume))
    wanted = lambda name: not only or any(name.startswith(o) for o in only)  # noqa: E731
    c, arch = config, architecture(config, "policy")
    # As stages.bundle loads them, one stage at a time: inference (sampling, claims, labeling, the
    # reference pass) in the compute dtype on SERVE_RULES, training with param_dtype master weights.
    served = abstract_model(arch, c.policy.dtype, c.policy.dtype)
    if wanted("sample"):
        p.sample(served)
    if c.claims.kind == "llm" and wanted("claims"):
        p.claims()
    if wanted("label"):
        p.label(served if c.labeler.kind == "self" else
                abstract_model(architecture(c, "labeler"), c.policy.dtype, c.policy.dtype))
    if wanted("ref_logps"):
        p.ref_logps(served)
    if wanted("dpo_step"):
        p.dpo_step(abstract_model(arch, c.policy.dtype, c.policy.param_dtype), variants)
    return report(p)


def iteration_times(stages: list[dict[str, Any]]) -> tuple[dict[str, float | None], float | None, list[str]]:
    """Seconds per online iteration by stage group (sample, claims, label, ...) and in all, from the
    compiler's per-call estimates × calls, and notes. A stage that does not fit counts as its fastest
    fitting alternative (``dpo_step[remat=full]``), named in the notes; None where nothing is known."""
    times: dict[str, float | None] = {}
    notes = []
    for s in stages:
        if s["variant"]:
            continue
        if not s["fits"]:
            fitting = [v for v in stages if v["variant"] and v["fits"] and v["seconds"]
                       and v["name"].startswith(s["name"] + "[")]
            if fitting:
                s = min(fitting, key=lambda v: v["seconds"])
                notes.append(f"{s['name']} in place of {s['name'].split('[')[0]}, which does not fit")
        group = s["name"].split("/")[0].split("[")[0]
        known = s["seconds"] is not None and times.get(group, 0.0) is not None
        times[group] = times.get(group, 0.0) + s["seconds"] * s["calls"] if known else None
    return times, (None if not times or None in times.values() else sum(times.values())), notes


def report(p: Planner) -> dict[str, Any]:
    """The JSON-able plan: slice, mesh, stages, counts, time per iteration (None when unknown)."""
    stages = [s.public() for s in p.stages]
    times, total, notes = iteration_times(stages)
    return {"topology": p.topo.name, "xla_topology": p.topo.xla_topology, "chips": p.topo.chips,
            "hbm_per_chip": p.topo.hbm_bytes, "device_kind": str(p.mesh.devices.flat[0].device_kind),
            "mesh": dict(p.mesh.shape), "fits": all(s["fits"] for s in stages if not s["variant"]), "stages": stages,
            "counts": p.counts, "iteration_seconds": times, "iteration_total_seconds": total, "iteration_notes": notes}


def quiet_libtpu(accelerator_type: str) -> None:
    """Keep libtpu's start-up lines off stderr; call before libtpu loads. Off a TPU VM libtpu's metadata
    lookup fails and leaves its warning text as the accelerator type and worker hostnames, which it then
    reports (``Logging before InitGoogle()``, ``E0000 ... unexpected worker hostname``). Compile-only
    planning takes its slice from the topology description, so naming the slice and this host changes no
    program; an explicitly set variable is kept."""
    for name, value in (("TPU_ACCELERATOR_TYPE", accelerator_type), ("TPU_WORKER_HOSTNAMES", "localhost"),
                        ("TPU_SKIP_MDS_QUERY", "1"), ("TPU_STDERR_LOG_LEVEL", "3"), ("TPU_MIN_LOG_LEVEL", "3"),
                        ("GRPC_VERBOSITY", "NONE")):
        os.environ.setdefault(name, value)


def main(argv: list[str]) -> int:
    """The command line (``argv[0]`` is the program name); returns the exit status: 0 fits, 1 a
    stage does not fit, 2 bad input (config, topology, missing libtpu)."""
    from absl import flags
    from ml_collections import config_flags
    fv = flags.FlagValues()  # a fresh set per call: main() can run more than once in one process
    config_flag = config_flags.DEFINE_config_file("config", None, "Python config file (get_config).",
                                                  flag_values=fv, lock_config=True, sys_argv=argv)
    topology = flags.DEFINE_string("topology", None, "v4-N, v5p-N, v5litepod-N, v6e-N, or local (this machine).",
                                   flag_values=fv)
    json_out = flags.DEFINE_string("json", None, "Write the report as JSON here.", flag_values=fv)
    only = flags.DEFINE_list("stages", [], "Plan only stages whose name starts with one of these "
                                           "(sample, claims, label, ref_logps, dpo_step).", flag_values=fv)
    variants = flags.DEFINE_bool("variants", True, "Also compile the DPO step with remat / bf16 optimizer state "
                                                   "/ bf16 master weights to show their effect.", flag_values=fv)
    verbosity = flags.DEFINE_integer("verbosity", 0, "≥ 1: also show libtpu's start-up lines.", flag_values=fv)
    fv(argv)
    progress = logging.getLogger(aot.__name__)  # one line per compiled stage, on stderr
    if not progress.handlers:
        progress.addHandler(logging.StreamHandler(sys.stderr))
        progress.setLevel(logging.INFO)
        progress.propagate = False
    if not config_flag.value or not topology.value:
        print("error: --config and --topology are required", file=sys.stderr)
        return 2
    if verbosity.value < 1:
        quiet_libtpu(topology.value)
    try:
        r = plan(vocabulary.canonicalize(config_flag.value), topology.value, only=tuple(only.value), variants=variants.value)
    except (hardware.MissingLibtpu, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(plan_report.format_report(r))
    if json_out.value:
        from rlaifv_jax.core.records import atomic_write_text
        atomic_write_text(json_out.value, json.dumps(r, indent=2))
    lines = plan_report.verdicts(r)
    for line in lines:
        print(line, file=sys.stderr)
    return 1 if lines else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
