"""Training checkpoints in safetensors + JSON (no pickle), written atomically, for `--resume`.

A checkpoint holds the trainable tensors, the optimizer's per-parameter state, the scheduler
state, the RNG state and the loop position, so a resumed run continues exactly where the
interrupted one stopped.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .durable import fsync_path
from .errors import ConfigError

STEP_PREFIX = "step-"
TMP_PREFIX = ".tmp-"
STATE = "state.json"
FILES = ("trainable.safetensors", "optimizer.safetensors", "rng.safetensors", STATE)


def optimizer_to_flat(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimizer's state as safetensors-ready tensors keyed "<param index>.<name>" and a JSON-ready
    rest (param groups, scalar entries): what every offsite checkpoint stores, never a pickle."""
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, pstate in state["state"].items():
        for name, value in pstate.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{name}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def optimizer_from_flat(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    """The state dict `optimizer_to_flat` took apart, for `optimizer.load_state_dict`."""
    state: dict[int, dict] = {}
    for key, value in list(tensors.items()) + list(meta["scalars"].items()):
        idx, _, name = key.partition(".")
        state.setdefault(int(idx), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(
    directory: Path,
    step: int,
    trainable: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    scheduler,
    position: dict,
    keep: int = 2,
) -> Path:
    """Write checkpoint `step-N` atomically and prune all but the newest `keep`.

    Files go to a temp dir, are fsynced, and the dir is renamed into place, so a process killed
    at any moment leaves only complete `step-N` checkpoints (plus a `.tmp-*` dir that
    `list_checkpoints` ignores and the next save removes). Only the main process saves.
    """
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob(f"{TMP_PREFIX}*"):
        shutil.rmtree(stale, ignore_errors=True)
    target = directory / f"{STEP_PREFIX}{step:08d}"
    tmp = Path(tempfile.mkdtemp(prefix=TMP_PREFIX, dir=directory))
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in trainable.items()}, tmp / "trainable.safetensors")
        opt_tensors, opt_meta = optimizer_to_flat(optimizer)
        save_file(opt_tensors, tmp / "optimizer.safetensors")
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
        save_file(rng, tmp / "rng.safetensors")
        meta = {"step": step, "position": position, "optimizer": opt_meta, "scheduler": scheduler.state_dict()}
        (tmp / STATE).write_text(json.dumps(meta))
        for name in FILES:
            fsync_path(tmp / name)
        fsync_path(tmp)
        if target.exists():
            _remove(target)
        os.replace(tmp, target)
        fsync_path(directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(directory)[:-keep]:
        _remove(old)
    return target


def _remove(path: Path) -> None:
    """Delete a checkpoint without ever leaving a half-deleted `step-N`: rename it away first."""
    doomed = Path(tempfile.mkdtemp(prefix=TMP_PREFIX, dir=path.parent))
    os.replace(path, doomed / path.name)
    shutil.rmtree(doomed, ignore_errors=True)


def list_checkpoints(directory: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temp dirs of an interrupted write are ignored)."""
    if not directory.is_dir():
        return []
    found = [
        p
        for p in directory.iterdir()
        if p.is_dir() and p.name.startswith(STEP_PREFIX) and all((p / name).is_file() for name in FILES)
    ]
    return sorted(found, key=lambda p: p.name)


def checkpoint_position(path: Path) -> dict:
    """The loop position a checkpoint saved (read before anything is restored)."""
    return json.loads((path / STATE).read_text())["position"]


def clear_checkpoints(directory: Path) -> None:
    """Remove every checkpoint of `directory` (a run started over must never resume an older one)."""
    for old in list_checkpoints(directory):
        _remove(old)


def restore_checkpoint(path: Path, trainable: dict[str, torch.nn.Parameter], optimizer, scheduler) -> dict:
    """Restore tensors, optimizer, scheduler and RNG in place; return the saved loop position."""
    meta = json.loads((path / STATE).read_text())
    saved = load_file(path / "trainable.safetensors")
    if set(saved) != set(trainable):
        raise ConfigError(f"checkpoint {path} does not match this run's trainable parameters; was the config changed?")
    with torch.no_grad():
        for name, param in trainable.items():
            param.copy_(saved[name])
    optimizer.load_state_dict(optimizer_from_flat(load_file(path / "optimizer.safetensors"), meta["optimizer"]))
    scheduler.load_state_dict(meta["scheduler"])
    rng = load_file(path / "rng.safetensors")
    torch.set_rng_state(rng["cpu"])
    if torch.cuda.is_available() and "cuda0" in rng:
        torch.cuda.set_rng_state_all([rng[f"cuda{i}"] for i in range(torch.cuda.device_count()) if f"cuda{i}" in rng])
    return {"step": meta["step"], **meta["position"]}
