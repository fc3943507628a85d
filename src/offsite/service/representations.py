"""Representation queries for PEMA: the owner's model answers, its weights never leave.

For a prompt, PEMA's data owner needs the context representation f(c), the hidden state
that enters the final norm (the last block's output), and the model's next-token
distribution. `last_block_representations` computes both for a batch of token-id prompts.
`RepresentationSource` is what the service's endpoint calls: it loads the owner's model once,
checks the request against it and runs one query at a time. It is a thin seam: when PEMA's
owner-side API exists, `RepresentationSource.compute` is the one place to call it from.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from ..evaluation import _max_length
from ..surgery import discover_layout
from .errors import ServiceError

POSITIONS = ("last", "all")


@torch.no_grad()
def last_block_representations(model, prompts: Sequence[Sequence[int]], top_k: int = 10, positions: str = "last") -> list[dict]:
    """Per prompt: `hidden` (P x d float32, the input of the final norm), `top_ids` and
    `top_logprobs` (P x k, the k most likely next tokens after each position), for the last
    position (P = 1) or every position (P = prompt length).

    The hidden state is captured by a forward pre-hook on the final norm found by
    `discover_layout` (a hook on the last block's output where a model has no final norm).
    Prompts are right-padded with an attention mask, so each result equals running that
    prompt alone.
    """
    if positions not in POSITIONS:
        raise ValueError(f"positions must be one of {POSITIONS}, got {positions!r}")
    layout = discover_layout(model)
    captured: list[torch.Tensor] = []
    if layout.norm is not None:
        def grab(module, args, kwargs):
            captured.append(args[0] if args else next(iter(kwargs.values())))

        handle = model.get_submodule(layout.norm).register_forward_pre_hook(grab, with_kwargs=True)
    else:
        def grab(module, args, output):
            captured.append(output[0] if isinstance(output, tuple) else output)

        handle = model.get_submodule(layout.blocks)[-1].register_forward_hook(grab)
    device = next(model.parameters()).device
    lengths = [len(p) for p in prompts]
    ids = torch.zeros(len(prompts), max(lengths), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, : len(prompt)] = torch.as_tensor(prompt, dtype=torch.long)
        mask[row, : len(prompt)] = 1
    try:
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
    finally:
        handle.remove()
    if len(captured) != 1:
        raise RuntimeError(f"expected one pass through the final norm, saw {len(captured)}")
    hidden = captured[0]
    out = []
    for row, n in enumerate(lengths):
        span = slice(n - 1, n) if positions == "last" else slice(0, n)
        logprobs = F.log_softmax(logits[row, span].float(), dim=-1)
        top = logprobs.topk(min(top_k, logprobs.shape[-1]), dim=-1)
        out.append({"hidden": hidden[row, span].float().cpu(), "top_ids": top.indices.cpu(), "top_logprobs": top.values.cpu()})
    return out


class RepresentationSource:
    """The owner's model, loaded on first use, answering representation queries one at a time."""

    def __init__(self, load_model: Callable[[], tuple[object, str]]):
        self._load_model = load_model  # -> (model on its device, display name)
        self._model = None
        self._name = ""
        self._lock = threading.Lock()

    def compute(self, prompts: list[list[int]], top_k: int, positions: str) -> dict:
        with self._lock:
            if self._model is None:
                self._model, self._name = self._load_model()
            model = self._model
            vocab = model.get_input_embeddings().num_embeddings
            limit = _max_length(model)
            for i, prompt in enumerate(prompts):
                bad = next((t for t in prompt if not 0 <= t < vocab), None)
                if bad is not None:
                    raise ServiceError(422, f"prompt {i} holds token id {bad}, outside the vocabulary of {vocab}")
                if limit and len(prompt) > limit:
                    raise ServiceError(422, f"prompt {i} has {len(prompt)} tokens; the model takes at most {limit}")
            results = last_block_representations(model, prompts, top_k, positions)
        return {
            "model": self._name,
            "hidden_size": int(results[0]["hidden"].shape[-1]),
            "positions": positions,
            "items": [{key: value.tolist() for key, value in r.items()} for r in results],
        }
