"""Checkpoints larger than memory: read a safetensors checkpoint tensor by tensor, in pieces, and
write a new one shard by shard, never building the model.

The owner's LayerDrop compress and plug-in (offsite.emulator, offsite.plugin) are pure tensor
selection and replacement, so they need no model in memory: `StoredCheckpoint` opens a
checkpoint on the meta device (its config, layout and state-dict names, no weights), maps the
file's tensor names to the model's the way transformers does when it loads them, and reads any
tensor in chunks with plain positioned reads (no memory map, so peak memory is one chunk, not
one shard). `Fingerprint` hashes those chunks exactly as `bundle.model_fingerprint` hashes a
loaded model, and `ShardedWriter` writes safetensors shards plus the index transformers writes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from .bundle import TORCH_DTYPES, Fingerprint, safetensors_layout, tensor_bytes
from .durable import WriteBehind
from .errors import BundleError, UnsupportedModelError
from .surgery import BlockLayout, discover_layout, reduced_config

log = logging.getLogger(__name__)
CHUNK_BYTES = 64 << 20
DEFAULT_SHARD_BYTES = 5 << 30  # the hub's customary shard size
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

SAFETENSORS_CODES = {v: k for k, v in TORCH_DTYPES.items()}


@dataclass(frozen=True)
class StoredTensor:
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # byte offsets in the file
    end: int


def open_stored(path: str | Path, dtype: torch.dtype, required: bool) -> "StoredCheckpoint | None":
    """The checkpoint opened for streaming, or None (logged) when it cannot stream and `required` is
    false (the caller then loads the model); with `required`, that is an UnsupportedModelError."""
    try:
        return StoredCheckpoint(path, dtype)
    except UnsupportedModelError as e:
        if required:
            raise
        log.info("streaming is not possible (%s); loading the model instead", e)
        return None


def checkpoint_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint directory: those its index names, or model.safetensors."""
    index = path / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            names = sorted(set(weight_map.values()))
        except (ValueError, KeyError, TypeError, AttributeError):
            raise BundleError(f"{INDEX_FILE} is not a safetensors index (no weight_map): {path}") from None
        if any("/" in n or n.startswith(".") for n in names):
            raise BundleError(f"{INDEX_FILE} names files outside the checkpoint directory: {path}")
        return [path / n for n in names]
    if (path / SINGLE_FILE).is_file():
        return [path / SINGLE_FILE]
    raise BundleError(f"checkpoint has no safetensors weights ({SINGLE_FILE} or {INDEX_FILE}): {path}")


