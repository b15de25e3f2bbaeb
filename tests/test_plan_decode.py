"""The planner's decode time (``rlaifv_jax.plan_decode``) against independent sums, and the KV-cache
bytes it rests on (``generate.decode_cache_bytes``) against the arrays ``generate`` really holds."""
import jax
import numpy as np
import pytest
from flax import nnx

import tiny_hf
from rlaifv_jax import plan_decode, plan_tune
from rlaifv_jax.core import aot, hardware, sharding
from rlaifv_jax.engine import generate
from rlaifv_jax.engine.logits import DecodeSettings
from rlaifv_jax.models import hf

CHIP = hardware.CHIPS["v5p"]
GB = 1e9


def _cost(**kw):
    base = dict(weight_bytes=14 * GB, prefix_bytes=5 * GB, own_bytes=40 * GB, own_slots=511, block=128,
                flops=2e12, attention_flops_per_slot=1e9)
    return plan_decode.StepCost(**{**base, **kw})


def test_filled_slots_are_whole_blocks_capped_at_the_cache():
    cost = _cost()
    assert [plan_decode.filled_slots(cost, f) for f in (1, 128, 129, 256, 300, 511, 512)] == \
        [128, 128, 256, 256, 384, 511, 511]


def test_static_decoder_sums_every_step_at_its_filled_length():
    cost, lengths = _cost(), plan_decode.Lengths(mean=160, longest=512)
    t = plan_decode.decode_time(cost, CHIP, lengths, prompts=100, num_samples=10, batch=32, slots=0)
    # independently: 4 batches × the sum over steps 1..512 of max(bytes / bandwidth, flops / peak)
    blocks = np.minimum(511, np.ceil(np.arange(1, 513) / 128) * 128)
    traffic = (14 + 5 + 40 * blocks / 511) * GB / CHIP.hbm_bytes_per_s
    compute = (2e12 + 1e9 * (blocks - 128)) / CHIP.peak_bf16_flops
    assert t.seconds == pytest.approx(4 * np.maximum(traffic, compute).sum(), rel=1e-9)
    assert (t.steps, t.tokens) == (4 * 512, 100 * 10 * 160)
    assert plan_decode.tokens_per_second_per_chip(t, 4) == pytest.approx(t.tokens / t.seconds / 4)


