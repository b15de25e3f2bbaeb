"""llava_v1 / chat-template encoding and LLaVA-1.5 image preprocessing against independent references."""
import numpy as np
import pytest
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import CLIPImageProcessor, PreTrainedTokenizerFast

from rlaifv_jax.data.chat import (
    CLIP_MEAN,
    CLIP_STD,
    clip_preprocess,
    encode_prompt,
    encode_prompt_answer,
    end_of_turn_id,
    expand2square,
    llava_image_preprocess,
    llava_v1_prompt,
)

SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
IMAGE_ID = 3
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


@pytest.fixture(scope="module")
def tokenizer():
    """A SentencePiece-like BPE (Metaspace, word-start marker, BOS added by the post-processor)."""
    corpus = [
        SYSTEM,
        "USER: What is in the image? ASSISTANT: The image shows a red circle and a blue square.",
        "Is there a cat? yes no. Describe the picture in detail.",
    ] * 5
    specials = ["<unk>", "<s>", "</s>", "<image>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    alphabet = list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,:?'!\n▁")
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=specials, initial_alphabet=alphabet))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    t = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    assert t.convert_tokens_to_ids("<image>") == IMAGE_ID
    t.chat_template = LLAMA3_TEMPLATE
    return t


def conv_llava_v1_get_prompt(messages):
    """Re-statement of LLaVA's Conversation.get_prompt for SeparatorStyle.TWO, sep=' ', sep2='</s>'."""
    seps = [" ", "</s>"]
    ret = SYSTEM + seps[0]
    for i, (role, message) in enumerate(messages):
        ret += role + ": " + message + seps[i % 2] if message else role + ":"
    return ret


def tokenizer_image_token(tokenizer, prompt, n_image):
    """LLaVA's tokenizer_image_token, with the image index expanded to n_image copies."""
    chunks = [tokenizer(c).input_ids for c in prompt.split("<image>")]
    assert all(c[0] == tokenizer.bos_token_id for c in chunks)
    ids = [tokenizer.bos_token_id]
    for i, c in enumerate(chunks):
        if i:
            ids += [IMAGE_ID] * n_image
        ids += c[1:]
    return ids


def test_llava_v1_prompt_text():
    q = "What is in the image?"
    ref = conv_llava_v1_get_prompt([("USER", "<image>\n" + q), ("ASSISTANT", None)])
    assert llava_v1_prompt(q) == ref
    assert ref == SYSTEM + " USER: <image>\nWhat is in the image? ASSISTANT:"


@pytest.mark.parametrize("answer", ["The image shows a red circle.", "  yes  ", "a blue square and a cat"])
@pytest.mark.parametrize("n_image", [0, 5])
def test_encode_prompt_answer_matches_llava_tokenization(tokenizer, answer, n_image):
    q = "Describe the picture in detail."
    user = ("<image>\n" + q) if n_image else q
    prompt_text = conv_llava_v1_get_prompt([("USER", user), ("ASSISTANT", None)])
    train_text = conv_llava_v1_get_prompt([("USER", user), ("ASSISTANT", answer.strip())])
    assert train_text.endswith("</s>")
    ref_prompt = tokenizer_image_token(tokenizer, prompt_text, n_image)
    ref_full = tokenizer_image_token(tokenizer, train_text, n_image)
    enc = encode_prompt_answer(tokenizer, q, answer, n_image, image_token_id=IMAGE_ID)
    assert enc.prompt_ids.tolist() == ref_prompt
    assert enc.prompt_ids.tolist() + enc.answer_ids.tolist() == ref_full
    assert enc.answer_ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(enc.answer_ids[:-1]).strip() == answer.strip()
    assert encode_prompt(tokenizer, q, n_image, image_token_id=IMAGE_ID).tolist() == ref_prompt
    assert (enc.prompt_ids == IMAGE_ID).sum() == n_image


def test_image_placeholder_checks(tokenizer):
    with pytest.raises(ValueError):
        encode_prompt(tokenizer, "q", 4)  # no image_token_id



def test_leading_image_marker_is_moved_not_doubled(tokenizer):
    plain = encode_prompt(tokenizer, "What is in the image?", 4, image_token_id=IMAGE_ID).tolist()
    for q in ("<image>\nWhat is in the image?", "What is in the image?\n<image>"):
        assert encode_prompt(tokenizer, q, 4, image_token_id=IMAGE_ID).tolist() == plain
    for template in ("llava_v1", "chat"):
        enc = encode_prompt_answer(tokenizer, "<image>\nWhat is in the image?", "a cat", 4, image_token_id=IMAGE_ID,
                                   template=template)
        assert (enc.prompt_ids == IMAGE_ID).sum() == 4


