"""Configs in, typed stage settings out, in one place.

``validate(config, mode)`` runs before anything touches the workdir and names every problem on one
line (field, bad value, allowed values): enums, types, ranges, paths that must exist (the prompt
file is read, checkpoint configs are loaded), the mesh against the device count, batch sizes
against the data-parallel size and ``max_length`` against the policy's image tokens. Then
``spec.online_spec`` / ``spec.offline_spec`` turn config subtrees into the dataclasses the stages
take (stages never read a ConfigDict).
"""
from __future__ import annotations

import dataclasses
import glob
import importlib.util
import math
import numbers
import os
from typing import Any

import jax
import ml_collections

from rlaifv_jax.core import paths
from rlaifv_jax.core.errors import ConfigError, UserError
from rlaifv_jax.data import toy_world
from rlaifv_jax.data.rlaifv_dataset import DATA_SUFFIXES
from rlaifv_jax.models import hf
from rlaifv_jax.training.loss import LOSS_TYPES, METRIC_NAMES
from rlaifv_jax.training.step import FLOAT_DTYPES, REMAT_CHOICES

MODES = ("online", "offline_dpo")
TEMPLATES = ("llava_v1", "chat")
EXPORT_CHOICES = ("last", "best", "all")
SELECT_SUITES = ("object_halbench", "amber", "pope")  # suites that score without a judge
_MISSING = object()

_ONLINE_CHOICES = {
    "source": ("toy", "files"),
    "policy.dtype": ("float32", "bfloat16"),
    "policy.param_dtype": ("float32", "bfloat16"),
    "policy.template": TEMPLATES,
    "labeler.template": TEMPLATES,
    "claims.kind": ("rule", "llm"),
    "labeler.kind": ("self", "model", "toy"),
    "labeler.answer_prefix": ("auto", "", " "),
    "toy_labeler.data": toy_world.LABELER_DATA,
    "dpo.loss_type": LOSS_TYPES,
    "dpo.remat": REMAT_CHOICES,
    "dpo.master_dtype": tuple(FLOAT_DTYPES),
    "dpo.optimizer_state_dtype": tuple(FLOAT_DTYPES),
}
_ONLINE_POSITIVE = ("iterations", "sampling.num_samples", "sampling.max_new_tokens", "sampling.batch_size",
                    "claims.batch_size", "claims.llm_batch_size", "labeler.batch_size", "pairs.per_prompt",
                    "pairs.min_score_gap",
                    "dpo.batch_size", "dpo.grad_accum", "dpo.epochs", "dpo.checkpoints_per_epoch", "dpo.max_length",
                    "eval.max_new_tokens",
                    "eval.batch_size", "dpo.beta", "dpo.learning_rate", "world.n_warmstart", "world.n_prompts",
                    "world.n_eval", "warmstart.steps", "warmstart.batch_size", "warmstart.learning_rate")
_ONLINE_NONNEG = ("prompts.per_iteration", "sampling.top_k", "sampling.temperature", "sampling.decode_rows",
                  "claims.decode_rows", "eval.decode_rows", "dpo.max_steps",
                  "dpo.label_smoothing", "dpo.weight_decay", "dpo.warmup_ratio", "dpo.sft_weight")

_OFFLINE_CHOICES = {
    "policy.dtype": tuple(sorted(hf.DTYPES)),
    "policy.param_dtype": tuple(sorted(hf.DTYPES)),
    "dpo.loss_type": LOSS_TYPES,
    "dpo.remat": REMAT_CHOICES,
    "dpo.master_dtype": tuple(FLOAT_DTYPES),
    "dpo.optimizer_state_dtype": tuple(FLOAT_DTYPES),
    "policy.template": TEMPLATES,
    "dpo.schedule": ("cosine", "constant"),
    "dpo.best_mode": ("min", "max"),
    "dpo.best_metric": ("",) + METRIC_NAMES + ("grad_norm",),
    "export.checkpoints": EXPORT_CHOICES,
}
_OFFLINE_POSITIVE = ("dpo.batch_size", "dpo.grad_accum", "dpo.epochs", "dpo.ref_batch_size",
                     "dpo.checkpoints_per_epoch", "dpo.log_every", "dpo.max_length", "dpo.beta",
                     "dpo.learning_rate")
