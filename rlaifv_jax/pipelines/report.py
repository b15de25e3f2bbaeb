"""End-of-run report: a table on stdout, ``report.json`` and a PNG plot in the workdir."""
from __future__ import annotations

import json
import os
from typing import Any

from rlaifv_jax.core.records import atomic_write_text

COLUMNS = (("iteration", "iter", "{}"), ("chair_response", "CHAIR resp", "{:.1%}"),
           ("chair_mention", "CHAIR ment", "{:.1%}"), ("recall", "recall", "{:.1%}"),
           ("yesno_accuracy", "yes/no acc", "{:.1%}"), ("pairs", "pairs", "{}"),
           ("dpo_reward_accuracy", "DPO acc", "{:.2f}"), ("dpo_reward_margin", "DPO margin", "{:.3f}"),
           ("wall_s", "wall s", "{:.0f}"))


def table(entries: list[dict[str, Any]]) -> str:
    """A fixed-width text table of the summary entries."""
    head = " | ".join(f"{title:>10}" for _, title, _ in COLUMNS)
    rows = [head, "-" * len(head)]
    for e in entries:
        cells = [fmt.format(e[key]) if e.get(key) is not None else "-" for key, _, fmt in COLUMNS]
        rows.append(" | ".join(f"{c:>10}" for c in cells))
    return "\n".join(rows)


def plot(entries: list[dict[str, Any]], path: str) -> None:
    """Hallucination rates and recall per iteration, as a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    its = [e["iteration"] for e in entries]
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label in (("chair_mention", "CHAIR mention"), ("chair_response", "CHAIR response"), ("recall", "recall")):
        ax.plot(its, [100 * e[key] for e in entries], marker="o", label=label)
    ax.set_xlabel("RLAIF-V iteration (0 = warm start)")
    ax.set_ylabel("%")
    ax.set_xticks(its)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# A lower CHAIR only counts as a reduction when the captions still say about as much: a policy that
# stops talking (or names far fewer true objects) hallucinates less by saying less.
COLLAPSE = 0.5  # flagged when mentions per caption or recall fall below this fraction of iteration 0


def collapse(first: dict[str, Any], last: dict[str, Any]) -> list[str]:
    """Why ``last`` cannot be compared with ``first`` as a hallucination reduction (empty: it can)."""
    reasons = []

    def per_caption(e):
        return e["n_mentions"] / e["n_responses"] if e.get("n_responses") and e.get("n_mentions") is not None else None

    a, b = per_caption(first), per_caption(last)
    if a and b is not None and b < COLLAPSE * a:
        reasons.append(f"captions collapsed: {a:.2f} -> {b:.2f} object mentions per caption")
    if first.get("recall") and last.get("recall") is not None and last["recall"] < COLLAPSE * first["recall"]:
        reasons.append(f"recall collapsed: {first['recall']:.1%} -> {last['recall']:.1%}")
    if any(last.get(k) is None for k in ("chair_mention", "recall")):
        reasons.append("the last evaluation has no CHAIR / recall value")
    return reasons


def selection_lines(entries: list[dict[str, Any]]) -> list[str]:
    """One line per iteration that selected its DPO checkpoint (``eval.every_epochs``): the metric at
    every candidate, the selected step and the last."""
    lines = []
    for e in entries:
        if e.get("selected_step") is None:
            continue
        metric, rows = e["select_metric"], e.get("checkpoint_evals") or []
        value = {r["step"]: r.get(metric) for r in rows}
        fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
        lines.append(f"iteration {e['iteration']}: {metric} ({e['select_mode']}) per checkpoint "
                     + " ".join(f"{s}:{fmt(v)}" for s, v in value.items())
                     + f"; selected step {e['selected_step']} ({fmt(value.get(e['selected_step']))}), "
                     f"last step {e['last_step']} ({fmt(value.get(e['last_step']))})")
    return lines


def write_report(workdir: str, entries: list[dict[str, Any]], prompt_report: dict[str, Any] | None) -> None:
    """Print the table (and the prompt-file problems) and write ``report.json`` + ``hallucination.png``."""
    print("\nRLAIF-V summary (" + os.path.join(workdir, "summary.json") + ")")
    print(table(entries))
    verdict = None
    if entries and entries[0].get("chair_mention") is not None:
        first, last = entries[0], entries[-1]
        reasons = collapse(first, last)
        if all(e.get(k) is not None for e in entries for k in ("chair_mention", "chair_response", "recall")):
            plot(entries, os.path.join(workdir, "hallucination.png"))
        if reasons:
            verdict = {"reduction": None, "flags": reasons}
            print("no hallucination reduction is claimed: " + "; ".join(reasons))
        elif first["chair_mention"]:
            verdict = {"reduction": 1 - last["chair_mention"] / first["chair_mention"], "flags": []}
            print(f"mention-level CHAIR {first['chair_mention']:.1%} -> {last['chair_mention']:.1%} "
                  f"({verdict['reduction']:.0%} relative reduction); "
                  f"recall {first['recall']:.1%} -> {last['recall']:.1%}")
    selection = selection_lines(entries)
    if selection:
        print("checkpoint selection (eval.every_epochs):")
        for line in selection:
            print("  " + line)
    if prompt_report:
        print(f"prompt file {prompt_report['path']}: kept {prompt_report['kept']}, skipped {prompt_report['skipped']}")
        for line in prompt_report["problems"]:
            print("  " + line)
    atomic_write_text(os.path.join(workdir, "report.json"),
                      json.dumps({"summary": entries, "verdict": verdict, "prompt_file": prompt_report}, indent=2,
                                 allow_nan=False))
