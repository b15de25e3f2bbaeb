"""The online export (the toy world's warm-started policy through ``pipelines.export``) loads with
``AutoProcessor`` + ``AutoModelForImageTextToText``, preprocesses images exactly as the run did and
generates (the offline export: test_ux_offline.py)."""
import os

import numpy as np
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from configs import default
from rlaifv_jax.data import toy_world
from rlaifv_jax.models import hf
from rlaifv_jax.pipelines import export, warmstart


def test_online_export_loads_with_auto_processor_and_generates(tmp_path):
    c = default.get_config("smoke")
    c.warmstart.steps, c.warmstart.batch_size = 2, 8
    world = toy_world.WorldSettings()
    records = toy_world.warmstart_split(world, 8, seed=0)
    warm = warmstart.warm_start(c.model, c.warmstart, world, records, str(tmp_path / "warm"), seed=0, progress=False)
    assert os.path.exists(os.path.join(warm, "processor_config.json"))  # written with the warm start
    out = str(tmp_path / "export")
    export.save(hf.load_pretrained(warm), out, assets_from=warm)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json",
                 "processor_config.json"):
        assert os.path.exists(os.path.join(out, name)), name

    processor = AutoProcessor.from_pretrained(out)
    model = AutoModelForImageTextToText.from_pretrained(out)
    image = records[0]["image"]
    inputs = processor(images=image, text="USER: <image>\ndescribe the image . ASSISTANT:", return_tensors="pt")
    np.testing.assert_allclose(inputs["pixel_values"][0].numpy(), toy_world.encode_image(image), atol=1e-6)
    n_image = int((inputs["input_ids"] == model.config.image_token_id).sum())
    assert n_image == hf.load_pretrained(warm).num_image_tokens() == 16
    with torch.no_grad():
        tokens = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert inputs["input_ids"].shape[1] < tokens.shape[1] <= inputs["input_ids"].shape[1] + 5  # it may end early
