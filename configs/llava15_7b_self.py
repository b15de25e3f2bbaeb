"""LLaVA-1.5-7B labeling its own responses (self-feedback), METHOD.md hyper-parameters.

python -m rlaifv_jax.main --config configs/llava15_7b_self.py --workdir runs/llava7b_self \
  --config.policy.path=/ckpt/llava-1.5-7b-hf --config.prompts.path=/data/prompts.jsonl \
  --config.claims.split_path=/ckpt/split-llama3-8b --config.claims.convert_path=/ckpt/convert-llama3-8b
"""
import ml_collections

from configs import default, slices

# docs/PLAN.md, 6 December 2026 (`plan --tune`): the sampler continuous through 384 slots on v5p-8, 128 on
# v6e-8; v5litepod-8 (16 GiB a chip) needs a tensor axis and fits 16 prompts a call.
TUNED: slices.Table = {
    "v5p-8": slices.entry(sample=(256, 384), claims=(1024, 0)),
    "v6e-8": slices.entry(sample=(128, 128), claims=(320, 0)),
    "v5litepod-8": slices.entry(sample=(16, 0), claims=(320, 0), mesh=(1, 2, 4)),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = default.get_config(None)
    c.source = "files"
    c.iterations = 4  # the paper's 4 online iterations
    c.prompts.path = ""  # JSONL: {"id", "image_path" | "image" (base64), "question"}
    c.prompts.per_iteration = 4000  # ~4k prompts per iteration
    c.policy.path = ""  # llava-hf/llava-1.5-7b-hf, downloaded beforehand
    c.policy.arch = "llava-1.5-7b"  # its config.json, for python -m rlaifv_jax.plan without weights
    c.policy.dtype = "bfloat16"
    c.policy.template = "llava_v1"
    c.sampling.num_samples = 10
    c.sampling.temperature = 0.7
    c.sampling.top_k = 50
    c.sampling.top_p = 1.0
    c.sampling.max_new_tokens = 512
    c.claims.kind = "llm"  # Llama-3-8B-Instruct (or the released split/convert fine-tunes)
    c.claims.split_arch = "llama-3-8b-instruct"  # both fine-tunes have its architecture
    c.pairs.length_ratio = -1.0  # METHOD.md §4: search the balancing threshold
    c.labeler.kind = "self"
    c.labeler.template = "llava_v1"
    c.labeler.batch_size = 64
    c.dpo.beta = 0.1  # METHOD.md §5
    c.dpo.sft_weight = 0.0  # off, as in the official code
    c.dpo.learning_rate = 5e-7
    c.dpo.batch_size = 8
    c.dpo.epochs = 4
    c.dpo.checkpoints_per_epoch = 4  # a resumable train checkpoint every 1/4 epoch
    c.dpo.max_length = 2048
    c.dpo.remat = "full"  # recompute each decoder layer in the backward pass: 28 GiB per chip on v5p-8, not 153 (docs/PLAN.md)
    c.eval.max_new_tokens = 512
    return slices.apply(c, arg, TUNED)  # decode batches and mesh of the slice (configs/slices.py)
