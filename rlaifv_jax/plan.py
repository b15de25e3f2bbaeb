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
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from rlaifv_jax.core import aot, hardware, sharding as shd
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


# ----------------------------------------------------------------------------- measuring
def measure(stage: Stage, compiled, topo: hardware.Slice, *, loop_trips: int = 1) -> Stage:
    """Fill ``stage`` from a compiled program. ``loop_trips``: XLA's cost analysis counts a loop body
    once, so a program whose work is a ``loop_trips``-times loop (grad accumulation) is scaled."""
    flops, stage.bytes_accessed, secs = aot.costs(compiled)
    stage.bytes_per_chip = aot.peak_bytes(compiled)
    stage.flops_per_chip = flops * loop_trips
    stage.seconds = None if secs is None else secs * loop_trips
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
    arg_bytes = aot.per_chip_bytes(args)
    out = [dataclasses.replace(template, name=f"{template.name}/{n}" if len(names) > 1 else template.name,
                               **(extra or {}).get(n, {})) for n in names]
    if hbm is not None and arg_bytes > hbm:
        for s in out:
            s.bytes_per_chip, s.fits, s.note = arg_bytes, False, "arguments alone exceed HBM (not compiled)"
    else:
        try:
            programs = build()
        except Exception as e:  # noqa: BLE001 — only XLA's out-of-HBM verdict is a result
            overflow = aot.hbm_overflow(str(e))
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


