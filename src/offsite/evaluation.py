"""Evaluation of any Hugging Face causal LM: multiple-choice accuracy and perplexity.

Every (context, choice) pair is tokenised by `offsite.data.encode_pair`, the same function that
builds training examples, so a fine-tuned model is scored on exactly the prompt format it was
trained on.

Scoring shares work: the choices of a question share its context tokens, so the context runs
once (left-padded, building a KV cache) and every choice continues from that cache
(right-padded). On a 2-core CPU this makes four-choice tasks with long contexts (SciQ, ARC)
several times faster than scoring each (context, choice) sequence. Requests are sorted by
length to keep padding small, position ids are passed explicitly wherever a model takes them
(padding never shifts positions), and only the positions that predict scored tokens reach the
LM head and the log-softmax. Results equal a one-sequence-at-a-time computation (see tests).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .data import encode_pair
from .errors import AssetError, ConfigError
from .progress import bars_disabled

LM_EVAL_INSTALL = "pip install lm-eval==0.4.13"

# A scoring request: token ids, of which the last `n` are scored (each predicted from the ones before).
Request = tuple[list[int], int]


def score_multiple_choice(model, tokenizer, docs: Sequence, batch_size: int = 16, progress: bool = True) -> dict:
    """Zero-shot accuracy on multiple-choice docs (anything with `context`, `choices`, `gold`).

    acc picks the choice with the highest log-likelihood; acc_norm divides it by the number of
    characters of the choice first (lm-eval's acc_norm, OLMES' acc_per_char), which removes the
    bias towards short answers. Standard errors are sqrt(p(1-p)/(n-1)), as lm-eval reports.
    """
    if not docs:
        raise ConfigError("no documents to score")
    pairs = [(doc.context, choice) for doc in docs for choice in doc.choices]
    lls = loglikelihoods(model, tokenizer, pairs, batch_size=batch_size, progress=progress)
    hits, hits_norm, start = [], [], 0
    for doc in docs:
        ll = lls[start : start + len(doc.choices)]
        start += len(doc.choices)
        norm = [x / max(len(c), 1) for x, c in zip(ll, doc.choices)]
        hits.append(_argmax(ll) == doc.gold)
        hits_norm.append(_argmax(norm) == doc.gold)
    acc, acc_norm, n = sum(hits) / len(docs), sum(hits_norm) / len(docs), len(docs)
    return {"acc": acc, "acc_stderr": _stderr(acc, n), "acc_norm": acc_norm, "acc_norm_stderr": _stderr(acc_norm, n), "n": n,
            # per-doc outcomes in doc order ("1" = correct), for paired comparisons (offsite.stats)
            "correct": "".join("1" if h else "0" for h in hits), "correct_norm": "".join("1" if h else "0" for h in hits_norm)}


def loglikelihoods(model, tokenizer, pairs: Sequence[tuple[str, str]], batch_size: int = 16, progress: bool = True) -> list[float]:
    """Summed log-probability of each continuation given its context, in the order given.

    Pairs longer than the model's maximum length lose tokens from the left of the context
    (as lm-eval does). An empty context is replaced by the EOS token, so the first token of
    the continuation is still scored.
    """
    limit = _max_length(model)
    requests = [_mc_request(tokenizer, context, continuation, limit) for context, continuation in pairs]
    return _score(model, requests, _pad_id(tokenizer), batch_size, progress, "loglikelihood")


def perplexity(model, tokenizer, text: str, block_size: int = 512, stride: int | None = None, batch_size: int = 4,
               progress: bool = True) -> dict:
    """Per-token perplexity of `text`, read in windows of at most `block_size` input tokens.

    Each window scores the next `stride` tokens (default `block_size`: disjoint blocks) with the
    rest of the window as context, so every token after the first is scored exactly once; a
    smaller stride gives each token more context at more compute. `block_size` is capped at the
    model's maximum length. Returns ppl, nll (mean per scored token) and tokens (scored).
    """
    limit = _max_length(model)
    block = min(block_size, limit) if limit else block_size
    stride = stride or block
    if block < 2 or not 0 < stride <= block:
        raise ConfigError(f"perplexity needs block_size >= 2 and 0 < stride <= block_size (got {block}, {stride})")
    ids = tokenizer(text, add_special_tokens=True, verbose=False)["input_ids"]
    if len(ids) < 2:
        raise ConfigError("perplexity needs a text of at least two tokens")
    requests: list[Request] = []
    scored = 1  # the first token has nothing to be predicted from
    while scored < len(ids):
        end = min(scored + stride, len(ids))
        requests.append((ids[max(0, end - block - 1) : end], end - scored))
        scored = end
    sums = _score(model, requests, _pad_id(tokenizer), batch_size, progress, "perplexity")
    tokens = len(ids) - 1
    nll = -sum(sums) / tokens
    return {"ppl": math.exp(nll), "nll": nll, "tokens": tokens}


def lm_eval_model(model, tokenizer, batch_size: int | str = 16):
    """Wrap a loaded model for lm-eval-harness (`lm_eval.simple_evaluate(model=...)`)."""
    try:
        from lm_eval.models.huggingface import HFLM
    except ImportError:
        raise AssetError(f"lm-eval is not installed (optional extra 'eval'): {LM_EVAL_INSTALL}") from None
    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)


def lm_eval_task_name(path: str | Path) -> str:
    """The task an lm-eval 0.4 task YAML defines, checked before any model loads: the file exists and
    names its task, and lm-eval is installed. Its data must be local (e.g. `dataset_path: json` with
    `dataset_kwargs: {data_files: ...}`): evaluation runs with the datasets hub offline."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"lm-eval task file not found: {path}")
    try:
        spec = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"lm-eval task file is not valid YAML ({str(e).splitlines()[0][:200]}): {path}") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("task"), str):
        raise ConfigError(f"lm-eval task file names no task (a top-level `task:` key): {path}")
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise AssetError(f"lm-eval is not installed (optional extra 'eval'): {LM_EVAL_INSTALL}") from None
    return spec["task"]


