"""Tokenisation of (context, continuation) pairs, shared by training and evaluation.

One function, `encode_pair`, decides where the context ends and the answer begins, so the
prompt format seen in fine-tuning is exactly the one scored in evaluation (the reference
Offsite-Tuning code had a spacing mismatch between the two).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import ConfigError

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Example:
    """One training or scoring unit: the model reads `context` and is taught/asked `continuation`."""

    context: str
    continuation: str


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of context and continuation, such that ctx + cont tokenises the joined text.

    Trailing spaces of the context move to the continuation ("Answer: " + "Paris" is scored as
    "Answer:" + " Paris"), which is how BPE tokenisers see a word boundary. The whole string is
    tokenised once and split, as lm-eval does, so merges across the boundary cannot drift.
    """
    stripped = context.rstrip(" ")
    continuation = context[len(stripped):] + continuation
    context = stripped
    whole = _ids(tokenizer, context + continuation)
    ctx = _ids(tokenizer, context)
    # The context tokens are a prefix of the whole in all but pathological merges; fall back to
    # the whole's own split point so the two always add up.
    n_ctx = len(ctx) if whole[: len(ctx)] == ctx else _common_prefix(whole, ctx)
    if n_ctx == len(whole):
        raise ConfigError(f"continuation {continuation!r} encodes to no tokens")
    return whole[:n_ctx], whole[n_ctx:]


def _ids(tokenizer, text: str) -> list[int]:
    ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    eos = tokenizer.eos_token_id
    # Some tokenisers append EOS as a "special token"; the continuation must not end in it.
    if eos is not None and ids and ids[-1] == eos and tokenizer.bos_token_id != eos:
        ids = ids[:-1]
    if not ids and tokenizer.bos_token_id is not None:
        ids = [tokenizer.bos_token_id]
    return ids


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def tokenize_example(tokenizer, ex: Example, max_length: int) -> dict[str, list[int]]:
    """input_ids and labels with the context masked; truncated from the left of the context."""
    ctx, cont = encode_pair(tokenizer, ex.context, ex.continuation)
    ids = ctx + cont
    labels = [IGNORE_INDEX] * len(ctx) + cont
    if len(ids) > max_length:
        ids, labels = ids[-max_length:], labels[-max_length:]
    return {"input_ids": ids, "labels": labels}


ROLES = ("system", "user", "assistant")


def read_jsonl(path: Path, what: str):
    """(line number, record) for every non-blank line of a JSONL file of objects, or a one-line ConfigError."""
    if not path.is_file():
        raise ConfigError(f"{what} file not found: {path}")
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(rec, dict):
                raise ConfigError(f"{path}:{lineno}: expected a JSON object")
            yield lineno, rec


def load_examples(path: str | Path, tokenizer=None) -> list[Example]:
    """Read a JSONL file of training records, one of these shapes per line:

    - {"context", "continuation"}: the context is masked from the loss;
    - {"prompt", "completion"} (the common SFT shape): the same;
    - {"text"}: plain text, all of it trained on;
    - {"messages": [{"role", "content"}, ...]} (chat): rendered with the tokenizer's chat template;
      every assistant turn becomes one example whose context is the conversation before it
      (with the assistant header) and whose continuation is the turn with its end-of-turn marker,
      so the loss falls on the assistant turns only. Needs `tokenizer` (or a zero-argument
      callable returning it, called only if a chat record appears) with a chat template.
    """
    path = Path(path)
    examples = []
    for lineno, rec in read_jsonl(path, "training data"):
        if "messages" in rec:
            if callable(tokenizer) and not hasattr(tokenizer, "apply_chat_template"):
                tokenizer = tokenizer()
            examples += chat_examples(rec["messages"], tokenizer, f"{path}:{lineno}")
        elif "text" in rec and "continuation" not in rec:
            examples.append(Example("", str(rec["text"])))
        elif isinstance(rec.get("context"), str) and isinstance(rec.get("continuation"), str):
            examples.append(Example(rec["context"], rec["continuation"]))
        elif isinstance(rec.get("prompt"), str) and isinstance(rec.get("completion"), str):
            examples.append(Example(rec["prompt"], rec["completion"]))
        else:
            raise ConfigError(f"{path}:{lineno}: needs string fields 'context' and 'continuation' (or 'prompt' and "
                              "'completion', 'text', or a 'messages' list)")
    if not examples:
        raise ConfigError(f"training data file has no examples: {path}")
    return examples


def chat_examples(messages, tokenizer, where: str = "messages") -> list[Example]:
    """One Example per assistant turn of a chat, rendered with the tokenizer's chat template."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ConfigError(f"{where}: chat 'messages' need a tokenizer with a chat template (the emulator's has none)")
    if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str) and set(m) <= {"role", "content"}
            for m in messages):
        raise ConfigError(f"{where}: 'messages' must be a non-empty list of {{'role': system|user|assistant, 'content': text}}")
    if not any(m["role"] == "assistant" for m in messages):
        raise ConfigError(f"{where}: the conversation has no assistant turn to train on")
    bos = tokenizer.bos_token or ""

    def render(turns, prompt):
        text = tokenizer.apply_chat_template(turns, add_generation_prompt=prompt, tokenize=False)
        return text[len(bos):] if bos and text.startswith(bos) else text  # the tokenizer adds BOS itself

    out = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        context, whole = render(messages[:i], True), render(messages[: i + 1], False)
        if not whole.startswith(context) or len(whole) == len(context):
            raise ConfigError(f"{where}: the chat template does not render turn {i} as an extension of the conversation before it")
        out.append(Example(context, whole[len(context):]))
    return out


def save_examples(examples: list[Example], path: str | Path) -> None:
    with Path(path).open("w", encoding="utf-8") as f:
        for ex in examples:
            f.write(json.dumps({"context": ex.context, "continuation": ex.continuation}) + "\n")


def pad_batch(features: list[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest sequence in the batch."""
    width = max(len(f["input_ids"]) for f in features)
    input_ids = torch.full((len(features), width), pad_id, dtype=torch.long)
    labels = torch.full((len(features), width), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((len(features), width), dtype=torch.long)
    for i, f in enumerate(features):
        n = len(f["input_ids"])
        input_ids[i, :n] = torch.tensor(f["input_ids"])
        labels[i, :n] = torch.tensor(f["labels"])
        attention[i, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention}


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """Deterministic shuffle per (seed, epoch): a resumed run sees the same order."""
    order = list(range(n))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order


MEGABATCH = 50  # batches per length-sorted group (as transformers' LengthGroupedSampler)


def length_grouped_order(lengths: list[int], batch_size: int, seed: int, epoch: int) -> list[int]:
    """The epoch's shuffled order, sorted by length (longest first) within groups of MEGABATCH batches, so
    a batch holds examples of similar length and pads less; still random across groups and deterministic
    per (seed, epoch), so a resumed run sees the same batches."""
    order = epoch_order(len(lengths), seed, epoch)
    size = max(1, batch_size * MEGABATCH)
    return [i for start in range(0, len(order), size) for i in sorted(order[start : start + size], key=lambda i: -lengths[i])]
