"""Ahead-of-time plan of an online RLAIF-V iteration on a TPU slice: does the config fit, how fast
should it run? Nothing runs and no weights are read: models are built abstractly from their
``config.json`` (``nnx.eval_shape``; ``configs/arch/`` holds presets of the paper's models), and
every stage's jitted programs are compiled for the named slice from abstract arguments.

python -m rlaifv_jax.plan --config configs/llava15_7b_self.py[:v6e-8] [--topology v6e-8] \\
  [--json plan.json] [--stages sample,dpo_step]

``--topology`` defaults to the slice the config's decode batches are tuned for (``config.slice``, set
by ``configs/slices.py`` from the config argument).

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
from flax import nnx

from rlaifv_jax.core import aot, hardware, sharding as shd, vocabulary
from rlaifv_jax.data import buckets
from rlaifv_jax import plan_decode, plan_report, plan_tune
from rlaifv_jax.plan_inputs import (Assumptions, abstract_model, architecture, dpo_settings, dpo_window,
                                    iteration_counts, pair_image, prompt_bucket, prompt_image, tower_input)
from rlaifv_jax.engine import generate, logps, score, vision
from rlaifv_jax.engine.logits import DecodeSettings
from rlaifv_jax.engine.prompt_checks import text_config
from rlaifv_jax.feedback.claims import CLAIM_LLM_DECODING
from rlaifv_jax.models.layers import DECODE_BLOCK
from rlaifv_jax.pipelines.spec import PlanSpec, plan_spec
from rlaifv_jax.training import step as dpo


def step_cost(model: nnx.Module, caches: generate.CacheBytes, *, weights: float, flops: float,
              ragged: bool = False) -> plan_decode.StepCost:
    """One decode step's per-chip traffic and FLOPs: the compiled step's ``flops`` and resident
    ``weights``, the KV caches' bytes as ``generate`` lays them out (``generate.decode_cache_bytes``);
    ``ragged``: the step reads the own cache through the Pallas kernel (``generate.own_cache_for``)."""
    tc = text_config(model)
    # Every own-cache slot adds QK and PV for each (row, query head) on the chip: 4 · H · head_dim FLOPs per
    # layer against the 2 · K · head_dim · itemsize bytes of its keys and values (H / K query heads per KV head).
    flops_per_byte = 2 * (tc.num_attention_heads / tc.num_key_value_heads) / jnp.dtype(model.dtype).itemsize
    return plan_decode.StepCost(weight_bytes=weights, prefix_bytes=caches.prefix, own_bytes=caches.own,
                                own_slots=caches.own_slots, block=DECODE_BLOCK, flops=flops,
                                attention_flops_per_slot=caches.own / caches.own_slots * flops_per_byte,
                                ragged=ragged)


def prefix_attention_flops(model: nnx.Module, mesh: Any, c: plan_tune.Candidate, num_samples: int,
                           length: int) -> float:
    """Per-chip FLOPs of one decode step's attention over prompt prefixes (``length`` tokens each): QK
    and PV of every row against each prefix it scores, its own prompt's (static decoder) or every
    prompt of its slot window (continuous: ``generate.prefix_window``, which for one sample per
    prompt grows with the slots, so these FLOPs grow with their square)."""
    tc = text_config(model)
    window = generate.prefix_window(c.batch, c.slots, num_samples) if c.slots else 1
    chips = mesh.shape["data"] * mesh.shape["fsdp"] * mesh.shape["tensor"]
    per_token = 4 * tc.num_attention_heads * tc.head_dim * tc.num_hidden_layers
    return c.rows(num_samples) * window * length * per_token / chips


@dataclasses.dataclass(frozen=True)
class Generation:
    """One generating stage's fixed inputs (the batch and slots are what ``--tune`` varies)."""

    name: str
    model: nnx.Module
    length: int  # prompt bucket
    num_samples: int
    max_new: int
    sampling: DecodeSettings
    prompts: int  # prompts (messages) per online iteration
    fields: tuple[str, str]  # the config fields of the prompt batch and the continuous slots


