"""Stage mechanics: a finished stage loads nothing, a bundle frees its arrays, the one image-feature
path of LLaVA-NeXT equals the model's own."""
import contextlib

import jax
import numpy as np
import pytest

import tiny_hf
from rlaifv_jax.core import memory, records
from rlaifv_jax.engine import vision
from rlaifv_jax.models import hf
from rlaifv_jax.stages import bundle, runner


def test_finished_stage_opens_nothing(tmp_path):
    opened = []

    @contextlib.contextmanager
    def open_fn():
        opened.append(1)
        yield lambda chunk: [{"v": x["key"] * 2} for x in chunk]

    inputs = [{"key": str(i)} for i in range(5)]
    out = runner.run(str(tmp_path), inputs, open_fn, chunk_size=2, desc="t", progress=False)
    assert [r["v"] for r in out] == ["00", "11", "22", "33", "44"] and opened == [1]

    def refuse():
        raise AssertionError("a finished stage must not load its models")

    assert runner.run(str(tmp_path), inputs, refuse, chunk_size=2, desc="t", progress=False) == out
    assert records.stage_done(str(tmp_path))


def test_bundle_frees_device_arrays(tmp_path):
    tiny_hf.llava(tmp_path / "m")
    from transformers import CLIPImageProcessor, PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models
    PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>")),
                            unk_token="<unk>").save_pretrained(str(tmp_path / "m"))
    CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}).save_pretrained(str(tmp_path / "m"))
    mesh = jax.make_mesh((1, 8, 1), ("data", "fsdp", "tensor"))
    before = sum(memory.resident_bytes().values())
    with bundle.loaded(bundle.ModelSettings(str(tmp_path / "m")), mesh) as b:
        leaves = [x for x in jax.tree.leaves(b.model) if isinstance(x, jax.Array)]
        assert leaves and not any(x.is_deleted() for x in leaves)
        weights = sum(x.nbytes for x in leaves)
        assert sum(memory.resident_bytes().values()) - before >= weights  # every byte of the model is counted
    assert all(x.is_deleted() for x in leaves)
    assert sum(memory.resident_bytes().values()) - before < weights / 10  # the stage's model is gone


def test_tokenizer_read_once_per_version(tmp_path):
    """The stages load one checkpoint's tokenizer again and again: it is read once, and read anew when
    the directory's files change."""
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models

    def save(vocab):
        PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<unk>")),
                                unk_token="<unk>").save_pretrained(str(tmp_path))

    save({"<unk>": 0, "a": 1})
    first = bundle.tokenizer(str(tmp_path))
    assert bundle.tokenizer(str(tmp_path)) is first and len(first) == 2
    save({"<unk>": 0, "a": 1, "b": 2})
    again = bundle.tokenizer(str(tmp_path))
    assert again is not first and len(again) == 3


@pytest.mark.parametrize("sizes", [[(28, 56)], [(56, 28), (28, 28)]])
def test_next_image_features_one_path(tmp_path, sizes):
    ref = tiny_hf.llava_next(tmp_path / "next")
    model = hf.load_pretrained(str(tmp_path / "next"))
    rng = np.random.default_rng(0)
    px = rng.standard_normal((len(sizes), 5, 3, 28, 28)).astype(np.float32)
    graphdef, state = __import__("flax").nnx.split(model)
    ours = np.asarray(vision.image_features(graphdef, state, px, np.asarray(sizes)))
    import torch
    with torch.no_grad():
        theirs = ref.model.get_image_features(torch.tensor(px), torch.tensor(sizes))
    theirs = torch.cat(list(theirs.pooler_output if hasattr(theirs, "pooler_output") else theirs)).numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-5)
    np.testing.assert_allclose(np.asarray(model.image_features(px, np.asarray(sizes))), ours, atol=1e-6)
