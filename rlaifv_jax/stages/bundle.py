"""One way to load a model for a stage: weights (a Hugging Face directory, optionally overlaid with
an Orbax policy checkpoint), tokenizer, chat template and image encoder, freed when the stage ends."""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import threading
import time
import zlib
from typing import Any, Callable, Iterator

import jax
import numpy as np
from flax import nnx

from rlaifv_jax.core import sharding
from rlaifv_jax.core.checkpoint import Checkpointer
from rlaifv_jax.core.tree import flat_values, unflat_values
from rlaifv_jax.data import chat, prompts as prompts_lib
from rlaifv_jax.data.pairs import pad_pair
from rlaifv_jax.engine.logps import pair_image_arrays
from rlaifv_jax.engine.vision import layout_key
from rlaifv_jax.models import hf

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ModelSettings:
    """Where a stage's model comes from and how it runs."""

    path: str  # Hugging Face directory: config.json, safetensors, tokenizer, image processor
    template: str = "llava_v1"  # chat format: llava_v1 or chat (the tokenizer's template)
    dtype: str = "float32"  # compute dtype
    param_dtype: str | None = None  # stored weights (default: dtype)
    toy: bool = False  # toy-world pixels instead of the checkpoint's image processor
    checkpoint: str | None = None  # Orbax directory of policy checkpoints overlaid on the weights
    step: int | None = None  # which checkpoint (None or 0: the Hugging Face weights as they are)


@dataclasses.dataclass
class Bundle:
    """A loaded model with what it needs to read prompts."""

    spec: ModelSettings
    model: nnx.Module
    tokenizer: Any
    encode_image: prompts_lib.ImageEncoder
    # Held around every use of ``tokenizer`` while a stage's helper thread may use it too
    # (``records.Prefetched``): a fast tokenizer is not safe to call from two threads at once. Bundles
    # loaded from one checkpoint share its tokenizer and this lock (``load``).
    tokenizer_lock: Any = dataclasses.field(default_factory=threading.RLock)

    @property
    def template(self) -> str:
        return self.spec.template

    def prompt(self, record: dict[str, Any]) -> dict[str, Any]:
        """Sampler/labeler input for a prompt record: ids with the image placeholder expanded, pixels
        and their layout (``image_sizes``, or ``image_grid_thw`` for Qwen2.5-VL)."""
        pixel_values, image_sizes = self.encode_image(record["image"])
        size = None if image_sizes is None else tuple(np.asarray(image_sizes)[0])
        with self.tokenizer_lock:
            ids = chat.encode_prompt(self.tokenizer, record["question"], self.model.num_image_tokens(size),
                                     image_token_id=self.model.config.image_token_id, template=self.template)
        return {"id": zlib.crc32(str(record["id"]).encode()), "input_ids": ids.tolist(),
                "pixel_values": pixel_values, layout_key(self.model): image_sizes}

    def stop_ids(self) -> list[int]:
        return [chat.end_of_turn_id(self.tokenizer, self.template)]

    def free(self) -> None:
        """Delete the model's device arrays now (peak memory is then one stage's models)."""
        for leaf in jax.tree.leaves(nnx.state(self.model)):
            if isinstance(leaf, jax.Array) and not leaf.is_deleted():
                leaf.delete()


def tokenizer(path: str):
    """The checkpoint's tokenizer, from local files only; read once per directory and version of its
    files within a process (the online loop's stages load the same checkpoints every iteration, and
    nothing here changes a tokenizer). The object is shared: code that uses it beside a stage's
    helper thread takes its bundle's ``tokenizer_lock``."""
    return _shared_tokenizer(path)[0]


def _shared_tokenizer(path: str) -> tuple[Any, Any]:
    """``(tokenizer, lock)`` of the checkpoint at ``path``, keyed by the version of its files."""
    return _tokenizer(path, _files_version(path))


def _files_version(path: str) -> tuple:
    """(name, size, mtime) of the files of a local directory (``()`` for a remote path): a cache key
    that changes when a checkpoint is rewritten in place."""
    if not os.path.isdir(path):
        return ()
    try:
        return tuple(sorted((e.name, e.stat().st_size, e.stat().st_mtime_ns) for e in os.scandir(path) if e.is_file()))
    except OSError:  # files changing under the scan: a key no other call gives (read anew)
        return (time.monotonic_ns(),)


@functools.lru_cache(maxsize=8)
def _tokenizer(path: str, version: tuple) -> tuple[Any, Any]:
    """The tokenizer and the lock every bundle holding it takes around its use (one tokenizer object
    may serve several bundles at once)."""
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(path, local_files_only=True), threading.RLock()


def _text_only(image: np.ndarray):
    raise ValueError("a text-only model was given an image")


