"""Causal-LM pieces every layer uses: tokenised training features, packed text blocks, the loss.

Below the emulator methods, training, distillation and PEMA, so that each of them can use these
without importing the others (see the layout in the README).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .data import IGNORE_INDEX, Example, tokenize_example
from .errors import ConfigError


def pack_blocks(tokenizer, texts: list[str], block_size: int) -> list[dict[str, list[int]]]:
    """Concatenate the texts (EOS between them) and cut into full blocks of `block_size` tokens."""
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for text in texts:
        stream += tokenizer(text, add_special_tokens=False)["input_ids"] + ([eos] if eos is not None else [])
    blocks = [stream[i : i + block_size] for i in range(0, len(stream) - block_size + 1, block_size)]
    if not blocks:
        raise ConfigError(f"generic text yields no full block of {block_size} tokens")
    return [{"input_ids": b, "labels": b} for b in blocks]


def causal_lm_loss(model, batch: dict[str, torch.Tensor], head: torch.nn.Module | None = None) -> torch.Tensor:
    """Mean next-token cross-entropy over the labelled (answer) positions.

    The LM head runs only on the positions that have a target: with the context masked that is a
    small fraction of the tokens, and the head (vocab x d) plus its logits are a large share of a
    small model's compute and of every model's activation memory. Same value as the model's own
    `labels=` loss. `head` is the output-embedding module of the unwrapped model.
    """
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE_INDEX
    head = head or model.get_output_embeddings()

    def only_labelled(module, args):
        return (args[0][:, :-1][keep].unsqueeze(0), *args[1:])

    handle = head.register_forward_pre_hook(only_labelled)
    try:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    finally:
        handle.remove()
    if not keep.any():
        return logits.sum() * 0.0
    return F.cross_entropy(logits[0].float(), targets[keep])


def tokenize_examples(tokenizer, examples: list[Example], max_length: int) -> list[dict[str, list[int]]]:
    if not examples:
        raise ConfigError("no training examples")
    return [tokenize_example(tokenizer, ex, max_length) for ex in examples]


def pad_token_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
