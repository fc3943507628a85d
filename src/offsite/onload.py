"""Sequential onloading: a stored checkpoint's first blocks run over a dataset with one block in memory.

As GPTQ and llm-compressor calibrate, block after block: the activations of every sequence are
carried forward on disk (a float32 memory map) and each block is read from the safetensors files
only when its turn comes, so peak memory is one block, the embeddings and head, and one batch, for
any model size. Each block runs inside a real one-block model of its architecture
(`StoredCheckpoint.load_blocks([i])`): the model computes its own attention masks, positions,
rotary or ALiBi terms and per-layer types, and a pre-hook swaps the carried activations in for the
embeddings' output, so no family needs code of its own.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .progress import bars_disabled
from .streaming import StoredCheckpoint
from .surgery import discover_layout, get_blocks


class _Stop(Exception):
    """Raised by the hook on the block's output: nothing after it needs to run."""


def _output(out):
    return out[0] if isinstance(out, tuple) else out


def _input_swapper(hidden: torch.Tensor | None):
    """A forward pre-hook that hands the block `hidden` in place of the embeddings' output (None: keep them)."""

    def swap_input(module, args, kwargs):
        if hidden is None:
            return None
        if args:
            return (hidden.to(args[0].dtype),) + tuple(args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden.to(kwargs["hidden_states"].dtype)}

    return swap_input


@torch.no_grad()
def run_block(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, hidden: torch.Tensor | None) -> torch.Tensor:
    """The output of the one-block `model`'s block for this batch; its input is `hidden` (the previous
    block's output) or, for None, the model's own embeddings of `input_ids`."""
    block = get_blocks(model, discover_layout(model))[0]
    captured = {}

    def keep_output(module, args, out):
        captured["h"] = _output(out)
        raise _Stop

    handles = [block.register_forward_pre_hook(_input_swapper(hidden), with_kwargs=True), block.register_forward_hook(keep_output)]
    try:
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    return captured["h"]


@torch.no_grad()
def run_to_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, hidden: torch.Tensor | None) -> torch.Tensor:
    """The logits of the one-block `model` (its block, final norm and head) for this batch, its block's
    input being `hidden` (or, for None, the embeddings of `input_ids`)."""
    block = get_blocks(model, discover_layout(model))[0]

    handle = block.register_forward_pre_hook(_input_swapper(hidden), with_kwargs=True)
    try:
        return model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    finally:
        handle.remove()


def block_activations(stored: StoredCheckpoint, input_ids: torch.Tensor, last_block: int, work_dir: str | Path,
                      batch_size: int = 8, device: torch.device | str = "cpu", progress: bool = True) -> np.memmap:
    """The hidden states leaving block `last_block` (original index) of the stored model for every row
    of `input_ids` (equal-length sequences, no padding: packed text blocks), as a float32 memory map
    of shape (rows, length, hidden) under `work_dir`. Blocks 0..last_block are each read once."""
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    rows, length = input_ids.shape
    hidden_size = stored.config.get_text_config().hidden_size
    maps = [np.lib.format.open_memmap(work_dir / f"activations-{k}.npy", mode="w+", dtype=np.float32,
                                      shape=(rows, length, hidden_size)) for k in (0, 1)]
    mask = torch.ones_like(input_ids)
    shared: dict[str, torch.Tensor] = {}
    for i in tqdm(range(last_block + 1), desc="teacher (block by block)", unit="block", disable=not progress or bars_disabled()):
        model = stored.load_blocks([i], shared=shared).to(device)
        src, dst = maps[(i + 1) % 2], maps[i % 2]
        for start in range(0, rows, batch_size):
            end = min(start + batch_size, rows)
            hidden = None if i == 0 else torch.from_numpy(np.ascontiguousarray(src[start:end])).to(device)
            out = run_block(model, input_ids[start:end].to(device), mask[start:end].to(device), hidden)
            dst[start:end] = out.float().cpu().numpy()
        del model
    result = maps[last_block % 2]
    result.flush()
    other = maps[(last_block + 1) % 2]
    del other
    (work_dir / f"activations-{(last_block + 1) % 2}.npy").unlink(missing_ok=True)
    return result


__all__ = ["block_activations", "run_block", "run_to_logits"]
