"""The one export of a trained policy (online and offline alike): a Hugging Face directory that
``AutoProcessor`` + ``AutoModelForImageTextToText`` load and generate from.

``save(model, path, assets_from=...)`` writes the weights and ``config.json``
(``models.hf.save_pretrained``), copies the tokenizer, image processor, processor, chat template
and ``generation_config.json`` of ``assets_from`` and, when that directory has no
``processor_config.json`` (a checkpoint saved as tokenizer + image processor only), builds the
processor from the tokenizer, the image processor and the model config with transformers' own
classes, so the export is complete either way.
"""
from __future__ import annotations

import json
import os
import tempfile

import jax
from flax import nnx

from rlaifv_jax.core import paths
from rlaifv_jax.models import hf

PROCESSOR_FILES = ("processor_config.json", "chat_template.json", "chat_template.jinja")


def _processor_class(model_type: str):
    from transformers import LlavaNextProcessor, LlavaProcessor
    return {"llava": LlavaProcessor, "llava_next": LlavaNextProcessor}.get(model_type)


def write_processor(source: str, dest: str) -> bool:
    """If the local Hugging Face directory ``source`` has a tokenizer and an image processor but no
    ``processor_config.json``, build its processor (transformers' ``LlavaProcessor`` /
    ``LlavaNextProcessor`` from ``AutoTokenizer`` + ``AutoImageProcessor`` + the model config) and
    write the processor's own files (``processor_config.json``, chat template) into ``dest`` (local
    or ``gs://``). Returns whether it wrote them; other architectures are left as they are."""
    if os.path.exists(os.path.join(source, "processor_config.json")):
        return False
    with open(os.path.join(source, "config.json")) as f:
        cfg = json.load(f)
    cls = _processor_class(cfg.get("model_type", ""))
    if cls is None or not os.path.exists(os.path.join(source, "preprocessor_config.json")):
        return False
    from transformers import AutoImageProcessor, AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
    image_processor = AutoImageProcessor.from_pretrained(source, local_files_only=True)
    vision = cfg.get("vision_config", {})
    image_token_id = cfg.get("image_token_index", cfg.get("image_token_id"))
    processor = cls(image_processor=image_processor, tokenizer=tokenizer, patch_size=vision.get("patch_size"),
                    vision_feature_select_strategy=cfg.get("vision_feature_select_strategy", "default"),
                    chat_template=getattr(tokenizer, "chat_template", None),
                    image_token=tokenizer.convert_ids_to_tokens(image_token_id) if image_token_id is not None
                    else "<image>",
                    # CLIP towers put a CLS token before the patches (LLaVA's "default" strategy drops it)
                    num_additional_image_tokens=1 if vision.get("model_type", "").startswith("clip") else 0)
    with tempfile.TemporaryDirectory() as tmp:  # only the processor's own files are taken over
        processor.save_pretrained(tmp)
        for name in PROCESSOR_FILES:
            if os.path.exists(os.path.join(tmp, name)):
                paths.copy_file(os.path.join(tmp, name), os.path.join(dest, name))
    return True


def save(model: nnx.Module, path: str, *, assets_from: str | None, dtype=None) -> None:
    """Export ``model`` to ``path`` (every process calls it; process 0 writes), see the module docstring."""
    hf.save_pretrained(model, path, dtype=dtype, assets_from=assets_from)
    if jax.process_index() == 0 and assets_from:
        write_processor(assets_from, path)
