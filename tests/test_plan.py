"""``python -m rlaifv_jax.plan``: topology names, abstract DPO steps, plans on the local CPU mesh and
on a compile-only TPU slice, and the "does not fit" verdict."""
import dataclasses
import importlib
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import default, qwen25vl_7b_self, qwen3vl_8b_self, slices
from rlaifv_jax import plan, plan_report, plan_tune
from rlaifv_jax.core import aot, hardware, sharding
from rlaifv_jax.data import buckets
from rlaifv_jax.engine import generate
from rlaifv_jax.models import hf, llama
from rlaifv_jax.pipelines.spec import online_spec, plan_spec
from rlaifv_jax.training import step as dpo

HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None
needs_libtpu = pytest.mark.skipif(not HAS_LIBTPU, reason="libtpu not installed (pip install -e '.[tpu]')")


@pytest.fixture
def full_optimization():
    """A plan for a TPU slice reports the compiled programs' memory and cost: compile them as a
    user's run does (conftest.py turns most of XLA's optimizations off for the CPU programs of tests)."""
    before = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", False)
    yield
    jax.config.update("jax_disable_most_optimizations", before)


def on_a_tpu_slice(test):
    """A test that compiles for a named TPU topology: needs libtpu, compiles with full optimization."""
    return needs_libtpu(pytest.mark.usefixtures("full_optimization")(test))


def smoke():
    return default.get_config("smoke")


@pytest.mark.parametrize("name,chips,xla", [
    ("v4-8", 4, "v4:2x2x1"), ("v4-32", 16, "v4:2x2x4"), ("v5p-8", 4, "v5:2x2x1"), ("v5p-16", 8, "v5:2x2x2"),
    ("v5p-64", 32, "v5:2x4x4"), ("v5p-128", 64, "v5:4x4x4"), ("v5litepod-1", 1, "v5e:1x1"),
    ("v5litepod-4", 4, "v5e:2x2"), ("v5litepod-8", 8, "v5e:2x4"), ("v5litepod-256", 256, "v5e:16x16"),
    ("v6e-8", 8, "v6e:2x4"), ("v6e-16", 16, "v6e:4x4"), ("v6e-32", 32, "v6e:4x8")])
def test_topology_names(name, chips, xla):
    t = hardware.parse_topology(name)
    assert (t.chips, t.xla_topology) == (chips, xla)


@pytest.mark.parametrize("bad", ["v5p-7", "v5p-2", "v5e-8", "tpu", "v6e-12"])
def test_bad_topology_names_are_refused(bad):
    with pytest.raises(ValueError, match="topology"):
        hardware.parse_topology(bad)


