"""CRaSh (Zhang et al., EMNLP 2023): Clustering, Removing and Sharing, training-free.

1. **Representations.** The full model reads a support set of generic text; forward hooks
   capture every middle block's output at up to `max_tokens` token positions (sampled with a
   fixed seed; each sequence's first position is left out, its activations are outliers in
   most LMs and would dominate the similarity).
2. **Similarity.** Linear CKA between every pair of middle blocks (Kornblith et al. 2019):
   CKA(X, Y) = ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F) on column-centred features, in float64.
3. **Clustering.** The middle is cut into `num_clusters` runs of *consecutive* blocks that
   minimise the total within-cluster scatter, sum over clusters of sum_{i,j in C} (1 - CKA_ij) / |C|
   (the k-means objective on the CKA distance, restricted to contiguous clusters), solved
   exactly by dynamic programming over cut points.
4. **Removing.** Each cluster keeps one block: its medoid (the block most similar to the rest
   of its cluster), or its first or last block (`keep`).
5. **Sharing** (`share`, on by default as in the paper's full method): the kept block stands at
   every position of its cluster, so the emulator has the full model's depth while holding
   only `num_clusters` distinct middle blocks. The bundle stores each position as its own copy
   (an ordinary Hugging Face checkpoint that plain transformers loads correctly), so its bytes
   grow with depth; the distinct parameters, which is what the verbatim count and the frontier
   size measure, do not. Without sharing the emulator is LayerDrop with CKA-chosen blocks.

The kept block count plays LayerDrop's `num_kept`: `num_clusters = 13` of 26 middle blocks
holds 50% of the middle's distinct parameters.
"""

from __future__ import annotations

import dataclasses
import random

import torch
from transformers import PreTrainedModel

from ..errors import ConfigError
from ..surgery import BlockLayout, build_reduced_model, get_blocks
from .base import Emulator, model_tokenizer, register
from .configs import KEEP, CrashConfig  # noqa: F401  (re-exported)





class _Stop(Exception):
    """Raised after the last middle block: nothing above it is needed."""


@torch.no_grad()
def block_representations(model: PreTrainedModel, layout: BlockLayout, blocks: list[int], features: list[dict],
                          batch_size: int, max_tokens: int, seed: int) -> list[torch.Tensor]:
    """Per block in `blocks`, its output at up to `max_tokens` sampled positions: (n, d) float32 tensors."""
    device = next(model.parameters()).device
    positions = [(s, t) for s in range(len(features)) for t in range(1, len(features[s]["input_ids"]))]
    random.Random(seed).shuffle(positions)
    chosen = sorted(positions[:max_tokens])
    captured: dict[int, list[torch.Tensor]] = {b: [] for b in blocks}
    current: dict[str, torch.Tensor] = {}
    last = blocks[-1]

    def hook(index):
        def fn(module, args, out):
            h = out[0] if isinstance(out, tuple) else out
            captured[index].append(h.detach().float().reshape(-1, h.shape[-1])[current["rows"]].cpu())
            if index == last:
                raise _Stop

        return fn

    handles = [get_blocks(model, layout)[b].register_forward_hook(hook(b)) for b in blocks]
    try:
        for start in range(0, len(features), batch_size):
            batch = features[start : start + batch_size]
            width = max(len(f["input_ids"]) for f in batch)
            rows = [(s - start) * width + t for s, t in chosen if start <= s < start + len(batch)]
            if not rows:
                continue
            ids = torch.zeros(len(batch), width, dtype=torch.long)
            mask = torch.zeros(len(batch), width, dtype=torch.long)
            for i, f in enumerate(batch):
                ids[i, : len(f["input_ids"])] = torch.tensor(f["input_ids"])
                mask[i, : len(f["input_ids"])] = 1
            current["rows"] = torch.tensor(rows)
            try:
                model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
            except _Stop:
                pass
    finally:
        for h in handles:
            h.remove()
    return [torch.cat(captured[b]) for b in blocks]


def linear_cka(reps: list[torch.Tensor]) -> torch.Tensor:
    """Pairwise linear CKA of (n, d) representations of the same n inputs: an (m, m) float64 matrix."""
    centred = [(x.double() - x.double().mean(0, keepdim=True)) for x in reps]
    norms = [torch.linalg.matrix_norm(x.T @ x) for x in centred]
    m = len(centred)
    cka = torch.eye(m, dtype=torch.float64)
    for i in range(m):
        for j in range(i + 1, m):
            hsic = torch.linalg.matrix_norm(centred[j].T @ centred[i]) ** 2
            cka[i, j] = cka[j, i] = hsic / (norms[i] * norms[j]).clamp_min(1e-300)
    return cka


