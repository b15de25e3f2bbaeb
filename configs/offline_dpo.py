"""Offline DPO on RLAIF-V-Dataset files (docs/METHOD.md §5 hyper-parameters for LLaVA-1.5-7B).

python -m rlaifv_jax.main --config configs/offline_dpo.py --workdir DIR \\
    --config.data.path=/data/RLAIF-V-Dataset --config.policy.path=/models/llava-1.5-7b-hf
"""
import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.mode = "offline_dpo"  # dispatch key for rlaifv_jax.main
    c.seed = 0  # data-shuffle seed and train-step RNG (LoRA dropout)
    c.progress = True  # progress bars (may change between runs of one workdir)

    c.data = ml_collections.ConfigDict()
    c.data.path = ""  # parquet/JSONL files or directories of them: comma-separated, globs allowed
    # (RLAIF-V-Dataset schema; a directory stands for every *.parquet / *.jsonl file in it)
    c.data.max_pairs = 0  # use only the first N usable pairs, for quick trials (0: all)
    c.data.image_root = ""  # folder image paths in the data resolve against ("": each data file's folder)
    c.data.allow_outside_root = False  # True: image paths may leave image_root (../, absolute); default: a counted skip

    c.policy = ml_collections.ConfigDict()
    c.policy.path = ""  # local Hugging Face LLaVA directory (config.json, safetensors, tokenizer, processor)
    c.policy.dtype = "bfloat16"  # forward/backward dtype ("bfloat16" or "float32")
    c.policy.param_dtype = "float32"  # master-weight dtype (optimizer works on these)
    c.policy.template = "llava_v1"  # chat format: "llava_v1" (LLaVA-1.5) or "chat" (tokenizer's template)

    # DPO: the same field names as the online loop's dpo.* (the former train.* / data.max_length /
    # policy.compute_dtype / data.template names still work for one release: core/vocabulary.py).
    c.dpo = ml_collections.ConfigDict()
    c.dpo.beta = 0.1  # β of the DPO loss
    c.dpo.loss_type = "sigmoid"  # sigmoid | ipo | hinge | robust (TRL definitions)
    c.dpo.label_smoothing = 0.0  # ε for sigmoid / robust
    c.dpo.sft_weight = 0.0  # weight of the −π(y_w) SFT term (0 = off)
    c.dpo.average = False  # average log-probs over answer tokens instead of summing
    c.dpo.learning_rate = 5e-7  # peak learning rate (LoRA variant in docs/METHOD.md §5: 1e-5)
    c.dpo.schedule = "cosine"  # "cosine" (to 0 at the last step) or "constant", after warm-up
    c.dpo.warmup_ratio = 0.05  # linear warm-up over ceil(ratio × total steps)
    c.dpo.weight_decay = 0.01  # AdamW decoupled weight decay on ≥2-D params
    c.dpo.adam_b1 = 0.9  # AdamW β1
    c.dpo.adam_b2 = 0.999  # AdamW β2
    c.dpo.adam_eps = 1e-8  # AdamW ε
    c.dpo.max_grad_norm = 1.0  # global-norm gradient clipping (≤ 0: off)
    c.dpo.batch_size = 8  # pairs per optimizer step, over all hosts
    c.dpo.grad_accum = 1  # micro-batches per step (exact: same result as the full batch)
    c.dpo.remat = "none"  # per decoder layer: none | full (recompute in the backward pass) | dots (keep matmuls)
    c.dpo.master_dtype = "float32"  # the train state's copy of the weights: float32 | bfloat16 (less HBM)
    c.dpo.optimizer_state_dtype = "float32"  # AdamW moments: float32 | bfloat16 (updated in float32)
    c.dpo.epochs = 4  # passes over the data (each reshuffled)
    c.dpo.max_steps = 0  # stop after this many optimizer steps, for quick trials (0: all epochs)
    c.dpo.max_length = 2048  # prompt (image tokens included) + longer answer; longer pairs are skipped
    c.dpo.checkpoints_per_epoch = 4  # a checkpoint every 1/4 epoch (and at the end)
    c.dpo.max_to_keep = 2  # latest train-state checkpoints kept, besides the best one (0 = all)
    c.dpo.best_metric = "loss"  # also keep the checkpoint with the best mean of this metric since the
    # previous checkpoint ("" = none): loss, rewards/accuracies, rewards/margins, ...
    c.dpo.best_mode = "min"  # "min" or "max" of best_metric
    c.dpo.log_every = 1  # write metrics every N steps
    c.dpo.ref_batch_size = 8  # pairs per forward in the reference log-prob pass

    c.lora = ml_collections.ConfigDict()
    c.lora.enabled = False  # train LoRA adapters on every LM linear layer instead of the full LM
    c.lora.rank = 64  # r
    c.lora.alpha = 16.0  # α (scale α / r)
    c.lora.dropout = 0.05  # dropout on the adapter input

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = 1  # data-parallel axis size
    c.mesh.fsdp = -1  # FSDP axis size (-1: all remaining devices)
    c.mesh.tensor = 1  # tensor-parallel axis size

    c.export = ml_collections.ConfigDict()
    c.export.dtype = "bfloat16"  # dtype of the exported Hugging Face weights ("" = master dtype)
    # Which train checkpoints become Hugging Face exports: "last" (export/ = the final step), "best"
    # (export/ = the kept checkpoint with the best dpo.best_metric), "all" (export/ = the final step,
    # and export/step_N/ for every other kept checkpoint).
    c.export.checkpoints = "last"

    # Checkpoint selection: every_epochs=1/N keeps a checkpoint every 1/N epoch, answers the
    # suite's questions with each one (its official decoding; python -m rlaifv_jax.evaluate's scoring, no
    # judge) and exports the best by select_metric instead of the last step. 0 = off.
    c.eval = ml_collections.ConfigDict()
    c.eval.every_epochs = 0.0  # 0 (off) or 1/N: 1, 0.5, 0.25, ...
    c.eval.suite = ""  # object_halbench | amber | pope (MMHal-Bench needs a judge: not here)
    c.eval.data = ""  # the suite's --data path (see docs/EVALUATION.md)
    c.eval.images = ""  # the suite's --images directory (POPE, AMBER)
    c.eval.limit = 0  # first N questions only (0: all)
    c.eval.num_beams = 0  # 0: the suite's official decoding
    c.eval.max_new_tokens = 0  # 0: the suite's official limit
    c.eval.batch_size = 8  # prompts per sampler batch
    c.eval.decode_rows = 0  # greedy answers through this many continuous-batching slots (0 = off; beam: unused)
    c.eval.select_metric = "mention_hall"  # a dotted name of the suite's metrics (the online loop uses the
    # same names for its toy CHAIR): object_halbench mention_hall / response_hall / chair_s / recall; pope random.f1 / all.accuracy ...; amber discriminative.f1,
    # generative.chair ...
    c.eval.select_mode = "min"  # "min" (lower is better) or "max"

    c.log = ml_collections.ConfigDict()  # may change between runs of one workdir
    c.log.wandb = False  # also log DPO metrics to Weights & Biases (pip install 'rlaifv_jax[wandb]')
    c.log.wandb_project = "rlaifv_jax"  # the W&B project
    return c
