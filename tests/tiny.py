"""Tiny random models of every supported family, and a small real tokenizer, built offline.

The tokenizer is byte-level BPE trained in-process, so any text (task files' punctuation and
unicode included) encodes. By default BOS is prepended, as Llama-family tokenizers do;
`make_tokenizer(add_bos=False)` gives a GPT-2-style one whose empty context encodes to nothing.
"""

from __future__ import annotations

import functools

import torch
import transformers as T
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

VOCAB = VOCAB_SIZE = 320  # the tokenizer's size
NUM_BLOCKS = 8

_COMMON = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0)

FAMILIES = {
    "llama": lambda: T.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=NUM_BLOCKS, num_attention_heads=4,
                                   num_key_value_heads=2, tie_word_embeddings=True, **_COMMON),
    "qwen2": lambda: T.Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=NUM_BLOCKS, num_attention_heads=4,
                                   num_key_value_heads=2, use_sliding_window=True, sliding_window=4, max_window_layers=4, **_COMMON),
    "mistral": lambda: T.MistralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=NUM_BLOCKS, num_attention_heads=4,
                                       num_key_value_heads=2, sliding_window=4, **_COMMON),
    "gemma3": lambda: T.Gemma3TextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=NUM_BLOCKS, num_attention_heads=4,
                                         num_key_value_heads=2, head_dim=8, sliding_window=4, **_COMMON),
    "gpt2": lambda: T.GPT2Config(n_embd=32, n_layer=NUM_BLOCKS, n_head=4, n_positions=128, **_COMMON),
    "opt": lambda: T.OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=NUM_BLOCKS, num_attention_heads=4,
                               max_position_embeddings=128, word_embed_proj_dim=32, **_COMMON),
    "gpt_neox": lambda: T.GPTNeoXConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=NUM_BLOCKS, num_attention_heads=4,
                                        max_position_embeddings=128, **_COMMON),
    "bloom": lambda: T.BloomConfig(hidden_size=32, n_layer=NUM_BLOCKS, n_head=4, **_COMMON),
    "phi": lambda: T.PhiConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=NUM_BLOCKS, num_attention_heads=4,
                               max_position_embeddings=128, **_COMMON),
}


def tiny_model(family: str, seed: int = 0):
    torch.manual_seed(seed)
    model = T.AutoModelForCausalLM.from_config(FAMILIES[family]())
    model.eval()
    return model


SPECIALS = ["<pad>", "<s>", "</s>"]
_CORPUS = [
    "Goal: How do I boil water?\nAnswer: Put a pot of water on the stove and turn on the heat.",
    "Question: Which gas do plants take in from the air?\nAnswer: carbon dioxide",
    "Question: What is the capital of France?\nAnswer: Paris",
    "The quick brown fox jumps over the lazy dog. A man is sitting on a roof.",
    "Science asks questions and tests the answers with careful experiments.",
]


@functools.cache
def _tokenizer_json(add_bos: bool) -> str:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_CORPUS * 8, trainer)
    if add_bos:
        bos = tok.token_to_id("<s>")
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", bos)])
    return tok.to_str()


def make_tokenizer(add_bos: bool = True) -> PreTrainedTokenizerFast:
    """A fresh tokenizer with pad 0, BOS 1, EOS 2."""
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_tokenizer_json(add_bos)),
                                   pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def tiny_tokenizer():
    return make_tokenizer(add_bos=True)


def save_tiny_checkpoint(family: str, path, seed: int = 0):
    model = tiny_model(family, seed)
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return model


def block_io(model, tokenizer, blocks: list[int], texts: list[str], block_size: int):
    """(inputs, outputs, mask): what each of `blocks` reads and returns, by block index, over `texts` packed
    into blocks of `block_size` tokens (no padding: the mask is all ones)."""
    from offsite.lm import pack_blocks
    from offsite.methods.scaleot import _Taps
    from offsite.surgery import discover_layout, get_blocks

    modules = get_blocks(model, discover_layout(model))
    taps = _Taps()
    for i in blocks:
        taps.watch(modules[i], i, record_input=True)
    ids = torch.tensor([b["input_ids"] for b in pack_blocks(tokenizer, texts, block_size)])
    try:
        with torch.no_grad():
            model(input_ids=ids)
    finally:
        taps.close()
    return taps.inputs, taps.outputs, torch.ones(ids.shape)
