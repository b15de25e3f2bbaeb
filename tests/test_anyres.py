"""LLaVA-NeXT anyres shape logic and packing against transformers' own functions and model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaNextConfig,
    LlavaNextImageProcessor,
    LlavaNextModel,
    LlavaNextProcessor,
    PreTrainedTokenizerFast,
)
from transformers import image_processing_utils as hf_utils
from transformers.models.llava_next import modeling_llava_next as hf_next

from rlaifv_jax.models import anyres

TINY = dict(vision_image_size=28, patch_size=14, pinpoints=[[28, 28], [28, 56], [56, 28], [56, 56]])
REAL = dict(
    vision_image_size=336, patch_size=14, pinpoints=[[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
)
TINY_SIZES = [(30, 50), (50, 30), (28, 28), (100, 40), (40, 100), (13, 7), (57, 29), (1, 1), (7, 300), (300, 7)]
# (110, 352), (176, 198), (328, 205): transformers' round(x, 7) in unpad_image changes the result vs int(x).
REAL_SIZES = [
    (336, 336), (480, 640), (640, 480), (1080, 1920), (200, 2000), (2000, 200), (337, 1000), (1000, 337),
    (100, 100), (110, 352), (176, 198), (328, 205),
]  # fmt: skip
CASES = [(TINY, s) for s in TINY_SIZES] + [(REAL, s) for s in REAL_SIZES]
IMAGE_TOKEN_ID = 1


def _kw(setup: dict) -> dict:
    return dict(
        grid_pinpoints=setup["pinpoints"], vision_image_size=setup["vision_image_size"], patch_size=setup["patch_size"]
    )


def _model(setup: dict, strategy: str = "default") -> LlavaNextModel:
    config = LlavaNextConfig(
        text_config=LlamaConfig(
            vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4
        ),
        vision_config=CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=setup["vision_image_size"],
            patch_size=setup["patch_size"],
        ),
        image_grid_pinpoints=setup["pinpoints"],
        image_token_id=IMAGE_TOKEN_ID,
        vision_feature_select_strategy=strategy,
    )
    torch.manual_seed(0)
    return LlavaNextModel(config).eval()


@pytest.fixture(scope="module")
def hf_models() -> dict[int, LlavaNextModel]:
    return {setup["vision_image_size"]: _model(setup) for setup in (TINY, REAL)}


def _processor(setup: dict, strategy: str) -> LlavaNextProcessor:
    tok = Tokenizer(models.WordLevel({"<unk>": 0, "<image>": IMAGE_TOKEN_ID, "<pad>": 2}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", additional_special_tokens=["<image>"]
    )
    side = setup["vision_image_size"]
    image_processor = LlavaNextImageProcessor(
        size={"shortest_edge": side}, crop_size={"height": side, "width": side}, image_grid_pinpoints=setup["pinpoints"]
    )
    return LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=setup["patch_size"],
        vision_feature_select_strategy=strategy,
        num_additional_image_tokens=1,
    )


def _images(sizes: list[tuple[int, int]]) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]


@pytest.mark.parametrize("setup,size", CASES)
def test_shapes_match_transformers(setup: dict, size: tuple[int, int]) -> None:
    pinpoints, side = setup["pinpoints"], setup["vision_image_size"]
    assert anyres.select_best_resolution(size, pinpoints) == hf_utils.select_best_resolution(size, pinpoints)
    assert anyres.grid_shape(size, pinpoints, side) == hf_next.get_anyres_image_grid_shape(size, pinpoints, side)
    assert anyres.num_patches(np.array(size), pinpoints, side) == hf_next.image_size_to_num_patches(
        size, pinpoints, side
    )
    rows, cols = anyres.grid_shape(size, pinpoints, side)
    cells = side // setup["patch_size"]
    unpadded = hf_next.unpad_image(torch.zeros(1, rows * cells, cols * cells), torch.tensor(size))
    assert anyres.unpadded_shape(size, **_kw(setup)) == tuple(unpadded.shape[1:])


@pytest.mark.parametrize("with_newline", [True, False])
@pytest.mark.parametrize("setup,size", CASES)
def test_pack_matches_pack_image_features(
    hf_models: dict[int, LlavaNextModel], setup: dict, size: tuple[int, int], with_newline: bool
) -> None:
    model = hf_models[setup["vision_image_size"]]
    patches = anyres.num_patches(size, setup["pinpoints"], setup["vision_image_size"])
    tokens = (setup["vision_image_size"] // setup["patch_size"]) ** 2
    features = torch.randn(patches, tokens, 32)
    newline = model.image_newline.detach()
    (expected,), lens = model.pack_image_features(
        [features], torch.tensor([size]), "default", image_newline=newline if with_newline else None
    )
    indices = anyres.pack_indices(size, **_kw(setup), with_newline=with_newline)
    assert indices.dtype == np.int32
    got = anyres.pack_features(jnp.asarray(features.numpy()), jnp.asarray(newline.numpy()), indices)
    np.testing.assert_array_equal(np.asarray(got), expected.numpy())
    assert anyres.num_image_tokens(size, **_kw(setup), with_newline=with_newline) == int(lens[0])


@pytest.mark.parametrize("setup", [TINY, REAL], ids=["tiny", "real"])
def test_batch_pack_matches_get_image_features(hf_models: dict[int, LlavaNextModel], setup: dict) -> None:
    """End to end: processor pixels -> transformers' features, vs our gather of its projector output, jitted."""
    model = hf_models[setup["vision_image_size"]]
    sizes = TINY_SIZES if setup is TINY else REAL_SIZES
    inputs = _processor(setup, "default")(
        images=_images(sizes), text=["<image>"] * len(sizes), padding=True, return_tensors="pt"
    )
    assert inputs["image_sizes"].tolist() == [list(s) for s in sizes]
    captured = []
    hook = model.multi_modal_projector.register_forward_hook(lambda mod, args, out: captured.append(out))
    with torch.no_grad():
        expected = model.get_image_features(pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"])
    hook.remove()
    expected = expected.pooler_output

    indices, patches, lengths = anyres.batch_pack_indices(sizes, **_kw(setup))
    side = setup["vision_image_size"]
    assert patches == [hf_next.image_size_to_num_patches(s, setup["pinpoints"], side) for s in sizes]
    assert lengths == [len(e) for e in expected]
    assert lengths == [anyres.num_image_tokens(s, **_kw(setup)) for s in sizes]
    # The processor's own count: image tokens it writes into input_ids for each image.
    assert lengths == (inputs["input_ids"] == IMAGE_TOKEN_ID).sum(-1).tolist()

    pack = jax.jit(lambda f, n: anyres.pack_features(f, n, indices))
    got = pack(jnp.asarray(captured[0].numpy()), jnp.asarray(model.image_newline.detach().numpy()))
    np.testing.assert_array_equal(np.asarray(got), torch.cat(expected).numpy())


def test_full_strategy_fails_like_transformers() -> None:
    """transformers cannot pack CLS-keeping ('full') anyres features, nor can we; its processor still counts them."""
    size = (30, 50)
    model = _model(TINY, strategy="full")
    inputs = _processor(TINY, "full")(images=_images([size]), text=["<image>"], return_tensors="pt")
    with pytest.raises(RuntimeError), torch.no_grad():
        model.get_image_features(pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"])
    with pytest.raises(ValueError, match="full"):
        anyres.pack_indices(size, **_kw(TINY), strategy="full")
    with pytest.raises(ValueError, match="strategy"):
        anyres.num_image_tokens(size, **_kw(TINY), strategy="cls_patch")
    # The processor's 'full' count is the 'default' count plus the base patch's CLS token.
    full_count = int((inputs["input_ids"] == IMAGE_TOKEN_ID).sum())
    assert full_count == anyres.num_image_tokens(size, **_kw(TINY)) + 1


def test_pinpoints_not_multiple_of_image_size_raise(hf_models: dict[int, LlavaNextModel]) -> None:
    """Crop count uses ceil, grid shape uses floor: transformers' view fails, we raise a clear error."""
    size, pinpoints = (30, 50), [[28, 42]]
    patches = anyres.num_patches(size, pinpoints, 28)
    assert patches == hf_next.image_size_to_num_patches(size, pinpoints, 28) == 3
    assert anyres.grid_shape(size, pinpoints, 28) == (1, 1)
    model = hf_models[28]
    model.config.image_grid_pinpoints = pinpoints
    try:
        with pytest.raises(RuntimeError):
            model.pack_image_features([torch.randn(patches, 4, 32)], torch.tensor([size]), "default")
    finally:
        model.config.image_grid_pinpoints = TINY["pinpoints"]
    with pytest.raises(ValueError, match="multiples"):
        anyres.pack_indices(size, grid_pinpoints=pinpoints, vision_image_size=28, patch_size=14)
