"""Length buckets: boundaries, window-sorted batch plans, and exactness of bucketed padding + the automatic answer window."""
import jax
import numpy as np
import pytest

import tiny_hf
from rlaifv_jax.data import buckets
from rlaifv_jax.data.pairs import PreferenceRecord, make_pair_dataset
from rlaifv_jax.engine import logps
from rlaifv_jax.models import hf
from rlaifv_jax.training import step as step_lib

N_IMG = 4  # tiny LLaVA: 28 px / 14 px patches


def test_boundaries_and_windows():
    assert buckets.length_buckets(2048) == (64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048)
    assert buckets.length_buckets(300, min_length=100) == (128, 192, 256, 300)
    assert buckets.length_buckets(24) == (24,)
    assert [buckets.bucket_length(n, (64, 96, 128)) for n in (1, 64, 65, 97, 128)] == [64, 64, 96, 128, 128]
    with pytest.raises(ValueError, match="exceeds the largest bucket 128"):
        buckets.bucket_length(129, (64, 96, 128))
    # the window is the longest answer bucketed; none when it would cover the whole sequence
    assert buckets.answer_window(100, 1024) == 128 and buckets.answer_window(10, 1024) == 64
    assert buckets.answer_window(300, 384) is None and buckets.answer_window(40, 64) is None


def _record(i, prompt, chosen, rejected):
    return PreferenceRecord("q", "c", "r", b"", f"r{i}", meta={"i": i},
                            features={"prompt_ids": np.full(prompt, 5, np.int32), "chosen_ids": np.full(chosen, 6, np.int32),
                                      "rejected_ids": np.full(rejected, 7, np.int32)})


def _example_fn(max_length):
    def fn(r):
        out = {"index": np.int64(r.meta["i"]), "answer_start": np.int32(len(r.features["prompt_ids"]))}
        for name in ("chosen", "rejected"):
            ids = np.concatenate([r.features["prompt_ids"], r.features[f"{name}_ids"]])
            out[f"{name}_tokens"] = np.pad(ids, (0, max_length - len(ids)))
            out[f"{name}_len"] = np.int32(len(r.features[f"{name}_ids"]))
        return out
    return fn


