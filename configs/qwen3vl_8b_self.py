"""Qwen3-VL-8B-Instruct labeling its own responses (self-feedback), METHOD.md hyper-parameters.

python -m rlaifv_jax.main --config configs/qwen3vl_8b_self.py --workdir runs/qwen3vl8b_self \
  --config.policy.path=/ckpt/Qwen3-VL-8B-Instruct --config.prompts.path=/data/prompts.jsonl \
  --config.claims.split_path=/ckpt/split-llama3-8b --config.claims.convert_path=/ckpt/convert-llama3-8b

The checkpoint directory is the hub's (``config.json``, safetensors, tokenizer, ``preprocessor_config.json``:
patch 16, merge 2, so an image token covers 32x32 px). Its image processor decides the image tokens:
``longest_edge`` / (32·32) at most. Set ``"longest_edge": 1310720`` (1280·32·32: ≤ 1280 image tokens) in
``preprocessor_config.json`` before the run, as for Qwen2.5-VL (configs/qwen25vl_7b_self.py): larger images
overflow ``dpo.max_length`` (counted as ``too_long``) and pad every DPO pair's image further. The tower
compiles once per chunk bucket of 64 patches and attends over each whole image (no windows); the
DeepStack features of blocks 8, 16 and 24 ride with the image features into decoder layers 0–2
(models/qwen3_vl.py).
Plan it without weights (``policy.arch`` / ``claims.split_arch`` name the presets in configs/arch/):
``python -m rlaifv_jax.plan --config configs/qwen3vl_8b_self.py --topology v5p-8``.
"""
import ml_collections

from configs import qwen25vl_7b_self, slices

# docs/PLAN.md, 6 December 2026 (`plan --tune` on v5p-8): 1,024 prompts a call through 640 decode slots.
TUNED: slices.Table = {"v5p-8": slices.entry(sample=(1024, 640), claims=(1024, 0))}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = qwen25vl_7b_self.get_config(None)  # the same loop, sampling, labeling and DPO settings
    c.policy.path = ""  # Qwen/Qwen3-VL-8B-Instruct, downloaded beforehand (see the module docstring)
    c.policy.arch = "qwen3-vl-8b-instruct"  # its config.json, for the planner
    c.policy.template = "chat"  # the tokenizer's ChatML template (the image as
    # <|vision_start|><|image_pad|>…<|vision_end|> before the question, as Qwen's processor renders it)
    c.labeler.kind = "self"  # the initial policy labels its own samples (self-feedback)
    c.labeler.template = "chat"  # the question in the labeler's own (ChatML) template
    c.labeler.answer_prefix = "auto"  # "" after "<|im_start|>assistant\n": tokens "yes"/"Yes"/"no"/"No"
    return slices.apply(c, arg, TUNED)  # decode batches and mesh of the slice (configs/slices.py)
