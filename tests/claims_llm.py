"""A tiny claims LLM for the online tests: a Llama wired as a bigram machine (no attention or MLP
output: the next token depends on the current one only). After ``ASSISTANT:`` it writes ``-``, then
one of ``w0..w7`` (equally likely, drawn from the sampler's per-message stream), then ``</s>``."""
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import tiny_hf

SPLIT_WORDS = ["<pad>", "<s>", "</s>", "<unk>", "USER:", "ASSISTANT:", "-"] + [f"w{i}" for i in range(60)]
BRANCHES = 8  # claim words w0..w7


def bigram_splitter(path):
    """A 1-layer Llama whose next token is a fixed function of the current one (see module docstring),
    saved with its tokenizer to ``path``."""
    vocab = {w: i for i, w in enumerate(SPLIT_WORDS)}
    tiny_hf.word_tokenizer(path, SPLIT_WORDS, image_token=None)
    torch.manual_seed(3)
    cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    llm = LlamaForCausalLM(cfg).eval()
    words = [f"w{i}" for i in range(BRANCHES)]
    transitions = {"ASSISTANT:": ["-"], "-": words, **{w: ["</s>"] for w in words}}
    with torch.no_grad():
        layer = llm.model.layers[0]
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()
        llm.model.embed_tokens.weight.mul_(0.01)
        llm.lm_head.weight.zero_()
        for dim, (source, targets) in enumerate(transitions.items()):
            llm.model.embed_tokens.weight[vocab[source]] = 0.0
            llm.model.embed_tokens.weight[vocab[source], dim] = 1.0  # normed: sqrt(32) on its own axis
            for target in targets:
                llm.lm_head.weight[vocab[target], dim] = 4.0  # logit 4 * sqrt(32) ~ 23
    llm.save_pretrained(str(path))