@pytest.mark.parametrize("template", ["llava_v1", "chat"])
def test_special_token_text_is_data(tokenizer, template):
    """<image>, </s>, <|eot_id|> written in a question or answer stay text: no special id appears
    beyond those the template puts, and clean text around them is unaffected."""
    specials = {tokenizer.convert_tokens_to_ids(t) for t in ("<s>", "</s>", "<image>", "<|eot_id|>",
                                                             "<|start_header_id|>", "<|end_header_id|>")}
    clean = encode_prompt_answer(tokenizer, "What is in the image?", "a red circle", 4, image_token_id=IMAGE_ID,
                                 template=template)
    dirty = encode_prompt_answer(tokenizer, "What is <image> in </s> the <|eot_id|> image?",
                                 "a red circle <image> </s> <|eot_id|>", 4, image_token_id=IMAGE_ID, template=template)

    def special_counts(ids):
        return {t: int((np.asarray(ids) == t).sum()) for t in specials}

    assert special_counts(dirty.prompt_ids) == special_counts(clean.prompt_ids)
    assert special_counts(dirty.answer_ids) == special_counts(clean.answer_ids)  # only the end-of-turn id
    assert (dirty.prompt_ids == IMAGE_ID).sum() == 4 and dirty.answer_ids[-1] == clean.answer_ids[-1]
    assert "image" in tokenizer.decode(dirty.answer_ids[:-1])  # kept as text ("<", ">" are <unk> in this BPE)


def test_vocabulary_word_image_is_a_placeholder_mismatch():
    """A word-level vocabulary with <image> as a plain word still maps the text to the image id: the
    host-side count check names it (PlaceholderMismatch, a ValueError) instead of a shifted write."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from rlaifv_jax.data.chat import PlaceholderMismatch
    words = ["<unk>", "<s>", "</s>", "<image>", "a", "cat", "USER:", "ASSISTANT:", "q"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    assert len(encode_prompt_answer(fast, "q", "a cat", 2, image_token_id=3).prompt_ids)
    with pytest.raises(PlaceholderMismatch, match="1 in the answer"):
        encode_prompt_answer(fast, "q", "a cat <image>", 2, image_token_id=3)
    with pytest.raises(PlaceholderMismatch, match="3 in the prompt"):
        encode_prompt(fast, "q <image> q", 2, image_token_id=3)


def test_chat_template(tokenizer):
    q, a = "Is there a cat?", "yes"
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
    assert prompt == "<s><|start_header_id|>user<|end_header_id|>\n\nIs there a cat?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")
    assert end_of_turn_id(tokenizer, "chat") == eot
    enc = encode_prompt_answer(tokenizer, q, a, 0, template="chat")
    full = tokenizer.apply_chat_template(
        [{"role": "user", "content": q}, {"role": "assistant", "content": a}], tokenize=False
    )
    ref_full = tokenizer(full, add_special_tokens=False).input_ids
    assert enc.prompt_ids.tolist() + enc.answer_ids.tolist() == ref_full
    assert enc.answer_ids[-1] == eot
    assert enc.prompt_ids[0] == tokenizer.bos_token_id and (enc.prompt_ids == tokenizer.bos_token_id).sum() == 1
    forced = encode_prompt_answer(tokenizer, q, a, 0, template="chat", eos_id=tokenizer.eos_token_id)
    assert forced.answer_ids[-1] == tokenizer.eos_token_id


def _random_images(seed):
    rng = np.random.default_rng(seed)
    sizes = [(37, 23), (23, 37), (50, 50), (19, 61), (64, 29)]
    return [Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)) for w, h in sizes]


@pytest.mark.parametrize("size", [28, 336])
def test_clip_preprocess_matches_transformers(size):
    proc = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    for img in _random_images(size):
        ref = proc(images=img, return_tensors="np")["pixel_values"][0]
        ours = clip_preprocess(img, size=size)
        assert ours.shape == ref.shape == (3, size, size)
        assert np.max(np.abs(ours - ref)) <= 1e-5
        padded = expand2square(img, tuple(int(x * 255) for x in proc.image_mean))
        ref_sq = proc(images=padded, return_tensors="np")["pixel_values"][0]
        assert np.max(np.abs(llava_image_preprocess(img, size=size) - ref_sq)) <= 1e-5


def test_clip_preprocess_crop_smaller_than_resize():
    proc = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 28, "width": 28})
    for img in _random_images(7):
        ref = proc(images=img, return_tensors="np")["pixel_values"][0]
        assert np.max(np.abs(clip_preprocess(img, size=32, crop_size=28) - ref)) <= 1e-5


def test_expand2square_background_and_placement():
    rng = np.random.default_rng(3)
    pixels = rng.integers(0, 256, size=(7, 12, 3), dtype=np.uint8)  # h=7, w=12
    bg = (122, 116, 104)
    assert tuple(int(x * 255) for x in CLIP_MEAN) == bg
    out = np.asarray(expand2square(Image.fromarray(pixels), bg))
    ref = np.empty((12, 12, 3), np.uint8)
    ref[:] = bg
    ref[(12 - 7) // 2: (12 - 7) // 2 + 7] = pixels
    np.testing.assert_array_equal(out, ref)
    # a mean-coloured pad normalises to ~0 after CLIP normalisation
    norm = (np.asarray(bg) / 255 - np.asarray(CLIP_MEAN)) / np.asarray(CLIP_STD)
    assert np.all(np.abs(norm) < 0.02)