def contiguous_clusters(similarity: torch.Tensor, k: int) -> list[list[int]]:
    """Cut positions 0..m-1 into k runs minimising sum over runs of sum_{i,j in run} (1 - s_ij) / |run|."""
    m = similarity.shape[0]
    if not 1 <= k <= m:
        raise ConfigError(f"num_clusters must be between 1 and the {m} middle blocks, got {k}")
    dist = (1 - similarity).clamp_min(0).tolist()

    def cost(a: int, b: int) -> float:  # run a..b inclusive
        return sum(dist[i][j] for i in range(a, b + 1) for j in range(a, b + 1)) / (b - a + 1)

    inf = float("inf")
    best = [[inf] * (m + 1) for _ in range(k + 1)]  # best[c][e]: first e positions in c runs
    cut = [[0] * (m + 1) for _ in range(k + 1)]
    best[0][0] = 0.0
    for c in range(1, k + 1):
        for e in range(c, m - (k - c) + 1):
            for s in range(c - 1, e):
                value = best[c - 1][s] + cost(s, e - 1)
                if value < best[c][e]:
                    best[c][e], cut[c][e] = value, s
    runs, e = [], m
    for c in range(k, 0, -1):
        s = cut[c][e]
        runs.append(list(range(s, e)))
        e = s
    return runs[::-1]


def representative(run: list[int], similarity: torch.Tensor, keep: str) -> int:
    if keep == "first":
        return run[0]
    if keep == "last":
        return run[-1]
    sub = similarity[run][:, run]
    return run[int(torch.argmax(sub.sum(1)))]  # medoid; ties go to the earliest block


def support_features(tokenizer, config: CrashConfig) -> list[dict]:
    from ..lm import pack_blocks
    from ..tasks import load_generic_text

    texts = load_generic_text(limit_chars=6 * config.support_size * config.support_max_length)  # ~4 characters a token
    return pack_blocks(tokenizer, texts, config.support_max_length)[: config.support_size]


@register("crash", CrashConfig, needs_tokenizer=True)
def build_crash(model: PreTrainedModel, layout: BlockLayout, config: CrashConfig, tokenizer=None) -> Emulator:
    adapter = config.adapter_blocks(layout.num_blocks)
    middle = config.middle_blocks(layout.num_blocks)
    if config.num_clusters > len(middle):
        raise ConfigError(f"num_clusters={config.num_clusters} is more than the {len(middle)} middle blocks")
    tokenizer = tokenizer or model_tokenizer(model, "crash")
    features = support_features(tokenizer, config)
    was_training = model.training
    model.eval()
    try:
        reps = block_representations(model, layout, middle, features, config.support_batch_size, config.max_tokens, config.seed)
    finally:
        model.train(was_training)
    similarity = linear_cka(reps)
    runs = contiguous_clusters(similarity, config.num_clusters)
    kept = [middle[representative(run, similarity, config.keep)] for run in runs]
    if config.share:
        middle_map = [k for k, run in zip(kept, runs) for _ in run]
    else:
        middle_map = kept
    bottom, top = adapter[: config.num_bottom], adapter[config.num_bottom :]
    block_map = bottom + middle_map + top
    result = {
        "clusters": [[middle[i] for i in run] for run in runs],
        "kept_blocks": kept,
        "cka": [[round(float(x), 4) for x in row] for row in similarity],
        "support_tokens": int(reps[0].shape[0]),
        "distinct_middle_parameters": sum(p.numel() for b in kept for p in get_blocks(model, layout)[b].parameters()),
    }
    print(f"[crash] {len(runs)} clusters of the {len(middle)} middle blocks: "
          + " ".join(f"{r[0]}-{r[-1]}:{k}" if len(r) > 1 else f"{r[0]}" for r, k in zip(result["clusters"], kept))
          + (" (shared across each cluster)" if config.share else ""), flush=True)
    return Emulator(
        model=build_reduced_model(model, layout, block_map, allow_repeats=config.share),
        layout=layout,
        block_map=block_map,
        adapter_blocks=adapter,
        method="crash",
        params=dataclasses.asdict(config) | {"result": result},
    )
