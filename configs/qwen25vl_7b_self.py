"""Qwen2.5-VL-7B-Instruct labeling its own responses (self-feedback), METHOD.md hyper-parameters.

python -m rlaifv_jax.main --config configs/qwen25vl_7b_self.py --workdir runs/qwen7b_self \
  --config.policy.path=/ckpt/Qwen2.5-VL-7B-Instruct --config.prompts.path=/data/prompts.jsonl \
  --config.claims.split_path=/ckpt/split-llama3-8b --config.claims.convert_path=/ckpt/convert-llama3-8b

The checkpoint directory is the hub's (``config.json``, safetensors, tokenizer, ``preprocessor_config.json``).
Its image processor decides the image tokens: ``max_pixels`` / (28·28) at most. Set ``"max_pixels":
1003520`` (1280·28·28: ≤ 1280 image tokens, the usual fine-tuning setting) in ``preprocessor_config.json``
before the run; the hub default (12845056: up to 16384 tokens) lets large images overflow
``dpo.max_length`` (such pairs are counted as ``too_long`` and left out) and makes each DPO pair pad its
image to ``4 · dpo.max_length`` patches. The vision tower compiles once per chunk bucket of 64 patches
(images resized near ``max_pixels`` share 2–3 programs; see models/qwen_vision.py).
Plan it without weights (``policy.arch`` / ``claims.split_arch`` name the presets in configs/arch/):
``python -m rlaifv_jax.plan --config configs/qwen25vl_7b_self.py --topology v5p-8``.
"""
import ml_collections

from configs import default, slices

# docs/PLAN.md, 6 December 2026 (`plan --tune` on v5p-8): 1,024 prompts a call through 512 decode slots.
TUNED: slices.Table = {"v5p-8": slices.entry(sample=(1024, 512), claims=(1024, 0))}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = default.get_config(None)
    c.source = "files"  # prompts from a JSONL file, models from Hugging Face directories
    c.iterations = 4  # the paper's 4 online iterations
    c.prompts.path = ""  # JSONL: {"id", "image_path" | "image" (base64), "question"}
    c.prompts.per_iteration = 4000  # ~4k prompts per iteration
    c.policy.path = ""  # Qwen/Qwen2.5-VL-7B-Instruct, downloaded beforehand (see the module docstring)
    c.policy.arch = "qwen2.5-vl-7b-instruct"  # its config.json, for the planner
    c.policy.dtype = "bfloat16"  # compute dtype
    c.policy.param_dtype = "float32"  # master weights: float32 so lr 5e-7 updates survive
    c.policy.template = "chat"  # the tokenizer's ChatML template (default system message; the image as
    # <|vision_start|><|image_pad|>…<|vision_end|> before the question, as Qwen's processor renders it)
    c.sampling.num_samples = 10  # deconfounded: 10 responses per prompt, same settings, own streams
    c.sampling.temperature = 0.7  # METHOD.md §2 (not Qwen's generation_config.json, which is near-greedy)
    c.sampling.top_k = 50  # transformers' default, as the official code left it
    c.sampling.top_p = 1.0  # off
    c.sampling.repetition_penalty = 1.0  # off (OmniLMM used 1.1)
    c.sampling.max_new_tokens = 512
    c.claims.kind = "llm"  # Llama-3-8B-Instruct (or the released split/convert fine-tunes)
    c.claims.split_arch = "llama-3-8b-instruct"  # both fine-tunes have its architecture (for the planner)
    c.pairs.length_ratio = -1.0  # METHOD.md §4: search the length-balancing threshold
    c.labeler.kind = "self"  # the initial policy labels its own samples (self-feedback)
    c.labeler.template = "chat"  # yes/no read after "<|im_start|>assistant\n" (tokens "yes"/"Yes"/"no"/"No")
    c.labeler.repetition_penalty = 1.0  # off (METHOD.md §3: the official code's 1.1/1.2 is an option)
    c.labeler.batch_size = 64  # questions scored per batch against one cached image prefix
    c.dpo.beta = 0.1
    c.dpo.sft_weight = 0.0  # off, as in the official code
    c.dpo.learning_rate = 5e-7  # METHOD.md §5 (full fine-tune of projector = 2x2 merger, and language model)
    c.dpo.warmup_ratio = 0.05
    c.dpo.weight_decay = 0.01
    c.dpo.batch_size = 8  # global batch (pairs per optimizer step)
    c.dpo.epochs = 4  # per iteration
    c.dpo.checkpoints_per_epoch = 4  # a resumable train checkpoint every 1/4 epoch
    c.dpo.max_length = 2048  # tokens per sequence (prompt + image + answer); longer pairs are counted, not cut
    c.dpo.remat = "full"  # recompute each decoder layer in the backward pass (activations of 2048-token pairs)
    c.eval.max_new_tokens = 512  # (exact toy evaluation only; files-source runs report no CHAIR)
    return slices.apply(c, arg, TUNED)  # decode batches and mesh (FSDP over every device) of the slice
