"""DPO train-step throughput: our jitted JAX step vs an equivalent PyTorch (transformers) step.

Same LLaVA-shaped model (random weights, ~25M params), same batch of pairs, same work per step:
the vision tower runs once per pair under no-grad, its projected features shared by the chosen and
rejected rows (one 2B forward + backward through projector and LM), summed answer log-probs, the
sigmoid DPO loss, global-norm clipping and AdamW on projector + LM. Float32 on both sides; both
on the same CPU in one run. Prints a table with pairs/s and the ratio.

    python benchmarks/dpo_step.py [--batch 4] [--length 128] [--steps 5]
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import numpy as np


def configs(args):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig
    text = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3,
                       num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                       num_key_value_heads=args.hidden // 64, max_position_embeddings=1024,
                       bos_token_id=1, eos_token_id=2, pad_token_id=0)
    vision = CLIPVisionConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                              image_size=112, patch_size=14)
    return LlavaConfig(text_config=text, vision_config=vision, image_token_index=args.vocab - 1)


def make_batch(args, n_img, rng):
    b, L = args.batch, args.length
    batch = {k: [] for k in ("chosen_tokens", "rejected_tokens", "answer_start", "chosen_len", "rejected_len")}
    for _ in range(b):
        prompt = [1, *rng.integers(3, args.vocab - 2, 5), *[args.vocab - 1] * n_img, *rng.integers(3, args.vocab - 2, 10)]
        batch["answer_start"].append(len(prompt))
        for name in ("chosen", "rejected"):
            n = int(rng.integers((L - len(prompt)) // 2, L - len(prompt) + 1))
            row = np.zeros(L, np.int32)
            row[: len(prompt) + n] = prompt + [*rng.integers(3, args.vocab - 2, n - 1), 2]
            batch[f"{name}_tokens"].append(row)
            batch[f"{name}_len"].append(n)
    out = {k: np.asarray(v, np.int32) for k, v in batch.items()}
    out["pixel_values"] = rng.standard_normal((b, 3, 112, 112)).astype(np.float32)
    out["ref_chosen_logps"] = rng.standard_normal(b).astype(np.float32) - 300
    out["ref_rejected_logps"] = rng.standard_normal(b).astype(np.float32) - 300
    return out


def torch_step_fn(model, lr):
    import torch
    params = [p for n, p in model.named_parameters() if "vision_tower" not in n]
    for n, p in model.named_parameters():
        p.requires_grad_("vision_tower" not in n)
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.999), eps=1e-8)
    cfg = model.config
    inner = model.model

    def step(batch):
        px = torch.from_numpy(batch["pixel_values"])
        tokens = torch.from_numpy(np.concatenate([batch["chosen_tokens"], batch["rejected_tokens"]])).long()
        start = torch.from_numpy(np.concatenate([batch["answer_start"]] * 2)).long()
        lens = torch.from_numpy(np.concatenate([batch["chosen_len"], batch["rejected_len"]])).long()
        with torch.no_grad():  # frozen vision tower, once per pair
            hidden = inner.vision_tower(px, output_hidden_states=True).hidden_states[cfg.vision_feature_layer][:, 1:]
        feats = inner.multi_modal_projector(hidden)
        feats = torch.cat([feats, feats]).reshape(-1, feats.shape[-1])
        embeds = inner.get_input_embeddings()(tokens.masked_fill(tokens == cfg.image_token_index, 0))
        is_img = (tokens == cfg.image_token_index)[..., None].expand_as(embeds)
        embeds = embeds.masked_scatter(is_img, feats)
        pos = torch.arange(tokens.shape[1])[None]
        attn = (pos < (start + lens)[:, None]).long()
        logits = model(inputs_embeds=embeds, attention_mask=attn).logits[:, :-1]
        lp = torch.log_softmax(logits.float(), -1).gather(-1, tokens[:, 1:, None])[..., 0]
        p1 = pos[:, 1:]
        mask = (p1 >= start[:, None]) & (p1 < (start + lens)[:, None])
        seq = (lp * mask).sum(-1)
        b = batch["chosen_tokens"].shape[0]
        rc, rr = torch.from_numpy(batch["ref_chosen_logps"]), torch.from_numpy(batch["ref_rejected_logps"])
        z = 0.1 * ((seq[:b] - seq[b:]) - (rc - rr))
        loss = -torch.nn.functional.logsigmoid(z).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        return float(loss.detach())

    return step


def timeit(fn, steps, warmup):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--length", type=int, default=128)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--vocab", type=int, default=8000)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    args = ap.parse_args()

    import torch
    from transformers import LlavaForConditionalGeneration
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    tmp = tempfile.mkdtemp()
    tmodel = LlavaForConditionalGeneration(configs(args)).float().train()
    tmodel.save_pretrained(tmp)
    n_params = sum(p.numel() for p in tmodel.parameters())
    n_img = (112 // 14) ** 2
    batch = make_batch(args, n_img, np.random.default_rng(0))

    import jax
    from rlaifv_jax.training import step as dpo_step
    from rlaifv_jax.models import hf
    jmodel = hf.load_pretrained(tmp)
    window = int(max(batch["chosen_len"].max(), batch["rejected_len"].max()))  # LM head on answers only
    step = dpo_step.DPOStep(jmodel, dpo_step.OptimSettings(learning_rate=1e-5, total_steps=1000, warmup_ratio=0.0),
                       dpo_step.LossSettings(answer_window=window))
    state = {"s": step.init_state(0)}

    def jax_run():
        state["s"], m = step(state["s"], batch)
        jax.block_until_ready(m["loss"])

    t0 = time.perf_counter()
    jax_run()
    compile_s = time.perf_counter() - t0
    t_jax = timeit(jax_run, args.steps, args.warmup)
    tstep = torch_step_fn(tmodel, 1e-5)
    t_torch = timeit(lambda: tstep(batch), args.steps, args.warmup)

    b = args.batch
    print(f"\nDPO train step, LLaVA-shaped model {n_params / 1e6:.1f}M params (vision 4x256, LM {args.layers}x{args.hidden}, "
          f"vocab {args.vocab}), batch {b} pairs x {args.length} tokens, float32, {args.threads} CPU threads")
    print(f"{'impl':<34}{'s/step':>10}{'pairs/s':>10}")
    print(f"{'PyTorch ' + torch.__version__ + ' (eager)':<34}{t_torch:>10.3f}{b / t_torch:>10.2f}")
    print(f"{'rlaifv_jax (jit; compile ' + f'{compile_s:.1f}s)':<34}{t_jax:>10.3f}{b / t_jax:>10.2f}")
    print(f"{'ratio (jax / torch pairs/s)':<34}{'':>10}{t_torch / t_jax:>10.2f}x")
    print(f"compiles: {step.compiles}")


if __name__ == "__main__":
    main()
