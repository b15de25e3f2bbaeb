"""Special tokens are data, never control (issue 20): a literal ``<image>`` in an offline answer
leaves every other pair's reference log-probs unchanged and is counted; sampled text never holds
the image token; a LLaVA-format question ``<image>\\n...`` runs; a response with ``<image>`` text
goes through claims and labels."""

import pytest

from rlaifv_jax.core import records
from rlaifv_jax.pipelines import offline
from test_offline_dpo import setup  # noqa: F401  (the tiny policy + parquet fixture)
from test_ux_offline import _config, _rows, _write


def _reference_logps(setup, tmp_path, monkeypatch, ending, name):  # noqa: F811
    """Offline run up to the reference pass on the fixture's pairs with chosen answers 0, 5, 10
    ending in ``ending``; returns {key: (ref chosen, ref rejected)} and the encode stage's records."""
    root, model_dir = setup
    captured = {}

    def stop_before_training(train_dir, examples, *args, **kwargs):
        captured.update({e["key"]: (e["ref_chosen_logps"], e["ref_rejected_logps"]) for e in examples})
        raise KeyboardInterrupt

    monkeypatch.setattr(offline.dpo, "run", stop_before_training)
    rows = _rows(root)
    for i in (0, 5, 10):
        rows[i] = dict(rows[i], chosen=rows[i]["chosen"] + ending)
    data = tmp_path / name / "train-0.parquet"
    _write(data, rows)
    with pytest.raises(KeyboardInterrupt):
        offline.run(_config(root, model_dir, data), str(tmp_path / name / "work"))
    return captured, records.read_stage(str(tmp_path / name / "work" / "encoded"))


def test_image_text_in_answers_leaves_other_pairs_unchanged(setup, tmp_path, monkeypatch):  # noqa: F811
    image, image_encoded = _reference_logps(setup, tmp_path, monkeypatch, " <image>", "image")
    plain, _ = _reference_logps(setup, tmp_path, monkeypatch, " there", "plain")
    shared = set(image) & set(plain)  # keys are content hashes: the 3 edited pairs differ
    assert len(image) == len(plain) == 24 and len(shared) == 21
    worst = max(abs(a - b) for k in shared for a, b in zip(image[k], plain[k]))
    print(f"max |ref logp difference| over the 21 untouched pairs: {worst:.3g}")
    assert worst <= 1e-6
    warned = [e for e in image_encoded if "special_token_text" in e.get("warnings", ())]
    assert len(warned) == 3 and all("prompt_ids" in e for e in warned)  # kept, as text, and counted
    image_id = 96  # test_offline_dpo.build_tokenizer: <image> is the last id of the vocabulary
    for e in image_encoded:
        assert e["prompt_ids"].count(image_id) == 4 and image_id not in e["chosen_ids"] + e["rejected_ids"]
