"""The data owner's external memory: context representations paired with gold target tokens.

For each training pair (prompt, target y_1..y_T) the owner is asked for the representations of
T contexts c_1..c_T, and row i of the memory pairs f(c_i) with the gold token y_i:

- `contexts="greedy"` (PEMA, as in the reference code and METHODS.md §4): c_1 is the prompt and
  c_i is the prompt extended by the model's own greedy predictions ŷ_1..ŷ_{i-1}, i.e. one
  request with `greedy_steps = T - 1`. The memory then holds the states the model is really in
  when it generates, labelled with what it should have said.
- `contexts="gold"` (teacher forcing): c_i is the prompt extended by the gold y_1..y_{i-1}
  (`forced = y_1..y_{T-1}`), the usual language-modelling pairing.

Files (all in one directory): `keys.npy` float32 (N, d) and `values.npy` int32 (N,), N = sum of T
over the examples, memory-mapped and written in place; `lengths.npy` int32 (examples,), T per
example in order; `memory.json` (what was built from what, written first) and `progress.json`
(examples and rows done, replaced atomically after every batch once the rows it counts are
flushed). Re-running the same build continues at the first unfinished batch; batches always
start at multiples of the batch size, so the finished memory is byte-identical to an
uninterrupted build. Any other data or settings for an existing directory is an error.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ..data import Example, encode_pair
from ..durable import atomic_write
from ..errors import ConfigError
from .configs import CONTEXTS, MemoryConfig  # noqa: F401  (re-exported)
from ..progress import bars_disabled
from .owner import RepresentationRequest

FORMAT = "offsite-pema-memory"
META, PROGRESS = "memory.json", "progress.json"
KEYS, VALUES, LENGTHS = "keys.npy", "values.npy", "lengths.npy"
OWN_FILES = (META, PROGRESS, KEYS, VALUES, LENGTHS)




def encode_examples(tokenizer, examples: list[Example], config: MemoryConfig) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, target ids) per example, split where offsite's training splits them (`encode_pair`)."""
    if not examples:
        raise ConfigError("no training examples for the external memory")
    eos = tokenizer.eos_token_id if config.end_row else None
    if config.end_row and eos is None:
        raise ConfigError("end_row needs a tokenizer with an EOS token (or build the memory with end_row=False)")
    out = []
    for ex in examples:
        prompt, target = encode_pair(tokenizer, ex.context, ex.continuation)
        target = target[: config.max_target_tokens]
        out.append((prompt[-config.max_prompt_tokens:], target + [eos] if eos is not None else target))
    return out


def _fingerprint(encoded, config: MemoryConfig, owner: dict) -> str:
    h = hashlib.sha256(json.dumps({"config": asdict(config), "owner": owner}, sort_keys=True).encode())
    for prompt, target in encoded:
        h.update(np.asarray(prompt, dtype=np.int64).tobytes() + b"|" + np.asarray(target, dtype=np.int64).tobytes() + b"\n")
    return h.hexdigest()


def _write_json(path: Path, data: dict) -> None:
    atomic_write(path, json.dumps(data, indent=1).encode())


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read {path.name} of the external memory ({type(e).__name__}): {path.parent}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path.name} of the external memory is not a JSON object: {path.parent}")
    return data


