"""Supervised warm start of the toy world's tiny LLaVA (captions + yes/no answers).

The result is a normal Hugging Face checkpoint directory (model, ``tokenizer.json``, image
processor) cached in the workdir, so the online loop loads the initial policy exactly as it would
load a real one.
"""
from __future__ import annotations

import functools
import logging
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

from rlaifv_jax.data import chat, toy_world
from rlaifv_jax.engine.logps import answer_logps
from rlaifv_jax.models import hf
from rlaifv_jax.pipelines import export
from rlaifv_jax.core.errors import NonFiniteError
from rlaifv_jax.core.records import atomic_write_text

DONE = "_DONE"
log = logging.getLogger(__name__)


def toy_model_config(tokenizer, world: toy_world.WorldSettings, size: Any) -> dict[str, Any]:
    """A transformers ``LlavaForConditionalGeneration`` config dict for the toy world."""
    text = dict(model_type="llama", vocab_size=len(tokenizer), hidden_size=size.hidden,
                intermediate_size=size.hidden * 2, num_hidden_layers=size.layers,
                num_attention_heads=size.heads, num_key_value_heads=size.kv_heads,
                head_dim=size.hidden // size.heads, rms_norm_eps=1e-6,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                max_position_embeddings=512, tie_word_embeddings=False, hidden_act="silu",
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id)
    vision = dict(model_type="clip_vision_model", hidden_size=size.vision_hidden,
                  intermediate_size=size.vision_hidden * 2, num_hidden_layers=size.vision_layers,
                  num_attention_heads=size.heads, image_size=world.image_size,
                  patch_size=size.patch, num_channels=3, layer_norm_eps=1e-5, hidden_act="quick_gelu")
    return dict(architectures=["LlavaForConditionalGeneration"], model_type="llava", text_config=text,
                vision_config=vision, image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                vision_feature_layer=-1, vision_feature_select_strategy="default",
                projector_hidden_act="gelu", multimodal_projector_bias=True, tie_word_embeddings=False)


def image_processor(world: toy_world.WorldSettings):
    """A ``CLIPImageProcessor`` doing what ``toy_world.encode_image`` does, saved with the checkpoint so
    transformers (and ``prompts.hf_image_encoder``) preprocess toy images identically."""
    from transformers import CLIPImageProcessor
    size = world.image_size
    return CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                              image_mean=[toy_world.IMAGE_MEAN] * 3, image_std=[toy_world.IMAGE_STD] * 3)