def test_continuous_decoder_keeps_its_slots_full_and_pays_the_tail():
    cost, lengths = _cost(), plan_decode.Lengths(mean=100, longest=512)
    t = plan_decode.decode_time(cost, CHIP, lengths, prompts=256, num_samples=10, batch=128, slots=640)
    steps_per_batch = -(-1280 * 101 // 640) + (512 - 100)  # one step per token + a fresh slot's, then the tail
    deepest = (14 + 5 + 40) * GB / CHIP.hbm_bytes_per_s  # every step charged at the longest fill
    assert t.steps == 2 * steps_per_batch
    assert t.seconds == pytest.approx(2 * steps_per_batch * deepest, rel=1e-9)
    # as many slots as rows: the static decoder
    same = plan_decode.decode_time(cost, CHIP, lengths, prompts=256, num_samples=10, batch=64, slots=640)
    static = plan_decode.decode_time(cost, CHIP, lengths, prompts=256, num_samples=10, batch=64, slots=0)
    assert same == static


def test_the_ragged_kernel_charges_refill_steps_at_the_mean_fill_and_the_tail_at_the_longest():
    cost, lengths = _cost(ragged=True), plan_decode.Lengths(mean=100, longest=512)
    t = plan_decode.decode_time(cost, CHIP, lengths, prompts=256, num_samples=10, batch=128, slots=640)
    refill, tail = -(-1280 * 101 // 640), 512 - 100
    at_mean = (14 + 5 + 40 * 128 / 511) * GB / CHIP.hbm_bytes_per_s  # 100 tokens: one 128-slot block per row
    deepest = (14 + 5 + 40) * GB / CHIP.hbm_bytes_per_s
    assert t.steps == 2 * (refill + tail)
    assert t.seconds == pytest.approx(2 * (refill * at_mean + tail * deepest), rel=1e-9)
    walk = plan_decode.decode_time(_cost(), CHIP, lengths, prompts=256, num_samples=10, batch=128, slots=640)
    assert t.seconds < walk.seconds and t.tokens == walk.tokens
    static = dict(prompts=256, num_samples=10, batch=64, slots=0)  # rows in lockstep: nothing to skip
    assert plan_decode.decode_time(cost, CHIP, lengths, **static) == \
        plan_decode.decode_time(_cost(), CHIP, lengths, **static)


def test_shorter_responses_cost_less_and_the_upper_bound_is_the_longest():
    cost = _cost()
    run = dict(prompts=64, num_samples=10, batch=64, slots=0)
    short = plan_decode.decode_time(cost, CHIP, plan_decode.Lengths(100, 200), **run)
    full = plan_decode.decode_time(cost, CHIP, plan_decode.Lengths(512, 512), **run)
    assert short.seconds < full.seconds and short.tokens < full.tokens
    # a weight-bound step (no cache) costs the same whatever the fill
    flat = _cost(prefix_bytes=0, own_bytes=0, flops=0, attention_flops_per_slot=0)
    t = plan_decode.decode_time(flat, CHIP, plan_decode.Lengths(100, 200), **run)
    assert t.seconds == pytest.approx(200 * 14 * GB / CHIP.hbm_bytes_per_s)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    tiny_hf.llama(path)
    return hf.load_pretrained(str(path))


@pytest.mark.parametrize("mesh_shape,decode_rows", [((1, 8, 1), None), ((1, 4, 2), None), ((1, 2, 2), 6)])
def test_cache_bytes_are_the_per_device_bytes_of_the_real_caches(llama, mesh_shape, decode_rows):
    """The prefix cache as the compiled prefill returns it, and the own cache as generate's decoders
    place it: their bytes per device are what the planner charges a step."""
    mesh = sharding.make_mesh(*mesh_shape, devices=jax.devices()[:int(np.prod(mesh_shape))])
    batch, length, n, max_new = 8, 32, 2, 17
    got = generate.decode_cache_bytes(llama, mesh, batch=batch, length=length, num_samples=n, max_new_tokens=max_new,
                                      decode_rows=decode_rows)
    state = aot.sharded(nnx.state(llama), mesh, sharding.SERVE_RULES)
    programs = generate.lower_programs(llama, state, mesh, batch=batch, length=length, num_samples=n,
                                       max_new_tokens=max_new, sampling=DecodeSettings(), decode_rows=decode_rows)
    prefix_cache = programs["prefill"].out_info[0]
    assert got.prefix_all == aot.per_chip_bytes(prefix_cache) > 0
    static = generate.batch_static(mesh, llama, rows=batch * n, cache_len=length + max_new - 1, num_samples=n,
                                   max_new_tokens=max_new, slots=decode_rows or 0)
    own = jax.device_put(llama.init_cache(decode_rows or batch * n, max_new - 1, heads_major=True),
                         jax.sharding.NamedSharding(mesh, static.cache_spec))
    assert got.own == sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(own))
    assert got.own_slots == max_new - 1
    if decode_rows:  # a step reads the window of prompts its slots may hold, not the whole batch
        assert got.prefix < got.prefix_all
    else:
        assert got.prefix == got.prefix_all


def test_tune_footprint_reproduces_its_calibration_point_and_scales_by_part():
    f = plan_tune.footprint(70e9, weights=14e9, prefix_all=5e9, own=40e9, batch=64, decode_rows=640)
    assert plan_tune.peak_bytes(f, plan_tune.Candidate(64, 0), num_samples=10) == pytest.approx(70e9)
    # twice the prompts through the same 640 slots: only the prefix caches grow
    assert plan_tune.peak_bytes(f, plan_tune.Candidate(128, 640), 10) == pytest.approx(75e9)
    # half the rows: the own caches and the per-row rest halve
    assert plan_tune.peak_bytes(f, plan_tune.Candidate(32, 0), 10) == pytest.approx(14e9 + 2.5e9 + 25.5e9)


def test_tune_candidates_and_ranking():
    cands = plan_tune.candidates(num_samples=10, prompts=100)
    assert {c.batch for c in cands} == {8, 16, 32, 64}  # no batch beyond the stage's prompts
    assert all(c.slots < c.batch * 10 for c in cands) and plan_tune.Candidate(8, 0) in cands
    seconds = {plan_tune.Candidate(8, 0): 3.0, plan_tune.Candidate(16, 0): 1.0, plan_tune.Candidate(32, 0): 2.0}
    best = plan_tune.ranked(list(seconds), seconds.get, lambda c: c.batch < 32)
    assert best == [plan_tune.Candidate(16, 0), plan_tune.Candidate(8, 0)]