@dataclasses.dataclass
class Planner:
    """Compiles one config's stages for one mesh and collects their :class:`aot.Stage` rows."""

    spec: PlanSpec
    topo: hardware.Slice
    mesh: Any
    assume: Assumptions
    counts: dict[str, int]
    tune: bool = False  # also plan each generating stage at the fastest decode batch that fits
    stages: list[aot.Stage] = dataclasses.field(default_factory=list)
    overrides: dict[str, int] = dataclasses.field(default_factory=dict)  # what --tune chose

    def vision(self, name: str, model: nnx.Module, state: Any) -> int:
        pixels, layout, tokens = prompt_image(model, self.assume)
        px = tower_input(model, self.mesh, pixels, layout)

        aot.run_stage(self.stages, self.topo, aot.Stage(name, "serve", resident_bytes=aot.per_chip_bytes(state),
                                                tokens_per_step=tokens, calls=self.counts["prompts"]),
                  lambda: {"vision": vision.lower_features(model, state, px, self.mesh)}, state, ("vision",))
        return tokens

    def generation(self, g: Generation, batch: int, decode_rows: int | None) -> None:
        """The prefill and decode programs of one generating stage as the run compiles them (with
        ``tune``: also at the fastest batch that fits, the config's own rows then shown as ``(alt)``;
        when the config's own batch does not fit, tuning starts from the largest smaller one that does)."""
        before = len(self.stages)
        own = plan_tune.Candidate(batch, decode_rows or 0)
        caches = self._generation(g, own)
        if self.tune and self.topo.chip is not None and not all(s.fits for s in self.stages[before:]):
            smaller = self._largest_fitting(g, own)
            if smaller is not None:
                for s in self.stages[before:before + 2]:
                    s.variant = True
                (own, caches), before = smaller, len(self.stages) - 2
                self.overrides.update({g.fields[0]: own.batch, g.fields[1]: own.slots})
        if not self.tune or caches is None:
            return
        prefill, decode = self.stages[before:before + 2]
        rows = own.rows(g.num_samples)
        fp = plan_tune.footprint(max(prefill.bytes_per_chip, decode.bytes_per_chip), decode.resident_bytes,
                                 caches.prefix_all, caches.own, batch=batch, decode_rows=rows)
        lengths = self.lengths(g.max_new)

        def prefix_flops(c: plan_tune.Candidate) -> float:
            return prefix_attention_flops(g.model, self.mesh, c, g.num_samples, g.length)

        other_flops = max(decode.flops_per_chip - prefix_flops(own), 0.0) / rows  # per row: weights, own cache

        def seconds(c: plan_tune.Candidate) -> float:
            cost = step_cost(g.model, self.caches(g, c), weights=decode.resident_bytes,
                             flops=other_flops * c.rows(g.num_samples) + prefix_flops(c), ragged=self.ragged(g))
            return plan_decode.decode_time(cost, self.topo.chip, lengths, prompts=g.prompts,
                                           num_samples=g.num_samples, batch=c.batch, slots=c.slots).seconds

        hbm = plan_tune.HEADROOM * self.topo.hbm_bytes
        for best in plan_tune.ranked(plan_tune.candidates(g.num_samples, g.prompts), seconds,
                                     lambda c: plan_tune.peak_bytes(fp, c, g.num_samples) <= hbm)[:3]:
            if best == own or seconds(best) >= decode.total_seconds:
                return  # the config's batch is already the fastest that fits
            start = len(self.stages)
            self._generation(g, best)
            compiled = self.stages[start:]
            faster = len(compiled) == 2 and (compiled[1].total_seconds or math.inf) < decode.total_seconds
            if faster and all(s.fits for s in compiled):
                prefill.variant = decode.variant = True
                self.overrides.update({g.fields[0]: best.batch, g.fields[1]: best.slots})
                if g.name.startswith("claims"):  # shards whose responses fill whole calls of the new batch
                    self.overrides["claims.batch_size"] = plan_tune.claims_shard(best.batch,
                                                                                 self.spec.sample.num_samples)
                return
            del self.stages[start:]  # XLA says it does not fit, or is slower, after all: the next candidate

    def _largest_fitting(self, g: Generation, own: plan_tune.Candidate
                         ) -> tuple[plan_tune.Candidate, generate.CacheBytes] | None:
        """The largest static prompt batch below ``own``'s that XLA fits, compiled (None: none fits)."""
        for b in sorted((b for b in plan_tune.PROMPT_BATCHES if b < own.batch), reverse=True):
            start = len(self.stages)
            c = plan_tune.Candidate(b, 0)
            caches = self._generation(g, c)
            if caches is not None and all(s.fits for s in self.stages[start:]):
                return c, caches
            del self.stages[start:]
        return None

    def caches(self, g: Generation, c: plan_tune.Candidate) -> generate.CacheBytes:
        """The KV-cache bytes per chip of stage ``g`` decoding batch ``c``."""
        return generate.decode_cache_bytes(g.model, self.mesh, batch=c.batch, length=g.length,
                                           num_samples=g.num_samples, max_new_tokens=g.max_new,
                                           decode_rows=c.slots or None)

    def _generation(self, g: Generation, c: plan_tune.Candidate) -> generate.CacheBytes | None:
        """Compile one batch's prefill and decode; the decode row's time summed over its steps. Returns
        the caches' bytes it used (None where the slice has no chip figures or nothing compiled)."""
        state = aot.sharded(nnx.state(g.model), self.mesh, shd.SERVE_RULES)
        rows, slots = c.rows(g.num_samples), c.slots or None
        tag = f"{c.batch} prompts, " + (f"{c.slots} slots (continuous)" if c.slots else f"{rows} rows")
        extra = {"prefill": dict(tokens_per_step=c.batch * g.length, calls=math.ceil(g.prompts / c.batch),
                                 note=tag),
                 "decode": dict(tokens_per_step=rows, note=f"steps at filled length; {tag}")}
        before = len(self.stages)
        aot.run_stage(self.stages, self.topo, aot.Stage(g.name, "serve", resident_bytes=aot.per_chip_bytes(state)),
                      lambda: generate.lower_programs(g.model, state, self.mesh, batch=c.batch, length=g.length,
                                                      num_samples=g.num_samples, max_new_tokens=g.max_new,
                                                      sampling=g.sampling, decode_rows=slots),
                      state, ("prefill", "decode"), extra)
        decode, chip = self.stages[before + 1], self.topo.chip
        if chip is None or decode.flops_per_chip is None:
            return None
        caches = self.caches(g, c)
        cost = step_cost(g.model, caches, weights=decode.resident_bytes, flops=decode.flops_per_chip,
                         ragged=self.ragged(g))
        run = dict(prompts=g.prompts, num_samples=g.num_samples, batch=c.batch, slots=c.slots)
        t = plan_decode.decode_time(cost, chip, self.lengths(g.max_new), **run)
        upper = plan_decode.decode_time(cost, chip, plan_decode.Lengths(g.max_new, g.max_new), **run)
        decode.calls, decode.total_seconds, decode.upper_seconds = t.steps, t.seconds, upper.seconds
        decode.tokens_per_s_chip = plan_decode.tokens_per_second_per_chip(t, self.topo.chips)
        if decode.seconds:  # the compiled program's own estimate (one step, one block of the walk) against ours
            ratio = decode.seconds / plan_decode.step_seconds(cost, chip, cost.block)
            decode.note += f"; compiler's step estimate {ratio:.1f}x this roofline's"
        return caches

    def ragged(self, g: Generation) -> bool:
        """Whether stage ``g``'s decode reads the own cache through the Pallas kernel on this mesh."""
        return generate.own_cache_for(g.model, self.mesh, g.max_new) == "pallas"

    def lengths(self, max_new: int) -> plan_decode.Lengths:
        """The response-length assumption for a stage that generates at most ``max_new`` tokens."""
        return plan_decode.Lengths(min(self.assume.response_tokens, max_new),
                                   min(self.assume.longest_response or max_new, max_new))

    def sample(self, policy: nnx.Module) -> None:
        s = self.spec.sample
        tokens = self.vision("sample/vision", policy, aot.sharded(nnx.state(policy), self.mesh, shd.SERVE_RULES))
        sampling = DecodeSettings(temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
                                  repetition_penalty=s.repetition_penalty)
        g = Generation("sample", policy, prompt_bucket(tokens + self.assume.prompt_text_tokens), s.num_samples,
                       s.max_new_tokens, sampling, self.counts["prompts"],
                       ("sampling.batch_size", "sampling.decode_rows"))
        self.generation(g, s.batch_size, s.decode_rows)

    def claims(self) -> None:
        """Split and convert calls of the claims LLM(s): each response goes through both."""
        spec, dec = self.spec, CLAIM_LLM_DECODING
        archs = {"claims/split": architecture(spec, "claims_split")}
        if any(spec.archs["claims_convert"]):
            archs["claims/convert"] = architecture(spec, "claims_convert")
        messages = self.counts["responses"]
        if len(archs) == 1 or archs["claims/convert"] == archs["claims/split"]:
            archs, messages = {"claims": archs["claims/split"]}, 2 * messages  # one model answers both calls
        for name, arch in archs.items():
            llm = abstract_model(arch, spec.dtype, spec.dtype)
            length = prompt_bucket(self.assume.claims_prompt_tokens + min(spec.sample.max_new_tokens, 400))
            decoding = DecodeSettings(temperature=dec.temperature, top_k=dec.top_k, top_p=dec.top_p)
            g = Generation(name, llm, length, 1, dec.max_new_tokens, decoding, messages,
                           ("claims.llm_batch_size", "claims.decode_rows"))
            self.generation(g, spec.claims.llm_batch_size, spec.claims.decode_rows)

    def label(self, labeler: nnx.Module) -> None:
        a, questions = self.assume, self.counts["questions_per_prompt"]
        state = aot.sharded(nnx.state(labeler), self.mesh, shd.SERVE_RULES)
        tokens = self.vision("label/vision", labeler, state)
        rows = min(self.spec.label.batch_size, score.row_bucket(questions))
        pb = score.round_up(tokens + a.prefix_text_tokens, score.PREFIX_MULTIPLE)
        cb = score.round_up(a.question_tokens, score.CONTINUATION_MULTIPLE)
        aot.run_stage(self.stages, self.topo, aot.Stage("label", "serve", resident_bytes=aot.per_chip_bytes(state)),
                  lambda: score.lower_programs(labeler, state, self.mesh, prefix_bucket=pb, rows=rows,
                                               continuation_bucket=cb, with_image=True,
                                               repetition_penalty=self.spec.label.repetition_penalty),
                  state, ("prefill", "score"),
                  {"prefill": dict(tokens_per_step=pb, calls=self.counts["prompts"]),
                   "score": dict(tokens_per_step=rows * cb,
                                 calls=self.counts["prompts"] * math.ceil(questions / rows))})

    def pair_batch(self, model: nnx.Module, with_ref: bool) -> dict[str, jax.ShapeDtypeStruct]:
        """The largest pair batch of the run: ``max_length`` tokens, the answer window of the longest answer."""
        b, length = self.spec.dpo.batch_size, self.spec.dpo.max_length
        window = dpo_window(self.spec)
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
            calls=math.ceil(self.counts["pairs"] / self.spec.dpo.batch_size)),
            lambda: {"ref": logps.lower_reference(policy, state, batch, self.mesh)}, (state, batch), ("ref",))

    def dpo_step(self, policy: nnx.Module, variants: bool) -> None:
        """The train step as configured and, with ``variants``, with remat / bf16 optimizer state /
        bf16 master weights to show what each saves."""
        optim, loss = dpo_settings(self.spec, self.counts["dpo_steps"])
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
         assume: Assumptions = Assumptions(), tune: bool = False) -> dict[str, Any]:
    """Compile every stage of ``config`` (or those named in ``only``) for ``topology``; the report.
    ``tune``: also compile each generating stage at the decode batch estimated fastest that fits, and
    report the config overrides that select it."""
    topo = hardware.parse_topology(topology)
    devices = hardware.devices(topo)
    spec = plan_spec(config, len(devices))
    mesh = shd.make_mesh(*spec.mesh, devices=devices)
    p = Planner(spec, topo, mesh, assume, iteration_counts(spec, assume), tune=tune)
    wanted = lambda name: not only or any(name.startswith(o) for o in only)  # noqa: E731
    arch = architecture(spec, "policy")
    # As stages.bundle loads them, one stage at a time: inference (sampling, claims, labeling, the
    # reference pass) in the compute dtype on SERVE_RULES, training with param_dtype master weights.
    served = abstract_model(arch, spec.dtype, spec.dtype)
    if wanted("sample"):
        p.sample(served)
    if spec.claims.kind == "llm" and wanted("claims"):
        p.claims()
    if wanted("label"):
        p.label(served if spec.labeler_kind == "self" else
                abstract_model(architecture(spec, "labeler"), spec.dtype, spec.dtype))
    if wanted("ref_logps"):
        p.ref_logps(served)
    if wanted("dpo_step"):
        p.dpo_step(abstract_model(arch, spec.dtype, spec.param_dtype), variants)
    return report(p)


