"""The embedded default: RLAIF-V with self-feedback on the generated toy world, no downloads.

python -m rlaifv_jax.main --config configs/default.py --workdir runs/default
"""
import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.mode = "online"  # online RLAIF-V loop (vs "offline_dpo")
    c.seed = 0  # every random stream (world, samples, pair choice, DPO order) derives from it
    c.iterations = 4  # online iterations (the paper's 4)
    c.progress = True  # progress bars (may differ between runs of one workdir)

    # Logging; like progress and mesh, these may change between runs of one workdir.
    c.log = ml_collections.ConfigDict()
    c.log.wandb = False  # also log DPO metrics to Weights & Biases (pip install 'rlaifv_jax[wandb]')
    c.log.wandb_project = "rlaifv_jax"  # the W&B project (one W&B run per workdir and DPO stage)

    # What a rerun does when the prompts behind an iteration's records changed (edited, removed or
    # added; records carry a fingerprint of prompt id, image bytes, question and policy step).
    # May change between runs of one workdir.
    c.resume = ml_collections.ConfigDict()
    c.resume.on_input_change = "refuse"  # refuse: stop in one line saying what changed | recompute: redo those records

    # The TPU slice the paper configs' decode batches and mesh were tuned for ("" = none: the toy);
    # configs/slices.py sets it from the config argument (configs/X.py:v6e-8); a run elsewhere warns.
    c.slice = ""

    c.mesh = ml_collections.ConfigDict()  # device layout of DPO training (may change on resume)
    c.mesh.data = 1  # data-parallel mesh axis size
    c.mesh.fsdp = -1  # FSDP axis size (-1: all remaining devices)
    c.mesh.tensor = 1  # tensor-parallel axis size

    # Where prompts and the initial policy come from: "toy" generates both; "files" reads a
    # prompt JSONL (prompts.path) and Hugging Face checkpoints (policy.path, labeler.path).
    c.source = "toy"

    c.world = ml_collections.ConfigDict()
    c.world.caption_partner_rate = 0.7  # how often noisy training captions name an absent usual partner
    c.world.n_warmstart = 5000  # images for the supervised warm start (1 caption + 2 yes/no each)
    c.world.n_prompts = 256  # RLAIF-V prompt images per iteration
    c.world.n_eval = 200  # held-out evaluation images

    c.model = ml_collections.ConfigDict()  # toy policy size (LLaVA-shaped)
    c.model.hidden = 128  # LM width
    c.model.layers = 2  # LM layers
    c.model.heads = 4  # attention heads (LM and vision)
    c.model.kv_heads = 2  # LM key/value heads (GQA)
    c.model.vision_hidden = 64  # vision tower width
    c.model.vision_layers = 2  # vision tower layers
    c.model.patch = 8  # vision patch size (32 px images -> 16 image tokens)

    c.warmstart = ml_collections.ConfigDict()
    c.warmstart.steps = 2000  # supervised steps on captions + yes/no answers (1,500 learned yes/no with 1 of 2 seeds)
    c.warmstart.batch_size = 64  # records per step, drawn as whole images: an image's caption and yes/no records
    # share one row (its image tokens run once; pipelines/warmstart.pack_trees), about 21 images per step here
    c.warmstart.learning_rate = 1e-3  # at 3e-3 whether yes/no was learned depended on float order (BENCHMARKS.md)

    c.prompts = ml_collections.ConfigDict()
    c.prompts.path = ""  # JSONL of {"id", "image_path" | "image" (base64), "question"} (source="files")
    c.prompts.per_iteration = 0  # prompts used per iteration (0: all)
    c.prompts.image_root = ""  # folder image_path values resolve against ("": the prompt file's folder)
    c.prompts.allow_outside_root = False  # True: image_path may leave image_root (../, absolute); default: a counted skip

    c.policy = ml_collections.ConfigDict()
    c.policy.path = ""  # Hugging Face checkpoint directory of the initial policy (source="files")
    c.policy.dtype = "float32"  # compute dtype: float32 or bfloat16
    c.policy.param_dtype = "float32"  # stored (master) weights: keep float32 so small DPO updates survive
    c.policy.template = "llava_v1"  # chat format: llava_v1 or chat (the tokenizer's template)
    c.policy.arch = ""  # architecture preset (configs/arch/<name>/config.json) that python -m rlaifv_jax.plan
    # builds when policy.path is empty (the run itself always reads policy.path)

    c.sampling = ml_collections.ConfigDict()
    c.sampling.num_samples = 10  # responses per prompt (deconfounded: same settings, own seeds)
    c.sampling.temperature = 0.7
    c.sampling.top_k = 50  # transformers' default, as the official code left it
    c.sampling.top_p = 1.0
    c.sampling.repetition_penalty = 1.0  # 1.0 = off
    c.sampling.max_new_tokens = 40
    c.sampling.batch_size = 32  # prompts per sampler call
    c.sampling.decode_rows = 0  # continuous batching: decode slots per call (0 = off: batch_size x num_samples rows)

    c.claims = ml_collections.ConfigDict()
    c.claims.kind = "rule"  # "rule" (toy language) or "llm" (split/convert chat LLMs)
    c.claims.split_path = ""  # HF dir of the split LLM (kind="llm")
    c.claims.convert_path = ""  # HF dir of the convert LLM (kind="llm"; empty: same as split)
    c.claims.split_arch = ""  # architecture presets (configs/arch/) the planner builds when the paths above
    c.claims.convert_arch = ""  # are empty (convert_arch empty: same as split)
    c.claims.batch_size = 16  # prompts per claims shard; all their responses go to the LLM in one call
    c.claims.llm_batch_size = 64  # messages the claims LLM prefills together (kind="llm"; memory vs speed:
    # decoding is memory bound, so a step of 64 rows costs about what a step of 8 does)
    c.claims.decode_rows = 0  # continuous batching of the claims LLM: decode slots per call (0 = off: one row
    # per message of the batch); `python -m rlaifv_jax.plan --tune` suggests both for a slice

    c.labeler = ml_collections.ConfigDict()
    c.labeler.kind = "self"  # "self": the initial policy labels itself (self-feedback); "model": the
    # MLLM at labeler.path; "toy": a larger toy model warm-started like the policy (toy_labeler.*)
    c.labeler.path = ""  # HF dir of a separate labeler MLLM (kind="model")
    c.labeler.arch = ""  # architecture preset (configs/arch/) the planner builds when labeler.path is empty
    c.labeler.template = "llava_v1"  # the labeler's chat format
    c.labeler.repetition_penalty = 1.0  # applied to the yes/no logits, as the official code did (1.0 = off)
    c.labeler.batch_size = 64  # questions scored per batch against one cached image prefix
    c.labeler.answer_prefix = "auto"  # the text before the yes/no word of the labeler's answer, read from its
    # own tokenizer and template: the answer's first token is one of prefix + "yes" / "Yes" / "no" / "No".
    # "auto": " " after llava_v1's "ASSISTANT:", "" after a chat template's generation prompt, else the other,
    # whichever the labeler's tokenizer encodes as one token per word; a labeler with neither is refused at
    # start, naming its tokenizer and what each surface form gave. Or set " " / "" explicitly.

    c.toy_labeler = ml_collections.ConfigDict()  # used when labeler.kind="toy"
    c.toy_labeler.model = ml_collections.ConfigDict(c.model.to_dict())  # same fields as c.model
    c.toy_labeler.model.hidden = 192
    c.toy_labeler.model.layers = 3
    c.toy_labeler.model.vision_hidden = 96
    c.toy_labeler.warmstart = ml_collections.ConfigDict(c.warmstart.to_dict())  # same fields as c.warmstart
    c.toy_labeler.warmstart.steps = 2000
    # Its warm-start data: "clean": the "yesno" set plus the warm-start images' captions without the
    # annotators' partner bias (its held-out yes/no: 99.5 %, against 78.8 % for "yesno"; BENCHMARKS.md);
    # "yesno" asks, per image, about every object in it, every absent usual partner (the co-occurrence
    # bias the policy's captions carry) and enough other absent objects to balance yes and no, no
    # captions (toy_world.labeler_split); "policy": the policy's records (captions + 2 yes/no).
    c.toy_labeler.data = "clean"

    c.pairs = ml_collections.ConfigDict()
    c.pairs.per_prompt = 2  # at most this many pairs per prompt, sampled with the seed
    c.pairs.min_score_gap = 1  # chosen score - rejected score
    c.pairs.balance_lengths = True  # dataset-level length balancing (METHOD.md §4)
    # Balancing threshold r: -1 searches it as METHOD.md §4 does; or fix r in {0, 0.02, ..., 0.98}
    # (drop a pair whose chosen is more than r shorter than its rejected). The toy world fixes 0.3:
    # its claims are whole sentences, so dropping one hallucination out of four shortens a caption by
    # 25 %; the search then keeps only equal-length pairs (a hallucination swapped for a repeated real
    # object) and DPO learns to repeat. BENCHMARKS.md has the measured runs (search, off, 0.3).
    c.pairs.length_ratio = 0.3

    c.dpo = ml_collections.ConfigDict()
    c.dpo.beta = 0.2  # toy: 0.2 made the outcome larger and steadier over warm-start draws than the paper's 0.1
    # (BENCHMARKS.md, issue 25: -86/-85/-76/-71 % against -81/-65/-54/-49 %); the paper configs set 0.1
    c.dpo.loss_type = "sigmoid"  # sigmoid | ipo | hinge | robust
    c.dpo.label_smoothing = 0.0
    c.dpo.sft_weight = 0.1  # adds -sft_weight * log p(chosen) per pair (the official code's option, off there and
    # in the paper configs); toy: 0.1 kept recall within 2.1 points on four warm-start draws, against up to
    # -6.8 without (BENCHMARKS.md, issue 25, seventh session)
    c.dpo.learning_rate = 2e-4  # toy scale; the paper's 7B setting is 5e-7
    c.dpo.warmup_ratio = 0.05
    c.dpo.weight_decay = 0.01
    c.dpo.max_grad_norm = 1.0
    c.dpo.batch_size = 16  # pairs per optimizer step
    c.dpo.grad_accum = 1  # micro-batches per step
    c.dpo.epochs = 2
    c.dpo.max_steps = 0  # cap on optimizer steps per iteration, for quick trials (0: all epochs)
    c.dpo.checkpoints_per_epoch = 1  # a resumable train checkpoint every 1/N epoch (and at the end); the toy's
    # DPO is 7-20 steps an iteration and a save takes about 0.25 s, so 4 would save after nearly every step
    # (BENCHMARKS.md, issue 25, eleventh session); the paper configs set 4
    c.dpo.max_length = 128  # tokens per sequence (prompt + image + answer)
    c.dpo.remat = "none"  # per decoder layer: none | full (recompute in the backward pass) | dots (keep matmuls)
    c.dpo.master_dtype = "float32"  # the train state's copy of the weights: float32 | bfloat16 (less HBM)
    c.dpo.optimizer_state_dtype = "float32"  # AdamW moments: float32 | bfloat16 (updated in float32)

    c.eval = ml_collections.ConfigDict()
    c.eval.max_new_tokens = 40  # greedy captions for CHAIR
    c.eval.batch_size = 64
    c.eval.decode_rows = 0  # continuous batching of the greedy captions: decode slots per call (0 = off)
    # Checkpoint selection: every_epochs=1/N keeps a DPO checkpoint every 1/N epoch, evaluates
    # each one as above (exact CHAIR on the held-out images; source="toy" only) and makes the best by
    # select_metric the iteration's policy (the next iteration's start, and the export). 0 = off: the
    # last step, as before. Costs one eval pass per checkpoint (4 per epoch at every_epochs=0.25).
    c.eval.every_epochs = 0.0
    c.eval.select_metric = "mention_hall"  # mention_hall | response_hall | chair_s | recall | yesno_accuracy | yesno_f1
    # (Object HalBench's names, as offline selection uses them; mention_hall is CHAIR's mention-level rate)
    c.eval.select_mode = ""  # "min" | "max" | "" (the metric's own direction: lower CHAIR, higher recall/accuracy)
    if arg == "smoke":
        smoke(c)
    return c


def smoke(c: ml_collections.ConfigDict) -> None:
    """A minutes-scale variant for tests: tiny world, short warm start, two iterations."""
    c.iterations = 2
    c.world.n_warmstart = 300
    c.world.n_prompts = 24
    c.world.n_eval = 24
    c.warmstart.steps = 100  # with 60 length-grouped steps the labels agree on every sample: no pair to train on
    c.warmstart.learning_rate = 3e-3  # 100 steps: the faster rate
    c.sampling.num_samples = 4
    c.sampling.batch_size = 8
    c.dpo.epochs = 4
    c.dpo.batch_size = 8  # a multiple of 8 devices (tests run 8 fake CPU devices, also as 2 hosts x 4)
    c.dpo.warmup_ratio = 0.0  # with 4 steps an iteration, warm-up would leave one step at learning rate 0
