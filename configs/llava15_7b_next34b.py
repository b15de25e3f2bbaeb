"""LLaVA-1.5-7B policy, LLaVA-NeXT-34B labeler, Llama-3-8B-Instruct split/convert (the paper's 7B run).

python -m rlaifv_jax.main --config configs/llava15_7b_next34b.py --workdir runs/llava7b_next34b \
  --config.policy.path=/ckpt/llava-1.5-7b-hf --config.labeler.path=/ckpt/llava-v1.6-34b-hf \
  --config.claims.split_path=/ckpt/Meta-Llama-3-8B-Instruct --config.prompts.path=/data/prompts.jsonl
"""
import ml_collections

from configs import llava15_7b_self, slices

# docs/PLAN.md, 6 December 2026 (`plan --tune`): the 34B labeler wants a tensor axis of 4; on v5p-8 the
# sampler runs 512 prompts a call through 384 decode slots.
TUNED: slices.Table = {
    "v5p-8": slices.entry(sample=(512, 384), claims=(1024, 0), mesh=(1, -1, 4)),
    "v6e-8": slices.entry(sample=(32, 0), claims=(512, 0), mesh=(1, 2, 4)),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = llava15_7b_self.get_config(None)
    c.labeler.kind = "model"
    c.labeler.path = ""  # llava-hf/llava-v1.6-34b-hf (LlavaNextForConditionalGeneration, Yi-34B)
    c.labeler.arch = "llava-v1.6-34b"  # its config.json, for the planner
    c.labeler.template = "chat"  # LLaVA-NeXT-34B uses its tokenizer's (ChatML) template
    c.labeler.batch_size = 32
    return slices.apply(c, arg, TUNED)  # decode batches and mesh of the slice (configs/slices.py)
