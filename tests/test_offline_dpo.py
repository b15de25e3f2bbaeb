"""End to end: offline DPO of a tiny LLaVA on a tiny RLAIF-V-schema parquet file, export to HF."""
import io
import json
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import CLIPImageProcessor, LlavaForConditionalGeneration, PreTrainedTokenizerFast

import tiny_hf
from rlaifv_jax.core import records
from rlaifv_jax.pipelines import offline

sys.path.insert(0, str(__import__("pathlib").Path(__file__).parents[1] / "configs"))
import offline_dpo  # noqa: E402

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


def test_offline_dpo_end_to_end(setup, tmp_path):
    root, model_dir = setup
    config = offline_dpo.get_config()
    config.data.path = str(root / "*.parquet")
    config.dpo.max_length = 80
    config.policy.path = str(model_dir)
    config.policy.dtype = "float32"
    config.dpo.learning_rate = 2e-3
    config.dpo.epochs = 4  # 24 pairs / batch 8 = 3 steps per epoch
    config.dpo.checkpoints_per_epoch = 1
    config.dpo.max_to_keep = 2
    config.export.dtype = ""  # float32, so unchanged weights compare exactly
    summary = offline.run(config, str(tmp_path))
    assert summary["pairs"] == 24 and summary["skipped"] == {"chosen_equals_rejected": 1}
    assert summary["steps"] == 12 and summary["checkpoint_every"] == 3
    rows = [json.loads(line) for line in open(tmp_path / "train" / "metrics.jsonl")]
    assert [r["step"] for r in rows] == list(range(1, 13))
    assert abs(rows[0]["loss"] - np.log(2)) < 1e-5  # policy == reference at step 0
    first, last = rows[:3], rows[-3:]
    mean = lambda rs, k: float(np.mean([r[k] for r in rs]))  # noqa: E731
    assert mean(last, "loss") < mean(first, "loss") - 0.05, rows
    assert mean(last, "rewards/accuracies") > mean(first, "rewards/accuracies") + 0.3, rows
    assert all(k in rows[0] for k in ("grad_norm", "learning_rate", "logps/ref_chosen", "rewards/margins"))
    assert (tmp_path / "train" / "tensorboard").is_dir() and records.stage_done(str(tmp_path / "ref_logps"))

    export = tmp_path / "export"
    back = LlavaForConditionalGeneration.from_pretrained(str(export))
    orig = LlavaForConditionalGeneration.from_pretrained(str(model_dir))
    sd_new, sd_old = back.state_dict(), orig.state_dict()
    changed = [k for k in sd_old if not np.allclose(sd_new[k].float().numpy(), sd_old[k].float().numpy())]
    assert any("language_model" in k for k in changed) and any("multi_modal_projector" in k for k in changed)
    assert not any("vision_tower" in k for k in changed)  # frozen
    assert PreTrainedTokenizerFast.from_pretrained(str(export)).convert_tokens_to_ids("<image>") == tiny_hf.IMAGE_TOKEN
    assert (export / "preprocessor_config.json").exists()

    again = offline.run(config, str(tmp_path))  # rerun: resumes at the end, nothing left to train
    assert again["resumed_from"] == 12 and again["steps"] == 12