class StoredCheckpoint:
    """A checkpoint directory seen as the model transformers would load from it, without its weights.

    `model` is that model on the meta device (dtype `dtype`), `layout` its parts; `source` maps each
    state-dict name to the file tensor that fills it (tied weights share one); `entries` locates every
    file tensor. What transformers could only load by converting tensors (fused experts, ...) is
    refused here with UnsupportedModelError, and callers fall back to loading the model.
    """

    def __init__(self, path: str | Path, dtype: torch.dtype):
        from transformers import AutoConfig, AutoModelForCausalLM

        self.path = Path(path)
        self.dtype = dtype
        self.config = AutoConfig.from_pretrained(self.path, local_files_only=True, trust_remote_code=False)
        with torch.device("meta"):
            self.model = AutoModelForCausalLM.from_config(self.config, dtype=dtype, trust_remote_code=False)
        self.layout: BlockLayout = discover_layout(self.model)
        self.state = self.model.state_dict(keep_vars=True)
        self.entries: dict[str, StoredTensor] = {}
        for file in checkpoint_files(self.path):
            found = safetensors_layout(file)
            for name, (code, shape, begin, end) in found.items():
                if name in self.entries:
                    raise BundleError(f"checkpoint tensor {name[:100]} is stored twice: {self.path}")
                if code not in TORCH_DTYPES:
                    raise UnsupportedModelError(f"checkpoint tensor {name[:100]} has dtype {code}, which offsite cannot stream")
                self.entries[name] = StoredTensor(file, TORCH_DTYPES[code], shape, begin, end)
        self.source = self._map_names()
        self._fds: dict[Path, int] = {}

    def _map_names(self) -> dict[str, str]:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

        transforms = get_model_conversion_mapping(self.model)
        renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
        converters = [t for t in transforms if isinstance(t, WeightConverter)]
        source: dict[str, str] = {}
        for file_key in self.entries:
            name, converted = rename_source_key(file_key, renamings, converters, self.model.base_model_prefix, self.state)
            if converted is not None:
                raise UnsupportedModelError(f"{self.layout.model_type}: checkpoint tensor {file_key[:100]} is converted on load, "
                                            "which offsite does not stream; load the model instead (stream=False)")
            if name in self.state:
                if name in source:
                    raise BundleError(f"checkpoint tensors {source[name][:80]} and {file_key[:80]} both fill {name[:80]}: {self.path}")
                source[name] = file_key
        # Tied weights (one Parameter under several names) are stored once.
        groups: dict[int, list[str]] = {}
        for name, tensor in self.state.items():
            groups.setdefault(id(tensor), []).append(name)
        for names in groups.values():
            stored = [source[n] for n in names if n in source]
            for n in names:
                if n not in source and stored:
                    source[n] = stored[0]
        missing = sorted(set(self.state) - set(source))
        if missing:
            raise BundleError(f"checkpoint has no tensor for {missing[:3]} (a model built from its config has them): {self.path}")
        for name, file_key in source.items():
            stored, expected = self.entries[file_key].shape, tuple(self.state[name].shape)
            if stored != expected:
                raise BundleError(f"checkpoint tensor {file_key[:100]} has shape {stored}, its config implies {expected}: {self.path}")
        return source

    def dtype_of(self, name: str) -> torch.dtype:
        """The dtype state-dict tensor `name` has once loaded (floating tensors take the load dtype)."""
        return self.state[name].dtype

    def primary_names(self) -> list[str]:
        """State-dict names in sorted order, each file tensor once (the first name that uses it)."""
        seen, out = set(), []
        for name in sorted(self.source):
            if self.source[name] not in seen:
                seen.add(self.source[name])
                out.append(name)
        return out

    def chunks(self, name: str, chunk_bytes: int = CHUNK_BYTES) -> Iterator[bytes]:
        """The bytes of state-dict tensor `name` in the load dtype, in pieces of about chunk_bytes."""
        stored = self.entries[self.source[name]]
        target = self.dtype_of(name)
        fd = self._fds.get(stored.file)
        if fd is None:
            fd = self._fds[stored.file] = os.open(stored.file, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        size = torch.empty((), dtype=stored.dtype).element_size()
        step = max(size, chunk_bytes // size * size)
        position = stored.begin
        while position < stored.end:
            data = os.pread(fd, min(step, stored.end - position), position)
            if not data or len(data) % size:
                raise BundleError(f"checkpoint file {stored.file.name} ended inside tensor {self.source[name][:100]}: {self.path}")
            position += len(data)
            if stored.dtype != target:
                data = tensor_bytes(torch.frombuffer(bytearray(data), dtype=stored.dtype).to(target))
            yield data

    def save_configs(self, out_dir: Path, config=None) -> None:
        """config.json (this checkpoint's, or `config`, in the load dtype) and the checkpoint's own
        generation_config.json, as `save_pretrained` writes them beside the weights."""
        config = config if config is not None else self.config
        config.dtype = self.dtype
        config.save_pretrained(out_dir)
        generation = generation_config_of(self.path)
        if generation is not None:
            generation.save_pretrained(out_dir)

    def read_ahead(self, names: list[str], depth: int = 3, chunk_bytes: int = CHUNK_BYTES, fingerprint: bool = True) -> "ReadAhead":
        """The chunks of `names`, in that order, read by a thread `depth` chunks ahead of the caller, so the
        disk reads overlap the caller's hashing and writing (both release the GIL). `fingerprint`: the
        thread also hashes what it reads (`ReadAhead.fingerprint`)."""
        return ReadAhead(self, names, depth, chunk_bytes, fingerprint)

    def fingerprint(self) -> str:
        """`bundle.model_fingerprint` of the model this checkpoint loads as, from one streamed read."""
        names = sorted(self.source)
        with self.read_ahead(names) as reader:
            for name in names:
                for _ in reader.chunks(name):
                    pass
            return reader.fingerprint()

    def load_blocks(self, kept: list[int], shared: dict[str, torch.Tensor] | None = None, with_fingerprint: bool = False):
        """The model with only blocks `kept` (original indices, ascending), renumbered, as
        `surgery.build_reduced_model` makes it from the loaded model, but reading only those blocks'
        tensors: peak memory is the reduced model, never the whole one. `shared`: a cache of the
        tensors outside the blocks (embeddings, final norm, head), filled on the first call, so a
        caller that loads one block after another reads them once. `with_fingerprint`: returns
        (model, the base fingerprint) from one streamed pass over every tensor, the kept ones
        copied in as they pass, so they are not read a second time for the fingerprint."""
        from transformers.initialization import no_init_weights

        layout = self.layout
        config = reduced_config(self.config, kept)
        with no_init_weights():  # allocated, not initialised: every tensor is overwritten below
            model = type(self.model)._from_config(config, dtype=self.dtype)
        targets = model.state_dict()
        wanted: dict[str, list[str]] = {}  # the checkpoint's state-dict name -> the reduced model's names it fills
        for name in targets:
            parsed = layout.parse_block_key(name)
            original = name if parsed is None else layout.block_key(kept[parsed[0]], parsed[1])
            if original not in self.source:
                raise UnsupportedModelError(f"{layout.model_type}: the reduced model has {name}, which the checkpoint does not fill")
            wanted.setdefault(original, []).append(name)
        fingerprint = None
        with torch.no_grad():
            if with_fingerprint:
                names = sorted(self.source)
                with self.read_ahead(names) as reader:  # it hashes every tensor as it reads
                    for name in names:
                        if name not in wanted:
                            for _ in reader.chunks(name):
                                pass
                            continue
                        value = self.as_tensor(name, reader.chunks(name))
                        for target in wanted[name]:
                            targets[target].copy_(value)
                    fingerprint = reader.fingerprint()
            else:
                for original, names in wanted.items():
                    if shared is not None and layout.parse_block_key(original) is None:
                        if original not in shared:
                            shared[original] = self.tensor(original)
                        value = shared[original]
                    else:
                        value = self.tensor(original)
                    for target in names:
                        targets[target].copy_(value)
        model.tie_weights()
        generation = generation_config_of(self.path)
        if generation is not None:
            model.generation_config = generation
        model.eval()
        return (model, fingerprint) if with_fingerprint else model

    def tensor(self, name: str) -> torch.Tensor:
        """State-dict tensor `name`, read whole (for the few tensors a caller must compute with)."""
        return self.as_tensor(name, self.chunks(name))

    def as_tensor(self, name: str, chunks) -> torch.Tensor:
        """State-dict tensor `name` (writable, in the load dtype) from its bytes in pieces: `chunks(name)`
        here or of a `read_ahead` reader."""
        data = bytearray().join(chunks)
        shape = tuple(self.state[name].shape)
        if not data:
            return torch.empty(shape, dtype=self.dtype_of(name))
        return torch.frombuffer(data, dtype=self.dtype_of(name)).reshape(shape)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> "StoredCheckpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class ReadAhead:
    """See `StoredCheckpoint.read_ahead`; `chunks(name)` must be asked for the names in order."""

    _END = object()

    def __init__(self, stored: StoredCheckpoint, names: list[str], depth: int, chunk_bytes: int, fingerprint: bool = True):
        # The reading thread also computes the fingerprint of what it reads (in the caller's name order), so
        # hashing the base and whatever the caller does with the bytes run on two cores.
        self._fingerprint = Fingerprint() if fingerprint else None
        self._error: BaseException | None = None
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._names = list(names)
        self._next = 0
        self._thread = threading.Thread(target=self._produce, args=(stored, chunk_bytes), daemon=True)
        self._thread.start()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self, stored: StoredCheckpoint, chunk_bytes: int) -> None:
        try:
            hashing = self._fingerprint
            for name in self._names:
                if hashing is not None:
                    hashing.begin(name, stored.dtype_of(name), tuple(stored.state[name].shape))
                for chunk in stored.chunks(name, chunk_bytes):
                    if hashing is not None:
                        hashing.update(chunk)
                    if not self._put(chunk):
                        return
                if not self._put(self._END):
                    return
        except BaseException as e:  # noqa: BLE001 - handed to the reader, raised there
            self._error = e
            self._put(e)

    def chunks(self, name: str) -> Iterator[bytes]:
        if self._next >= len(self._names) or self._names[self._next] != name:
            raise RuntimeError(f"ReadAhead: asked for {name}, the next tensor is {self._names[self._next:self._next + 1]}")
        self._next += 1
        while True:
            item = self._queue.get()
            if item is self._END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def fingerprint(self) -> str:
        """`bundle.model_fingerprint` over the names read, in order; only once every one has been consumed."""
        if self._fingerprint is None:
            raise RuntimeError("ReadAhead: made with fingerprint=False")
        if self._next != len(self._names):
            raise RuntimeError("ReadAhead: the fingerprint is known only once every tensor has been read")
        while self._thread.is_alive():  # it may still be handing over the end of the last tensor
            try:
                self._queue.get(timeout=0.1)
            except queue.Empty:
                pass
        if self._error is not None:
            raise self._error
        return self._fingerprint.hexdigest()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()

    def __enter__(self) -> "ReadAhead":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def generation_config_of(path: Path):
    """The checkpoint's generation_config.json as transformers reads it, or None."""
    from transformers import GenerationConfig

    if not (Path(path) / "generation_config.json").is_file():
        return None
    try:
        return GenerationConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError):
        return None