# ----------------------------------------------------------------------------- stages
def _bucket(tokens: int) -> int:
    return next((b for b in generate.DEFAULT_BUCKETS if b >= tokens), -(-tokens // 512) * 512)


def _image(model: nnx.Module, assume: Assumptions) -> tuple[tuple[int, ...], int]:
    """``pixel_values`` shape of one prompt image for ``model`` and the image tokens it gives."""
    v = model.config.vision
    if isinstance(model, LlavaNext):
        tiles = anyres.num_patches(assume.image_size, model.config.image_grid_pinpoints, v.image_size)
        return (1, tiles, v.num_channels, v.image_size, v.image_size), model.num_image_tokens(assume.image_size)
    return (1, v.num_channels, v.image_size, v.image_size), model.num_image_tokens()


def _vision(stages, topo, mesh, name, model, state, assume, calls) -> int:
    shape, tokens = _image(model, assume)
    px = aot.replicated(mesh, shape, jnp.float32)

    def build():
        with jax.set_mesh(mesh):
            return {"vision": vision._tile_features.lower(nnx.graphdef(model), state, px).compile()}

    run_stage(stages, topo, Stage(name, "serve", resident_bytes=aot.per_chip_bytes(state), tokens_per_step=tokens,
                                  calls=calls), build, state, ("vision",))
    return tokens


def _generation(stages, topo, mesh, name, model, state, *, batch, length, num_samples, max_new, sampling, calls):
    extra = {"prefill": dict(tokens_per_step=batch * length, calls=calls),
             "decode": dict(tokens_per_step=batch * num_samples, calls=calls * max_new,
                            note="one step; calls = steps at max_new_tokens")}
    run_stage(stages, topo, Stage(name, "serve", resident_bytes=aot.per_chip_bytes(state)),
              lambda: generate.lower_programs(model, state, mesh, batch=batch, length=length, num_samples=num_samples,
                                              max_new_tokens=max_new, sampling=sampling),
              state, ("prefill", "decode"), extra)


def _pair_batch(mesh, model: Llava, batch: int, length: int, with_ref: bool) -> dict[str, jax.ShapeDtypeStruct]:
    v = model.config.vision
    shapes = {"pixel_values": ((batch, v.num_channels, v.image_size, v.image_size), jnp.float32),
              "chosen_tokens": ((batch, length), jnp.int32), "rejected_tokens": ((batch, length), jnp.int32),
              **{k: ((batch,), jnp.int32) for k in ("answer_start", "chosen_len", "rejected_len")},
              **({k: ((batch,), jnp.float32) for k in ("ref_chosen_logps", "ref_rejected_logps")} if with_ref else {})}
    return {k: jax.ShapeDtypeStruct(s, d, sharding=shd.batch_sharding(mesh, len(s))) for k, (s, d) in shapes.items()}


def dpo_configs(config: ml_collections.ConfigDict, steps: int) -> tuple[dpo.OptimConfig, dpo.LossConfig]:
    """The train step's settings as the online loop builds them (plus remat / dtype options)."""
    d = config.dpo
    optim = dpo.OptimConfig(learning_rate=d.learning_rate, warmup_ratio=d.warmup_ratio, weight_decay=d.weight_decay,
                            max_grad_norm=d.max_grad_norm, total_steps=max(steps, 1),
                            master_dtype=d.get("master_dtype", "float32"),
                            state_dtype=d.get("optimizer_state_dtype", "float32"))
    loss = dpo.LossConfig(beta=d.beta, loss_type=d.loss_type, label_smoothing=d.label_smoothing,
                          grad_accum=d.grad_accum, remat=d.get("remat", "none"))
    return optim, loss


def _dpo_stage(stages, topo, mesh, name, policy, batch, optim, loss, calls, variant=False) -> None:
    step = dpo.DPOStep(policy, optim, loss, mesh=mesh)
    args = (step.abstract_state(), step.frozen, batch)
    run_stage(stages, topo, Stage(name, "train", resident_bytes=aot.per_chip_bytes(args[:2]), variant=variant,
                                  tokens_per_step=2 * math.prod(batch["chosen_tokens"].shape), calls=calls),
              lambda: {"step": step.lower(batch).compile()}, args, ("step",), loop_trips=loss.grad_accum)


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


def plan(config: ml_collections.ConfigDict, topology: str, *, only: tuple[str, ...] = (), variants: bool = True,
         assume: Assumptions = Assumptions()) -> dict[str, Any]:
    """Compile every stage of ``config`` for ``topology``; the report (see the module docstring)."""
    topo = hardware.parse_topology(topology)
    mesh = shd.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor, devices=hardware.devices(topo))
    counts = iteration_counts(config, assume)
    wanted = lambda name: not only or any(name.startswith(o) for o in only)  # noqa: E731
    stages: list[Stage] = []
    c, s = config, config.sampling
    policy = abstract_model(architecture(c, "policy"), c.policy.dtype, c.policy.param_dtype)
    models = {"policy": policy}
    if wanted("sample"):
        state = sharded_state(policy, mesh, shd.SERVE_RULES)
        tokens = _vision(stages, topo, mesh, "sample/vision", policy, state, assume, counts["prompts"])
        sampling = SamplingConfig(temperature=s.temperature, top_k=s.top_k or None, top_p=s.top_p if s.top_p < 1 else None,
                                  repetition_penalty=s.repetition_penalty if s.repetition_penalty != 1 else None)
        _generation(stages, topo, mesh, "sample", policy, state, batch=s.batch_size,
                    length=_bucket(tokens + assume.prompt_text_tokens), num_samples=s.num_samples,
                    max_new=s.max_new_tokens, sampling=sampling, calls=math.ceil(counts["prompts"] / s.batch_size))
    if c.claims.kind == "llm" and wanted("claims"):
        roles = ["claims_split"] + (["claims_convert"] if c.claims.convert_path else [])
        archs = {r: architecture(c, r) for r in roles}
        if len(roles) == 2 and archs["claims_convert"] == archs["claims_split"]:
            roles = roles[:1]  # one architecture: one plan, both calls
        dec, batch = CLAIM_LLM_DECODING, 8  # generate()'s default batch, as the claims stage calls it
        for role in roles:
            llm = models[role] = abstract_model(archs[role], c.policy.dtype, c.policy.dtype)
            _generation(stages, topo, mesh, role.replace("claims_", "claims/") if len(roles) > 1 else "claims", llm,
                        sharded_state(llm, mesh, shd.SERVE_RULES), batch=batch, num_samples=1,
                        length=_bucket(assume.claims_prompt_tokens + min(s.max_new_tokens, 400)),
                        max_new=dec.max_new_tokens, sampling=SamplingConfig(temperature=dec.temperature, top_k=dec.top_k, top_p=dec.top_p),
                        calls=math.ceil(counts["responses"] / batch) * (3 - len(roles)))
    if wanted("label"):
        labeler = models["labeler"] = abstract_model(architecture(c, "labeler" if c.labeler.kind != "self" else "policy"),
                                                     c.policy.dtype, c.policy.dtype)
        state = sharded_state(labeler, mesh, shd.SERVE_RULES)
        tokens = _vision(stages, topo, mesh, "label/vision", labeler, state, assume, counts["prompts"])
        rows = min(c.labeler.batch_size, score._row_bucket(counts["questions_per_prompt"]))
        pb, cb = score._round_up(tokens + assume.prefix_text_tokens, 64), score._round_up(assume.question_tokens, 16)
        rep = c.labeler.repetition_penalty
        run_stage(stages, topo, Stage("label", "serve", resident_bytes=aot.per_chip_bytes(state)),
                  lambda: score.lower_programs(labeler, state, mesh, prefix_bucket=pb, rows=rows, continuation_bucket=cb,
                                               with_image=True, repetition_penalty=None if rep == 1.0 else rep),
                  state, ("prefill", "score"),
                  {"prefill": dict(tokens_per_step=pb, calls=counts["prompts"]),
                   "score": dict(tokens_per_step=rows * cb,
                                 calls=counts["prompts"] * math.ceil(counts["questions_per_prompt"] / rows))})
    batch_size, length = c.dpo.batch_size, c.dpo.max_length
    if wanted("ref_logps"):
        state, batch = sharded_state(policy, mesh, shd.TRAIN_RULES), _pair_batch(mesh, policy, batch_size, length, False)

        def build():
            with jax.set_mesh(mesh):
                return {"ref": logps._pair_logps_jit.lower(nnx.graphdef(policy), state, batch).compile()}

        run_stage(stages, topo, Stage("ref_logps", "serve", resident_bytes=aot.per_chip_bytes(state),
                                      tokens_per_step=2 * batch_size * length,
                                      calls=math.ceil(counts["pairs"] / batch_size)), build, (state, batch), ("ref",))
    if wanted("dpo_step"):
        batch = _pair_batch(mesh, policy, batch_size, length, True)
        optim, loss = dpo_configs(c, counts["dpo_steps"])
        _dpo_stage(stages, topo, mesh, "dpo_step", policy, batch, optim, loss, counts["dpo_steps"])
        alternatives = []
        if variants and loss.remat == "none":
            alternatives.append(("remat=full", optim, dataclasses.replace(loss, remat="full")))
        if variants and optim.state_dtype == "float32":
            alternatives.append(("opt_state=bf16", dataclasses.replace(optim, state_dtype="bfloat16"), loss))
        if variants and optim.master_dtype == "float32":
            alternatives.append(("master+opt_state=bf16", dataclasses.replace(
                optim, master_dtype="bfloat16", state_dtype="bfloat16"), loss))
        for label, o, l in alternatives:
            _dpo_stage(stages, topo, mesh, f"dpo_step[{label}]", policy, batch, o, l, counts["dpo_steps"], variant=True)
    return report(topo, mesh, stages, counts, models)


def report(topo: hardware.Slice, mesh, stages: list[Stage], counts: dict[str, int], models: dict) -> dict[str, Any]:
    run = [s for s in stages if not s.variant]
    times: dict[str, float | None] = {}
    for s in run:
        group = s.name.split("/")[0]
        t = None if s.seconds is None or times.get(group, 0.0) is None else times.get(group, 0.0) + s.seconds * s.calls
        times[group] = t
    total = None if any(t is None for t in times.values()) or not times else sum(times.values())
    return {"topology": topo.name, "xla_topology": topo.xla_topology, "chips": topo.chips,
            "hbm_per_chip": topo.hbm_bytes, "device_kind": str(mesh.devices.flat[0].device_kind),
            "mesh": dict(mesh.shape), "fits": all(s.fits for s in run),
            "stages": [s.public() for s in stages], "counts": counts, "iteration_seconds": times,
            "iteration_total_seconds": total,
            "models_resident_bytes": {k: aot.per_chip_bytes(sharded_state(m, mesh, shd.TRAIN_RULES)) for k, m in models.items()}}


# ----------------------------------------------------------------------------- output
def _fmt(x: float | None, scale: float = 1.0) -> str:
    """``x / scale`` to 3 significant digits ("-" for unknown)."""
    if x is None:
        return "-"
    v = x / scale
    return f"{v:.1f}" if abs(v) >= 100 else f"{v:.3g}"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def _duration(seconds: float) -> str:
    for unit, size in (("h", 3600), ("min", 60), ("s", 1)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds * 1e3:.3g} ms"


def format_report(r: dict[str, Any]) -> str:
    """The human-readable table of a :func:`plan` report."""
    hbm = r["hbm_per_chip"]
    lines = [f"{r['topology']} ({r['xla_topology']}): {r['chips']} × {r['device_kind']}, "
             f"{_fmt(hbm, GIB)} GiB HBM per chip, mesh {r['mesh']}",
             f"{'stage':32} {'GiB/chip':>9} {'resident':>9} {'TFLOP/chip':>11} {'est. ms':>9} {'MFU':>6} "
             f"{'HBM-roof':>8} {'tokens':>8} {'calls/iter':>11}  fits"]
    for s in r["stages"]:
        mark = "yes" if s["fits"] else "NO"
        lines.append(f"{s['name'] + (' (alt)' if s['variant'] else ''):32} {_fmt(s['bytes_per_chip'], GIB):>9} "
                     f"{_fmt(s['resident_bytes'], GIB):>9} {_fmt(s['flops_per_chip'], 1e12):>11} "
                     f"{_fmt(s['seconds'], 1e-3):>9} {_pct(s['mfu']):>6} {_pct(s['hbm_roofline']):>8} "
                     f"{s['tokens_per_step']:>8} {s['calls']:>11,.0f}  {mark}{'  ' + s['note'] if s['note'] else ''}")
    times = r["iteration_seconds"]
    if times and r["iteration_total_seconds"] is not None:
        parts = ", ".join(f"{k} {_duration(v)}" for k, v in times.items())
        lines.append(f"estimated wall time per online iteration: {_duration(r['iteration_total_seconds'])} ({parts}; "
                     "compiler estimates, no host time, every response max_new_tokens long)")
    elif times:
        lines.append("no time estimate: the compiler gives none for this platform")
    c = r["counts"]
    lines.append(f"per iteration: {c['prompts']} prompts, {c['responses']} responses, "
                 f"{c['questions_per_prompt']} questions per prompt, ≤ {c['pairs']} pairs, {c['dpo_steps']} DPO steps")
    held = r["models_resident_bytes"]
    lines.append("weights per chip (train layout): " + ", ".join(f"{k} {_fmt(v, GIB)} GiB" for k, v in held.items()))
    return "\n".join(lines)


def verdicts(r: dict[str, Any]) -> list[str]:
    """One "does not fit" line per stage of the run that does not fit, with the knobs that help."""
    out = []
    for s in r["stages"]:
        if s["fits"] or s["variant"]:
            continue
        out.append(f"does not fit: stage {s['name']} needs {_fmt(s['bytes_per_chip'], GIB)} GiB per chip, "
                   f"{r['topology']} has {_fmt(r['hbm_per_chip'], GIB)} GiB. Knobs that help: "
                   + "; ".join(KNOBS[s["kind"]]))
    return out


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
    fv(argv)
    if not config_flag.value or not topology.value:
        print("error: --config and --topology are required", file=sys.stderr)
        return 2
    try:
        r = plan(config_flag.value, topology.value, only=tuple(only.value), variants=variants.value)
    except (hardware.MissingLibtpu, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_report(r))
    if json_out.value:
        from rlaifv_jax.core.records import atomic_write_text
        atomic_write_text(json_out.value, json.dumps(r, indent=2))
    lines = verdicts(r)
    for line in lines:
        print(line, file=sys.stderr)
    return 1 if lines else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
