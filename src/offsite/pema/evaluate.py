"""Token-level evaluation of PEMA without generation: held-out NLL and next-token accuracy of the mixture.

For each held-out (prompt, target) pair the owner answers teacher-forced representations: f(c_j)
for the prompt extended by the first j target tokens, j = 0 .. len(target) - 1 (one
representation query with the target as `forced`, no log-probabilities needed). The data owner
has the head bundle, so it computes both distributions itself: P_LM = softmax(head(f)), exactly
the model's own, and P_PEMA = softmax(head(B_pd A f)). For every lambda it scores

    P = lambda * P_PEMA + (1 - lambda) * P_LM      (lambda = 0: the model alone)

by the mean negative log-likelihood of the target tokens and the share predicted exactly
(argmax). Per-example NLLs are kept, so a difference between two lambdas gets a paired bootstrap
interval over examples (`offsite.stats`).
"""

from __future__ import annotations

import math

import torch

from ..data import encode_pair
from ..errors import ConfigError
from .owner import RepresentationRequest

LAMBDAS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


@torch.no_grad()
def mixture_scores(server, head, adapter, examples, lambdas=LAMBDAS, batch_size: int = 8, max_prompt_tokens: int = 512,
                   max_target_tokens: int = 64) -> dict:
    """{lambda: {"nll", "acc", "tokens", "example_nll": [...]}} over `examples` (context, continuation)."""
    if not examples:
        raise ConfigError("no examples to score")
    lambdas = sorted({float(x) for x in lambdas})
    if any(not 0 <= x < 1 for x in lambdas):
        raise ConfigError(f"lambdas must be in [0, 1), got {lambdas}")
    tokenizer, device = head.tokenizer, torch.device("cpu")
    logits_of = head.head.to(device).eval()
    pema = adapter.adapter.to(device).eval()
    sums = {x: 0.0 for x in lambdas}
    hits = {x: 0 for x in lambdas}
    per_example = {x: [] for x in lambdas}
    tokens = 0
    for start in range(0, len(examples), batch_size):
        batch = examples[start : start + batch_size]
        pairs = [encode_pair(tokenizer, ex.context, ex.continuation) for ex in batch]
        prompts = [ctx[-max_prompt_tokens:] for ctx, _ in pairs]
        targets = [cont[:max_target_tokens] for _, cont in pairs]
        if any(not p or not t for p, t in zip(prompts, targets)):
            raise ConfigError("every example needs a non-empty prompt and target")
        answer = server.represent(RepresentationRequest(prompts, forced=[t[:-1] for t in targets], greedy_steps=0, log_probs=0))
        for f, target in zip(answer.representations, targets):
            f = torch.as_tensor(f, dtype=torch.float32, device=device)  # (len(target), d)
            y = torch.tensor(target, device=device)
            lm = torch.log_softmax(logits_of(f).float(), -1)
            pe = torch.log_softmax(logits_of(pema.predict(f)).float(), -1)
            for x in lambdas:
                mixed = lm if x == 0 else torch.logaddexp(math.log(x) + pe, math.log1p(-x) + lm)
                nll = -mixed.gather(1, y[:, None]).squeeze(1)
                sums[x] += float(nll.sum())
                hits[x] += int((mixed.argmax(-1) == y).sum())
                per_example[x].append(float(nll.mean()))
            tokens += len(target)
    return {x: {"nll": sums[x] / tokens, "acc": hits[x] / tokens, "tokens": tokens, "example_nll": per_example[x]} for x in lambdas}


def best_lambda(scores: dict) -> float:
    """The lambda with the lowest held-out NLL (choose it on a validation split, not on the test examples)."""
    return min(scores, key=lambda x: scores[x]["nll"])
