"""ScaleOT stage (a) block by block, for checkpoints larger than memory (`ImportanceConfig.onload`).

The in-memory stage (a) holds the whole model: its harmonizer objectives "lm" and "match" and the
learned importance score mixed networks end to end. Two parts of it need no mixed network, and those
are what this runs with one base block in memory at a time (offsite.onload, as GPTQ calibrates):

- the "local" objective: each harmonizer regressed on its own block's input -> output in the
  original network. The training activations are carried forward on disk (float32 memory maps);
  when block i's turn comes its inputs and outputs are both on disk and its harmonizer is fitted
  there, `steps` steps of the batches the in-memory run would draw, AdamW, each harmonizer's
  gradient clipped on its own (in memory one clip spans all of them);
- the direct swap measurement, which ranks the blocks: the held-out loss with each middle block
  alone swapped for its harmonizer, minus the original network's. Every swapped network is carried
  forward at once (one activation set per middle block, on disk), so each base block is read once.

The artifact is the in-memory one's, with no learned importance ("importance": null): an emulator is
made from it with `ranking="direct"`; `ranking="learned"` is refused by name. Peak memory is one
block, the embeddings and head, the harmonizers and one batch; disk holds two training activation
sets and M + 1 held-out ones (rows x block_size x hidden float32 each).
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..errors import ConfigError
from ..models import checkpoint_tokenizer, resolve_device
from ..onload import run_block, run_to_logits
from ..progress import bars_disabled
from ..structure import TUPLE_OUTPUT_BLOCKS, Harmonizer
from .configs import ImportanceConfig
from .scaleot import importance_texts, least_important_first, normalised_mse, split_features, train_indices, write_artifact


def onload_importance(model_path: str | Path, out_dir: str | Path, config: ImportanceConfig, base_name: str = "",
                      texts: list[str] | None = None, overwrite: bool = False, progress: bool = True, log=print,
                      work_dir: str | Path | None = None) -> Path:
    """Stage (a) from the checkpoint at `model_path`, one block in memory at a time (see the module).
    `texts` overrides the configured data; the activations go to a temporary directory under `work_dir`."""
    from ..streaming import StoredCheckpoint

    if config.objective != "local" or not config.direct_sequences:
        raise ConfigError("onload runs the 'local' objective and ranks by the direct swap measurement: "
                          f"set objective='local' and direct_sequences >= 1 (got {config.objective!r}, {config.direct_sequences})")
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise ConfigError(f"output already exists, not overwriting: {out_dir}")
    model_path = Path(model_path)
    tokenizer = checkpoint_tokenizer(model_path)
    train_set, heldout_set = split_features(tokenizer, texts if texts is not None else importance_texts(config), config)
    with StoredCheckpoint(model_path, torch.float32) as stored:
        layout = stored.layout
        middle = config.middle(layout.num_blocks)
        if len(middle) < 2:
            raise ConfigError(f"scaleot needs at least 2 middle blocks, the adapter {config.num_bottom}+{config.num_top} leaves {len(middle)}")
        if config.num_bottom < 1 or config.num_top < 1:
            raise ConfigError("onload needs at least one bottom and one top adapter block (the first block makes the embeddings' "
                              f"activations, the last the logits), got {config.num_bottom}+{config.num_top}")
        hidden = stored.config.get_text_config().hidden_size
        rank = config.harmonizer_rank(hidden)
        if rank > hidden:
            raise ConfigError(f"rank {rank} is more than the hidden size {hidden}")
        device = resolve_device(config.device)
        fingerprint = stored.fingerprint()
        torch.manual_seed(config.seed)  # every harmonizer made up front, in block order, as in memory
        tuple_output = layout.model_type in TUPLE_OUTPUT_BLOCKS
        harmonizers = {i: Harmonizer(hidden, rank, config.activation, tuple_output, dtype=torch.float32, device=device) for i in middle}
        train_ids = torch.tensor([f["input_ids"] for f in train_set])
        held_ids = torch.tensor([f["input_ids"] for f in heldout_set[: config.direct_sequences]])
        start = time.perf_counter()
        scratch = Path(tempfile.mkdtemp(prefix="offsite-scaleot-", dir=work_dir))
        try:
            fitted, base_loss, increase = _run(stored, middle, harmonizers, train_ids, held_ids, config, device, scratch, progress)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    direct = {"sequences": len(held_ids), "base_loss": round(base_loss, 6),
              "loss_increase": {str(b): round(increase[b], 6) for b in middle}}
    direct["ranking"] = least_important_first({b: direct["loss_increase"][str(b)] for b in middle})
    manifest = {
        "base": {"fingerprint": fingerprint, "name": base_name or str(model_path), "model_type": layout.model_type,
                 "num_blocks": layout.num_blocks, "hidden_size": hidden, "dtype": "float32"},  # blocks are loaded in float32, as in memory
        "scaleot": {
            "config": dataclasses.asdict(config),
            "middle": middle,
            "groups": None,
            "harmonizer": {"rank": rank, "activation": config.activation},
            "importance": None,  # no learned importance: rank by the direct measurement
            "ranking": direct["ranking"],
            "training": {
                "onloaded": True,
                "steps": config.steps,
                "seconds_this_run": round(time.perf_counter() - start, 1),
                "train_blocks": len(train_set),
                "heldout_blocks": len(heldout_set),
                "final_loss": round(sum(fitted.values()) / len(fitted), 6),
                "final_local_loss": {str(b): round(v, 6) for b, v in fitted.items()},
                "history": [],
            },
            "direct": direct,
        },
    }
    tensors = {f"{i}.{n}": p.detach().cpu().contiguous().clone() for i in middle for n, p in harmonizers[i].named_parameters()}
    path = write_artifact(out_dir, manifest, tensors, overwrite=overwrite)
    log(f"[scaleot] block by block: least important first {direct['ranking']}")
    return path


def _memmap(path: Path, shape) -> np.memmap:
    return np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=shape)


def _rows(array: np.ndarray, rows, device) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array[rows])).to(device)


def _run(stored, middle, harmonizers, train_ids, held_ids, config: ImportanceConfig, device, scratch: Path, progress):
    """One pass over the blocks: (final local loss per harmonizer, base held-out loss, loss increase per block)."""
    num_blocks = stored.layout.num_blocks
    hidden = next(iter(harmonizers.values())).hidden_size
    n, length = train_ids.shape
    h = len(held_ids)
    train = [_memmap(scratch / f"train-{k}.npy", (n, length, hidden)) for k in (0, 1)]
    # Held-out paths: None is the original network; b is the network with block b alone swapped.
    paths: dict = {None: _memmap(scratch / "held-original.npy", (h, length, hidden))}
    losses: dict = {}
    fitted: dict[int, float] = {}
    batch = config.batch_size
    shared: dict[str, torch.Tensor] = {}
    ones = lambda rows: torch.ones((len(rows), length), dtype=torch.long, device=device)  # noqa: E731 (packed text: no padding)
    bar = tqdm(range(num_blocks), desc="scaleot (block by block)", unit="block", disable=bars_disabled(progress))
    for i in bar:
        model = stored.load_blocks([i], shared=shared).to(device)
        last = i == num_blocks - 1
        with torch.no_grad():
            if not last:  # the training activations: block i's output, from its input (none: the embeddings)
                src, dst = train[(i + 1) % 2], train[i % 2]
                for s in range(0, n, batch):
                    rows = slice(s, min(s + batch, n))
                    ids = train_ids[rows].to(device)
                    inp = None if i == 0 else _rows(src, rows, device)
                    dst[rows] = run_block(model, ids, ones(ids), inp).float().cpu().numpy()
        if i in harmonizers:  # fitted on block i's training inputs and outputs, before it stands in for block i below
            fitted[i] = _fit(harmonizers[i], train[(i + 1) % 2], train[i % 2], config, device)
            bar.set_postfix(block=i, local=f"{fitted[i]:.4f}")
        with torch.no_grad():
            if i in harmonizers:  # the path that swaps block i starts from the original network's input to it
                swapped = paths[i] = _memmap(scratch / f"held-{i}.npy", (h, length, hidden))
                for s in range(0, h, batch):
                    rows = slice(s, min(s + batch, h))
                    out = harmonizers[i](_rows(paths[None], rows, device))
                    swapped[rows] = (out[0] if isinstance(out, tuple) else out).float().cpu().numpy()
            for key, state in paths.items():
                if key == i:
                    continue  # its block i is the harmonizer, applied above
                total = 0.0
                for s in range(0, h, batch):
                    rows = slice(s, min(s + batch, h))
                    ids = held_ids[rows].to(device)
                    inp = None if i == 0 else _rows(state, rows, device)
                    if last:
                        logits = run_to_logits(model, ids, ones(ids), inp).float()
                        total += float(F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                                       reduction="sum"))
                    else:
                        state[rows] = run_block(model, ids, ones(ids), inp).float().cpu().numpy()
                if last:
                    losses[key] = total / (h * (length - 1))
        del model
    base = losses[None]
    return fitted, base, {b: losses[b] - base for b in middle}


def _fit(harmonizer, inputs: np.ndarray, outputs: np.ndarray, config: ImportanceConfig, device) -> float:
    """`steps` AdamW steps of the local objective on (inputs, outputs); the mean loss of the last 10% of steps."""
    optimizer = torch.optim.AdamW(harmonizer.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    n = len(inputs)
    tail = []
    for step in range(config.steps):
        rows = train_indices(n, step, config.batch_size, config.seed)
        x, y = _rows(inputs, rows, device), _rows(outputs, rows, device)
        out = harmonizer(x)
        loss = normalised_mse(out[0] if isinstance(out, tuple) else out, y, torch.ones(y.shape[:2], device=device))
        loss.backward()
        if config.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(harmonizer.parameters(), config.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step >= config.steps - max(1, math.ceil(config.steps / 10)):
            tail.append(float(loss.detach()))
    return sum(tail) / len(tail)
