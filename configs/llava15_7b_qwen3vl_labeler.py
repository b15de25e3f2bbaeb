"""LLaVA-1.5-7B policy labeled by Qwen3-VL-8B-Instruct (another family: its own tokenizer, ChatML
template, image processor and yes/no token ids), Llama-3-8B-Instruct split/convert.

python -m rlaifv_jax.main --config configs/llava15_7b_qwen3vl_labeler.py --workdir runs/llava7b_qwen3vl \
  --config.policy.path=/ckpt/llava-1.5-7b-hf --config.labeler.path=/ckpt/Qwen3-VL-8B-Instruct \
  --config.claims.split_path=/ckpt/Meta-Llama-3-8B-Instruct --config.prompts.path=/data/prompts.jsonl

The labeler reads each image with its own processor (set ``"longest_edge": 1310720`` in its
``preprocessor_config.json``, see configs/qwen3vl_8b_self.py) and asks each question in its own chat
template; the policy keeps LLaVA's ``llava_v1`` prompts. The labeler's yes/no ids are resolved from its
tokenizer at start (a labeler whose answers cannot be read is refused then, in one line).
Plan it without weights (``policy.arch``, ``labeler.arch``, ``claims.split_arch`` name the presets in
configs/arch/): ``python -m rlaifv_jax.plan --config configs/llava15_7b_qwen3vl_labeler.py --topology v5p-8``.
"""
import ml_collections

from configs import llava15_7b_self


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = llava15_7b_self.get_config(arg)  # its sampler and claims batches per slice (the labeler does not decode)
    c.labeler.kind = "model"
    c.labeler.path = ""  # Qwen/Qwen3-VL-8B-Instruct (Qwen3VLForConditionalGeneration)
    c.labeler.arch = "qwen3-vl-8b-instruct"  # its config.json, for the planner
    c.labeler.template = "chat"  # the labeler's own ChatML template, not the policy's llava_v1
    c.labeler.answer_prefix = "auto"  # "" after "<|im_start|>assistant\n" (its tokens "yes"/"Yes"/"no"/"No")
    c.labeler.batch_size = 64
    return c
