"""Qwen2.5-VL-3B-Instruct labeling its own responses (self-feedback): the 7B config
(``configs/qwen25vl_7b_self.py``, METHOD.md hyper-parameters) on the 3B model, which TRL's VLM DPO
examples train.

python -m rlaifv_jax.main --config configs/qwen25vl_3b_self.py --workdir runs/qwen3b_self \
  --config.policy.path=/ckpt/Qwen2.5-VL-3B-Instruct --config.prompts.path=/data/prompts.jsonl \
  --config.claims.split_path=/ckpt/split-llama3-8b --config.claims.convert_path=/ckpt/convert-llama3-8b

Set ``max_pixels`` in the checkpoint's ``preprocessor_config.json`` as the 7B config explains. Plan:
``python -m rlaifv_jax.plan --config configs/qwen25vl_3b_self.py --topology v5p-8``.
"""
import ml_collections

from configs import qwen25vl_7b_self


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = qwen25vl_7b_self.get_config(arg)  # the 7B's decode batches per slice: the 3B's weights and KV cache are smaller
    c.policy.path = ""  # Qwen/Qwen2.5-VL-3B-Instruct (tied embeddings), downloaded beforehand
    c.policy.arch = "qwen2.5-vl-3b-instruct"  # its config.json, for the planner
    return c
