"""The DPO training loop shell shared by offline DPO and the online RLAIF-V loop.

``train(model, dataset, cfg, workdir)`` runs ``len(dataset)`` optimizer steps of ``dpo_step.DPOStep``
over a grain ``MapDataset`` of pair batches that already carry reference log-probs
(``ref_chosen_logps`` / ``ref_rejected_logps``; see ``logps.reference_logps``), with a progress bar,
metrics (TRL names + ``grad_norm`` + ``learning_rate``) to TensorBoard (``workdir/tensorboard``)
and JSON lines (``workdir/metrics.jsonl``), and Orbax checkpoints (``workdir/checkpoints``) of
params, optimizer state, step, RNG and the data-iterator state every ``save_every`` steps and at the
end. Rerunning the same call after a crash resumes from the last complete checkpoint and gives the
same final parameters as an uninterrupted run (same data order: the iterator state is restored).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Callable
from typing import Any

import grain
import jax
import tqdm
from flax import nnx
from jax.sharding import Mesh

from rlaifv_jax.engine import logps
from rlaifv_jax.training import step as dpo_step
from rlaifv_jax.core import sharding as shd
from rlaifv_jax.core.checkpoint import Checkpointer
from rlaifv_jax.data.rlaifv_dataset import make_iterator


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    optim: dpo_step.OptimConfig = dpo_step.OptimConfig()  # total_steps <= 0: set to len(dataset)
    loss: dpo_step.LossConfig = dpo_step.LossConfig()
    seed: int = 0  # RNG of the step (LoRA dropout); saved in checkpoints
    save_every: int = 0  # checkpoint every N optimizer steps (0: only at the end)
    max_to_keep: int | None = 3  # checkpoints kept (None: all)
    log_every: int = 1  # fetch + write metrics every N steps
    progress: bool = True  # tqdm progress bar
    async_checkpoint: bool = True


@dataclasses.dataclass
class TrainResult:
    model: nnx.Module  # the trained model (trainable params merged back, in the model's param dtype)
    state: dict[str, Any]  # the final train state (params are float32 master weights)
    step: int
    history: list[dict[str, float]]  # metrics of this process's logged steps
    resumed_from: int | None


class MetricWriter:
    """TensorBoard scalars + JSON lines; only process 0 writes. On resume, lines past the restored
    step are dropped so the file reads like one uninterrupted run."""

    def __init__(self, workdir: str, resume_step: int | None = None):
        self.enabled = jax.process_index() == 0
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.tb = None
        if not self.enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        if os.path.exists(self.path):
            with open(self.path) as f:
                keep = [ln for ln in f if ln.strip() and resume_step is not None
                        and json.loads(ln).get("step", 0) <= resume_step]
            with open(self.path + ".tmp", "w") as f:
                f.writelines(keep)
            os.replace(self.path + ".tmp", self.path)
        from tensorboardX import SummaryWriter
        self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        for k, v in metrics.items():
            self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def train(model: nnx.Module, dataset: grain.MapDataset, cfg: TrainConfig, workdir: str, *,
          mesh: Mesh | None = None, rules: shd.Rules = shd.TRAIN_RULES,
          trainable: Callable = dpo_step.default_trainable, prepare: Callable | None = None,
          checkpointer: Checkpointer | None = None,
          hook: Callable[[int, dict[str, Any], bool], None] | None = None,
          desc: str = "dpo") -> TrainResult:
    """Train ``model`` with DPO on ``dataset`` (one element = one global batch of pairs).

    ``workdir`` receives ``checkpoints/`` (unless ``checkpointer`` is given), ``metrics.jsonl`` and
    ``tensorboard/``. If a checkpoint exists there, training resumes from the latest one. ``hook(step,
    metrics, saved)`` runs after every step (after a checkpoint save started, if any) — tests use it
    to kill the process. ``trainable`` / ``prepare`` are passed to ``DPOStep`` (LoRA uses them).
    """
    total = len(dataset)
    optim = cfg.optim if cfg.optim.total_steps > 0 else dataclasses.replace(cfg.optim, total_steps=total)
    step_fn = dpo_step.DPOStep(model, optim, cfg.loss, mesh=mesh, rules=rules, trainable=trainable, prepare=prepare)
    own_ckpt = checkpointer is None
    ckpt = checkpointer or Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=cfg.max_to_keep,
                                        save_every=cfg.save_every, async_save=cfg.async_checkpoint)
    it = make_iterator(dataset)
    start = ckpt.latest_step()
    if start is not None:
        state, extra = ckpt.restore(start, step_fn.abstract_state())
        if int(state["step"]) != start:
            raise RuntimeError(f"checkpoint {start} holds step {int(state['step'])}")
        it.set_state(extra["data"])
        logging.info("resumed from checkpoint step %d in %s", start, ckpt.directory)
    else:
        state = step_fn.init_state(cfg.seed)
    first = start or 0
    writer = MetricWriter(workdir, resume_step=first)
    history: list[dict[str, float]] = []
    bar = tqdm.tqdm(total=total, initial=first, desc=desc, unit="step", disable=not cfg.progress,
                    dynamic_ncols=True)
    pending: list[tuple[int, dict[str, jax.Array]]] = []
    t0 = time.perf_counter()

    def flush():
        for s, m in pending:
            row = {k: float(v) for k, v in jax.device_get(m).items()}
            history.append({"step": s, **row})
            writer.write(s, row)
        if pending:
            last = history[-1]
            bar.set_postfix(loss=f"{last['loss']:.4f}", acc=f"{last['rewards/accuracies']:.2f}",
                            margin=f"{last['rewards/margins']:.3f}")
        pending.clear()

    try:
        for step in range(first, total):
            batch = next(it)
            state, metrics = step_fn(state, batch)
            done = step + 1
            pending.append((done, metrics))
            if done % max(cfg.log_every, 1) == 0 or done == total:
                flush()
            saved = False
            if ckpt.should_save(done) or done == total:
                flush()
                saved = ckpt.save(done, state, {"data": it.get_state(), "step": done}, force=done == total)
            bar.update(1)
            if hook is not None:
                hook(done, metrics, saved)
        flush()
    finally:
        bar.close()
        writer.close()
        if own_ckpt:
            ckpt.close()
        else:
            ckpt.wait()
    steps_run = total - first
    if steps_run:
        logging.info("%s: %d steps in %.1fs", desc, steps_run, time.perf_counter() - t0)
    return TrainResult(model=step_fn.model(state), state=state, step=total, history=history,
                       resumed_from=start)
