"""A tiny LLaVA checkpoint (with tokenizer and image processor) and a tiny RLAIF-V-schema parquet file,
shared by the offline DPO tests (``setup`` is a module-scoped fixture: import it into a test module)."""
import io
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import CLIPImageProcessor, PreTrainedTokenizerFast

import tiny_hf
from configs import offline_dpo

SYSTEM = ("A chat between a curious human and an artificial intelligence assistant . The assistant gives "
          "helpful , detailed , and polite answers to the human ' s questions").split()
WORDS = "USER ASSISTANT : what is in the image ? a red blue green circle square there".split()


def build_tokenizer():
    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    words = list(dict.fromkeys(specials + SYSTEM + WORDS))
    words += [f"w{i}" for i in range(tiny_hf.IMAGE_TOKEN - len(words))] + ["<image>"]
    assert len(words) == tiny_hf.VOCAB and words.index("<image>") == tiny_hf.IMAGE_TOKEN
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", additional_special_tokens=["<image>"])


def png(color, rng):
    arr = np.clip(np.asarray(color)[None, None] + rng.integers(-20, 20, (20, 24, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("offline")
    model_dir = root / "policy"
    tiny_hf.llava(model_dir, seed=3, text={"pad_token_id": 3})
    build_tokenizer().save_pretrained(model_dir)
    CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}).save_pretrained(model_dir)
    rng = np.random.default_rng(0)
    colors = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 30)}
    rows = []
    for i in range(24):
        c = list(colors)[i % 3]
        wrong = list(colors)[(i + 1) % 3]
        shape = "circle" if i % 2 else "square"
        rows.append({"ds_name": "toy", "image": {"bytes": png(colors[c], rng), "path": None},
                     "question": "what is in the image ?", "chosen": f"a {c} {shape}",
                     "rejected": f"a {wrong} {shape} there", "origin_dataset": "unit",
                     "origin_split": json.dumps({"model": "toy"}), "idx": i, "image_path": None})
    rows.append(dict(rows[0], idx=99, chosen=rows[0]["rejected"]))  # chosen == rejected: skipped
    pq.write_table(pa.Table.from_pylist(rows), root / "train-0.parquet")
    return root, model_dir


def policy_params(directory, step) -> dict[str, np.ndarray]:
    """A policy checkpoint's flat parameters as saved (numpy)."""
    import orbax.checkpoint as ocp
    from rlaifv_jax.core.checkpoint import Checkpointer
    with Checkpointer(str(directory), max_to_keep=None, async_save=False) as ckpt:
        out = ckpt.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(),
                                                                 extra=ocp.args.JsonRestore()))
    return {k: np.asarray(v) for k, v in out["state"].items()}


def offline_config(root, model_dir, data):
    """A quick offline DPO config on the tiny policy: 3 steps of an 80-token, float32 run."""
    c = offline_dpo.get_config()
    c.data.path, c.dpo.max_length = str(data), 80
    c.policy.path, c.policy.dtype = str(model_dir), "float32"
    c.dpo.learning_rate, c.dpo.checkpoints_per_epoch, c.dpo.epochs = 2e-3, 3, 2  # 3 steps an epoch
    c.dpo.max_steps = 3  # a quick trial: the first 3 of 6 steps (the schedule spans 3)
    c.dpo.max_to_keep, c.export.checkpoints, c.export.dtype = 2, "all", ""
    c.progress = False
    return c


def read_rows(root):
    """The fixture parquet's rows as dicts."""
    return pq.read_table(root / "train-0.parquet").to_pylist()


def write_rows(path, rows):
    """Write ``rows`` as a parquet file at ``path``."""
    os.makedirs(path.parent, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