def encode_examples(records: list[dict[str, Any]], tokenizer, image_tokens: int, image_token_id: int
                    ) -> dict[str, np.ndarray]:
    """Right-padded ``tokens``, ``answer_start``, ``answer_len`` and ``pixel_values`` for SFT records."""
    rows, starts, lens = [], [], []
    for r in records:
        enc = chat.encode_prompt_answer(tokenizer, r["question"], r["answer"], image_tokens,
                                        image_token_id=image_token_id)
        rows.append(np.concatenate([enc.prompt_ids, enc.answer_ids]))
        starts.append(len(enc.prompt_ids))
        lens.append(len(enc.answer_ids))
    length = -(-max(len(r) for r in rows) // 8) * 8
    tokens = np.full((len(rows), length), tokenizer.pad_token_id, np.int32)
    for i, r in enumerate(rows):
        tokens[i, :len(r)] = r
    return dict(tokens=tokens, answer_start=np.asarray(starts, np.int32), answer_len=np.asarray(lens, np.int32),
                pixel_values=toy_world.encode_image(np.stack([r["image"] for r in records])))


def shared_prefix(tokens: np.ndarray, answer_start: np.ndarray, image_token_id: int) -> int:
    """Length of the token prefix every row of ``tokens`` starts with, holding no image token and
    ending before the position that predicts any row's first answer token (the chat template's
    system text, the same in every row)."""
    limit = int(answer_start.min()) - 1
    same = np.all(tokens[:, :limit] == tokens[:1, :limit], axis=0) & (tokens[0, :limit] != image_token_id)
    return limit if same.all() else int(np.argmin(same))


def sft_loss(model: nnx.Module, prefix: jax.Array, batch: dict[str, jax.Array], window: int) -> jax.Array:
    """Mean negative log-likelihood of the answer tokens of ``prefix + batch["tokens"]`` per row.

    The same number as the loss of the whole right-padded sequences under the causal model, computed
    with less arithmetic: the ``prefix`` every row starts with (``[P]``) runs once and every row
    attends to it (``batch``: ``tokens [B, T]`` after the prefix, ``answer_start`` index in them,
    ``answer_len``, ``pixel_values``); the LM head runs only on the ``window`` positions that
    predict answer tokens (``window`` static, ≥ every ``answer_len``)."""
    p = prefix.shape[0]
    tokens, start, lens = batch["tokens"], batch["answer_start"], batch["answer_len"]
    b, t = tokens.shape
    shared = None
    if p:
        _, cache = model.forward_embeds(model.embed(prefix[None]), positions=jnp.arange(p)[None],
                                        key_mask=jnp.ones((1, p), bool), cache=model.init_cache(1, p))
        shared = (cache, jnp.ones((1, p), bool))
    x = model.embed(tokens, model.image_features(batch["pixel_values"]))
    hidden, _ = model.forward_embeds(x, positions=jnp.broadcast_to(p + jnp.arange(t), (b, t)),
                                     key_mask=jnp.ones((b, t), bool), prefix=shared)
    at = jnp.clip(start[:, None] - 1 + jnp.arange(window + 1)[None], 0, t - 1)  # at[:, 0] predicts the first answer token
    total, count = answer_logps(model.logits(jnp.take_along_axis(hidden, at[:, :-1, None], axis=1)),
                                jnp.take_along_axis(tokens, at, axis=1), jnp.ones_like(start), lens, shifted=True)
    return -jnp.sum(total) / jnp.maximum(jnp.sum(count), 1)


def train_sft(model: nnx.Module, examples: dict[str, np.ndarray], *, steps: int, batch_size: int,
              learning_rate: float, seed: int, progress: bool = True, chunk: int = 50) -> list[float]:
    """Train every parameter of ``model`` in place with AdamW + cosine decay on ``encode_examples``'
    arrays; returns every step's loss.

    Step ``i`` trains on the rows ``rng.choice(n, batch_size, replace=False)`` (the ``i``-th draw of
    ``np.random.default_rng(seed)``), minimising the mean answer NLL of whole sequences. The
    arrays live on the device and each jitted call runs ``chunk`` steps in a ``lax.scan`` over row
    indices drawn on the host, in order; the loss runs the shared chat prefix once and the LM head
    on the answer positions only (``sft_loss``). Every step's loss and gradient norm are checked
    once per call."""
    schedule = optax.warmup_cosine_decay_schedule(0.0, learning_rate, max(steps // 20, 1), steps)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.01))
    graphdef, params = nnx.split(model)
    opt_state = tx.init(params)
    p = shared_prefix(examples["tokens"], examples["answer_start"], model.config.image_token_id)
    used = -(-int(np.max(examples["answer_start"] + examples["answer_len"]) - p) // 8) * 8
    data = jax.device_put(dict(tokens=examples["tokens"][:, p:p + used], answer_start=examples["answer_start"] - p,
                               answer_len=examples["answer_len"], pixel_values=examples["pixel_values"]))
    prefix = jax.device_put(examples["tokens"][0, :p])
    window = int(examples["answer_len"].max())

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def run(params, opt_state, rows):
        def one(carry, idx):
            params, opt_state = carry
            batch = {k: v[idx] for k, v in data.items()}
            loss, grads = jax.value_and_grad(
                lambda q: sft_loss(nnx.merge(graphdef, q), prefix, batch, window))(params)
            updates, opt_state = tx.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), (loss, optax.tree.norm(grads))
        return jax.lax.scan(one, (params, opt_state), rows)

    rng = np.random.default_rng(seed)
    n = len(examples["tokens"])
    losses: list[float] = []
    with tqdm(total=steps, desc="warm start", unit="step", disable=not progress, dynamic_ncols=True) as bar:
        for first in range(0, steps, chunk):
            size = min(chunk, steps - first)
            rows = np.stack([rng.choice(n, batch_size, replace=False) for _ in range(size)]).astype(np.int32)
            (params, opt_state), out = run(params, opt_state, rows)
            loss, norm = jax.device_get(out)
            bad = np.flatnonzero(~(np.isfinite(loss) & np.isfinite(norm)))
            if bad.size:
                i = int(bad[0])
                raise NonFiniteError(f"warm start: non-finite loss={float(loss[i])} / grad norm={float(norm[i])} at "
                                     f"step {first + i + 1} of {steps}; nothing was saved. Lower warmstart.learning_rate")
            losses += loss.tolist()
            bar.update(size)
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    nnx.update(model, params)
    return losses


def warm_start(size: Any, opt: Any, world: toy_world.WorldSettings,
               warm_records: list[dict], out_dir: str, *, seed: int, progress: bool) -> str:
    """Build a toy LLaVA of ``size`` (``inputs.ToyModelSettings`` fields), train it with ``opt``
    (``inputs.WarmstartSettings``: steps, batch_size, learning_rate) and save it to
    ``out_dir`` as a Hugging Face checkpoint (skipped when already done)."""
    if os.path.exists(os.path.join(out_dir, DONE)):
        return out_dir
    t0 = time.time()
    tokenizer = toy_world.build_tokenizer(world)
    model = hf.build_model("LlavaForConditionalGeneration", toy_model_config(tokenizer, world, size), seed=seed)
    examples = encode_examples(warm_records, tokenizer, model.num_image_tokens(), model.config.image_token_id)
    losses = train_sft(model, examples, steps=opt.steps, batch_size=opt.batch_size,
                       learning_rate=opt.learning_rate, seed=seed, progress=progress)
    os.makedirs(out_dir, exist_ok=True)
    hf.save_pretrained(model, out_dir)
    tokenizer.save_pretrained(out_dir)
    image_processor(world).save_pretrained(out_dir)
    export.write_processor(out_dir, out_dir)  # processor_config.json: AutoProcessor loads the directory
    atomic_write_text(os.path.join(out_dir, DONE), f'{{"final_loss": {losses[-1]:.4f}, "wall_s": {time.time() - t0:.1f}}}')
    log.info("warm start %s: %d steps, loss %.3f → %.3f in %.0f s", out_dir, opt.steps, losses[0],
             losses[-1], time.time() - t0)
    return out_dir