def evaluate_lm_eval_task(model, tokenizer, path: str | Path, limit: int | None = None, batch_size: int = 16) -> dict:
    """lm-eval's own metrics ({"acc,none": ..., ...}) of the task a local task YAML defines, on a loaded
    model, through `lm_eval_model`; the hub stays offline (HF_DATASETS_OFFLINE, HF_HUB_OFFLINE)."""
    import os

    name = lm_eval_task_name(path)
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import lm_eval
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(Path(path).resolve().parent))
    out = lm_eval.simple_evaluate(model=lm_eval_model(model, tokenizer, batch_size), tasks=[name], task_manager=manager, limit=limit)
    metrics = out["results"][name]
    return {k: v for k, v in metrics.items() if k not in ("name", "alias")} | {"lm_eval_task": name}


def _mc_request(tokenizer, context: str, continuation: str, limit: int | None) -> Request:
    ctx, cont = encode_pair(tokenizer, context, continuation)
    if not ctx:
        if tokenizer.eos_token_id is None:
            raise ConfigError(f"context {context!r} encodes to no tokens and the tokenizer has no EOS to stand in")
        ctx = [tokenizer.eos_token_id]
    ids = ctx + cont
    if limit and len(ids) > limit + 1:
        ids = ids[-(limit + 1):]  # the last token is only a target, never an input
    return ids, min(len(cont), len(ids) - 1)


@dataclass
class _Group:
    """Requests that share their unscored prefix: the prefix is run once, the tails reuse its KV cache."""

    prefix: list[int]
    tails: list[list[int]] = field(default_factory=list)
    slots: list[int] = field(default_factory=list)  # where each tail's result goes

    @property
    def cost(self) -> int:
        return len(self.prefix) + max(map(len, self.tails))


def _group(requests: list[Request], max_rows: int) -> list[_Group]:
    """Group requests by identical prefix tokens (a doc's choices), at most `max_rows` tails per group."""
    groups: dict[tuple[int, ...], list[_Group]] = {}
    for slot, (ids, n) in enumerate(requests):
        prefix = tuple(ids[:-n])
        chunks = groups.setdefault(prefix, [_Group(list(prefix))])
        if len(chunks[-1].tails) == max_rows:
            chunks.append(_Group(list(prefix)))
        chunks[-1].tails.append(ids[-n:])
        chunks[-1].slots.append(slot)
    return sorted((g for chunks in groups.values() for g in chunks), key=lambda g: -g.cost)


def _batches(groups: list[_Group], max_rows: int):
    """Consecutive groups packed into batches of at most `max_rows` tails."""
    batch: list[_Group] = []
    rows = 0
    for g in groups:
        if batch and rows + len(g.tails) > max_rows:
            yield batch
            batch, rows = [], 0
        batch.append(g)
        rows += len(g.tails)
    if batch:
        yield batch


