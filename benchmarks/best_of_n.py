"""Self-reward best-of-N in the toy world (METHOD.md §6; the paper's Fig. 5): exact CHAIR of the
answer picked among N samples, for N = 1, 4, 16, 64.

A toy run's workdir holds the warm start (``warmstart/``, the pre-alignment π_ref) and the aligned
export (``export/``, π_θ). On the run's held-out evaluation images (``toy_world.eval_split`` with the
run's world, seed and ``n_eval``), each model-answered prompt gets 64 samples (temperature 1), each
scored with the length-normalised implicit reward ``(β/T) Σ [log π_θ − log π_ref]``
(``eval.policy.best_of_n``); best-of-N keeps the best of the first N. For comparison, the same
samples are also picked by length-normalised likelihood under π_θ (the "perplexity" reward of
Fig. 5) and by the claim-verification reward (``feedback.claim_reward``: the toy rule claims, labeled
by π_ref as training's self-feedback labels them; answers without claims are not candidates).
CHAIR is exact (``eval.chair`` on the toy language against each image's objects).

    python -m benchmarks.best_of_n --workdir WORKDIR [--ns 1,4,16,64] [--png best_of_n.png]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from rlaifv_jax.data import toy_world  # noqa: E402
from rlaifv_jax.eval import chair  # noqa: E402
from rlaifv_jax.eval.policy import ImplicitReward, Policy, best_of_n, load_reference  # noqa: E402
from rlaifv_jax.eval.questions import Question  # noqa: E402
from rlaifv_jax.engine.score import Labeler  # noqa: E402
from rlaifv_jax.engine.vision import layout_key  # noqa: E402
from rlaifv_jax.feedback.claim_reward import ClaimReward  # noqa: E402
from rlaifv_jax.feedback.toy_claims import RuleClaimExtractor  # noqa: E402


def pick(samples: list[list[dict]], n: int, key) -> list[str]:
    """Per prompt, the answer of the best of the first ``n`` samples by ``key`` (first on ties)."""
    return [max(s[:n], key=key)["answer"] for s in samples]


class BothRewards:
    """One pass over the samples with both rewards: ``reward`` (implicit) and ``claim_reward``."""

    def __init__(self, implicit: ImplicitReward, claims: ClaimReward):
        self.implicit, self.claims = implicit, claims

    def __call__(self, questions, prompts, samples):
        scored = zip(self.implicit(questions, prompts, samples), self.claims(questions, prompts, samples))
        return [[{**a, "claim_reward": b["reward"]} for a, b in zip(xs, ys)] for xs, ys in scored]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", required=True, help="a toy run's workdir (warmstart/ and export/)")
    parser.add_argument("--aligned", default=None, help="aligned model (default WORKDIR/export)")
    parser.add_argument("--reference", default=None, help="reference model (default WORKDIR/warmstart)")
    parser.add_argument("--ns", default="1,4,16,64")
    parser.add_argument("--n_eval", type=int, default=None, help="evaluation images (default: the run's)")
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--max_new_tokens", type=int, default=40)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--png", default="best_of_n.png")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    ns = sorted(int(n) for n in args.ns.split(","))
    with open(os.path.join(args.workdir, "config.json")) as f:
        config = json.load(f)
    world = toy_world.WorldSettings(caption_partner_rate=config["world"]["caption_partner_rate"])
    records = toy_world.eval_split(world, args.n_eval or config["world"]["n_eval"], config["seed"])
    aligned = args.aligned or os.path.join(args.workdir, "export")
    policy = Policy(aligned, dtype="float32")
    reference = load_reference(args.reference or os.path.join(args.workdir, "warmstart"), policy, "float32")
    with tempfile.TemporaryDirectory() as tmp:
        questions = []
        for r in records:  # PNG is lossless: the images read back exactly
            path = os.path.join(tmp, f"{r['id']}.png")
            Image.fromarray(r["image"]).save(path)
            questions.append(Question(r["id"], r["question"], path))
        greedy = policy.answer(questions, num_beams=1, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
        labeler = Policy(args.reference or os.path.join(args.workdir, "warmstart"), dtype="float32")
        claims = ClaimReward(RuleClaimExtractor(world),
                             Labeler(labeler.model, labeler.tokenizer, template=labeler.template,
                                     batch_size=8 * args.batch_size).score,
                             labeler.encode_image, layout_key(labeler.model))
        rewards = BothRewards(ImplicitReward(policy, reference, args.beta, args.batch_size), claims)
        best = best_of_n(policy, questions, rewards, n=ns[-1],
                         temperature=args.temperature, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    truths = [{tuple(o) for o in r["objects"]} for r in records]

    def metrics(answers: list[str]) -> dict[str, float]:
        m = chair.chair_metrics([chair.toy_mentions(a, world) for a in answers], truths)
        return {k: m[k] for k in ("chair_response", "chair_mention", "recall")}

    samples = [b["samples"] for b in best]
    rows = {"greedy": metrics(greedy),
            "implicit": {n: metrics(pick(samples, n, lambda s: s["reward"])) for n in ns},
            "likelihood": {n: metrics(pick(samples, n, lambda s: s["logp"] / s["tokens"])) for n in ns},
            "labeler": {n: metrics(pick(samples, n, lambda s: -math.inf if s["claim_reward"] is None
                                        else s["claim_reward"])) for n in ns}}
    result = {"aligned": aligned, "images": len(records), "beta": args.beta, "temperature": args.temperature,
              **rows}
    print(f"{'N':>4}  {'implicit resp/ment':>20}  {'likelihood resp/ment':>22}  {'labeler resp/ment':>20}")
    for n in ns:
        i, lk, lb = rows["implicit"][n], rows["likelihood"][n], rows["labeler"][n]
        print(f"{n:>4}  {i['chair_response']:>9.3f} {i['chair_mention']:>9.3f}  "
              f"{lk['chair_response']:>10.3f} {lk['chair_mention']:>10.3f}  "
              f"{lb['chair_response']:>9.3f} {lb['chair_mention']:>9.3f}")
    g = rows["greedy"]
    print(f"greedy: response {g['chair_response']:.3f}, mention {g['chair_mention']:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name, style in (("implicit", "o-"), ("likelihood", "s--"), ("labeler", "^-.")):
        ax.plot(ns, [100 * (1 - rows[name][n]["chair_response"]) for n in ns], style,
                label=f"{name} reward")
    ax.axhline(100 * (1 - g["chair_response"]), color="grey", ls=":", label="greedy")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ns, [str(n) for n in ns])
    ax.set_xlabel("N (samples)")
    ax.set_ylabel("responses without hallucination (%)")
    ax.set_title(f"Toy world best-of-N ({len(records)} images)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.png, dpi=120)
    print(f"wrote {args.png}")


if __name__ == "__main__":
    main()
