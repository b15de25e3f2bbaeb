"""The toy warm start: its loss (shared prefix run once, length groups, LM head on the answer window)
equals the plain full-sequence answer NLL, in value and gradient; the grouping and batch shares;
the persistent compilation cache switch."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from benchmarks.warmstart import full_sequence_loss
from rlaifv_jax.core import compile_cache
from rlaifv_jax.data import toy_world
from rlaifv_jax.models import hf
from rlaifv_jax.pipelines import warmstart

SIZE = ml_collections.ConfigDict(dict(hidden=32, layers=2, heads=4, kv_heads=2, vision_hidden=16,
                                      vision_layers=1, patch=8))


def test_sft_loss_and_gradient_equal_the_full_sequence_formula():
    world = toy_world.WorldConfig()
    tokenizer = toy_world.build_tokenizer(world)
    records = toy_world.warmstart_split(world, 6, seed=3)  # 6 captions + 12 yes/no answers
    model = hf.build_model("LlavaForConditionalGeneration", warmstart.toy_model_config(tokenizer, world, SIZE), seed=1)
    ex = warmstart.encode_examples(records, tokenizer, model.num_image_tokens(), model.config.image_token_id,
                                   max_groups=2)
    assert tokenizer.decode(ex["prefix"]).endswith("questions . user :") and len(ex["groups"]) == 2
    assert len(ex["pixel_values"]) == 6  # one per image, shared by its three records
    # every record once, found back by its (prefix-less) token row
    batches, order = [], []
    for g in ex["groups"]:
        batches.append({"pixel_values": ex["pixel_values"][g["image"]], **{k: g[k] for k in ("tokens", "answer_start", "answer_len")}})
        order += [int(i) for i in g["image"]]
    windows = [int(g["answer_len"].max()) for g in ex["groups"]]
    graphdef, params = nnx.split(model)
    got, got_grad = jax.jit(jax.value_and_grad(
        lambda p: warmstart.sft_loss(nnx.merge(graphdef, p), jnp.asarray(ex["prefix"]), batches, windows)))(params)
    reference, _ = full_sequence_loss(model, records, tokenizer, extra_pad=3)
    want, want_grad = jax.jit(jax.value_and_grad(lambda p: reference(nnx.merge(graphdef, p))))(params)
    np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(got_grad), jax.tree.leaves(want_grad)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-6, rtol=1e-4)
    assert sorted(order) == sorted(i // 3 for i in range(len(records)))


def test_length_groups_pad_least_and_batch_shares():
    lengths = np.asarray([8, 8, 16, 16, 16, 40, 48, 48])
    groups = warmstart._length_groups(lengths, 2)
    assert [(list(m), top) for m, top in groups] == [([0, 1, 2, 3, 4], 16), ([5, 6, 7], 48)]
    assert [top for _, top in warmstart._length_groups(lengths, 3)] == [8, 16, 48]
    assert [top for _, top in warmstart._length_groups(lengths, 1)] == [48]
    assert warmstart.group_counts([12128, 2872], 64) == [52, 12]
    assert sum(warmstart.group_counts([5, 3, 1], 7)) == 7
    with pytest.raises(ValueError, match="batch_size=10 exceeds the 9 examples"):
        warmstart.group_counts([5, 3, 1], 10)


def test_compile_cache_dir_from_env(monkeypatch, tmp_path):
    keys = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
            "jax_persistent_cache_min_entry_size_bytes")
    before = {k: getattr(jax.config, k) for k in keys}
    try:
        jax.config.update("jax_compilation_cache_dir", None)
        monkeypatch.setenv(compile_cache.ENV, "")
        assert compile_cache.enable() is None and jax.config.jax_compilation_cache_dir is None
        monkeypatch.setenv(compile_cache.ENV, str(tmp_path / "cc"))
        assert compile_cache.enable() == str(tmp_path / "cc") and (tmp_path / "cc").is_dir()
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "cc")
        assert jax.config.jax_persistent_cache_min_compile_time_secs == 0.0
        monkeypatch.setenv(compile_cache.ENV, str(tmp_path / "other"))
        assert compile_cache.enable() == str(tmp_path / "cc")  # a directory already set wins
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
        assert compile_cache.default_dir() == str(tmp_path / "xdg" / "rlaifv_jax" / "jax")
    finally:
        for k, v in before.items():
            jax.config.update(k, v)
