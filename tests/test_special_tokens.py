"""Special tokens are data, never control (issue 20): a literal ``<image>`` in an offline answer
leaves every other pair's reference log-probs unchanged and is counted; sampled text never holds
the image token; a LLaVA-format question ``<image>\\n...`` runs; a response with ``<image>`` text
goes through claims and labels."""

import jax
import numpy as np
import pytest

import tiny_hf
from rlaifv_jax.core import records
from rlaifv_jax.data import chat, yesno
from rlaifv_jax.engine import beam, generate
from rlaifv_jax.models import hf
from rlaifv_jax.pipelines import offline
from offline_data import build_tokenizer, offline_config, read_rows, setup, write_rows  # noqa: F401
from chat_tokenizers import word_tokenizer


def _reference_logps(setup, tmp_path, monkeypatch, ending, name):  # noqa: F811
    """Offline run up to the reference pass on the fixture's pairs with chosen answers 0, 5, 10
    ending in ``ending``; returns {key: (ref chosen, ref rejected)} and the encode stage's records."""
    root, model_dir = setup
    captured = {}

    def stop_before_training(train_dir, examples, *args, **kwargs):
        captured.update({e["key"]: (e["ref_chosen_logps"], e["ref_rejected_logps"]) for e in examples})
        raise KeyboardInterrupt

    monkeypatch.setattr(offline.dpo, "run", stop_before_training)
    rows = read_rows(root)
    for i in (0, 5, 10):
        rows[i] = dict(rows[i], chosen=rows[i]["chosen"] + ending)
    data = tmp_path / name / "train-0.parquet"
    write_rows(data, rows)
    with pytest.raises(KeyboardInterrupt):
        offline.run(offline_config(root, model_dir, data), str(tmp_path / name / "work"))
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


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    path = tmp_path_factory.mktemp("llava_banned")
    tiny_hf.llava(path, seed=5)
    return hf.load_pretrained(str(path))


def test_sampler_never_emits_the_image_token(llava, monkeypatch):
    """1,000 sampled responses from a model whose logits favour the image token (+30 on its logit)."""
    model, img = llava, tiny_hf.IMAGE_TOKEN
    plain_logits = type(model).logits
    monkeypatch.setattr(type(model), "logits", lambda self, h: plain_logits(self, h).at[..., img].add(30.0))
    rng = np.random.RandomState(0)
    prompts = [{"id": i, "input_ids": [1, 5, *[img] * model.num_image_tokens(), *rng.randint(3, 90, 4).tolist()],
                "pixel_values": rng.randn(1, 3, 28, 28).astype(np.float32)} for i in range(8)]
    kw = dict(max_new_tokens=3, temperature=1.0, stop_token_ids=[2], batch_size=8, progress=False)
    try:
        with monkeypatch.context() as m:  # the control: without the ban the image token dominates
            m.setattr(generate, "reserved_ids", lambda model, allowed: ())
            control = generate.generate(model, prompts, num_samples=7, **kw)
        assert np.mean([t == img for o in control for s in o["tokens"] for t in s]) > 0.9
        outs = generate.generate(model, prompts, num_samples=125, **kw)
        responses = [s for o in outs for s in o["tokens"]]
        assert len(responses) == 1000 and sum(map(len, responses)) > 1000
        assert not any(img in s for s in responses)
        beams = beam.beam_search(model, prompts[:2], num_beams=3, max_new_tokens=3, stop_token_ids=[2],
                                 progress=False)
        assert not any(img in o["tokens"][0] for o in beams)
    finally:
        jax.clear_caches()  # the biased programs must not serve later tests


def test_llava_question_with_leading_image_marker_runs(llava):
    """LLaVA data's "<image>\\nquestion": the marker is moved where the template wants it, not doubled."""
    tok, model = build_tokenizer(), llava
    n = model.num_image_tokens()
    ids = chat.encode_prompt(tok, "<image>\nwhat is in the image ?", n, image_token_id=tiny_hf.IMAGE_TOKEN)
    assert ids.tolist() == chat.encode_prompt(tok, "what is in the image ?", n,
                                              image_token_id=tiny_hf.IMAGE_TOKEN).tolist()
    out = generate.generate(model, [{"input_ids": ids.tolist(), "pixel_values": np.zeros((1, 3, 28, 28), np.float32)}],
                            max_new_tokens=2, stop_token_ids=[2], progress=False)
    assert len(out) == 1


def test_response_with_image_text_is_labeled():
    """A sampled response holding the text "<image>" becomes claims questions the labeler scores."""
    tok = word_tokenizer()
    questions = ["is there a <image> cat ?", "is there a cat ?"]
    prefix, conts = yesno.split_prompts(tok, questions, 4, image_token_id=tiny_hf.IMAGE_TOKEN)
    assert int((prefix == tiny_hf.IMAGE_TOKEN).sum()) == 4 and not any(tiny_hf.IMAGE_TOKEN in c for c in conts)
    claims_prompt = chat.encode_prompt(tok, "Split the response: a <image> cat </s> sat", 0, template="chat")
    assert tiny_hf.IMAGE_TOKEN not in claims_prompt.tolist()
    assert claims_prompt.tolist().count(tok.eos_token_id) == 0