def _score(model, requests: list[Request], pad_id: int, batch_size: int, progress: bool, desc: str) -> list[float]:
    """Summed log-probabilities of the scored tail of every request, in the original order."""
    if batch_size < 1:
        raise ConfigError(f"batch_size must be at least 1 (got {batch_size})")
    out = [0.0] * len(requests)
    device = next(model.parameters()).device
    accepts = _forward_parameters(model)
    with _eval_mode(model), torch.inference_mode(), tqdm(total=len(requests), desc=desc, disable=bars_disabled(progress)) as bar:
        for batch in _batches(_group(requests, batch_size), batch_size):
            sums = _score_batch(model, batch, pad_id, device, accepts).tolist()
            for slot, value in zip((s for g in batch for s in g.slots), sums):
                out[slot] = value
            bar.update(len(sums))
    return out


def _score_batch(model, batch: list[_Group], pad_id: int, device, accepts: set[str]) -> torch.Tensor:
    """Two forwards: the shared prefixes (left-padded, cached), then every tail (right-padded).

    The last prefix token goes with the tails, so all scored logits come from the second
    forward and only those positions reach the LM head.
    """
    owner = torch.tensor([k for k, g in enumerate(batch) for _ in g.tails])  # tail row -> its group
    cache, prefix_mask = _run_prefixes(model, batch, pad_id, device, accepts)
    if cache is not None:
        cache.reorder_cache(owner.to(device))
    tail_ids, tail_mask, targets, positions = _tails(batch, pad_id)
    logits = model(input_ids=tail_ids.to(device), attention_mask=torch.cat([prefix_mask[owner], tail_mask], 1).to(device),
                   past_key_values=cache, use_cache=cache is not None, **_position_kwargs(accepts, positions, device)).logits
    nll = F.cross_entropy(logits.float().flatten(0, 1), targets.to(device).flatten(), reduction="none", ignore_index=-100)
    return -nll.view(targets.shape).sum(dim=1).cpu()


def _run_prefixes(model, batch: list[_Group], pad_id: int, device, accepts: set[str]):
    """KV cache of every prefix but its last token, and its mask; no cache when there is nothing to run.

    Left padding keeps each row's real tokens contiguous and last in the cache, so the tails
    continue right after them, which sliding-window attention relies on.
    """
    width = max(len(g.prefix) for g in batch) - 1
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    if not width:
        return None, mask
    for row, g in enumerate(batch):
        n = len(g.prefix) - 1
        if n:
            ids[row, width - n:] = torch.tensor(g.prefix[:-1])
            mask[row, width - n:] = 1
    kwargs = _position_kwargs(accepts, mask.cumsum(1) - 1, device)
    if "logits_to_keep" in accepts:
        kwargs["logits_to_keep"] = 1  # the prefix logits are not needed: skip the LM head
    out = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=True, **kwargs)
    return out.past_key_values, mask


def _tails(batch: list[_Group], pad_id: int):
    """Right-padded tail inputs (last prefix token + tail minus its last), mask, targets, positions."""
    rows = [(g, tail) for g in batch for tail in g.tails]
    width = max(len(tail) for _, tail in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    targets = torch.full((len(rows), width), -100, dtype=torch.long)
    start = torch.zeros((len(rows), 1), dtype=torch.long)
    for row, (g, tail) in enumerate(rows):
        ids[row, : len(tail)] = torch.tensor([g.prefix[-1], *tail[:-1]])
        mask[row, : len(tail)] = 1
        targets[row, : len(tail)] = torch.tensor(tail)
        start[row] = len(g.prefix) - 1
    positions = (start + torch.arange(width)) * mask  # padding at position 0: never out of range
    return ids, mask, targets, positions


def _forward_parameters(model) -> set[str]:
    """Keyword arguments the underlying transformers model takes.

    A PEFT wrapper hides them behind **kwargs but passes them through to its base model.
    """
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return set(inspect.signature(inner.forward).parameters)


def _position_kwargs(accepts: set[str], positions: torch.Tensor, device) -> dict:
    """Explicit position ids where the model takes them (padding must not shift positions)."""
    return {"position_ids": positions.clamp(min=0).to(device)} if "position_ids" in accepts else {}


@contextmanager
def _eval_mode(model):
    """Dropout off while scoring; a model scored mid-training goes back to training mode."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _max_length(model) -> int | None:
    config = getattr(model, "config", None)
    for attr in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _pad_id(tokenizer) -> int:
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return token_id
    return 0


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=values.__getitem__)


def _stderr(p: float, n: int) -> float:
    return math.sqrt(p * (1 - p) / (n - 1)) if n > 1 else float("nan")
