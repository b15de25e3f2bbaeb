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
from typing import Any, Sequence

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
    encoded: dict[tuple[str, str], Any] = {}  # the toy's yes/no records repeat a few hundred texts
    for r in records:
        key = (r["question"], r["answer"])
        if key not in encoded:
            encoded[key] = chat.encode_prompt_answer(tokenizer, *key, image_tokens, image_token_id=image_token_id)
        enc = encoded[key]
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


def pack_trees(examples: dict[str, np.ndarray], keys: Sequence[Any], p: int
               ) -> tuple[dict[str, np.ndarray], list[np.ndarray]]:
    """Pack the records of each image into one row, a tree: the records' common start after the
    shared prefix of ``p`` tokens (the image tokens) once, then each record's question and answer as
    a branch that sees that trunk and itself only (``sft_loss``). The loss of a tree is the sum of
    its records' losses, with a third of the positions (and one vision pass instead of three) for the
    toy's caption + 2 yes/no per image.

    ``keys``: one hashable per record, equal for records of one image. Returns (rows, members):
    ``rows`` holds per tree ``tokens [N, T]`` after the prefix (right-padded), ``positions [N, T]``
    (each branch continues the trunk's positions, as its record alone would), ``branch [N, T]`` (0:
    trunk, j ≥ 1: the j-th record, -1: padding), ``answer_start`` / ``answer_len [N, A]`` (index in
    the row; length 0 where a tree has fewer than A records) and ``pixel_values`` (its first
    record's); ``members`` lists each tree's record indices, in order."""
    trees: dict[Any, list[int]] = {}
    for i, k in enumerate(keys):
        trees.setdefault(k, []).append(i)
    members = [np.asarray(m) for m in trees.values()]
    tokens, starts, lens = examples["tokens"], examples["answer_start"], examples["answer_len"]
    packed = []
    for m in members:
        seqs = [tokens[i, p:starts[i] + lens[i]] for i in m]
        limit = int(min(starts[m])) - 1 - p  # the trunk ends before any position that predicts an answer
        same = np.all(np.stack([s[:limit] for s in seqs]) == seqs[0][:limit], axis=0)
        trunk = limit if same.all() else int(np.argmin(same))
        parts, branch, pos, a_start, at = [seqs[0][:trunk]], [np.zeros(trunk, int)], [np.arange(trunk)], [], trunk
        for j, (i, s) in enumerate(zip(m, seqs), 1):
            parts.append(s[trunk:])
            branch.append(np.full(len(s) - trunk, j))
            pos.append(np.arange(trunk, len(s)))
            a_start.append(at + starts[i] - p - trunk)
            at += len(s) - trunk
        packed.append((np.concatenate(parts), np.concatenate(branch), np.concatenate(pos), a_start, lens[m]))
    n, length, width = len(members), -(-max(len(t) for t, *_ in packed) // 8) * 8, max(len(m) for m in members)
    rows = dict(tokens=np.zeros((n, length), np.int32), positions=np.zeros((n, length), np.int32),
                branch=np.full((n, length), -1, np.int32), answer_start=np.ones((n, width), np.int32),
                answer_len=np.zeros((n, width), np.int32), pixel_values=examples["pixel_values"][[m[0] for m in members]])
    for r, (t, b, q, a, l) in enumerate(packed):
        rows["tokens"][r, :len(t)], rows["branch"][r, :len(t)], rows["positions"][r, :len(t)] = t, b, q
        rows["answer_start"][r, :len(a)], rows["answer_len"][r, :len(l)] = a, l
    return rows, members


def sft_loss(model: nnx.Module, prefix: jax.Array, parts: Sequence[tuple[dict[str, jax.Array], int]]) -> jax.Array:
    """Mean negative log-likelihood of the answer tokens of every record packed in the trees
    (``pack_trees``) of every ``(batch, window)`` in ``parts`` (one batch cut into groups of rows of
    similar length), each record read as ``prefix + its tokens``.

    The same number as the loss of the records' whole right-padded sequences under the causal
    model, computed with less arithmetic: the ``prefix`` every record starts with (``[P]``) runs once
    per part and every row attends to it; a tree's trunk (the image) runs once for its records; the
    LM head runs only on the ``window`` positions before each answer's tokens (``window`` static, ≥
    every ``answer_len``)."""
    p = prefix.shape[0]
    nll, tokens_seen = 0.0, 0
    for batch, window in parts:
        tokens, start, lens, branch = batch["tokens"], batch["answer_start"], batch["answer_len"], batch["branch"]
        (b, t), a = tokens.shape, start.shape[1]
        shared = None
        if p:
            _, cache = model.forward_embeds(model.embed(prefix[None]), positions=jnp.arange(p)[None],
                                            key_mask=jnp.ones((1, p), bool), cache=model.init_cache(1, p))
            shared = (cache, jnp.ones((1, p), bool))
        seen = branch[:, None, :]  # a query sees earlier slots of the trunk and of its own branch
        mask = (jnp.tril(jnp.ones((t, t), bool)) & (seen >= 0)
                & ((seen == 0) | (seen == branch[:, :, None])))
        x = model.embed(tokens, model.image_features(batch["pixel_values"]))
        hidden, _ = model.forward_embeds(x, positions=p + batch["positions"], key_mask=jnp.ones((b, t), bool),
                                         mask=mask, prefix=shared)
        at = jnp.clip(start[:, :, None] - 1 + jnp.arange(window + 1), 0, t - 1)  # at[..., 0] predicts an answer's first token
        before = jnp.take_along_axis(hidden, at[:, :, :-1].reshape(b, -1, 1), axis=1).reshape(b * a, window, -1)
        total, count = answer_logps(model.logits(before), jnp.take_along_axis(tokens, at.reshape(b, -1), axis=1)
                                    .reshape(b * a, window + 1), jnp.ones((b * a,), jnp.int32), lens.reshape(-1),
                                    shifted=True)
        nll, tokens_seen = nll - jnp.sum(total), tokens_seen + jnp.sum(count)
    return nll / jnp.maximum(tokens_seen, 1)


def length_groups(lengths: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Row indices in one or two groups by sequence length (after the shared prefix), split where
    padding each group to its own longest row (rounded up to 8) wastes the fewest positions, each
    group large enough for one row per batch (``group_counts``). The toy warm start's yes/no rows are
    half a caption row's length: cut to their own length they cost half."""
    order = np.argsort(lengths, kind="stable")
    padded = -(-np.asarray(lengths)[order] // 8) * 8
    n = len(order)
    cuts = np.arange(-(-n // batch_size), n - -(-n // batch_size) + 1)
    if not cuts.size:
        return [np.arange(n)]
    costs = cuts * padded[cuts - 1] + (n - cuts) * padded[-1]
    best = int(np.argmin(costs))
    if costs[best] >= n * padded[-1]:
        return [np.arange(n)]
    cut = int(cuts[best])
    return [np.sort(order[:cut]), np.sort(order[cut:])]


def group_counts(sizes: Sequence[int], batch_size: int) -> list[int]:
    """Rows per batch from each group: ``batch_size`` shared in proportion to the group sizes (largest
    remainder), at least one each, so every row is about as likely in a batch as in undivided draws."""
    exact = np.asarray(sizes, np.float64) * batch_size / sum(sizes)
    counts = np.maximum(np.floor(exact).astype(int), 1)
    if counts.sum() > batch_size:
        raise ValueError(f"a batch of {batch_size} rows cannot take one from each of {len(sizes)} groups")
    for g in np.argsort(-(exact - np.floor(exact)), kind="stable")[:batch_size - counts.sum()]:
        counts[g] += 1
    return counts.tolist()


def draw_rows(sizes: Sequence[int], counts: Sequence[int], steps: int, seed: int) -> list[np.ndarray]:
    """Each step's rows of each group: per step, per group ``g`` in order, ``rng.choice(sizes[g],
    counts[g], replace=False)`` from ``np.random.default_rng(seed)``; → per group ``[steps, counts[g]]``
    indices within the group."""
    rng = np.random.default_rng(seed)
    rows = [np.zeros((steps, k), np.int32) for k in counts]
    for i in range(steps):
        for g, (n, k) in enumerate(zip(sizes, counts)):
            rows[g][i] = rng.choice(n, k, replace=False)
    return rows


def sft_batches(examples: dict[str, np.ndarray], keys: Sequence[Any], p: int, *, batch_size: int, steps: int,
                seed: int) -> tuple[dict[str, np.ndarray], list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
    """The warm start's batches: the records packed into trees (``pack_trees``), the trees split by
    length (``length_groups``), each step taking ``group_counts`` trees from each group (``draw_rows``),
    about ``batch_size`` records per step in all. → (rows, members, groups, draws): ``groups[g]`` tree
    indices, ``draws[g][step]`` indices into ``groups[g]``."""
    rows, members = pack_trees(examples, keys, p)
    per_step = max(1, round(batch_size * len(members) / len(examples["tokens"])))
    groups = length_groups(np.sum(rows["branch"] >= 0, axis=1), per_step)
    sizes = [len(g) for g in groups]
    return rows, members, groups, draw_rows(sizes, group_counts(sizes, per_step), steps, seed)


def group_arrays(trees: dict[str, np.ndarray], groups: Sequence[np.ndarray]
                 ) -> tuple[list[dict[str, jax.Array]], list[int]]:
    """Each length group's trees (``sft_batches``) on the device, cut to the group's longest row
    (rounded up to 8), and its answer window (the longest answer): ``sft_loss``'s parts, indexed per step."""
    data, windows = [], []
    for g in groups:
        used = -(-int(np.max(np.sum(trees["branch"][g] >= 0, axis=1))) // 8) * 8
        data.append(jax.device_put({k: v[g][:, :used] if k in ("tokens", "positions", "branch") else v[g]
                                    for k, v in trees.items()}))
        windows.append(int(trees["answer_len"][g].max()))
    return data, windows


def train_sft(model: nnx.Module, examples: dict[str, np.ndarray], *, steps: int, batch_size: int,
              learning_rate: float, seed: int, keys: Sequence[Any] | None = None, progress: bool = True,
              chunk: int = 50) -> list[float]:
    """Train every parameter of ``model`` in place with AdamW + cosine decay on ``encode_examples``'
    arrays; returns every step's loss.

    ``keys`` (one per record, equal for the records of one image; default: every record its own)
    packs each image's records into one row (``pack_trees``); each step trains on about
    ``batch_size`` records, whole trees drawn from length groups (``sft_batches``), and minimises the
    mean answer NLL of its records' whole sequences. Each group's arrays, cut to its longest row,
    live on the device; each jitted call runs ``chunk`` steps in a ``lax.scan`` over the drawn rows;
    the loss runs the shared chat prefix once per group and the LM head on the answer positions only
    (``sft_loss``). Every step's loss and gradient norm are checked once per call."""
    schedule = optax.warmup_cosine_decay_schedule(0.0, learning_rate, max(steps // 20, 1), steps)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.01))
    graphdef, params = nnx.split(model)
    opt_state = tx.init(params)
    p = shared_prefix(examples["tokens"], examples["answer_start"], model.config.image_token_id)
    prefix = jax.device_put(examples["tokens"][0, :p])
    trees, _, groups, rows = sft_batches(examples, range(len(examples["tokens"])) if keys is None else keys, p,
                                         batch_size=batch_size, steps=steps, seed=seed)
    data, windows = group_arrays(trees, groups)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def run(params, opt_state, rows):
        def one(carry, idx):
            params, opt_state = carry
            parts = [({k: v[i] for k, v in d.items()}, w) for d, w, i in zip(data, windows, idx)]
            loss, grads = jax.value_and_grad(lambda q: sft_loss(nnx.merge(graphdef, q), prefix, parts))(params)
            updates, opt_state = tx.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), (loss, optax.tree.norm(grads))
        return jax.lax.scan(one, (params, opt_state), rows)

    losses: list[float] = []
    with tqdm(total=steps, desc="warm start", unit="step", disable=not progress, dynamic_ncols=True) as bar:
        for first in range(0, steps, chunk):
            size = min(chunk, steps - first)
            (params, opt_state), out = run(params, opt_state, [r[first:first + size] for r in rows])
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
    losses = train_sft(model, examples, steps=opt.steps, batch_size=opt.batch_size, learning_rate=opt.learning_rate,
                       seed=seed, keys=[np.asarray(r["image"]).tobytes() for r in warm_records], progress=progress)
    os.makedirs(out_dir, exist_ok=True)
    hf.save_pretrained(model, out_dir)
    tokenizer.save_pretrained(out_dir)
    image_processor(world).save_pretrained(out_dir)
    export.write_processor(out_dir, out_dir)  # processor_config.json: AutoProcessor loads the directory
    atomic_write_text(os.path.join(out_dir, DONE), f'{{"final_loss": {losses[-1]:.4f}, "wall_s": {time.time() - t0:.1f}}}')
    log.info("warm start %s: %d steps, loss %.3f → %.3f in %.0f s", out_dir, opt.steps, losses[0],
             losses[-1], time.time() - t0)
    return out_dir
