"""The DPO training loop shell shared by offline DPO and the online RLAIF-V loop.

``train(model, dataset, cfg, workdir)`` runs ``len(dataset)`` (at most ``cfg.max_steps``) optimizer
steps of ``step.DPOStep`` over a grain ``MapDataset`` of pair batches that already carry reference
log-probs (``ref_chosen_logps`` / ``ref_rejected_logps``; see ``logps.reference_logps``), with:

* a progress bar (rate, ETA, loss), metrics (TRL names + ``grad_norm`` + ``learning_rate``) as JSON
  lines (``workdir/metrics.jsonl``, append-only; a torn last line is cut off on resume) and
  TensorBoard scalars (``workdir/tensorboard``), plus speed (``perf/step_time_s``,
  ``perf/pairs_per_s``, ``perf/tokens_per_s``, ``perf/mfu`` where the chip's peak is known) in
  TensorBoard only, so ``metrics.jsonl`` is the same for a resumed and an uninterrupted run;
  optionally Weights & Biases (``cfg.wandb_project``);
* Orbax checkpoints (``workdir/checkpoints``) of params, optimizer state, step, RNG and the
  data-iterator state every ``save_every`` steps, after each of ``save_steps`` and at the end, keeping the last ``max_to_keep``
  and the best by ``best_metric`` (its mean over the steps since the previous checkpoint);
* a finite check: a non-finite loss or gradient norm stops the run (``NonFiniteError`` naming the
  step) before anything from that step is saved, so the last good checkpoint stays the latest;
* preemption: on SIGTERM or SIGINT the current step finishes, a checkpoint is saved and
  ``Preempted`` is raised (on many hosts JAX's preemption sync point makes every host stop at the
  same step).

Rerunning the same call after a crash or a preemption resumes from the last complete checkpoint
and gives the same final parameters and metrics as an uninterrupted run (same data order: the
iterator state is restored).
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from collections.abc import Callable
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from flax import nnx
from jax.sharding import Mesh

from rlaifv_jax.core import hardware, jsonl, preemption, sharding as shd
from rlaifv_jax.core.checkpoint import Checkpointer
from rlaifv_jax.core.errors import NonFiniteError, UserError
from rlaifv_jax.core.tree import flat_values
from rlaifv_jax.data.pairs import make_iterator
from rlaifv_jax.training import step as dpo_step

log = logging.getLogger(__name__)
FINITE_KEYS = ("loss", "grad_norm")  # a non-finite value of either stops training


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    optim: dpo_step.OptimSettings = dpo_step.OptimSettings()  # total_steps <= 0: set to the steps run
    loss: dpo_step.LossSettings = dpo_step.LossSettings()
    seed: int = 0  # RNG of the step (LoRA dropout); saved in checkpoints
    save_every: int = 0  # checkpoint every N optimizer steps (0: only at the end)
    save_steps: tuple[int, ...] = ()  # also checkpoint after exactly these steps (e.g. every 1/4 epoch)
    max_to_keep: int | None = 3  # latest checkpoints kept (None: all), besides the best one
    best_metric: str = ""  # also keep the best checkpoint by this metric ("": none), e.g. "loss"
    best_mode: str = "min"  # "min" or "max" of best_metric
    max_steps: int = 0  # stop after this many optimizer steps (0: the whole dataset); quick trials
    log_every: int = 1  # fetch + write metrics every N steps
    progress: bool = True  # tqdm progress bar
    async_checkpoint: bool = True
    wandb_project: str = ""  # also log to this Weights & Biases project ("": off)


@dataclasses.dataclass
class TrainResult:
    model: nnx.Module  # the trained model (trainable params merged back, in the model's param dtype)
    state: dict[str, Any]  # the final train state (params are float32 master weights)
    step: int
    history: list[dict[str, float]]  # metrics of this process's logged steps
    resumed_from: int | None
    kept_steps: list[int] = dataclasses.field(default_factory=list)  # checkpoints on disk at the end
    best_step: int | None = None  # the best kept checkpoint by best_metric (else the latest)
    model_at: Callable[[int], nnx.Module] | None = None  # the model of kept checkpoint ``step``


class MetricWriter:
    """JSON lines (append-only) + TensorBoard scalars (+ Weights & Biases); only process 0 writes.
    On resume, rows past the restored step are dropped so the file reads like one uninterrupted run."""

    def __init__(self, workdir: str, resume_step: int | None = None, wandb_project: str = ""):
        self.enabled = jax.process_index() == 0
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.tb = self.wandb = None
        if not self.enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        rows = jsonl.read(self.path, repair=True)
        keep = [r for r in rows if resume_step and r.get("step", 0) <= resume_step]
        if len(keep) != len(rows):
            jsonl.rewrite(self.path, keep)
        from tensorboardX import SummaryWriter
        self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
        if wandb_project:
            self.wandb = start_wandb(wandb_project, workdir)

    def write(self, step: int, metrics: dict[str, float], perf: dict[str, float] | None = None) -> None:
        """``metrics`` go to every sink, ``perf`` (timings) to TensorBoard / W&B only."""
        if not self.enabled:
            return
        jsonl.append(self.path, {"step": step, **metrics})
        scalars = {**metrics, **{f"perf/{k}": v for k, v in (perf or {}).items()}}
        for k, v in scalars.items():
            self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def start_wandb(project: str, workdir: str):
    """A Weights & Biases run for ``workdir`` (one run id per workdir, resumed on rerun)."""
    try:
        import wandb
    except ImportError:
        raise UserError("log.wandb=True needs the wandb package: pip install 'rlaifv_jax[wandb]' "
                        "(or set --config.log.wandb=False)") from None
    run_id = "rlaifv-" + format(abs(hash(os.path.abspath(workdir))) % 16**10, "010x")
    return wandb.init(project=project, name=os.path.basename(os.path.normpath(workdir)) or None, id=run_id,
                      resume="allow", dir=workdir)


def peak_flops_per_device() -> float | None:
    """Peak bf16 FLOP/s of one device of this platform (``core.hardware``), or None when unknown."""
    chip = hardware.chip_of(jax.devices()[0].device_kind)  # "TPU v4", "TPU v5", "TPU v5 lite", "TPU v6 lite"
    return chip.peak_bf16_flops if chip else None


@jax.jit
def _all_finite(params: dict[str, jax.Array]) -> jax.Array:
    """Whether every parameter is finite (checked before each checkpoint)."""
    return jax.tree.reduce(jnp.logical_and, jax.tree.map(lambda x: jnp.all(jnp.isfinite(x)), params), True)


def _batch_tokens(batch: dict[str, Any]) -> int:
    """Non-pad tokens of a (host's) batch: prompt + answer, for chosen and rejected."""
    start = np.asarray(batch["answer_start"], np.int64)
    return int(np.sum(2 * start + np.asarray(batch["chosen_len"]) + np.asarray(batch["rejected_len"])))


def _model_params(model: nnx.Module) -> int:
    """Parameters that every token goes through (all but the vision tower): for the MFU estimate."""
    return sum(int(np.prod(v.shape)) for k, v in flat_values(nnx.state(model, nnx.Param)).items()
               if not k.startswith("vision_tower"))


def train(model: nnx.Module, dataset: grain.MapDataset, cfg: TrainSettings, workdir: str, *,
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
    Raises ``NonFiniteError`` (nothing of the bad step saved) or ``Preempted`` (saved; rerun resumes).
    """
    total = min(len(dataset), cfg.max_steps) if cfg.max_steps > 0 else len(dataset)
    optim = cfg.optim if cfg.optim.total_steps > 0 else dataclasses.replace(cfg.optim, total_steps=total)
    step_fn = dpo_step.DPOStep(model, optim, cfg.loss, mesh=mesh, rules=rules, trainable=trainable, prepare=prepare)
    own_ckpt = checkpointer is None
    ckpt_dir = os.path.join(workdir, "checkpoints")
    ckpt_kw = dict(max_to_keep=cfg.max_to_keep, best_metric=cfg.best_metric or None, best_mode=cfg.best_mode)
    ckpt = checkpointer or Checkpointer(ckpt_dir, save_every=cfg.save_every, async_save=cfg.async_checkpoint,
                                        **ckpt_kw)
    it = make_iterator(dataset)
    start = ckpt.latest_step()
    if start is not None:
        state, extra = ckpt.restore(start, step_fn.abstract_state())
        if int(state["step"]) != start:
            raise RuntimeError(f"checkpoint {start} holds step {int(state['step'])}")
        it.set_state(extra["data"])
        if start < total:
            log.info("%s: resuming from checkpoint step %d in %s", desc, start, ckpt.directory)
    else:
        state = step_fn.init_state(cfg.seed)
    first = start or 0
    writer = MetricWriter(workdir, resume_step=first, wandb_project=cfg.wandb_project)
    history: list[dict[str, float]] = []
    bar = tqdm.tqdm(total=total, initial=first, desc=desc, unit="step", disable=not cfg.progress,
                    dynamic_ncols=True)
    pending: list[tuple[int, dict[str, jax.Array], int, int]] = []  # (step, metrics, pairs, tokens)
    since_save: list[dict[str, float]] = []
    peak = peak_flops_per_device()
    flops_per_token = 6 * _model_params(model) if peak else 0.0
    t0 = t_flush = time.perf_counter()

    def flush():
        nonlocal t_flush
        if not pending:
            return
        rows = jax.device_get([m for _, m, _, _ in pending])
        now = time.perf_counter()
        step_time = (now - t_flush) / len(pending)
        t_flush = now
        for (s, _, pairs, tokens), m in zip(pending, rows):
            row = {k: float(v) for k, v in m.items()}
            bad = {k: row[k] for k in FINITE_KEYS if k in row and not math.isfinite(row[k])}
            if bad:
                pending.clear()
                kept = ckpt.latest_step()
                raise NonFiniteError(
                    f"{desc}: non-finite {', '.join(f'{k}={v}' for k, v in bad.items())} at step {s} of {total}; "
                    f"training stopped before saving it (last good checkpoint: "
                    f"{f'step {kept} in {ckpt.directory}' if kept is not None else 'none'}). Lower the learning "
                    "rate or check the data, then use a new --workdir")
            pairs = row.get("pairs", pairs)
            perf = {"step_time_s": step_time, "pairs_per_s": pairs / step_time, "tokens_per_s": tokens / step_time}
            if peak:
                perf["mfu"] = flops_per_token * tokens / step_time / (peak * jax.device_count())
            history.append({"step": s, **row})
            since_save.append(row)
            writer.write(s, row, perf)
        last = history[-1]
        bar.set_postfix(loss=f"{last['loss']:.4f}", acc=f"{last['rewards/accuracies']:.2f}",
                        margin=f"{last['rewards/margins']:.3f}")
        pending.clear()

    def save(done: int, force: bool) -> bool:
        flush()
        if (force or ckpt.should_save(done)) and not bool(_all_finite(state["params"])):
            kept = ckpt.latest_step()
            raise NonFiniteError(f"{desc}: non-finite parameters after step {done} of {total}; not saved (last good "
                                 f"checkpoint: {f'step {kept}' if kept is not None else 'none'}). Lower the "
                                 "learning rate, then use a new --workdir")
        metrics = None
        if cfg.best_metric:
            values = [r[cfg.best_metric] for r in since_save if cfg.best_metric in r]
            if not values:  # resumed right at a checkpoint: the last logged value
                values = [history[-1][cfg.best_metric]] if history else [0.0]
            metrics = {cfg.best_metric: float(np.mean(values))}
        saved = ckpt.save(done, state, {"data": it.get_state(), "step": done}, force=force, metrics=metrics)
        if saved:
            since_save.clear()
        return saved

    try:
        with preemption.StopSignals() as stop:
            for step in range(first, total):
                batch = next(it)
                pairs = len(batch["chosen_len"]) * jax.process_count()
                tokens = _batch_tokens(batch) * jax.process_count()
                state, metrics = step_fn(state, batch)
                done = step + 1
                pending.append((done, metrics, pairs, tokens))
                if done % max(cfg.log_every, 1) == 0 or done == total:
                    flush()
                saved = False
                if ckpt.should_save(done) or done == total or done in cfg.save_steps:
                    saved = save(done, force=done == total or done in cfg.save_steps)
                bar.update(1)
                if hook is not None:
                    hook(done, metrics, saved)
                if done < total and stop.requested(done):
                    save(done, force=True)
                    ckpt.wait()
                    raise stop.preempted(f"{desc}: stopped by {stop.signal_name} after step {done} of {total}; "
                                         f"checkpoint saved in {ckpt.directory}. Rerun the same command to resume")
            flush()
        ckpt.wait()
        kept, best = ckpt.all_steps(), ckpt.best_step()
    finally:
        bar.close()
        writer.close()
        if own_ckpt:
            ckpt.close()
        else:
            ckpt.wait()
    steps_run = total - first
    if steps_run:
        log.info("%s: %d steps in %.1fs", desc, steps_run, time.perf_counter() - t0)

    def model_at(s: int) -> nnx.Module:
        with Checkpointer(ckpt_dir, async_save=False, **ckpt_kw) as reader:
            restored, _ = reader.restore(s, step_fn.abstract_state())
        return step_fn.model(restored)

    return TrainResult(model=step_fn.model(state), state=state, step=total, history=history,
                       resumed_from=start, kept_steps=kept, best_step=best, model_at=model_at if own_ckpt else None)
