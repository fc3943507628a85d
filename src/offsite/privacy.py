"""How much of the owner's model an emulator gives away.

- `verbatim_fraction`: the share of the base model's parameters that the emulator bundle ships
  bit for bit (LayerDrop ships the kept blocks, embeddings and head unchanged).
- `heal`: what a curious data owner could do with the bundle alone: fine-tune the emulator's
  middle (non-adapter) blocks on generic text for a few steps to recover the full model. The
  report compares perplexities before and after with the full model's, as the fraction of the
  emulator's perplexity gap (in log space, i.e. per-token loss) that healing closes.
"""

from __future__ import annotations

import hashlib
import math

import torch

from .bundle import tensor_bytes
from .data import Example
from .emulator import LoadedEmulator
from .surgery import discover_layout, get_blocks
from .training import FinetuneConfig, pad_token_id, tokenize_examples, train


def _digest(tensor: torch.Tensor) -> bytes:
    return hashlib.sha256(tensor_bytes(tensor)).digest()


@torch.no_grad()
def verbatim_fraction(base: torch.nn.Module, emulator: LoadedEmulator) -> dict:
    """Parameters of `base` whose exact bytes appear in the emulator (tied weights counted once)."""
    shipped = {_digest(p) for p in emulator.model.parameters()}
    seen, total, verbatim = set(), 0, 0
    for p in base.parameters():  # .parameters() already yields a tied tensor once
        if p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        total += p.numel()
        if _digest(p) in shipped:
            verbatim += p.numel()
    return {"verbatim_parameters": verbatim, "base_parameters": total, "fraction": verbatim / total}


def heal(emulator: LoadedEmulator, texts: list[str], steps: int, lr: float = 1e-4, batch_size: int = 8,
         max_length: int = 128, progress: bool = True) -> torch.nn.Module:
    """Fine-tune the emulator's middle blocks on plain text, as an attacker holding the bundle could."""
    model = emulator.model
    model.requires_grad_(False)
    blocks = get_blocks(model, discover_layout(model))
    for i in range(len(blocks)):
        if i not in emulator.trainable:
            blocks[i].requires_grad_(True)
    config = FinetuneConfig(lr=lr, batch_size=batch_size, max_steps=steps, max_length=max_length, warmup_ratio=0.0)
    features = tokenize_examples(emulator.tokenizer, [Example("", t) for t in texts], max_length)
    return train(model, features, pad_token_id(emulator.tokenizer), config, progress=progress, desc="healing").model


def gap_closed(ppl_emulator: float, ppl_healed: float, ppl_full: float) -> float:
    """Fraction of the emulator's per-token-loss gap to the full model that healing removed."""
    gap = math.log(ppl_emulator) - math.log(ppl_full)
    return (math.log(ppl_emulator) - math.log(ppl_healed)) / gap if gap > 0 else 0.0
