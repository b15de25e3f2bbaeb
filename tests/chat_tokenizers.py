"""Chat tokenizers built in code for the labeler and special-token tests: a word-level one and a
SentencePiece-like BPE one, both with a Llama-3 style chat template and ``<image>`` at tiny_hf.IMAGE_TOKEN."""
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

import tiny_hf
from rlaifv_jax.data.chat import LLAVA_V1_SYSTEM

LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
SPECIALS = ["<s>", "</s>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
WORDS = sorted(set(
    (LLAVA_V1_SYSTEM + " USER ASSISTANT : Please answer yes Yes or no No . ? Is there a red blue green "
     "circle square triangle in the image picture Does show cat dog left right of top bottom two three "
     "small large user assistant").replace(".", " . ").replace(",", " , ").replace("'", " ' ").split()))


def word_tokenizer():
    """WordLevel tokenizer: words, punctuation and "\\n" are tokens; <image> is id tiny_hf.IMAGE_TOKEN."""
    vocab = ["<pad>", "<s>", "</s>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "\n"] + WORDS
    assert len(vocab) <= tiny_hf.IMAGE_TOKEN
    vocab += [f"w{i}" for i in range(tiny_hf.IMAGE_TOKEN - len(vocab))] + ["<image>"]
    t = tiny_hf.word_level({w: i for i, w in enumerate(vocab)}, "<pad>",
                           pre_tokenizers.Split(Regex(r"\w+|[^\w\s]|\n"), behavior="removed", invert=True),
                           specials=SPECIALS + ["<image>"], bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    assert t.convert_tokens_to_ids("<image>") == tiny_hf.IMAGE_TOKEN and t.bos_token_id == 1
    t.chat_template = LLAMA3_TEMPLATE
    return t


def bpe_tokenizer():
    """SentencePiece-like BPE (Metaspace word-start marker, BOS by the post-processor), as in test_chat."""
    corpus = [LLAVA_V1_SYSTEM, "USER: What is in the image? ASSISTANT: The image shows a red circle.",
              "Is there a cat? Please answer yes or no. Yes No"] * 5
    specials = ["<unk>", "<s>", "</s>", "<image>"] + SPECIALS[2:]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    alphabet = list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,:?'!\n▁")
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                                        initial_alphabet=alphabet))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    t = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    t.chat_template = LLAMA3_TEMPLATE
    return t