def pad_id(tok) -> int:
    """The id that pads token rows: the tokenizer's pad token, else EOS, else 0."""
    for candidate in (tok.pad_token_id, tok.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


def image_encoder(spec: ModelSettings) -> prompts_lib.ImageEncoder:
    """The image encoder of ``spec``'s model (toy pixels, or the checkpoint's processor)."""
    if spec.toy:
        return prompts_lib.toy_image_encoder
    architecture, _ = hf.read_config(spec.path)
    if not hasattr(hf.ARCHITECTURES[architecture][0], "image_features"):  # a text-only LLM (claims)
        def no_images(image: np.ndarray) -> tuple[np.ndarray, Any]:
            raise ValueError(f"{spec.path}: {architecture} is a text-only model; it reads no images")
        return no_images
    return prompts_lib.hf_image_encoder(spec.path, architecture)


def abstract_model(path: str) -> nnx.Module:
    """The model of a Hugging Face directory built abstractly (shapes only; no weights are read)."""
    architecture, cfg = hf.read_config(path)
    return nnx.eval_shape(lambda: hf.build_model(architecture, cfg))


def restore_params(model: nnx.Module, directory: str, step: int) -> dict[str, Any]:
    """Overlay ``model``'s parameters with Orbax checkpoint ``step`` of ``directory`` (same sharding);
    returns the checkpoint's JSON side-car.

    A model on this process's own devices (an inference stage) is restored by this process alone,
    read-only, with no cross-host synchronisation (a host with no work loads nothing); a model
    sharded over every host is restored collectively."""
    state = nnx.state(model, nnx.Param)
    values = flat_values(state)
    target = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=v.sharding) for k, v in values.items()}
    local = all(v.is_fully_addressable for v in values.values())
    if local and jax.process_count() > 1:
        import orbax.checkpoint as ocp
        me = jax.process_index()
        options = ocp.CheckpointManagerOptions(read_only=True, multiprocessing_options=ocp.options.MultiprocessingOptions(
            primary_host=me, active_processes={me}))
        manager = ocp.CheckpointManager(directory, options=options)
        try:
            out = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                                                extra=ocp.args.JsonRestore()))
        finally:
            manager.close()
        restored, extra = out["state"], dict(out["extra"] or {})
    else:
        with Checkpointer(directory, max_to_keep=None, async_save=False) as ckpt:
            restored, extra = ckpt.restore(step, target)
    nnx.update(model, unflat_values(state, restored))
    return extra


def save_params(model: nnx.Module, directory: str, step: int, extra: dict[str, Any] | None = None) -> None:
    """Write ``model``'s parameters as Orbax checkpoint ``step`` of ``directory`` (every process
    calls it; Orbax writes collectively), waiting until it is complete."""
    with Checkpointer(directory, max_to_keep=None, async_save=False) as ckpt:
        ckpt.save(step, flat_values(nnx.state(model, nnx.Param)), extra or {}, force=True)


def saved_steps(directory: str) -> list[int]:
    """Complete checkpoints of ``directory`` (none if it does not exist)."""
    if not os.path.isdir(directory):
        return []
    with Checkpointer(directory, max_to_keep=None, async_save=False) as ckpt:
        return ckpt.all_steps()


def load(spec: ModelSettings, mesh, *, training: bool = False) -> Bundle:
    """Load ``spec`` onto ``mesh``. For training: ``TRAIN_RULES`` (fsdp/tensor-sharded) and weights
    in ``param_dtype`` (the master weights); for inference: the serving layout (``SERVE_RULES``:
    replicated over ``data``, split over ``tensor``) and weights in the compute ``dtype``."""
    dtype = hf.parse_dtype(spec.dtype)
    rules = sharding.TRAIN_RULES if training else sharding.SERVE_RULES
    stored = spec.param_dtype if training and spec.param_dtype else spec.dtype
    model = hf.load_pretrained(spec.path, dtype=dtype, param_dtype=hf.parse_dtype(stored),
                               shardings=lambda state: sharding.state_shardings(state, mesh, rules))
    if spec.checkpoint and spec.step:
        restore_params(model, spec.checkpoint, spec.step)
    encoder = image_encoder(spec) if hasattr(model, "tile_features") else _text_only
    tok, lock = _shared_tokenizer(spec.path)
    return Bundle(spec, model, tok, encoder, lock)


@contextlib.contextmanager
def loaded(spec: ModelSettings, mesh, *, training: bool = False) -> Iterator[Bundle]:
    """``load`` for the duration of a ``with`` block, freed on exit."""
    bundle = load(spec, mesh, training=training)
    try:
        yield bundle
    finally:
        bundle.free()


def pair_example(record: dict[str, Any], pixel_values: np.ndarray, *, max_length: int,
                 pad_id: int) -> dict[str, np.ndarray]:
    """Fixed-shape arrays of one encoded pair (``stages/encode`` record): ``pixel_values``, the padded
    tokens of ``data.pairs.pad_pair`` (the inputs of ``engine.logps.pair_logps``), ``weights`` (1, or 0 for
    a padding row), plus any ``ref_*`` log-probs."""
    out = {"pixel_values": pixel_values,
           **pad_pair(record["prompt_ids"], record["chosen_ids"], record["rejected_ids"], max_length=max_length,
                      pad_id=pad_id),
           "weights": np.float32(record.get("weight", 1.0))}  # 0 for padding rows
    for key in ("ref_chosen_logps", "ref_rejected_logps"):
        if key in record:
            out[key] = np.float32(record[key])
    return out


def pair_example_fn(image_of: Callable[[str], np.ndarray], b: Bundle, max_length: int
                    ) -> Callable[[dict[str, Any]], dict[str, np.ndarray]]:
    """``pair_example`` with the pair's pixels from ``image_of(image_key)`` through the bundle's encoder
    (Qwen2.5-VL: plus its tower layout and positions, ``engine.logps.pair_image_arrays``); the batches
    of the reference pass and of DPO."""
    pad = pad_id(b.tokenizer)
    max_patches = getattr(b.encode_image, "max_patches", None)

    def fn(rec: dict[str, Any]) -> dict[str, np.ndarray]:
        pixel_values, layout = b.encode_image(image_of(rec["image_key"]))
        image = pair_image_arrays(b.model, pixel_values, layout, rec["prompt_ids"], max_length, max_patches=max_patches)
        return {**pair_example(rec, image.pop("pixel_values"), max_length=max_length, pad_id=pad), **image}

    return fn
