"""The warm start's fast step against the plain formula: whole right-padded sequences, one per
record, through the model, the LM head at every position, one jitted step per batch of the same
records."""
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
    records = toy_world.warmstart_split(world, n_images, 0)
    examples = warmstart.encode_examples(records, tokenizer, model.num_image_tokens(), model.config.image_token_id)
    return model, examples, [r["image_id"] for r in records]


def reference_step(graphdef, tx):
    """The plain loop's step ``(params, opt_state, batch) -> (params, opt_state, loss)``: ``batch``
    holds whole right-padded sequences (``encode_examples``), the LM head runs at every position, the
    loss is the mean answer NLL, ``tx`` updates every parameter."""
    def loss_fn(p, batch):
        logits = nnx.merge(graphdef, p)(batch["tokens"], pixel_values=batch["pixel_values"])
        total, count = answer_logps(logits, batch["tokens"], batch["answer_start"], batch["answer_len"])
        return -jnp.sum(total) / jnp.sum(count)

    def step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss
    return step


def reference_train(model, examples, keys, *, steps, batch_size, learning_rate, seed):
    """The plain loop: per step the records of the trees ``train_sft`` draws (``sft_batches``) as
    one batch of whole sequences of the full padded length, logits at every position, the same
    AdamW + cosine + clipping; → (params, losses)."""
    schedule = optax.warmup_cosine_decay_schedule(0.0, learning_rate, max(steps // 20, 1), steps)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.01))
    graphdef, params = nnx.split(model)
    opt_state = tx.init(params)
    step = jax.jit(reference_step(graphdef, tx))
    _, members, groups, draws = _batches(model, examples, keys, batch_size, steps, seed)
    losses = []
    for i in range(steps):
        trees = np.concatenate([g[r[i]] for g, r in zip(groups, draws)])
        idx = np.concatenate([members[t] for t in trees])
        params, opt_state, loss = step(params, opt_state, {k: v[idx] for k, v in examples.items()})
        losses.append(float(loss))
    return params, losses


def _batches(model, examples, keys, batch_size, steps, seed):
    p = warmstart.shared_prefix(examples["tokens"], examples["answer_start"], model.config.image_token_id)
    return warmstart.sft_batches(examples, keys, p, batch_size=batch_size, steps=steps, seed=seed)


def test_train_sft_matches_the_plain_loop():
    model, examples, keys = _setup(18)
    p = warmstart.shared_prefix(examples["tokens"], examples["answer_start"], model.config.image_token_id)
    assert 0 < p < examples["answer_start"].min()  # the chat template's text before the image is shared
    _, members, groups, _ = _batches(model, examples, keys, 9, 1, 0)
    # 3 records (caption, yes, no) per tree, 3 trees per step from two length groups
    assert [len(m) for m in members] == [3] * 18 and sum(map(len, groups)) == 18 and len(groups) == 2
    steps = 12  # chunks of 5, 5 and 2: the last call compiles its own length
    expected_params, expected_losses = reference_train(model, examples, keys, steps=steps, batch_size=9,
                                                       learning_rate=3e-3, seed=3)
    losses = warmstart.train_sft(model, examples, steps=steps, batch_size=9, learning_rate=3e-3, seed=3, chunk=5,
                                 keys=keys, progress=False)
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


def test_length_groups_split_where_padding_wastes_least():
    lengths = np.array([20, 3, 40, 5, 4, 41, 6, 39, 2, 7])
    short, long = warmstart.length_groups(lengths, 3)
    assert short.tolist() == [1, 3, 4, 6, 8, 9] and long.tolist() == [0, 2, 5, 7]  # 6×8 + 4×48 positions
    assert [g.tolist() for g in warmstart.length_groups(lengths, 1)] == [list(range(10))]  # a group of 10 rows
    assert [g.tolist() for g in warmstart.length_groups(np.full(9, 17), 2)] == [list(range(9))]


def test_group_counts_and_draw_rows():
    assert warmstart.group_counts([1000, 500], 64) == [43, 21]
    assert warmstart.group_counts([990, 10], 8) == [7, 1]  # every group gets a row
    rows = warmstart.draw_rows([30, 10], [5, 2], 200, seed=0)
    assert [r.shape for r in rows] == [(200, 5), (200, 2)]
    assert all(len(set(r)) == len(r) and r.max() < n for g, n in zip(rows, (30, 10)) for r in g)
    assert all(np.array_equal(a, b) for a, b in zip(rows, warmstart.draw_rows([30, 10], [5, 2], 200, seed=0)))


def test_pack_trees_keeps_every_record_whole():
    model, examples, keys = _setup(4)
    p = warmstart.shared_prefix(examples["tokens"], examples["answer_start"], model.config.image_token_id)
    rows, members = warmstart.pack_trees(examples, keys, p)
    assert [m.tolist() for m in members] == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11]]
    image = model.config.image_token_id
    for r, m in enumerate(members):
        trunk = rows["branch"][r] == 0
        assert np.all(rows["tokens"][r][trunk] == image) and trunk.sum() == model.num_image_tokens()
        for j, i in enumerate(m, 1):  # trunk + branch j, in row order: record i after the prefix, at its own positions
            seen = trunk | (rows["branch"][r] == j)
            end = examples["answer_start"][i] + examples["answer_len"][i]
            np.testing.assert_array_equal(rows["tokens"][r][seen], examples["tokens"][i, p:end])
            np.testing.assert_array_equal(rows["positions"][r][seen], np.arange(end - p))
            s_, n = rows["answer_start"][r, j - 1], rows["answer_len"][r, j - 1]
            np.testing.assert_array_equal(rows["tokens"][r, s_:s_ + n], examples["tokens"][i, end - n:end])
        np.testing.assert_array_equal(rows["pixel_values"][r], examples["pixel_values"][m[0]])


