"""RLAIF-V-Dataset rows with random PNG images and a word-level tokenizer over their words, shared by the
dataset reader and TFDS tests (``tokenizer`` is a module-scoped fixture: import it into a test module)."""
import io
import json

import numpy as np
import pytest
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

WORDS = "what is in the image ? a red blue circle square cat dog there yes no and".split()
IMAGE_ID = 3


def png_bytes(seed, size=(9, 6)):
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def row(idx, *, image_bytes=None, image_path=None, question="what is in the image ?",
        chosen="a red circle", rejected="a blue square and a cat"):
    return {
        "ds_name": "toy", "image": {"bytes": image_bytes, "path": None}, "question": question,
        "chosen": chosen, "rejected": rejected, "origin_dataset": "unit", "origin_split": json.dumps({"model": "m"}),
        "idx": idx, "image_path": image_path,
    }


@pytest.fixture(scope="module")
def tokenizer():
    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", "<image>", "<pad>", *WORDS, *"ABCDEFGHIJKLMNOPQRSTUVWXYZ", "USER", "ASSISTANT", ":", ".", ",", "'", "s", "human", "chat", "between", "curious", "an", "artificial", "intelligence", "assistant", "The", "gives", "helpful", "detailed", "polite", "answers", "to", "questions"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    t = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>")
    assert t.convert_tokens_to_ids("<image>") == IMAGE_ID
    return t
