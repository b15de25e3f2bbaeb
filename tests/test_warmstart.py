"""The warm start's fast step against the plain formula: whole right-padded sequences through the
model, the LM head at every position, one jitted step per batch from the same draws."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from rlaifv_jax.core.errors import NonFiniteError
from rlaifv_jax.data import toy_world
from rlaifv_jax.engine.logps import answer_logps
from rlaifv_jax.models import hf
from rlaifv_jax.pipelines import warmstart

SIZE = ml_collections.ConfigDict(dict(hidden=32, layers=2, heads=4, kv_heads=2, vision_hidden=16,
                                      vision_layers=1, patch=8))


def _setup(n_images=12):
    world = toy_world.WorldSettings()
    tokenizer = toy_world.build_tokenizer(world)
    model = hf.build_model("LlavaForConditionalGeneration", warmstart.toy_model_config(tokenizer, world, SIZE), seed=0)
    examples = warmstart.encode_examples(toy_world.warmstart_split(world, n_images, 0), tokenizer,
                                         model.num_image_tokens(), model.config.image_token_id)
    return model, examples


def reference_train(model, examples, *, steps, batch_size, learning_rate, seed):
    """The plain loop: per step the rows of ``rng.choice(n, batch_size, replace=False)`` as whole
    sequences, logits at every position, the same AdamW + cosine + clipping; → (params, losses)."""
    schedule = optax.warmup_cosine_decay_schedule(0.0, learning_rate, max(steps // 20, 1), steps)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.01))
    graphdef, params = nnx.split(model)
    opt_state = tx.init(params)

    def loss_fn(p, batch):
        logits = nnx.merge(graphdef, p)(batch["tokens"], pixel_values=batch["pixel_values"])
        total, count = answer_logps(logits, batch["tokens"], batch["answer_start"], batch["answer_len"])
        return -jnp.sum(total) / jnp.sum(count)

    @jax.jit
    def step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    rng = np.random.default_rng(seed)
    losses = []
    for _ in range(steps):
        idx = rng.choice(len(examples["tokens"]), batch_size, replace=False)
        params, opt_state, loss = step(params, opt_state, {k: v[idx] for k, v in examples.items()})
        losses.append(float(loss))
    return params, losses


def test_train_sft_matches_the_plain_loop():
    model, examples = _setup()
    p = warmstart.shared_prefix(examples["tokens"], examples["answer_start"], model.config.image_token_id)
    assert 0 < p < examples["answer_start"].min()  # the chat template's text before the image is shared
    steps = 12  # chunks of 5, 5 and 2: the last call compiles its own length
    expected_params, expected_losses = reference_train(model, examples, steps=steps, batch_size=8,
                                                       learning_rate=3e-3, seed=3)
    losses = warmstart.train_sft(model, examples, steps=steps, batch_size=8, learning_rate=3e-3, seed=3, chunk=5,
                                 progress=False)
    np.testing.assert_allclose(losses, expected_losses, rtol=2e-5)
    assert expected_losses[-1] < expected_losses[0] - 0.5  # it learned something, so the match means something
    compared = 0
    for (path, a), b in zip(jax.tree.leaves_with_path(nnx.state(model)), jax.tree.leaves(expected_params)):
        if "k_proj" in jax.tree_util.keystr(path) and "bias" in jax.tree_util.keystr(path):
            # The key bias adds q·b to every score of a query: softmax ignores it, its gradient is
            # rounding noise, and AdamW normalises that noise to steps of ±lr in either code.
            continue
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-6, rtol=1e-5)
        compared += 1
    assert compared == len(jax.tree.leaves(expected_params)) - SIZE.vision_layers


def test_sft_loss_is_the_whole_sequence_loss():
    model, examples = _setup(4)
    p = warmstart.shared_prefix(examples["tokens"], examples["answer_start"], model.config.image_token_id)
    logits = nnx.jit(lambda m, t, px: m(t, pixel_values=px))(model, jnp.asarray(examples["tokens"]),
                                                              jnp.asarray(examples["pixel_values"]))
    total, count = answer_logps(logits, jnp.asarray(examples["tokens"]), jnp.asarray(examples["answer_start"]),
                                jnp.asarray(examples["answer_len"]))
    batch = dict(tokens=jnp.asarray(examples["tokens"][:, p:]), answer_start=jnp.asarray(examples["answer_start"] - p),
                 answer_len=jnp.asarray(examples["answer_len"]), pixel_values=jnp.asarray(examples["pixel_values"]))
    for q in (p, 0):  # with the prefix run once, and without one
        b = dict(batch, tokens=jnp.asarray(examples["tokens"][:, q:]), answer_start=jnp.asarray(examples["answer_start"] - q))
        loss = nnx.jit(warmstart.sft_loss, static_argnums=3)(model, jnp.asarray(examples["tokens"][0, :q]), b,
                                                            int(examples["answer_len"].max()))  # compiled: eager ops are slow
        np.testing.assert_allclose(float(loss), float(-jnp.sum(total) / jnp.sum(count)), rtol=1e-5)


def test_train_sft_stops_on_a_non_finite_loss():
    model, examples = _setup(4)
    with pytest.raises(NonFiniteError, match="at step 2 of 3"):
        warmstart.train_sft(model, examples, steps=3, batch_size=4, learning_rate=float("nan"), seed=0, progress=False)