_OFFLINE_NONNEG = ("dpo.max_to_keep", "dpo.max_steps", "data.max_pairs", "eval.decode_rows", "dpo.warmup_ratio",
                   "dpo.weight_decay", "dpo.label_smoothing", "dpo.sft_weight")

# The architectures DPO trains (the others work as labelers).
POLICY_ARCHITECTURES = ("LlavaForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration",
                        "Qwen3VLForConditionalGeneration")


def field_value(c: ml_collections.ConfigDict, field: str, default: Any = _MISSING) -> Any:
    """The value of dotted ``field`` in ``c``; ``default`` when ``c`` lacks it (``KeyError`` without one)."""
    for part in field.split("."):
        if not isinstance(c, (ml_collections.ConfigDict, dict)) or part not in c:
            if default is _MISSING:
                raise KeyError(field)
            return default
        c = c[part]
    return c


class Problems:
    """Collects one line per invalid field of config ``c``; fields the config lacks are skipped."""

    def __init__(self, c: ml_collections.ConfigDict):
        self.c = c
        self.lines: list[str] = []
        self.prompts: tuple[list, Any] | None = None  # what the prompt file check read

    def add(self, line: str) -> None:
        self.lines.append(line)

    def value(self, field: str) -> Any:
        return field_value(self.c, field, _MISSING)

    def number(self, field: str) -> float | None:
        """The field's value if it is a number (else a problem line and None)."""
        v = self.value(field)
        if v is _MISSING:
            return None
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            self.add(f"{field}={v!r} must be a number")
            return None
        return v

    def choice(self, field: str, choices: tuple) -> None:
        v = self.value(field)
        if v is not _MISSING and v not in choices:
            self.add(f"{field}={v!r} must be one of {', '.join(map(repr, choices))}")

    def positive(self, *fields: str) -> None:
        for field in fields:
            v = self.number(field)
            if v is not None and not v > 0:
                self.add(f"{field}={v!r} must be > 0")

    def nonneg(self, *fields: str) -> None:
        for field in fields:
            v = self.number(field)
            if v is not None and v < 0:
                self.add(f"{field}={v!r} must be >= 0")

    def hf_dir(self, field: str, multimodal: bool, trainable: bool = False, assets: bool = False) -> str | None:
        """Check a Hugging Face directory (its config is loaded); returns its architecture."""
        path = self.value(field)
        if not path:
            self.add(f"{field} is empty: give a local Hugging Face checkpoint directory")
            return None
        remote = paths.is_remote(path)
        if not remote and not os.path.isdir(path):
            self.add(f"{field}={path!r} is not a directory")
            return None
        try:
            arch, _ = hf.read_config(path)
        except (OSError, ValueError, KeyError) as e:
            self.add(f"{field}={path!r}: {e}")
            return None
        if multimodal and not arch.startswith(("Llava", "Qwen")):
            self.add(f"{field}={path!r}: {arch} is not a multimodal model")
        if trainable and arch not in POLICY_ARCHITECTURES:
            self.add(f"{field}={path!r}: {arch} cannot be the policy yet (DPO trains "
                     f"{', '.join(POLICY_ARCHITECTURES)}; LLaVA-NeXT works as a labeler)")
        if assets and not remote:
            if not any(os.path.exists(os.path.join(path, f)) for f in
                       ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
                self.add(f"{field}={path!r} has no tokenizer (tokenizer.json / tokenizer_config.json)")
            if multimodal and not os.path.exists(os.path.join(path, "preprocessor_config.json")):
                self.add(f"{field}={path!r} has no image processor (preprocessor_config.json)")
        return arch


def _image_tokens(problems: Problems, path: str) -> int | None:
    """Image tokens per prompt of the Hugging Face LLaVA model at ``path`` (shapes only); None when
    the count depends on the image (Qwen2.5-VL: the encode stage counts pairs that do not fit)."""
    from rlaifv_jax.stages.bundle import abstract_model
    try:
        model = abstract_model(path)
        return None if hasattr(model, "vision_inputs") else int(model.num_image_tokens())
    except Exception as e:  # noqa: BLE001 - an unreadable/unsupported config is already reported
        problems.add(f"cannot build the model of {path!r} from its config.json ({type(e).__name__}: {e})")
        return None


def _max_length(problems: Problems, field: str, image_tokens: int | None) -> None:
    n = problems.number(field)
    if image_tokens is not None and n is not None and n <= image_tokens + 8:
        problems.add(f"{field}={n} leaves no room for text: the policy's image alone takes {image_tokens} "
                     f"tokens (use > {image_tokens + 8})")


def _mesh(problems: Problems, batch_fields: tuple[str, ...], accum_field: str, devices: int | None = None) -> None:
    """The mesh against the device count (``devices``, default this run's); DPO batch sizes against the
    data-parallel size."""
    sizes = [problems.number(f"mesh.{a}") for a in ("data", "fsdp", "tensor")]
    if any(s is None for s in sizes):
        return
    if any(s != -1 and s < 1 for s in sizes) or sizes.count(-1) > 1 or any(s != int(s) for s in sizes):
        problems.add(f"mesh (data, fsdp, tensor)={tuple(sizes)}: each must be a positive integer, or -1 for "
                     "one axis (all remaining devices)")
        return
    devices = jax.device_count() if devices is None else devices
    known = math.prod(s for s in sizes if s != -1)
    if (-1 in sizes and devices % known) or (-1 not in sizes and known != devices):
        problems.add(f"mesh (data, fsdp, tensor)={tuple(sizes)} does not fit the {devices} devices "
                     "(the product must equal the device count; -1 fills one axis)")
        return
    resolved = [devices // known if s == -1 else s for s in sizes]
    dp = resolved[0] * resolved[1]
    accum = problems.number(accum_field) or 1
    for field in batch_fields:
        b = problems.number(field)
        if b and b % (dp * accum):
            problems.add(f"{field}={b} must be a multiple of the data-parallel size {dp} (mesh.data × mesh.fsdp)"
                         + (f" × {accum_field}={accum}" if accum > 1 else ""))


def _wandb(problems: Problems) -> None:
    if problems.value("log.wandb") is True and importlib.util.find_spec("wandb") is None:
        problems.add("log.wandb=True but the wandb package is not installed (pip install 'rlaifv_jax[wandb]')")


def _every_epochs(p: Problems) -> float | None:
    """``eval.every_epochs``: 0 (off: None) or 1/N for a whole N."""
    every = p.number("eval.every_epochs")
    if not every:
        return None
    if not 0 < every <= 1 or abs(1 / every - round(1 / every)) > 1e-6:
        p.add(f"eval.every_epochs={every!r} must be 0 (off) or 1/N for a whole N (1, 0.5, 0.25, ...)")
    return every


def _selection(p: Problems) -> None:
    """``eval.every_epochs``, ``eval.select_metric`` and ``eval.select_mode`` (online, toy CHAIR)."""
    from rlaifv_jax.stages.measure import DIRECTIONS
    every = _every_epochs(p)
    if every is None:
        return
    p.choice("eval.select_metric", tuple(DIRECTIONS))
    p.choice("eval.select_mode", ("", "min", "max"))
    if p.value("source") != "toy":
        p.add(f"eval.every_epochs={every!r}: checkpoint selection scores checkpoints with the online loop's "
              "evaluation, exact CHAIR of the toy world (source='toy'); the benchmark suites "
              "(python -m rlaifv_jax.evaluate) do not run inside the online loop yet; use 0")


def _online_files(p: Problems) -> None:
    """The prompt file (read now, every line, for the spec) and the checkpoint directories of source='files'."""
    c = p.c
    path = c.prompts.path
    if not path:
        p.add("prompts.path is empty: source='files' reads prompts from a JSONL file")
    elif not os.path.isfile(path):
        p.add(f"prompts.path={path!r} is not a file")
    else:
        from rlaifv_jax.pipelines import inputs
        try:
            p.prompts = inputs.read_prompts(path, c.prompts.image_root, c.prompts.allow_outside_root)
        except UserError as e:
            p.add(str(e))
    if p.hf_dir("policy.path", multimodal=True, trainable=True, assets=True):
        _max_length(p, "dpo.max_length", _image_tokens(p, c.policy.path))
    if c.claims.kind == "llm":
        p.hf_dir("claims.split_path", multimodal=False)
        if c.claims.convert_path:
            p.hf_dir("claims.convert_path", multimodal=False)


def _online(p: Problems, paths: bool = True, devices: int | None = None) -> None:
    """The online checks; ``paths=False`` leaves out the files and checkpoint directories, ``devices``
    replaces this machine's device count (planning for a slice)."""
    c = p.c
    for field, choices in _ONLINE_CHOICES.items():
        p.choice(field, choices)
    p.positive(*_ONLINE_POSITIVE)
    p.nonneg(*_ONLINE_NONNEG)
    for field in ("sampling.repetition_penalty", "labeler.repetition_penalty"):
        v = p.number(field)
        if v is not None and not v > 0:
            p.add(f"{field}={v} must be > 0 (1.0: off)")
    top_p = p.number("sampling.top_p")
    if top_p is not None and not 0 < top_p <= 1:
        p.add(f"sampling.top_p={top_p} must be in (0, 1]")
    r = p.number("pairs.length_ratio")
    if r is not None and r != -1 and not (0 <= r < 1 and abs(r * 50 - round(r * 50)) < 1e-6):
        p.add(f"pairs.length_ratio={r} must be -1 (search) or one of 0, 0.02, ..., 0.98")
    n = p.number("sampling.num_samples")
    if n is not None and n < 2:
        p.add(f"sampling.num_samples={n} must be >= 2: pairs come from a prompt's different responses")
    _mesh(p, ("dpo.batch_size",), "dpo.grad_accum", devices)
    _wandb(p)
    _selection(p)
    if c.source == "toy":
        if c.claims.kind != "rule":
            p.add(f"claims.kind={c.claims.kind!r}: source='toy' uses 'rule' (the toy language has its rule-based "
                  "splitter)")
        if c.policy.path:
            p.add(f"policy.path={c.policy.path!r}: source='toy' builds its own policy; leave it empty")
        if "chat" in (c.policy.template, c.labeler.template):
            p.add("policy.template / labeler.template: source='toy' uses 'llava_v1' (the toy tokenizer has no "
                  "chat template)")
        patch = p.number("model.patch")
        if patch:
            size = toy_world.WorldSettings().image_size
            if size % patch:
                p.add(f"model.patch={patch} must divide the toy image size {size}")
            else:
                _max_length(p, "dpo.max_length", (size // patch) ** 2)
    elif c.source == "files":
        if c.claims.kind == "rule":
            p.add("claims.kind='rule': source='files' needs 'llm' (the rule-based splitter reads only the toy "
                  "language)")
        if paths:
            _online_files(p)
    if c.labeler.kind == "model":
        if paths:
            p.hf_dir("labeler.path", multimodal=True, assets=True)
    elif c.labeler.path:
        p.add(f"labeler.path={c.labeler.path!r}: labeler.kind={c.labeler.kind!r} builds its labeler; leave it empty")
    if c.labeler.kind == "toy" and c.source != "toy":
        p.add("labeler.kind='toy' (a larger toy labeler) needs source='toy'")


def data_paths(spec: str) -> list[str]:
    """``data.path`` (comma-separated files, directories or globs) → paths; ``ConfigError`` when a
    part matches nothing, names a missing file, or a directory with no data file."""
    out: list[str] = []
    problems = []
    for part in [q.strip() for q in str(spec).split(",") if q.strip()]:
        matches = sorted(glob.glob(part)) if any(ch in part for ch in "*?[") else [part]
        if not matches:
            problems.append(f"data.path: {part!r} matches no file")
        for m in matches:
            if os.path.isdir(m):
                if not any(f.endswith(DATA_SUFFIXES) for f in os.listdir(m)):
                    problems.append(f"data.path: directory {m!r} holds no {' / '.join(DATA_SUFFIXES)} file")
            elif not os.path.isfile(m):
                problems.append(f"data.path: {m!r} does not exist")
            elif not m.endswith(DATA_SUFFIXES):
                problems.append(f"data.path: {m!r} is not a {' / '.join(DATA_SUFFIXES)} file")
        out.extend(matches)
    if problems:
        raise ConfigError(problems)
    if not out:
        raise ConfigError("data.path is empty: give RLAIF-V-Dataset parquet/JSONL files or a directory of them")
    return out


def _offline(p: Problems) -> None:
    c = p.c
    for field, choices in _OFFLINE_CHOICES.items():
        p.choice(field, choices)
    if c.export.dtype:
        p.choice("export.dtype", tuple(sorted(hf.DTYPES)))
    p.positive(*_OFFLINE_POSITIVE)
    p.nonneg(*_OFFLINE_NONNEG)
    _mesh(p, ("dpo.batch_size",), "dpo.grad_accum")
    ref = p.number("dpo.ref_batch_size")
    local = jax.local_device_count()
    if ref and ref % local:
        p.add(f"dpo.ref_batch_size={ref} must be a multiple of this host's {local} devices (the reference "
              "pass splits each batch over them)")
    _wandb(p)
    try:
        data_paths(c.data.path)
    except ConfigError as e:
        p.lines.extend(e.problems)
    if p.hf_dir("policy.path", multimodal=True, trainable=True, assets=True):
        _max_length(p, "dpo.max_length", _image_tokens(p, c.policy.path))
    _offline_selection(p)


def _offline_selection(p: Problems) -> None:
    """``eval.*`` of offline DPO: a suite, its files and a named metric with its direction."""
    if _every_epochs(p) is None:
        return
    p.choice("eval.suite", SELECT_SUITES)
    p.choice("eval.select_mode", ("min", "max"))
    p.nonneg("eval.limit", "eval.num_beams", "eval.max_new_tokens")
    p.positive("eval.batch_size")
    if not p.value("eval.select_metric"):
        p.add("eval.select_metric is empty: name one of the suite's metrics (e.g. mention_hall)")
    data = p.value("eval.data")
    if not data or not os.path.exists(data):
        p.add(f"eval.data={data!r} does not exist: give the suite's files (docs/EVALUATION.md)")
    images = p.value("eval.images")
    if images and not os.path.isdir(images):
        p.add(f"eval.images={images!r} is not a directory")
    if p.value("export.checkpoints") not in (_MISSING, "last"):
        p.add(f"export.checkpoints={p.value('export.checkpoints')!r}: with eval.every_epochs > 0 the selected "
              "checkpoint is exported; use 'last'")


@dataclasses.dataclass(frozen=True)
class Checked:
    """What validation had to read anyway, handed on to the spec so that nothing is read twice."""

    prompts: tuple[list, Any] | None = None  # the prompt file's usable records and report (source="files")


def validate(c: ml_collections.ConfigDict, mode: str | None = None, *, paths: bool = True,
             devices: int | None = None) -> Checked:
    """Raise ``ConfigError`` listing every invalid field of ``c`` for ``mode`` (default ``c.mode``);
    else return what the checks read (``Checked``). ``paths=False`` (online only: the planner) checks
    every setting but no file or checkpoint directory; ``devices`` (online only: the planner) checks
    the mesh against a slice's device count instead of this machine's."""
    mode = mode or field_value(c, "mode", "online")
    p = Problems(c)
    if c.get("mode", mode) != mode or mode not in MODES:
        p.add(f"mode={c.get('mode')!r} must be {mode!r} here" if mode in MODES else
              f"mode={mode!r} must be one of {', '.join(map(repr, MODES))}")
        raise ConfigError(p.lines)
    if mode == "online":
        _online(p, paths, devices)
    else:
        _offline(p)
    if p.lines:
        raise ConfigError(p.lines)
    return Checked(prompts=p.prompts)
