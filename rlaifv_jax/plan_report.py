"""The table and the "does not fit" verdicts of a ``rlaifv_jax.plan`` report (a JSON-able dict)."""
from __future__ import annotations

from typing import Any

from rlaifv_jax.core.hardware import GIB

# Knobs that shrink a stage, for weights (and optimizer state) and for activations.
KNOBS = {
    "train": {"weights": ("a larger fsdp axis (--config.mesh.fsdp, or a bigger slice)",
                          "a tensor axis (--config.mesh.tensor)", "bf16 master weights (dpo.master_dtype=bfloat16)",
                          "bf16 optimizer state (dpo.optimizer_state_dtype=bfloat16)", "LoRA"),
              "activations": ("remat (dpo.remat=full)", "a smaller dpo.batch_size with dpo.grad_accum")},
    "serve": {"weights": ("a tensor axis (--config.mesh.tensor: the serving layout keeps weights whole along "
                          "data and fsdp)", "a smaller model"),
              "activations": ("a smaller batch (sampling.batch_size / labeler.batch_size / dpo.batch_size)",
                              "more chips on the batch axes (a bigger slice, larger fsdp)")},
}


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
    """The human-readable table of a ``plan.plan`` report."""
    hbm = r["hbm_per_chip"]
    lines = [f"{r['topology']} ({r['xla_topology']}): {r['chips']} × {r['device_kind']}, "
             f"{_fmt(hbm, GIB)} GiB HBM per chip, mesh {r['mesh']}",
             f"{'stage':38} {'GiB/chip':>9} {'resident':>9} {'TFLOP/chip':>11} {'est. ms':>9} {'MFU':>6} "
             f"{'HBM-roof':>8} {'tokens':>8} {'calls/iter':>11}  fits"]
    for s in r["stages"]:
        mark = "yes" if s["fits"] else "NO"
        lines.append(f"{s['name'] + (' (alt)' if s['variant'] else ''):38} {_fmt(s['bytes_per_chip'], GIB):>9} "
                     f"{_fmt(s['resident_bytes'], GIB):>9} {_fmt(s['flops_per_chip'], 1e12):>11} "
                     f"{_fmt(s['seconds'], 1e-3):>9} {_pct(s['mfu']):>6} {_pct(s['hbm_roofline']):>8} "
                     f"{s['tokens_per_step']:>8} {s['calls']:>11,.0f}  {mark}{'  ' + s['note'] if s['note'] else ''}")
    lengths = r.get("lengths") or {}
    assumed = (f"responses {lengths.get('response_tokens', 0):g} tokens on average, the longest "
               + (f"{lengths['longest_response']}" if lengths.get("longest_response") else "max_new_tokens")
               + ", at most each stage's max_new_tokens (--response_tokens, --longest_response)")
    rates = decode_rates(r)
    if rates:
        lines.append(f"generated tokens/s per chip (each step at its filled length; {assumed}): "
                     + ", ".join(f"{name} {rate:,.0f}" for name, rate in rates.items()))
    times = r["iteration_seconds"]
    if times and r["iteration_total_seconds"] is not None:
        parts = ", ".join(f"{k} {_duration(v)}" for k, v in times.items())
        lines.append(f"estimated wall time per online iteration: {_duration(r['iteration_total_seconds'])} ({parts}; "
                     f"{assumed}; compiler estimates and HBM rooflines, no host time)")
        if r.get("iteration_upper_seconds") is not None:
            upper = _duration(r["iteration_upper_seconds"])
            lines.append(f"  upper bound, every response max_new_tokens long: {upper}")
        lines += [f"  with {note}" for note in r["iteration_notes"]]
    elif times:
        lines.append("no time estimate: " + ("a stage does not fit" if not r["fits"] else
                                             "the compiler gives no time estimate on this platform"))
    if r.get("overrides"):
        lines.append("tuned decode batches (the config's own shown as (alt)): "
                     + " ".join(f"--config.{k}={v}" for k, v in r["overrides"].items()))
    c = r["counts"]
    lines.append(f"per iteration: {c['prompts']} prompts, {c['responses']} responses, "
                 f"{c['questions_per_prompt']} questions per prompt, ≤ {c['pairs']} pairs, {c['dpo_steps']} DPO steps")
    return "\n".join(lines)


def decode_rates(r: dict[str, Any]) -> dict[str, float]:
    """Generated tokens per second per chip of every decode stage over the whole stage (its steps
    summed at their filled lengths, ``plan_decode``)."""
    return {s["name"]: s["tokens_per_s_chip"] for s in r["stages"]
            if s["name"].endswith("/decode") and s.get("tokens_per_s_chip") and not s["variant"]}


def verdicts(r: dict[str, Any]) -> list[str]:
    """One line per stage of the run that cannot run: "does not fit" with needed vs available GiB, the
    knobs that help (weights' first when the resident weights alone overflow) and alternatives that
    fit, or "does not compile" with XLA's message."""
    out, hbm = [], r["hbm_per_chip"]
    for s in r["stages"]:
        if s["fits"] or s["variant"]:
            continue
        if s.get("error") and "out of memory" not in s["note"]:
            out.append(f"does not compile: stage {s['name']} on {r['topology']}: {s['error']}")
            continue
        need = f"more than {_fmt(hbm, GIB)}" if s["bytes_per_chip"] is None else _fmt(s["bytes_per_chip"], GIB)
        knobs = KNOBS[s["kind"]]
        order = ("weights", "activations") if s["resident_bytes"] > 0.5 * (hbm or 0) else ("activations", "weights")
        fitting = [f"{v['name']} fits ({_fmt(v['bytes_per_chip'], GIB)} GiB)" for v in r["stages"]
                   if v["variant"] and v["fits"] and v["name"].startswith(s["name"] + "[")]
        out.append(f"does not fit: stage {s['name']} needs {need} GiB per chip, {r['topology']} has "
                   f"{_fmt(hbm, GIB)} GiB. Knobs that help: " + "; ".join(knobs[order[0]] + knobs[order[1]])
                   + (". " + "; ".join(fitting) if fitting else ""))
    return out