def test_named_topology_without_libtpu_says_how_to_install(monkeypatch, capsys):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "libtpu" else object())
    assert plan.main(["plan", "--config", "configs/default.py:smoke", "--topology", "v5p-8"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs libtpu" in err[0] and "pip install" in err[0]


def _real_batch(policy, config, rng):
    b, length, v = config.dpo.batch_size, config.dpo.max_length, policy.config
    vocab = v.text.vocab_size
    return {"pixel_values": rng.randn(b, 3, v.vision.image_size, v.vision.image_size).astype(np.float32),
            "chosen_tokens": rng.randint(0, vocab, (b, length)).astype(np.int32),
            "rejected_tokens": rng.randint(0, vocab, (b, length)).astype(np.int32),
            "answer_start": np.full((b,), 40, np.int32), "chosen_len": rng.randint(1, 60, b).astype(np.int32),
            "rejected_len": rng.randint(1, 60, b).astype(np.int32),
            "ref_chosen_logps": rng.randn(b).astype(np.float32), "ref_rejected_logps": rng.randn(b).astype(np.float32)}


@pytest.fixture(scope="module")
def local_plan():
    return plan.plan(smoke(), "local", only=("dpo_step",), variants=False)


def test_local_plan_dpo_bytes_equal_the_real_step(local_plan):
    """The planned DPO step (abstract model) reports the memory of the step a real run compiles."""
    config = smoke()
    (stage,) = [s for s in local_plan["stages"] if s["name"] == "dpo_step"]
    mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
    with jax.set_mesh(mesh):
        policy = hf.build_model(*plan.architecture(plan_spec(config), "policy"))
    optim, loss = plan.dpo_settings(plan_spec(config), local_plan["counts"]["dpo_steps"])
    step = dpo.DPOStep(policy, optim, loss, mesh=mesh)
    batch = buckets.with_answer_window(_real_batch(policy, config, np.random.RandomState(0)),
                                       plan.dpo_window(plan_spec(config)))
    assert buckets.WINDOW_KEY in batch  # the run's automatic LM-head window, as planned
    fn, b_sh = step.program(batch)
    compiled = fn.lower(step.init_state(), step.frozen, jax.device_put(batch, b_sh), step.schedule_steps).compile()
    assert stage["bytes_per_chip"] == aot.peak_bytes(compiled) > 0
    assert local_plan["chips"] == 8 and local_plan["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}


def _dpo_flops_ratio(report, config) -> float:
    (stage,) = [s for s in report["stages"] if s["name"] == "dpo_step"]
    policy = plan.abstract_model(plan.architecture(plan_spec(config), "policy"), config.policy.dtype,
                                 config.policy.param_dtype)
    trainable = sum(math.prod(x.shape) for p, x in nnx.to_flat_state(nnx.state(policy, nnx.Param))
                    if p[0] != "vision_tower")
    return stage["flops_per_chip"] * report["chips"] / (6 * trainable * stage["tokens_per_step"])


def test_local_dpo_flops_near_6_params_tokens(local_plan):
    assert 0.5 <= _dpo_flops_ratio(local_plan, smoke()) <= 2.0


@on_a_tpu_slice
def test_smoke_plan_on_a_tpu_slice(tmp_path, capsys):
    out = tmp_path / "plan.json"
    """The serving stages (the DPO step's TPU compile is the slowest; its plan is checked locally)."""
    assert plan.main(["plan", "--config", "configs/default.py:smoke", "--topology", "v5litepod-4",
                      "--stages", "sample,label,ref_logps", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert (r["topology"], r["chips"], r["hbm_per_chip"], r["fits"]) == ("v5litepod-4", 4, 16 * 2**30, True)
    names = [s["name"] for s in r["stages"]]
    assert names == ["sample/vision", "sample/prefill", "sample/decode", "label/vision", "label/prefill",
                     "label/score", "ref_logps"]
    for s in r["stages"]:
        assert 0 < s["bytes_per_chip"] < 2**30 and s["flops_per_chip"] > 0 and s["seconds"] > 0, s
        assert 0 < s["mfu"] <= 1 and s["resident_bytes"] > 0, s
    (decode,) = [s for s in r["stages"] if s["name"] == "sample/decode"]
    assert 0 < decode["hbm_roofline"] <= 1.01 and decode["calls"] == 3 * smoke().sampling.max_new_tokens
    # the decode row: its steps summed at their filled lengths, under the stated length assumption
    mean = min(plan.Assumptions().response_tokens, smoke().sampling.max_new_tokens)
    tokens = r["counts"]["responses"] * mean
    assert decode["tokens_per_s_chip"] == pytest.approx(tokens / decode["total_seconds"] / r["chips"])
    assert 0 < decode["total_seconds"] <= decode["upper_seconds"]
    assert r["iteration_total_seconds"] == pytest.approx(
        sum(s["total_seconds"] or s["seconds"] * s["calls"] for s in r["stages"]))
    assert r["iteration_total_seconds"] <= r["iteration_upper_seconds"]
    assert plan_report.decode_rates(r) == {"sample/decode": decode["tokens_per_s_chip"]}
    out = capsys.readouterr().out
    assert "estimated wall time per online iteration" in out and "generated tokens/s per chip" in out
    assert "upper bound, every response max_new_tokens long" in out and "--response_tokens" in out


@on_a_tpu_slice
def test_tune_plans_the_fastest_decode_batch_that_fits(tmp_path, capsys):
    """``--tune``: the sampler is also compiled at the batch estimated fastest, which fits, beats the
    config's own (shown as ``(alt)``) and is printed as overrides; the length assumption is a flag."""
    out = tmp_path / "plan.json"
    assert plan.main(["plan", "--config", "configs/default.py:smoke", "--topology", "v5litepod-4", "--stages",
                      "sample", "--tune", "--response_tokens=12", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    decodes = {s["variant"]: s for s in r["stages"] if s["name"] == "sample/decode"}
    assert decodes[False]["fits"] and decodes[False]["total_seconds"] < decodes[True]["total_seconds"]
    assert set(r["overrides"]) == {"sampling.batch_size", "sampling.decode_rows"}
    assert r["overrides"] != {"sampling.batch_size": smoke().sampling.batch_size, "sampling.decode_rows": 0}
    assert r["lengths"]["response_tokens"] == 12
    assert decodes[False]["tokens_per_s_chip"] == pytest.approx(
        r["counts"]["responses"] * 12 / decodes[False]["total_seconds"] / r["chips"])
    text = capsys.readouterr().out
    assert "--config.sampling.batch_size=" in text and "responses 12 tokens on average" in text


@on_a_tpu_slice
def test_7b_with_float32_master_weights_does_not_fit_v5litepod_4(capsys):
    """No path flag: the config's policy.arch preset (configs/arch/llava-1.5-7b) stands in for weights."""
    rc = plan.main(["plan", "--config", "configs/llava15_7b_self.py", "--topology", "v5litepod-4",
                    "--stages", "dpo_step", "--novariants"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "does not fit: stage dpo_step needs" in err and "v5litepod-4 has 16 GiB" in err
    for knob in ("fsdp", "tensor", "bf16 master weights", "remat", "grad_accum", "LoRA"):
        assert knob in err, knob


def _tiny_qwen(tmp_path):
    """configs/qwen25vl_7b_self.py on the Qwen2.5-VL-7B preset shrunk to a few units (config.json only)."""
    arch = json.loads(Path("configs/arch/qwen2.5-vl-7b-instruct/config.json").read_text())
    arch.update(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    arch["rope_scaling"]["mrope_section"] = [2, 1, 1]
    arch["vision_config"].update(depth=2, hidden_size=32, intermediate_size=48, num_heads=4, out_hidden_size=32,
                                 fullatt_block_indexes=[1])
    (tmp_path / "config.json").write_text(json.dumps(arch))
    c = qwen25vl_7b_self.get_config()
    c.policy.path = str(tmp_path)
    c.prompts.per_iteration, c.sampling.max_new_tokens, c.sampling.num_samples = 8, 16, 2
    c.labeler.batch_size, c.dpo.max_length = 16, 256
    return c


TINY_IMAGE = plan.Assumptions(image_size=(224, 224))  # 16 x 16 patches: 64 image tokens


def _qwen_plan(tmp_path, topology, only):
    r = plan.plan(_tiny_qwen(tmp_path), topology, only=only, variants=False, assume=TINY_IMAGE)
    stages = {s["name"]: s for s in r["stages"]}
    vision = "sample/vision" if "sample" in only else "label/vision"
    assert r["fits"] and stages[vision]["tokens_per_step"] == 64
    assert all(s["bytes_per_chip"] > 0 and s["flops_per_chip"] > 0 for s in r["stages"]), r["stages"]
    return stages


@needs_libtpu
def test_libtpu_start_up_lines_are_silenced(tmp_path):
    """Off a TPU VM libtpu reports its failed metadata lookup on stderr; plan.quiet_libtpu keeps it quiet."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TPU_", "GRPC_"))}
    code = ("from rlaifv_jax import plan; plan.quiet_libtpu('v5p-8'); from rlaifv_jax.core import hardware; "
            "print(len(hardware.devices(hardware.parse_topology('v5p-8'))))")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).parent.parent)
    assert proc.returncode == 0 and proc.stdout.strip() == "4", proc.stderr
    assert "InitGoogle" not in proc.stderr and "E0000" not in proc.stderr and "TPU_" not in proc.stderr, proc.stderr


@pytest.mark.parametrize("name,policy,labeler", [
    ("llava15_7b_self", "llava", None), ("llava15_7b_next34b", "llava", "llava_next"),
    ("qwen25vl_3b_self", "qwen2_5_vl", None), ("qwen25vl_7b_self", "qwen2_5_vl", None),
    ("qwen3vl_8b_self", "qwen3_vl", None), ("llava15_7b_qwen3vl_labeler", "llava", "qwen3_vl")])
def test_paper_configs_name_the_presets_of_their_own_models(name, policy, labeler):
    c = importlib.import_module(f"configs.{name}").get_config()
    assert (c.labeler.kind == "model") == (labeler is not None)
    for role, kind in (("policy", policy), ("claims_split", "llama"), ("labeler", labeler)):
        if kind:
            arch, cfg = plan.architecture(plan_spec(c), role)
            assert arch in hf.ARCHITECTURES and cfg["model_type"] == kind, (name, role, arch, cfg["model_type"])


def test_the_plan_checks_the_mesh_against_the_slice_not_this_machine():
    """next34b's tensor = 4 fits a 4-chip slice whatever this machine has (the planner passes the
    slice's device count), and is refused with one line for a slice it does not divide."""
    c = importlib.import_module("configs.llava15_7b_next34b").get_config()
    assert plan_spec(c, 4).mesh == (1, -1, 4) and plan_spec(c, 8).mesh == (1, -1, 4)
    with pytest.raises(ValueError, match=r"does not fit the 2 devices"):
        plan_spec(c, 2)


PAPER_CONFIGS = ("llava15_7b_self", "llava15_7b_next34b", "qwen25vl_3b_self", "qwen25vl_7b_self",
                 "qwen3vl_8b_self", "llava15_7b_qwen3vl_labeler")


@pytest.mark.parametrize("name", PAPER_CONFIGS)
def test_paper_configs_carry_their_slices_decode_batches(name):
    """Each slice a paper config names sets every tuned field, passes the run's checks against that
    slice's device count, and gives claims shards that fill whole claims-LLM calls; no argument is the
    default slice; an unknown slice is refused in one line naming the known ones."""
    module = importlib.import_module(f"configs.{name}")
    default_slice = module.get_config()
    assert default_slice.slice == "v5p-8"
    table = getattr(module, "TUNED", None) or getattr(importlib.import_module(
        "configs.llava15_7b_self" if name.startswith("llava") else "configs.qwen25vl_7b_self"), "TUNED")
    for slice_name, fields in table.items():
        assert set(fields) == set(slices.FIELDS)
        c = module.get_config(slice_name)
        assert c.slice == slice_name
        assert {f: c[f.split(".")[0]][f.split(".")[1]] for f in slices.FIELDS} == fields
        spec = plan_spec(c, hardware.parse_topology(slice_name).chips)
        assert spec.mesh == (c.mesh.data, c.mesh.fsdp, c.mesh.tensor)
        assert (c.claims.batch_size * c.sampling.num_samples) % c.claims.llm_batch_size == 0
    assert module.get_config("v5p-8").to_dict() == default_slice.to_dict()
    with pytest.raises(ValueError, match=r"no decode batches for slice 'v9-8'.*known: .*v5p-8"):
        module.get_config("v9-8")


def test_slice_names_and_the_mismatch_warning():
    assert hardware.slice_name("TPU v5", 4) == "v5p-8" and hardware.slice_name("TPU v6 lite", 8) == "v6e-8"
    assert hardware.slice_name("TPU v5 lite", 8) == "v5litepod-8" and hardware.slice_name("cpu", 8) is None
    assert hardware.slice_mismatch("v5p-8", "TPU v5", 4) is None
    assert hardware.slice_mismatch("", "TPU v6 lite", 8) is None and hardware.slice_mismatch("v5p-8", "cpu", 1) is None
    warning = hardware.slice_mismatch("v5p-8", "TPU v6 lite", 8)
    assert "tuned for v5p-8, this is v6e-8" in warning and ".py:v6e-8" in warning
    assert slices.entry(sample=(8, 0), claims=(320, 0))["claims.batch_size"] == 32  # 320 responses: one call
    assert slices.entry(sample=(8, 0), claims=(1024, 0))["claims.batch_size"] == 512  # 5,120: five calls


def test_the_planner_takes_the_runs_own_settings(tmp_path):
    """plan_spec builds the stages' settings with online_spec's builders; it needs no file or checkpoint,
    still refuses bad values, and the DPO dtype options reach the step the planner compiles."""
    c = smoke()
    planned, run = plan_spec(c), online_spec(c, str(tmp_path))
    for stage in ("sample", "claims", "label", "pairs", "dpo"):
        assert getattr(planned, stage) == getattr(run, stage), stage
    paper = importlib.import_module("configs.llava15_7b_self").get_config()
    assert not paper.policy.path and plan_spec(paper).archs["policy"] == ("", "llava-1.5-7b")
    paper.dpo.master_dtype, paper.dpo.optimizer_state_dtype = "bfloat16", "bfloat16"
    optim, _ = plan.dpo_settings(plan_spec(paper), 10)
    assert (optim.master_dtype, optim.state_dtype, optim.total_steps) == ("bfloat16", "bfloat16", 10)
    paper.sampling.decode_rows = -1
    with pytest.raises(ValueError, match="sampling.decode_rows=-1"):
        plan_spec(paper)


def test_qwen25vl_plan_on_local_devices(tmp_path):
    """Qwen2.5-VL's tower layout (image_grid_thw), M-RoPE positions and pair arrays through the labeler
    and reference programs; its sampler and DPO step are planned on a TPU slice below (and Qwen3-VL,
    a Qwen2.5-VL subclass, plans every stage locally)."""
    stages = _qwen_plan(tmp_path, "local", ("label", "ref_logps"))
    assert list(stages) == ["label/vision", "label/prefill", "label/score", "ref_logps"]


def test_qwen3vl_plan_on_local_devices(tmp_path):
    """configs/qwen3vl_8b_self.py on the Qwen3-VL-8B preset shrunk to a few units: DeepStack-wide image
    features through the sampler and labeler programs, pair arrays through ref_logps and the DPO step."""
    arch = json.loads(Path("configs/arch/qwen3-vl-8b-instruct/config.json").read_text())
    arch["text_config"].update(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2, head_dim=8)
    arch["text_config"]["rope_scaling"]["mrope_section"] = [2, 1, 1]
    arch["vision_config"].update(depth=2, hidden_size=32, intermediate_size=48, num_heads=4, out_hidden_size=32,
                                 deepstack_visual_indexes=[0, 1])
    (tmp_path / "config.json").write_text(json.dumps(arch))
    c = qwen3vl_8b_self.get_config()
    c.policy.path = str(tmp_path)
    c.prompts.per_iteration, c.sampling.max_new_tokens, c.sampling.num_samples = 8, 16, 2
    c.labeler.batch_size, c.dpo.max_length = 16, 256
    r = plan.plan(c, "local", only=("sample", "label", "ref_logps", "dpo_step"), variants=False,
                  assume=plan.Assumptions(image_size=(256, 256)))  # 16 x 16 patches of 16 px: 64 image tokens
    stages = {s["name"]: s for s in r["stages"]}
    assert r["fits"] and stages["sample/vision"]["tokens_per_step"] == 64
    assert all(s["bytes_per_chip"] > 0 and s["flops_per_chip"] > 0 for s in r["stages"]), r["stages"]


@on_a_tpu_slice
def test_qwen25vl_plan_on_a_tpu_slice(tmp_path):
    stages = _qwen_plan(tmp_path, "v5litepod-4", ("sample", "dpo_step"))
    assert all(s["seconds"] > 0 for s in stages.values())


@pytest.mark.parametrize("remat", ["full", "dots"])
def test_remat_recomputes_the_same_gradients(remat):
    cfg = llama.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    model = llama.Llama(cfg, rngs=nnx.Rngs(0))
    ids = jnp.asarray(np.random.RandomState(0).randint(0, 64, (2, 12)))

    key_mask = jnp.ones(ids.shape, bool)
    positions = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)

    def loss(m, mode):
        hidden, _ = m.forward_embeds(m.embed(ids), positions=positions, key_mask=key_mask, remat=mode)
        return jnp.mean(m.logits(hidden) ** 2)

    want = nnx.grad(loss)(model, "none")
    got = nnx.grad(loss)(model, remat)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6), got, want)
    graphdef, state = nnx.split(model)
    assert "remat2" in str(jax.make_jaxpr(lambda st: loss(nnx.merge(graphdef, st), remat))(state))
    assert "remat2" not in str(jax.make_jaxpr(lambda st: loss(nnx.merge(graphdef, st), "none"))(state))


def test_dpo_step_remat_option_reaches_the_decoder_as_an_argument():
    config = smoke()
    policy = plan.abstract_model(plan.architecture(plan_spec(config), "policy"), "float32", "float32")
    mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    planner = plan.Planner(plan_spec(config), hardware.parse_topology("local"), mesh, plan.Assumptions(), {})
    batch = planner.pair_batch(policy, True)
    jaxprs = {}
    for mode in ("none", "full"):
        step = dpo.DPOStep(policy, dpo.OptimSettings(), dpo.LossSettings(remat=mode), mesh=mesh)
        params = {k: v for k, v in step.abstract_state()["params"].items()}
        jaxprs[mode] = str(jax.make_jaxpr(step._loss_fn)(params, step.frozen, batch, 1.0, jax.random.key(0)))
    assert "remat2" in jaxprs["full"] and "remat2" not in jaxprs["none"]
    assert not hasattr(policy.language_model, "remat")  # no hidden state on the model
    with pytest.raises(ValueError, match="remat"):
        dpo.LossSettings(remat="some")


def test_bf16_optimizer_state_is_stored_in_bf16_and_updated_in_float32():
    params = {"w": jnp.linspace(-1, 1, 12, dtype=jnp.float32).reshape(3, 4), "b": jnp.ones((4,), jnp.float32)}
    grads = jax.tree.map(lambda p: jnp.cos(p * 3.0), params)
    cfg = dpo.OptimSettings(learning_rate=1e-2, total_steps=10, warmup_ratio=0.0)
    tx32 = dpo.make_optimizer(cfg)
    tx16 = dpo.make_optimizer(dataclasses.replace(cfg, state_dtype="bfloat16"))
    s32, s16 = tx32.init(params), tx16.init(params)
    assert {x.dtype for x in jax.tree.leaves(s16) if jnp.issubdtype(x.dtype, jnp.floating)} == {jnp.dtype(jnp.bfloat16)}
    u32, s32 = tx32.update(grads, s32, params)
    u16, s16 = tx16.update(grads, s16, params)
    for k in params:  # step 1 starts from zero moments: the same float32 update
        np.testing.assert_array_equal(np.asarray(u16[k]), np.asarray(u32[k]))
    mu32 = jax.tree.leaves(s32)[1]
    mu16 = jax.tree.leaves(s16)[1]
    assert mu16.dtype == jnp.bfloat16 and np.allclose(np.asarray(mu16, np.float32), np.asarray(mu32), rtol=1e-2)
    with pytest.raises(ValueError, match="state_dtype"):
        dpo.OptimSettings(state_dtype="float16")


def test_abstract_step_state_bytes_follow_the_dtype_options():
    """Built from an abstract model: float32 master + Adam = 12 bytes per trainable parameter,
    bf16 optimizer state 8, bf16 master weights and state 6."""
    config = smoke()
    mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    policy = plan.abstract_model(plan.architecture(plan_spec(config), "policy"), "float32", "float32")
    n = sum(math.prod(x.shape) for p, x in nnx.to_flat_state(nnx.state(policy, nnx.Param)) if p[0] != "vision_tower")
    got = {}
    for master, state in (("float32", "float32"), ("float32", "bfloat16"), ("bfloat16", "bfloat16")):
        step = dpo.DPOStep(policy, dpo.OptimSettings(master_dtype=master, state_dtype=state), mesh=mesh)
        assert step.is_abstract
        got[master, state] = aot.per_chip_bytes({k: v for k, v in step.abstract_state().items() if k != "rng"})
    overhead = got["float32", "float32"] - 12 * n  # step counters
    assert 0 <= overhead < 64
    assert got["float32", "bfloat16"] - overhead == 8 * n and got["bfloat16", "bfloat16"] - overhead == 6 * n
    with pytest.raises(ValueError, match="abstract model"):
        step.init_state()


def test_prefix_attention_flops_follow_the_compiled_decode_step():
    """``--tune`` models a candidate's decode FLOPs as per-row work plus the rows' attention over the
    prefixes they score. With one sample per prompt the continuous decoder's window grows with the
    slots (``prefix_attention_flops`` grows with their square): the compiled steps agree, so the
    tuner no longer prefers a continuous claims decoder XLA then finds 6x slower."""
    config = smoke()
    policy = plan.abstract_model(plan.architecture(plan_spec(config), "policy"), "float32", "float32")
    mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    state = aot.sharded(nnx.state(policy), mesh, sharding.SERVE_RULES)
    length, n = 64, 1
    sampling = plan.DecodeSettings(temperature=0.0)

    def compiled_flops(c):
        programs = generate.lower_programs(policy, state, mesh, batch=c.batch, length=length, num_samples=n,
                                           max_new_tokens=8, sampling=sampling, decode_rows=c.slots or None)
        return aot.costs(programs["decode"])[0]

    cands = [plan_tune.Candidate(32, 0), plan_tune.Candidate(32, 8), plan_tune.Candidate(32, 16)]
    assert [generate.prefix_window(c.batch, c.slots, n) if c.slots else 1 for c in cands] == [1, 9, 17]
    model = [plan.prefix_attention_flops(policy, mesh, c, n, length) for c in cands]
    assert model[2] / model[1] == pytest.approx(16 * 17 / (8 * 9))  # slots x window
    got = [compiled_flops(c) for c in cands]
    # What the prefix attention adds between two slot counts, compiled vs modelled (per-row work
    # scales with the rows: subtract it using the static decoder's 32 rows).
    per_row = (got[0] - model[0]) / 32
    for c, g, m in zip(cands[1:], got[1:], model[1:]):
        assert g - per_row * c.slots == pytest.approx(m, rel=0.15), (c, g, m)


@on_a_tpu_slice
@pytest.mark.parametrize("decode_rows", [None, 6])
def test_decode_on_a_tpu_slice_reads_the_own_cache_through_the_pallas_kernel(tmp_path, decode_rows):
    """A 128-wide-head model on v5litepod-4 (rows over fsdp 2, KV heads over tensor 2): the sampler's
    decode program, static or continuous, compiles with the Pallas own-cache kernel (a Mosaic call per
    shard); the prefill has none."""
    import tiny_hf
    tiny_hf.llama(tmp_path, hidden_size=512, num_attention_heads=4, num_key_value_heads=2, intermediate_size=256)
    model = plan.abstract_model(hf.read_config(str(tmp_path)), "bfloat16", "bfloat16")
    topo = hardware.parse_topology("v5litepod-4")
    mesh = sharding.make_mesh(1, 2, 2, devices=hardware.devices(topo))
    assert generate.own_cache_for(model, mesh, 300) == "pallas"
    assert generate.own_cache_for(model, mesh, 128) == "xla"  # 127 own slots: one block of 127, which does not tile
    state = aot.sharded(nnx.state(model), mesh, sharding.SERVE_RULES)
    programs = generate.lower_programs(model, state, mesh, batch=4, length=32, num_samples=3, max_new_tokens=300,
                                       sampling=plan.DecodeSettings(temperature=1.0, top_k=40), decode_rows=decode_rows)
    assert "tpu_custom_call" in programs["decode"].as_text()
    assert "tpu_custom_call" not in programs["prefill"].as_text()


def test_tune_starts_from_the_largest_batch_that_fits_when_the_configs_does_not(monkeypatch):
    """--tune on a slice where the config's prompt batch is out of HBM: the largest smaller batch XLA
    fits is compiled, the config's rows become ``(alt)`` and the override names that batch (XLA's
    verdicts stood in for by the batch size here; the cache bytes and step costs are the real ones)."""
    config = smoke()
    policy = plan.abstract_model(plan.architecture(plan_spec(config), "policy"), "float32", "float32")
    mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    planner = plan.Planner(plan_spec(config), hardware.parse_topology("v5p-8"), mesh, plan.Assumptions(),
                           {"prompts": 256}, tune=True)
    g = plan.Generation("sample", policy, 64, 4, 16, plan.DecodeSettings(temperature=1.0), 256,
                        ("sampling.batch_size", "sampling.decode_rows"))
    compiled = []

    def fake_generation(gen, c):  # XLA fits 16 prompts and fewer, static or continuous
        compiled.append(c)
        fits = c.batch <= 16
        for name in ("prefill", "decode"):
            planner.stages.append(aot.Stage(
                f"sample/{name}", "serve", bytes_per_chip=int(2e9 * c.batch), resident_bytes=int(1e9),
                flops_per_chip=1e9 * c.rows(4) if fits else None, fits=fits, total_seconds=100.0 / c.batch,
                note=f"{c.batch} prompts"))
        return planner.caches(gen, c) if fits else None

    monkeypatch.setattr(planner, "_generation", fake_generation)
    planner.generation(g, 64, None)
    assert compiled[:3] == [plan_tune.Candidate(64, 0), plan_tune.Candidate(32, 0), plan_tune.Candidate(16, 0)]
    own = [s for s in planner.stages if s.note == "64 prompts"]
    assert len(own) == 2 and all(s.variant and not s.fits for s in own)
    assert planner.overrides["sampling.batch_size"] <= 16
    chosen = [s for s in planner.stages if not s.variant]
    assert len(chosen) == 2 and all(s.fits for s in chosen)
    assert plan_report.verdicts({"hbm_per_chip": 95 * 2**30, "topology": "v5p-8",
                                 "stages": [s.public() for s in planner.stages]}) == []