def test_sorted_batches_cover_epochs_and_stay_random():
    rng = np.random.default_rng(0)
    records = [_record(i, int(rng.integers(3, 20)), int(rng.integers(1, 200)), int(rng.integers(1, 200))) for i in range(103)]
    lengths = np.asarray([len(r.features["prompt_ids"]) + max(len(r.features["chosen_ids"]), len(r.features["rejected_ids"]))
                          for r in records])
    kw = dict(example_fn=_example_fn(256), batch_size=4, seed=3, num_epochs=2, buckets=buckets.length_buckets(256),
              sort_window=5, shard_count=2)
    hosts = [make_pair_dataset(records, shard_index=h, **kw) for h in range(2)]
    assert len(hosts[0]) == len(hosts[1]) == 2 * (103 // 8)
    per_step = [np.concatenate([hosts[0][i]["index"], hosts[1][i]["index"]]) for i in range(len(hosts[0]))]
    epochs = [np.concatenate(per_step[:12]), np.concatenate(per_step[12:])]
    for e in epochs:  # each epoch: 96 distinct pairs (103 truncated to whole global batches)
        assert len(set(e.tolist())) == 96
    assert epochs[0].tolist() != epochs[1].tolist()
    # the same seed gives the same plan; within a window the global batches are length-sorted slices
    again = make_pair_dataset(records, shard_index=0, **kw)
    assert all(np.array_equal(again[i]["index"], hosts[0][i]["index"]) for i in range(len(again)))
    window = np.concatenate(per_step[:5])
    spans = sorted((lengths[b].min(), lengths[b].max()) for b in per_step[:5])
    assert all(hi <= nxt_lo for (_, hi), (nxt_lo, _) in zip(spans, spans[1:]))  # non-overlapping length ranges
    assert sorted(window.tolist()) != window.tolist()  # not in index order
    # batch order inside the window is shuffled, not ascending, for at least one window
    first = [lengths[b].min() for b in per_step[:12]]
    assert first != sorted(first)
    # each batch is cut to the bucket of its longest pair
    for b in hosts[0]:
        width = b["chosen_tokens"].shape[1]
        assert width == buckets.bucket_length(int(buckets.sequence_lengths(b).max()), buckets.length_buckets(256))


def test_bucketed_padding_keeps_batches():
    rng = np.random.default_rng(1)
    records = [_record(i, 10, int(rng.integers(1, 100)), int(rng.integers(1, 100))) for i in range(12)]
    kw = dict(example_fn=_example_fn(256), batch_size=4, seed=0, shard_index=0, shard_count=1)
    fixed, bucketed = make_pair_dataset(records, **kw), make_pair_dataset(records, buckets=buckets.length_buckets(256), **kw)
    for i in range(len(fixed)):
        f, b = fixed[i], bucketed[i]
        width = b["chosen_tokens"].shape[1]
        assert width < 256 and np.array_equal(f["index"], b["index"])
        np.testing.assert_array_equal(f["chosen_tokens"][:, :width], b["chosen_tokens"])
        assert not f["chosen_tokens"][:, width:].any() and not f["rejected_tokens"][:, width:].any()


# ----------------------------------------------------------------------------- exactness on a model
def _pairs(rng, n, max_length):
    """Examples padded to max_length: BOS, image tokens, 20-40 prompt tokens, answers of 5-70 tokens."""
    out = []
    for _ in range(n):
        prompt = [1, *rng.integers(4, 90, 2), *[tiny_hf.IMAGE_TOKEN] * N_IMG, *rng.integers(4, 90, rng.integers(20, 40))]
        ex = {"answer_start": np.int32(len(prompt)), "pixel_values": rng.standard_normal((3, 28, 28)).astype(np.float32)}
        for name in ("chosen", "rejected"):
            k = int(rng.integers(5, 70))
            ex[f"{name}_tokens"] = np.pad(np.asarray(prompt + [*rng.integers(4, 90, k - 1), 2], np.int32),
                                          (0, max_length - len(prompt) - k))
            ex[f"{name}_len"] = np.int32(k)
        ex["ref_chosen_logps"], ex["ref_rejected_logps"] = np.float32(rng.normal() - 200), np.float32(rng.normal() - 200)
        out.append(ex)
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("llava")
    tiny_hf.llava(path)
    return str(path)


def test_bucketed_windowed_step_equals_fixed_padding(tiny):
    model = hf.load_pretrained(tiny)
    examples = _pairs(np.random.default_rng(2), 4, max_length=256)
    fixed = buckets.collate()(examples)
    bucketed = buckets.collate(buckets.length_buckets(256))(examples)
    assert fixed["chosen_tokens"].shape[1] == 256 and bucketed["chosen_tokens"].shape[1] == 96
    windowed = buckets.with_answer_window(bucketed)
    assert windowed[buckets.WINDOW_KEY].shape == (4, 65)  # answers <= 64 tokens: LM head on 65 of 96 rows

    full_lp = jax.jit(lambda b: logps.pair_logps(model, b))(fixed)
    refs = logps.reference_logps(model, [bucketed])  # bucketed, automatic window
    np.testing.assert_allclose(refs["ref_chosen_logps"], np.asarray(full_lp["chosen"]), atol=1e-4, rtol=1e-6)
    np.testing.assert_allclose(refs["ref_rejected_logps"], np.asarray(full_lp["rejected"]), atol=1e-4, rtol=1e-6)

    opt = step_lib.OptimSettings(learning_rate=1e-3, total_steps=10, warmup_ratio=0.0)
    dpo = step_lib.DPOStep(model, opt)
    state = dpo.init_state(0)
    g_fixed, m_fixed = dpo.gradients(state, fixed)  # fixed padding, LM head on all 256 positions
    g_win, m_win = dpo.gradients(state, windowed)
    assert abs(float(m_fixed["loss"]) - np.log(2)) > 1e-3  # the shifted references make the loss non-trivial
    for k in g_fixed:
        np.testing.assert_allclose(np.asarray(g_win[k]), np.asarray(g_fixed[k]), atol=1e-6, rtol=1e-4, err_msg=k)
    for k in m_fixed:
        np.testing.assert_allclose(float(m_win[k]), float(m_fixed[k]), atol=1e-6, rtol=1e-5, err_msg=k)

    # the train step picks the window itself (one program per padded length and window)
    s_buck, mb = dpo(dpo.init_state(0), bucketed)
    for k in ("loss", "rewards/margins", "logps/chosen"):
        np.testing.assert_allclose(float(mb[k]), float(m_fixed[k]), atol=1e-6, rtol=1e-5, err_msg=k)
    norm = np.sqrt(sum(float(np.sum(np.square(g))) for g in g_fixed.values()))
    np.testing.assert_allclose(float(mb["grad_norm"]), norm, rtol=1e-5)
    dpo(s_buck, bucketed)
    assert dpo.compiles == 1 and len(dpo._jitted) == 1
    (program_key,) = dpo._jitted
    assert (buckets.WINDOW_KEY, (4, 65), "int32") in program_key  # the program runs the LM head on the window
