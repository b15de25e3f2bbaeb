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


def toy_model_config(tokenizer, world: toy_world.WorldConfig, size: Any) -> dict[str, Any]:
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


def image_processor(world: toy_world.WorldConfig):
    """A ``CLIPImageProcessor`` doing what ``toy_world.encode_image`` does, saved with the checkpoint so
    transformers (and ``prompts.hf_image_encoder``) preprocess toy images identically."""
    from transformers import CLIPImageProcessor
    size = world.image_size
    return CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                              image_mean=[toy_world.IMAGE_MEAN] * 3, image_std=[toy_world.IMAGE_STD] * 3)


def encode_examples(records: list[dict[str, Any]], tokenizer, image_tokens: int, image_token_id: int,
                    max_groups: int = 1) -> dict[str, Any]:
    """SFT records → arrays: ``prefix [P]``, the tokens every row starts with (the chat template up to
    the first image token); ``pixel_values [M, C, H, W]``, one entry per distinct ``image_id``; and
    ``groups``, the rows split by length into at most ``max_groups`` groups (the split that pads
    least), each ``{"tokens" [n, L], "answer_start" [n], "answer_len" [n], "image" [n]}``: the
    tokens after the prefix, right-padded to a multiple of 8, the answer's index in them and
    length, and the row's index into ``pixel_values``."""
    rows, starts, lens, image_index, images = [], [], [], [], {}
    for r in records:
        enc = chat.encode_prompt_answer(tokenizer, r["question"], r["answer"], image_tokens,
                                        image_token_id=image_token_id)
        rows.append(np.concatenate([enc.prompt_ids, enc.answer_ids]))
        starts.append(len(enc.prompt_ids))
        lens.append(len(enc.answer_ids))
        key = r.get("image_id", r["id"])
        if key not in images:
            images[key] = (len(images), r["image"])
        image_index.append(images[key][0])
    prefix = _shared_prefix(rows, image_token_id)
    rows = [r[len(prefix):] for r in rows]
    padded = np.asarray([-(-len(r) // 8) * 8 for r in rows])
    groups = []
    for members, length in _length_groups(padded, max_groups):
        tokens = np.full((len(members), length), tokenizer.pad_token_id, np.int32)
        for i, m in enumerate(members):
            tokens[i, :len(rows[m])] = rows[m]
        groups.append(dict(tokens=tokens, answer_start=np.asarray(starts, np.int32)[members] - len(prefix),
                           answer_len=np.asarray(lens, np.int32)[members],
                           image=np.asarray(image_index, np.int32)[members]))
    return dict(prefix=prefix, groups=groups,
                pixel_values=toy_world.encode_image(np.stack([img for _, img in images.values()])))


def _shared_prefix(rows: list[np.ndarray], image_token_id: int) -> np.ndarray:
    """The longest token prefix of every row that holds no image token (images differ per row)."""
    first = rows[0]
    n = min(len(r) for r in rows)
    same = np.all(np.stack([r[:n] for r in rows]) == first[:n], axis=0) & (first[:n] != image_token_id)
    return first[:n if same.all() else int(np.argmin(same))].astype(np.int32)


def _length_groups(lengths: np.ndarray, max_groups: int) -> list[tuple[np.ndarray, int]]:
    """Split rows of (padded) ``lengths`` into at most ``max_groups`` groups of consecutive lengths,
    the split with the fewest padded tokens → [(row indices, group length)], shortest first."""
    values = sorted(set(lengths.tolist()))
    count = {v: int(np.sum(lengths == v)) for v in values}

    def best(upper: int, k: int) -> tuple[int, list[int]]:  # lengths <= upper in k groups -> (tokens, tops)
        below = [v for v in values if v <= upper]
        options = [(upper * sum(count[v] for v in below), [upper])]
        if k > 1:
            for cut in below[:-1]:
                cost, tops = best(cut, k - 1)
                options.append((cost + upper * sum(count[v] for v in below if v > cut), tops + [upper]))
        return min(options)

    tops = best(values[-1], max_groups)[1]
    lows = [0] + tops[:-1]
    return [(np.flatnonzero((lengths > lo) & (lengths <= hi)), hi) for lo, hi in zip(lows, tops)]


def group_counts(sizes: list[int], batch_size: int) -> list[int]:
    """Rows per group in each batch: proportional to the group sizes, summing to ``batch_size``."""
    if batch_size > sum(sizes):
        raise ValueError(f"warm-start batch_size={batch_size} exceeds the {sum(sizes)} examples")
    share = np.asarray(sizes, np.float64) * batch_size / sum(sizes)
    counts = np.floor(share).astype(int)
    for i in np.argsort(counts - share)[: batch_size - counts.sum()]:  # largest remainders first
        counts[i] += 1
    return [int(min(c, n)) for c, n in zip(counts, sizes)]


def sft_loss(model: nnx.Module, prefix: jax.Array, batches: list[dict[str, jax.Array]],
             windows: list[int]) -> jax.Array:
    """Mean negative log-likelihood of the answer tokens of ``batches`` (one per length group:
    ``tokens``, ``answer_start``, ``answer_len`` as in ``encode_examples`` and ``pixel_values``).

    Exactly the loss of the full sequences (``prefix`` + ``tokens``) under the causal model, with the
    shared ``prefix`` run once (batch 1) and attended by every row, and the LM head applied only to
    the ``window + 1`` positions from ``answer_start - 1`` on (``windows``: static, one per batch,
    each ≥ its batch's ``answer_len``)."""
    p = prefix.shape[0]
    _, cache = model.forward_embeds(model.embed(prefix[None]), positions=jnp.arange(p)[None],
                                    key_mask=jnp.ones((1, p), bool), cache=model.init_cache(1, p))
    total, count = 0.0, 0
    for batch, window in zip(batches, windows):
        tokens, start, lens = batch["tokens"], batch["answer_start"], batch["answer_len"]
        b, t = tokens.shape
        index = jnp.arange(t, dtype=jnp.int32)[None]
        x = model.embed(tokens, model.image_features(batch["pixel_values"]))
        hidden, _ = model.forward_embeds(x, positions=jnp.broadcast_to(p + index, (b, t)),
                                         key_mask=index < (start + lens)[:, None], prefix=(cache, jnp.ones((1, p), bool)))
        at = jnp.clip(start[:, None] - 1 + jnp.arange(window + 1)[None], 0, t - 1)  # at[:, 0] predicts the first answer token
        sums, counts = answer_logps(model.logits(jnp.take_along_axis(hidden, at[:, :-1, None], axis=1)),
                                    jnp.take_along_axis(tokens, at, axis=1), jnp.ones_like(start), lens, shifted=True)
        total, count = total + jnp.sum(sums), count + jnp.sum(counts)
    return -total / jnp.maximum(count, 1)


def train_sft(model: nnx.Module, examples: dict[str, Any], *, steps: int, batch_size: int,
              learning_rate: float, seed: int, progress: bool = True, chunk: int = 50) -> list[float]:
    """Train every parameter of ``model`` in place with AdamW + cosine decay on ``encode_examples``'
    arrays; returns the first step's loss, then the loss at the end of each ``chunk`` of steps.

    The arrays live on the device; each jitted call runs ``chunk`` steps in a ``lax.scan``, reading
    its batches by row index (drawn on the host with ``seed``: each length group gives its share of
    ``batch_size`` rows, without replacement within a step). Every step's loss and gradient norm are
    checked once per call."""
    schedule = optax.warmup_cosine_decay_schedule(0.0, learning_rate, max(steps // 20, 1), steps)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.01))
    graphdef, params = nnx.split(model)
    opt_state = tx.init(params)
    groups = examples["groups"]
    counts = group_counts([len(g["tokens"]) for g in groups], batch_size)
    windows = [int(g["answer_len"].max()) for g in groups]
    data = jax.device_put(examples)

    def gather(rows: list[jax.Array]) -> list[dict[str, jax.Array]]:
        return [{"pixel_values": data["pixel_values"][g["image"][r]], **{k: g[k][r] for k in ("tokens", "answer_start", "answer_len")}}
                for g, r in zip(data["groups"], rows)]

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def run(params, opt_state, rows):
        def one(carry, rows):
            params, opt_state = carry
            loss, grads = jax.value_and_grad(
                lambda p: sft_loss(nnx.merge(graphdef, p), data["prefix"], gather(rows), windows))(params)
            updates, opt_state = tx.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), (loss, optax.tree.norm(grads))
        return jax.lax.scan(one, (params, opt_state), rows)

    rng = np.random.default_rng(seed)
    losses: list[float] = []
    with tqdm(total=steps, desc="warm start", unit="step", disable=not progress, dynamic_ncols=True) as bar:
        for first in range(0, steps, chunk):
            size = min(chunk, steps - first)
            draws = [[rng.choice(len(g["tokens"]), c, replace=False) for g, c in zip(groups, counts)]
                     for _ in range(size)]
            rows = [np.stack([d[i] for d in draws]).astype(np.int32) for i in range(len(groups))]
            (params, opt_state), out = run(params, opt_state, rows)
            loss, norm = jax.device_get(out)
            bad = np.flatnonzero(~(np.isfinite(loss) & np.isfinite(norm)))
            if bad.size:
                i = int(bad[0])
                raise NonFiniteError(f"warm start: non-finite loss={float(loss[i])} / grad norm={float(norm[i])} "
                                     f"at step {first + i + 1} of {steps}; nothing was saved. Lower warmstart.learning_rate")
            losses += [float(loss[0])] * (not losses) + [float(loss[-1])]
            bar.update(size)
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    nnx.update(model, params)
    return losses


def warm_start(size: Any, opt: Any, world: toy_world.WorldConfig,
               warm_records: list[dict], out_dir: str, *, seed: int, progress: bool) -> str:
    """Build a toy LLaVA of ``size`` (``inputs.ToyModelSettings`` fields), train it with ``opt``
    (``inputs.WarmstartSettings``: steps, batch_size, learning_rate, length_groups) and save it to
    ``out_dir`` as a Hugging Face checkpoint (skipped when already done)."""
    if os.path.exists(os.path.join(out_dir, DONE)):
        return out_dir
    t0 = time.time()
    tokenizer = toy_world.build_tokenizer(world)
    model = hf.build_model("LlavaForConditionalGeneration", toy_model_config(tokenizer, world, size), seed=seed)
    examples = encode_examples(warm_records, tokenizer, model.num_image_tokens(), model.config.image_token_id,
                               max_groups=opt.length_groups)
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