class ShardedWriter:
    """Safetensors shards written sequentially from a plan of (name, dtype, shape), in plan order, with
    `model.safetensors.index.json` as transformers writes it (one `model.safetensors` if it fits)."""

    def __init__(self, out_dir: Path, plan: list[tuple[str, torch.dtype, tuple[int, ...]]], max_shard_bytes: int = DEFAULT_SHARD_BYTES):
        self.out_dir = Path(out_dir)
        shards: list[list[tuple[str, torch.dtype, tuple[int, ...], int]]] = [[]]
        used = 0
        for name, dtype, shape in plan:
            nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
            if shards[-1] and used + nbytes > max_shard_bytes:
                shards.append([])
                used = 0
            shards[-1].append((name, dtype, shape, nbytes))
            used += nbytes
        n = len(shards)
        self.files = [SINGLE_FILE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self._queue = [(file, name, nbytes) for file, shard in zip(self.files, shards) for name, _, _, nbytes in shard]
        self._headers = {file: _header(shard) for file, shard in zip(self.files, shards)}
        self.weight_map = {name: file for file, shard in zip(self.files, shards) for name, *_ in shard}
        self.total_size = sum(nbytes for shard in shards for *_, nbytes in shard)
        self._position = 0  # index into the queue of the tensor being written
        self._handle = None
        self._open_file = None
        self._hashes: dict[str, "hashlib._Hash"] = {}
        self._skip_empty()

    def _skip_empty(self) -> None:
        """Zero-size tensors have no bytes to wait for: they are complete as soon as they come up."""
        while self._position < len(self._queue) and self._queue[self._position][2] == 0:
            self._position += 1
        self._left = self._queue[self._position][2] if self._position < len(self._queue) else 0

    def write(self, name: str, data: bytes) -> None:
        """Append bytes of tensor `name`, which must be the plan's next tensor (or the current one)."""
        if self._position >= len(self._queue):
            raise RuntimeError(f"ShardedWriter: got {name} after every planned tensor was written")
        file, expected, _ = self._queue[self._position]
        if name != expected:
            raise RuntimeError(f"ShardedWriter: got {name}, the plan's next tensor is {expected}")
        if len(data) > self._left:
            raise RuntimeError(f"ShardedWriter: more bytes than tensor {name} holds")
        if self._open_file != file:
            self._switch(file)
        self._handle.write(data)
        self._hashes[file].update(data)
        self._left -= len(data)
        if self._left == 0:
            self._position += 1
            self._skip_empty()

    def _switch(self, file: str) -> None:
        if self._handle is not None:
            self._handle.close()
        # The disk write of one chunk overlaps the caller's hashing of the next (and its reads).
        self._handle = WriteBehind(open(self.out_dir / file, "wb"))
        self._handle.write(self._headers[file])
        self._hashes[file] = hashlib.sha256(self._headers[file])
        self._open_file = file

    def close(self) -> dict[str, str]:
        """Finish the last shard and write the index; the SHA-256 of each shard written, by file name
        (what `bundle.write_bundle` takes, so the shards are not read back to be hashed)."""
        if self._position < len(self._queue):
            raise RuntimeError("ShardedWriter closed before every planned tensor was written")
        for file in self.files:  # shards of zero-size tensors only are never opened by write()
            if self._open_file != file and not (self.out_dir / file).exists():
                self._switch(file)
        if self._handle is not None:
            self._handle.close()
            self._handle = None
        if len(self.files) > 1:
            index = {"metadata": {"total_size": self.total_size}, "weight_map": dict(sorted(self.weight_map.items()))}
            (self.out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        return {file: h.hexdigest() for file, h in self._hashes.items()}

    def abort(self) -> None:
        """Stop after an error elsewhere: the open shard is closed, incomplete (the caller discards the directory)."""
        if self._handle is not None:
            self._handle.abort()
            self._handle = None

    def __enter__(self) -> "ShardedWriter":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is not None:
            self.abort()


def _header(shard: list[tuple[str, torch.dtype, tuple[int, ...], int]]) -> bytes:
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, dtype, shape, nbytes in shard:
        header[name] = {"dtype": SAFETENSORS_CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    data = json.dumps(header, separators=(",", ":")).encode()
    data += b" " * (-len(data) % 8)  # the data section starts 8-byte aligned, as safetensors writes it
    return struct.pack("<Q", len(data)) + data
