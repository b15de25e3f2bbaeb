"""End to end: offline DPO of a tiny LLaVA on a tiny RLAIF-V-schema parquet file, export to HF."""
import json

import numpy as np
from transformers import LlavaForConditionalGeneration, PreTrainedTokenizerFast

import tiny_hf
from configs import offline_dpo
from offline_data import setup  # noqa: F401  (the tiny policy + parquet fixture)
from rlaifv_jax.core import records
from rlaifv_jax.pipelines import offline


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