def test_sft_loss_is_the_whole_sequence_loss():
    model, examples, keys = _setup(4)
    p = warmstart.shared_prefix(examples["tokens"], examples["answer_start"], model.config.image_token_id)
    logits = nnx.jit(lambda m, t, px: m(t, pixel_values=px))(model, jnp.asarray(examples["tokens"]),
                                                              jnp.asarray(examples["pixel_values"]))
    total, count = answer_logps(logits, jnp.asarray(examples["tokens"]), jnp.asarray(examples["answer_start"]),
                                jnp.asarray(examples["answer_len"]))
    expected = float(-jnp.sum(total) / jnp.sum(count))
    # With the prefix run once or not, an image's records packed in one tree or each in its own row,
    # the batch whole or cut in two parts: each choice twice, each pair of choices once (4 of the 8).
    for q, trees, halved in ((p, True, True), (p, False, False), (0, True, False), (0, False, True)):
        rows, _ = warmstart.pack_trees(examples, keys if trees else range(len(keys)), q)
        b = {name: jnp.asarray(v) for name, v in rows.items()}
        window = int(rows["answer_len"].max())
        parts = ([({n: v[:2] for n, v in b.items()}, window), ({n: v[2:] for n, v in b.items()}, window)] if halved
                 else [(b, window)])
        loss = nnx.jit(lambda m, x, parts=parts: warmstart.sft_loss(m, x, parts))(  # compiled: eager ops are slow
            model, jnp.asarray(examples["tokens"][0, :q]))
        np.testing.assert_allclose(float(loss), expected, rtol=1e-5,
                                   err_msg=f"prefix {q}, trees {trees}, halved {halved}")


def test_train_sft_stops_on_a_non_finite_loss():
    model, examples, _ = _setup(4)
    with pytest.raises(NonFiniteError, match="at step 2 of 3"):
        warmstart.train_sft(model, examples, steps=3, batch_size=4, learning_rate=float("nan"), seed=0, progress=False)
