"""LLaVA-1.5-7B labeling its own responses (self-feedback), METHOD.md hyper-parameters.

python -m rlaifv_jax.main --config configs/llava15_7b_self.py --workdir runs/llava7b_self \
  --config.policy.path=/ckpt/llava-1.5-7b-hf --config.prompts.path=/data/prompts.jsonl \
  --config.claims.split_path=/ckpt/split-llama3-8b --config.claims.convert_path=/ckpt/convert-llama3-8b
"""
import ml_collections

from configs import default


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
    c.sampling.batch_size = 32  # prompts per prefill: 320 decode rows, which fit v5p-8 and v6e-8 (docs/PLAN.md;
    # `python -m rlaifv_jax.plan --tune` picks the fastest batch for a slice)
    c.claims.kind = "llm"  # Llama-3-8B-Instruct (or the released split/convert fine-tunes)
    c.claims.split_arch = "llama-3-8b-instruct"  # both fine-tunes have its architecture
    c.claims.batch_size = 32
    c.claims.llm_batch_size = 320  # all 320 responses of a claims shard decode together (docs/PLAN.md)
    c.pairs.length_ratio = -1.0  # METHOD.md §4: search the balancing threshold
    c.labeler.kind = "self"
    c.labeler.template = "llava_v1"
    c.labeler.batch_size = 64
    c.dpo.learning_rate = 5e-7
    c.dpo.batch_size = 8
    c.dpo.epochs = 4
    c.dpo.max_length = 2048
    c.dpo.remat = "full"  # recompute each decoder layer in the backward pass: 28 GiB per chip on v5p-8, not 153 (docs/PLAN.md)
    c.eval.max_new_tokens = 512
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1
    return c