def stage_seconds(s: dict[str, Any], upper: bool = False) -> float | None:
    """A stage's seconds per online iteration: a decode row's sum over its steps (``upper``: every
    response max_new_tokens long), otherwise the compiler's per-call estimate × calls."""
    if s["total_seconds"] is not None:
        return s["upper_seconds"] if upper else s["total_seconds"]
    return None if s["seconds"] is None else s["seconds"] * s["calls"]


def iteration_times(stages: list[dict[str, Any]], upper: bool = False
                    ) -> tuple[dict[str, float | None], float | None, list[str]]:
    """Seconds per online iteration by stage group (sample, claims, label, ...) and in all, and notes.
    A stage that does not fit counts as its fastest fitting alternative (``dpo_step[remat=full]``),
    named in the notes; None where nothing is known."""
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
        seconds = stage_seconds(s, upper)
        known = seconds is not None and times.get(group, 0.0) is not None
        times[group] = times.get(group, 0.0) + seconds if known else None
    return times, (None if not times or None in times.values() else sum(times.values())), notes


def report(p: Planner) -> dict[str, Any]:
    """The JSON-able plan: slice, mesh, stages, counts, the length assumption, time per iteration
    under it and its upper bound (None when unknown)."""
    stages = [s.public() for s in p.stages]
    times, total, notes = iteration_times(stages)
    upper = iteration_times(stages, upper=True)[1]
    return {"topology": p.topo.name, "xla_topology": p.topo.xla_topology, "chips": p.topo.chips,
            "hbm_per_chip": p.topo.hbm_bytes, "device_kind": str(p.mesh.devices.flat[0].device_kind),
            "mesh": dict(p.mesh.shape), "fits": all(s["fits"] for s in stages if not s["variant"]), "stages": stages,
            "counts": p.counts, "lengths": {"response_tokens": p.assume.response_tokens,
                                            "longest_response": p.assume.longest_response},
            "iteration_seconds": times, "iteration_total_seconds": total, "iteration_upper_seconds": upper,
            "iteration_notes": notes, "overrides": dict(p.overrides)}


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
    topology = flags.DEFINE_string("topology", None, "v4-N, v5p-N, v5litepod-N, v6e-N, or local (this machine); "
                                   "default: the slice the config's batches are tuned for (config.slice).",
                                   flag_values=fv)
    json_out = flags.DEFINE_string("json", None, "Write the report as JSON here.", flag_values=fv)
    only = flags.DEFINE_list("stages", [], "Plan only stages whose name starts with one of these "
                                           "(sample, claims, label, ref_logps, dpo_step).", flag_values=fv)
    variants = flags.DEFINE_bool("variants", True, "Also compile the DPO step with remat / bf16 optimizer state "
                                                   "/ bf16 master weights to show their effect.", flag_values=fv)
    verbosity = flags.DEFINE_integer("verbosity", 0, "≥ 1: also show libtpu's start-up lines.", flag_values=fv)
    tune = flags.DEFINE_bool("tune", False, "Also plan each generating stage at the decode batch (prompts per "
                                            "prefill, continuous slots) estimated fastest that fits, and print the "
                                            "overrides that select it.", flag_values=fv)
    mean = flags.DEFINE_float("response_tokens", Assumptions.response_tokens,
                              "Assumed mean generated tokens per response (policy and claims LLM).", flag_values=fv)
    longest = flags.DEFINE_integer("longest_response", 0, "Assumed longest response of a batch (0: each stage's "
                                                          "max_new_tokens).", flag_values=fv)
    fv(argv)
    progress = logging.getLogger(aot.__name__)  # one line per compiled stage, on stderr
    if not progress.handlers:
        progress.addHandler(logging.StreamHandler(sys.stderr))
        progress.setLevel(logging.INFO)
        progress.propagate = False
    slice_ = topology.value or (config_flag.value.get("slice", "") if config_flag.value else "")
    if not config_flag.value or not slice_:
        print("error: --config and --topology are required (a config without config.slice names no slice)",
              file=sys.stderr)
        return 2
    if verbosity.value < 1:
        quiet_libtpu(slice_)
    try:
        assume = dataclasses.replace(Assumptions(), response_tokens=mean.value, longest_response=longest.value)
        r = plan(vocabulary.canonicalize(config_flag.value), slice_, only=tuple(only.value),
                 variants=variants.value, assume=assume, tune=tune.value)
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