def build_memory(
    server,
    tokenizer,
    examples: list[Example],
    out_dir: str | Path,
    config: MemoryConfig | None = None,
    progress: bool = True,
) -> Path:
    """Build (or continue building) the external memory in `out_dir` from `examples`.

    `server` answers `represent(RepresentationRequest)` and `info()` (a `RepresentationServer`,
    or a client of one); `tokenizer` is the one from the head bundle.
    """
    config = config or MemoryConfig()
    out_dir = Path(out_dir)
    encoded = encode_examples(tokenizer, examples, config)
    owner = server.info()
    d = owner["hidden_size"]
    fingerprint = _fingerprint(encoded, config, owner)
    lengths = np.asarray([len(t) for _, t in encoded], dtype=np.int32)
    rows = int(lengths.sum())
    meta = {
        "format": FORMAT, "version": 1, "fingerprint": fingerprint, "hidden_size": d, "rows": rows,
        "examples": len(encoded), "mean_target_length": float(lengths.mean()), "config": asdict(config),
        "owner": {"base_fingerprint": owner["base_fingerprint"], "model_type": owner["model_type"], "vocab_size": owner["vocab_size"]},
    }

    if (out_dir / META).exists():
        existing = _read_json(out_dir / META)
        if existing.get("fingerprint") != fingerprint:
            raise ConfigError(f"{out_dir} holds an external memory built from other data, settings or model; choose another output")
        state = _read_json(out_dir / PROGRESS)
        try:
            keys = np.load(out_dir / KEYS, mmap_mode="r+")
            values = np.load(out_dir / VALUES, mmap_mode="r+")
        except (OSError, ValueError) as e:
            raise ConfigError(f"external memory files are unreadable ({str(e)[:100]}); start it again in a new directory: {out_dir}") from None
        if keys.shape != (rows, d) or keys.dtype != np.float32 or values.shape != (rows,) or values.dtype != np.int32:
            raise ConfigError(f"external memory files do not have the shapes memory.json declares: {out_dir}")
    else:
        # Without memory.json nothing was recorded yet: our own leftovers are rewritten, anything else is not ours.
        foreign = sorted(p.name for p in out_dir.iterdir() if p.name not in OWN_FILES and not p.name.startswith(".")) if out_dir.is_dir() else []
        if foreign:
            raise ConfigError(f"output directory holds files that are not an external memory ({foreign[:3]}): {out_dir}")
        out_dir.mkdir(parents=True, exist_ok=True)
        np.save(out_dir / LENGTHS, lengths)
        keys = np.lib.format.open_memmap(out_dir / KEYS, mode="w+", dtype=np.float32, shape=(rows, d))
        values = np.lib.format.open_memmap(out_dir / VALUES, mode="w+", dtype=np.int32, shape=(rows,))
        state = {"fingerprint": fingerprint, "examples_done": 0, "rows_done": 0, "complete": False}
        _write_json(out_dir / PROGRESS, state)
        _write_json(out_dir / META, meta)  # last: its presence means the files above exist
    if state.get("fingerprint") != fingerprint or not isinstance(state.get("examples_done"), int):
        raise ConfigError(f"progress.json does not belong to this external memory: {out_dir}")

    done, row = state["examples_done"], state["rows_done"]
    bar = tqdm(total=len(encoded), initial=done, disable=bars_disabled(progress), desc="external memory", unit="ex")
    while done < len(encoded):
        batch = encoded[done : done + config.batch_size]
        request = RepresentationRequest(prompts=[p for p, _ in batch], log_probs=0)
        if config.contexts == "greedy":
            request.greedy_steps = [len(t) - 1 for _, t in batch]
        else:
            request.forced = [t[:-1] for _, t in batch]
        response = server.represent(request)
        for (_, target), reps in zip(batch, response.representations):
            if reps.shape != (len(target), d):
                raise ConfigError(f"the owner answered {reps.shape[0]} representations of size {reps.shape[-1]} for a target of {len(target)} tokens")
            keys[row : row + len(target)] = reps
            values[row : row + len(target)] = target
            row += len(target)
        keys.flush()
        values.flush()
        done += len(batch)
        state = {"fingerprint": fingerprint, "examples_done": done, "rows_done": row, "complete": done == len(encoded)}
        _write_json(out_dir / PROGRESS, state)
        bar.update(len(batch))
    bar.close()
    return out_dir


@dataclass
class ExternalMemory:
    """A finished memory, opened read-only (keys and values stay on disk, memory-mapped)."""

    path: Path
    keys: np.ndarray  # float32 (N, d), memmap
    values: np.ndarray  # int32 (N,), memmap
    lengths: np.ndarray  # int32 (examples,)
    meta: dict

    @property
    def hidden_size(self) -> int:
        return self.keys.shape[1]

    @property
    def mean_target_length(self) -> float:
        return float(self.lengths.mean())

    def example_rows(self) -> list[tuple[int, int]]:
        """(start, end) row range of every example."""
        ends = np.cumsum(self.lengths, dtype=np.int64)
        return [(int(e - n), int(e)) for e, n in zip(ends, self.lengths)]

    @classmethod
    def open(cls, path: str | Path) -> "ExternalMemory":
        path = Path(path)
        if not (path / META).is_file():
            raise ConfigError(f"not an external memory (no {META}): {path}")
        meta = _read_json(path / META)
        state = _read_json(path / PROGRESS)
        if meta.get("format") != FORMAT or state.get("fingerprint") != meta.get("fingerprint"):
            raise ConfigError(f"not an offsite external memory, or its progress file belongs to another: {path}")
        if not state.get("complete"):
            raise ConfigError(f"external memory is unfinished ({state.get('examples_done')} of {meta.get('examples')} examples); "
                              f"run the same build again to continue it: {path}")
        try:
            keys = np.load(path / KEYS, mmap_mode="r")
            values = np.load(path / VALUES, mmap_mode="r")
            lengths = np.load(path / LENGTHS, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise ConfigError(f"external memory files are unreadable ({str(e)[:100]}): {path}") from None
        rows, d = meta.get("rows"), meta.get("hidden_size")
        if (keys.dtype != np.float32 or keys.shape != (rows, d) or values.dtype != np.int32 or values.shape != (rows,)
                or lengths.dtype != np.int32 or lengths.shape != (meta.get("examples"),) or int(lengths.sum()) != rows):
            raise ConfigError(f"external memory files do not have the shapes and dtypes memory.json declares: {path}")
        return cls(path, keys, values, lengths, meta)
