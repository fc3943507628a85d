"""Data owner: train the PEMA adapter on the external memory, and its bundle.

The adapter is a LoRA-like bottleneck on the representation f (d) with rank r, no bias:
A (r x d) and two decoders B_rct, B_pd (d x r), scale s = 1/r, dropout 0.2 on the input:

    z     = s A dropout(f)
    h_rct = B_rct z        L_rct = |h_rct - f|^2 / |f|^2   (per row, averaged)
    h_pd  = B_pd z         L_pd  = CE(head(h_pd), y)       head = lm_head(norm(.)) from the head bundle

Phase 1 trains A and B_rct on L_rct. Phase 2 freezes B_rct, starts a fresh A (and B_pd) and
trains them on kappa L_rct + (1 - kappa) L_pd, so the new latent must still reconstruct f
through the frozen decoder. L_rct is the reference code's MSE divided by each row's mean square:
the last-block states of pre-norm models are large (mean square about 1,100 for SmolLM2-135M,
with a few outlier channels), so the plain MSE is hundreds of times the cross-entropy and
kappa = 0.2 would leave L_pd no say; relative to |f|^2 the two losses are on one scale for any
model. The adapter needs many more memory rows than the representation has dimensions (the
reconstruction alone is a d x d map); `train_pema` warns below MIN_ROWS_PER_DIMENSION * d rows.

A is Kaiming-uniform initialised and the B's start at zero, as in the reference code; one
dropout mask feeds both decoders (the reference draws two). Each phase uses Adam and stops early
when its validation loss has not improved for `patience` validations; the best weights are kept. The validation split is a fixed random subset of *examples* (all of
an example's rows go to the same side). Batches are read from the memory-mapped keys, so memory
use is bounded by the batch size, not the memory size.
"""

from __future__ import annotations

import copy
import math
import os
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from ..bundle import read_manifest, write_bundle
from ..checkpoint import optimizer_from_flat, optimizer_to_flat
from ..errors import BundleError, ConfigError
from .configs import PemaConfig  # noqa: F401  (re-exported)
from ..progress import bars_disabled
from .head import LoadedHead, read_tensors
from .memory import ExternalMemory

KIND = "pema-adapter"
WEIGHTS = "pema.safetensors"
MIN_ROWS_PER_DIMENSION = 10  # fewer training rows than this times d: warn that PEMA will not generalise




class PemaAdapter(nn.Module):
    def __init__(self, hidden_size: int, rank: int, dropout: float = 0.2):
        super().__init__()
        if rank > hidden_size:
            raise ConfigError(f"PEMA rank {rank} is larger than the representation size {hidden_size}")
        self.hidden_size, self.rank = hidden_size, rank
        self.scale = 1.0 / rank
        self.A = nn.Parameter(torch.empty(rank, hidden_size))
        self.B_rct = nn.Parameter(torch.zeros(hidden_size, rank))
        self.B_pd = nn.Parameter(torch.zeros(hidden_size, rank))
        self.dropout = nn.Dropout(dropout)
        self.reset_A()

    def reset_A(self) -> None:
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))

    def forward(self, f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(h_rct, h_pd) for representations f (..., d)."""
        z = self.dropout(f.float()) @ self.A.T * self.scale
        return z @ self.B_rct.T, z @ self.B_pd.T

    def predict(self, f: torch.Tensor) -> torch.Tensor:
        """h_pd, whose head(h_pd) is PEMA's next-token distribution."""
        return self.forward(f)[1]


def relative_mse(h: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """Mean over rows of |h - f|^2 / |f|^2 (scale-free reconstruction error; 1.0 for h = 0)."""
    f = f.float()
    return ((h - f).pow(2).sum(-1) / f.pow(2).sum(-1).clamp_min(1e-12)).mean()


# ---------------------------------------------------------------- data
def split_rows(memory: ExternalMemory, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train rows, validation rows), sorted, splitting by example."""
    spans = memory.example_rows()
    if len(spans) < 2:
        raise ConfigError("the external memory needs at least two examples (one for validation)")
    order = np.random.default_rng(seed).permutation(len(spans))
    n_val = min(len(spans) - 1, max(1, round(val_fraction * len(spans))))
    val = set(order[:n_val].tolist())
    pick = lambda chosen: np.concatenate([np.arange(*spans[i]) for i in sorted(chosen)]).astype(np.int64)  # noqa: E731
    return pick(set(range(len(spans))) - val), pick(val)


def _batch(memory: ExternalMemory, rows: np.ndarray, device) -> tuple[torch.Tensor, torch.Tensor]:
    rows = np.sort(rows)  # ascending reads from the memmap
    keys = torch.from_numpy(np.ascontiguousarray(memory.keys[rows])).to(device)
    values = torch.from_numpy(np.ascontiguousarray(memory.values[rows]).astype(np.int64)).to(device)
    return keys, values


# ---------------------------------------------------------------- training
def train_pema(memory: ExternalMemory, head: LoadedHead, config: PemaConfig | None = None,
               progress: bool = True, checkpoint_dir: str | Path | None = None) -> tuple[PemaAdapter, dict]:
    """Both phases on `memory`; returns the adapter (best weights of each phase) and metrics.

    With `checkpoint_dir`, the run's state is saved there at every validation (safetensors + JSON),
    and a run started again with the same settings, memory and head continues where it stopped,
    step for step as if never interrupted (the RNG state is saved too)."""
    from ..models import resolve_device

    config = config or PemaConfig()
    check_compatible(memory, head)
    device = resolve_device(config.device)
    torch.manual_seed(config.seed)
    rank = config.rank or max(1, memory.hidden_size // 4)
    adapter = PemaAdapter(memory.hidden_size, rank, config.dropout).to(device)
    logits_of = head.head.to(device)
    norm = logits_of.norm if config.reconstruct_normed else (lambda h: h)
    train_rows, val_rows = split_rows(memory, config.val_fraction, config.seed)
    kappa = config.kappa

    def reconstruction(h_rct, f):
        return relative_mse(norm(h_rct).float(), norm(f).float())

    def rct_loss(f, y):
        h_rct, _ = adapter(f)
        return reconstruction(h_rct, f)

    def joint_loss(f, y):
        h_rct, h_pd = adapter(f)
        return kappa * reconstruction(h_rct, f) + (1 - kappa) * F.cross_entropy(logits_of(h_pd).float(), y)

    min_rows = MIN_ROWS_PER_DIMENSION * memory.hidden_size
    if len(train_rows) < min_rows:
        warnings.warn(f"the external memory has {len(train_rows):,} training rows for {memory.hidden_size}-dimensional "
                      f"representations; PEMA learns a rank-{rank} map of them and generalises poorly with fewer "
                      f"than about {min_rows:,} rows (use more or longer training examples)", stacklevel=2)
    start = time.perf_counter()
    metrics = {"train_rows": len(train_rows), "val_rows": len(val_rows)}
    saver = PhaseCheckpoints(checkpoint_dir, run_identity(config, memory, head)) if checkpoint_dir is not None else None
    done = saver.finished("rct", adapter) if saver else None
    if done is None:
        metrics["rct"] = _run_phase("rct", adapter, [adapter.A, adapter.B_rct], rct_loss, memory, train_rows, val_rows, config, device,
                                    progress, saver)
    else:
        metrics["rct"] = done
    adapter.B_rct.requires_grad_(False)
    if done is None or saver.phase_state("joint") is None:
        adapter.reset_A()  # phase 2 learns a fresh encoder against the frozen reconstruction decoder
    metrics["joint"] = _run_phase("joint", adapter, [adapter.A, adapter.B_pd], joint_loss, memory, train_rows, val_rows, config, device,
                                  progress, saver)
    metrics.update(_accuracy(adapter, logits_of, memory, val_rows, config.batch_size, device))
    metrics["seconds"] = round(time.perf_counter() - start, 2)
    adapter.requires_grad_(False).eval()
    return adapter, metrics


def _run_phase(name, adapter, params, loss_fn, memory, train_rows, val_rows, config: PemaConfig, device, progress,
               saver: "PhaseCheckpoints | None" = None) -> dict:
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(params, lr=config.lr)
    steps_per_epoch = math.ceil(len(train_rows) / config.batch_size)
    best, best_state, bad, history, step, losses = math.inf, None, 0, [], 0, []
    stopped, validated_at = False, -1
    phase_seed = {"rct": 1, "joint": 2}[name]
    resumed = saver.phase_state(name) if saver else None
    if resumed is not None:  # continue a run that stopped after a validation
        state, tensors = resumed
        adapter.load_state_dict({k.removeprefix("adapter."): v for k, v in tensors.items() if k.startswith("adapter.")})
        best_state = {k.removeprefix("best."): v for k, v in tensors.items() if k.startswith("best.")}
        optimizer.load_state_dict(optimizer_from_flat({k.removeprefix("opt."): v for k, v in tensors.items() if k.startswith("opt.")},
                                                      state["optimizer"]))
        torch.set_rng_state(tensors["rng"])
        best, bad, history, step, losses = state["best"], state["bad"], state["history"], state["step"], state["losses"]
        validated_at = step
    bar = tqdm(total=config.epochs * steps_per_epoch, initial=step, disable=bars_disabled(progress), desc=f"pema {name}", unit="step")

    def validate() -> bool:
        nonlocal best, best_state, bad, validated_at
        validated_at = step
        value = evaluate_loss(adapter, loss_fn, memory, val_rows, config.batch_size, device)
        history.append(round(value, 6))
        if value < best:
            best, best_state, bad = value, copy.deepcopy(adapter.state_dict()), 0
        else:
            bad += 1
        bar.set_postfix(val=f"{value:.4f}", best=f"{best:.4f}")
        if saver is not None:
            saver.save_phase(name, adapter, best_state, optimizer, {"best": best, "bad": bad, "history": history, "step": step,
                                                                     "losses": [losses[0], losses[-1]] if losses else []})
        return bad >= config.patience

    first_epoch, first_i = divmod(step, steps_per_epoch)
    for epoch in range(first_epoch, config.epochs):
        order = train_rows[np.random.default_rng([config.seed, phase_seed, epoch]).permutation(len(train_rows))]
        adapter.train()
        for i in range(first_i if epoch == first_epoch else 0, steps_per_epoch):
            f, y = _batch(memory, order[i * config.batch_size : (i + 1) * config.batch_size], device)
            loss = loss_fn(f, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            step += 1
            bar.update(1)
            if config.eval_every and step % config.eval_every == 0:
                stopped = validate()
                adapter.train()
                if stopped:
                    break
        if stopped or (not config.eval_every and validate()):
            stopped = True
            break
    if validated_at != step:  # eval_every did not land on the last step
        validate()
    bar.close()
    adapter.load_state_dict(best_state)
    for p in params:
        p.requires_grad_(False)
    result = {"steps": step, "epochs": min(config.epochs, step // steps_per_epoch + (step % steps_per_epoch > 0)), "stopped_early": stopped,
              "stopped_by": "patience" if stopped else "epoch cap", "best_val_loss": round(best, 6),
              "val_history": history, "first_train_loss": round(losses[0], 6), "last_train_loss": round(losses[-1], 6)}
    if resumed is not None:
        result["resumed_at_step"] = resumed[0]["step"]
    if saver is not None:
        saver.finish_phase(name, adapter, result)
    return result


def run_identity(config: PemaConfig, memory: ExternalMemory, head: LoadedHead) -> str:
    """What a PEMA run computes from: its settings (less the device), the memory and the head."""
    import hashlib
    import json

    settings = {k: v for k, v in asdict(config).items() if k != "device"}
    data = json.dumps([settings, memory.meta.get("fingerprint"), head.fingerprint], sort_keys=True)
    return hashlib.sha256(data.encode()).hexdigest()


class PhaseCheckpoints:
    """A PEMA run's state after each validation, in `directory`: per phase `<phase>.safetensors` (adapter,
    best weights, Adam moments, RNG state) + `<phase>.json` (counters, history, optimizer layout), and
    `<phase>.done.json` with the phase's metrics once it ends. A run of another identity starts afresh."""

    def __init__(self, directory: str | Path, identity: str):
        import json

        self.dir = Path(directory)
        self.identity = identity
        self.dir.mkdir(parents=True, exist_ok=True)
        mark = self.dir / "identity.txt"
        if not mark.exists() or mark.read_text().strip() != identity:
            for old in self.dir.glob("*"):
                if old.is_file():
                    old.unlink()
            mark.write_text(identity + "\n")
        self._json = json

    def _write(self, name: str, tensors: dict, state: dict) -> None:
        from ..durable import write_synced

        tmp = self.dir / f".{name}.safetensors.tmp"
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp)
        os.replace(tmp, self.dir / f"{name}.safetensors")
        write_synced(self.dir / f"{name}.json", (self._json.dumps(state) + "\n").encode())  # written last: it marks the pair complete

    def save_phase(self, name: str, adapter, best_state, optimizer, state: dict) -> None:
        tensors = {f"adapter.{k}": v for k, v in adapter.state_dict().items()}
        tensors |= {f"best.{k}": v for k, v in (best_state or {}).items()}
        tensors["rng"] = torch.get_rng_state()
        opt_tensors, layout = optimizer_to_flat(optimizer)  # the format of offsite.checkpoint's optimizer state
        tensors |= {f"opt.{k}": v for k, v in opt_tensors.items()}
        (self.dir / f"{name}.json").unlink(missing_ok=True)  # a crash between the two writes leaves no mismatched pair
        self._write(name, tensors, {**state, "optimizer": layout})

    def phase_state(self, name: str):
        """(state, tensors) of an unfinished phase saved after a validation, or None."""
        from safetensors.torch import load_file

        if not (self.dir / f"{name}.json").exists() or (self.dir / f"{name}.done.json").exists():
            return None
        return self._json.loads((self.dir / f"{name}.json").read_text()), load_file(self.dir / f"{name}.safetensors")

    def finish_phase(self, name: str, adapter, metrics: dict) -> None:
        from ..durable import write_synced

        tmp = self.dir / f".{name}.final.tmp"
        tensors = {k: v.detach().cpu().contiguous() for k, v in adapter.state_dict().items()}
        save_file(tensors | {"rng": torch.get_rng_state()}, tmp)  # what follows the phase draws from this RNG state
        os.replace(tmp, self.dir / f"{name}.final.safetensors")
        write_synced(self.dir / f"{name}.done.json", (self._json.dumps(metrics) + "\n").encode())

    def finished(self, name: str, adapter) -> dict | None:
        """The metrics of a finished phase, its final weights loaded into `adapter`; None if not finished."""
        from safetensors.torch import load_file

        if not (self.dir / f"{name}.done.json").exists():
            return None
        tensors = load_file(self.dir / f"{name}.final.safetensors")
        torch.set_rng_state(tensors.pop("rng"))
        adapter.load_state_dict(tensors)
        return self._json.loads((self.dir / f"{name}.done.json").read_text())


@torch.no_grad()
def evaluate_loss(adapter, loss_fn, memory, rows: np.ndarray, batch_size: int, device) -> float:
    """Row-weighted mean of `loss_fn` over `rows` in eval mode (no dropout)."""
    was_training = adapter.training
    adapter.eval()
    total = 0.0
    for i in range(0, len(rows), batch_size):
        f, y = _batch(memory, rows[i : i + batch_size], device)
        total += loss_fn(f, y).item() * len(y)
    adapter.train(was_training)
    return total / len(rows)


@torch.no_grad()
def _accuracy(adapter, logits_of, memory, rows, batch_size, device) -> dict:
    """Validation next-token accuracy of P_PEMA and of the model's own P_LM (same rows)."""
    adapter.eval()
    pema = lm = 0
    for i in range(0, len(rows), batch_size):
        f, y = _batch(memory, rows[i : i + batch_size], device)
        pema += int((logits_of(adapter.predict(f)).argmax(-1) == y).sum())
        lm += int((logits_of(f).argmax(-1) == y).sum())
    return {"val_accuracy_pema": round(pema / len(rows), 4), "val_accuracy_lm": round(lm / len(rows), 4)}


def check_compatible(memory: ExternalMemory, head: LoadedHead) -> None:
    owner = memory.meta.get("owner", {})
    if owner.get("base_fingerprint") != head.base_fingerprint:
        raise ConfigError("the external memory was built from another model than the one the head bundle belongs to")
    if memory.hidden_size != head.hidden_size:
        raise ConfigError(f"memory keys have size {memory.hidden_size}, the head expects {head.hidden_size}")
    low, high = int(memory.values.min()), int(memory.values.max())
    if low < 0 or high >= head.head.vocab_size:
        raise ConfigError(f"memory values range over [{low}, {high}], outside the head's vocabulary of {head.head.vocab_size}")


# ---------------------------------------------------------------- bundle
def save_pema_adapter(adapter: PemaAdapter, out_dir: str | Path, head: LoadedHead, memory: ExternalMemory,
                      config: PemaConfig, metrics: dict, overwrite: bool = False, sign_key=None) -> Path:
    """Write the PEMA adapter bundle, bound to the head bundle it was trained with."""
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in (("A", adapter.A), ("B_rct", adapter.B_rct), ("B_pd", adapter.B_pd))}
    manifest = {
        "base": {"fingerprint": head.base_fingerprint, "name": head.manifest["base"].get("name", ""),
                 "model_type": head.manifest["base"].get("model_type", "")},
        "pema": {"hidden_size": adapter.hidden_size, "rank": adapter.rank, "scale": adapter.scale, "dropout": config.dropout},
        "head": {"fingerprint": head.fingerprint},
        "memory": {"fingerprint": memory.meta["fingerprint"], "rows": int(memory.keys.shape[0]), "examples": int(len(memory.lengths)),
                   "mean_target_length": memory.mean_target_length, "contexts": memory.meta["config"]["contexts"]},
        "training": asdict(config),
        "metrics": metrics,
    }
    return write_bundle(out_dir, KIND, manifest, lambda tmp: save_file(tensors, tmp / WEIGHTS, metadata={"format": "pt"}),
                        overwrite=overwrite, sign_key=sign_key)


@dataclass
class LoadedPemaAdapter:
    adapter: PemaAdapter
    manifest: dict

    @property
    def mean_target_length(self) -> float:
        return self.manifest["memory"]["mean_target_length"]


def load_pema_adapter(bundle_dir: str | Path, head: LoadedHead | None = None, trusted_key=None) -> LoadedPemaAdapter:
    """Verify a PEMA adapter bundle and rebuild the adapter; with `head`, it must be the head bundle it was trained with."""
    bundle_dir = Path(bundle_dir)
    manifest = read_manifest(bundle_dir, kind=KIND, trusted_key=trusted_key)
    spec, memory, bound = manifest.get("pema"), manifest.get("memory"), manifest.get("head")
    ok = (
        isinstance(spec, dict) and type(spec.get("hidden_size")) is int and type(spec.get("rank")) is int
        and 0 < spec["rank"] <= spec["hidden_size"] <= 1 << 24
        and isinstance(bound, dict) and isinstance(bound.get("fingerprint"), str)
        and isinstance(memory, dict) and type(memory.get("mean_target_length")) in (int, float)
        and math.isfinite(memory["mean_target_length"]) and memory["mean_target_length"] > 0
    )
    if not ok:
        raise BundleError(f"PEMA adapter manifest has a malformed 'pema', 'head' or 'memory' section: {bundle_dir}")
    if head is not None and bound["fingerprint"] != head.fingerprint:
        raise BundleError(f"PEMA adapter was trained with head bundle {bound['fingerprint'][:16]}, not the given {head.fingerprint[:16]}: {bundle_dir}")
    if WEIGHTS not in manifest["files"]:
        raise BundleError(f"PEMA adapter bundle lacks {WEIGHTS}: {bundle_dir}")
    d, r = spec["hidden_size"], spec["rank"]
    tensors = read_tensors(bundle_dir, WEIGHTS, {"A": (r, d), "B_rct": (d, r), "B_pd": (d, r)}, "float32")
    adapter = PemaAdapter(d, r, 0.0)
    adapter.load_state_dict(tensors, strict=True)
    adapter.requires_grad_(False).eval()
    return LoadedPemaAdapter(adapter, manifest)


def train_pema_bundle(memory_dir, head_dir, out_dir, config: PemaConfig | None = None, overwrite: bool = False,
                      sign_key=None, trusted_key=None, progress: bool = True) -> Path:
    """Data-owner recipe: open the memory and the head bundle, train both phases, write the adapter bundle."""
    from ..signing import load_private_key
    from .head import load_head

    config = config or PemaConfig()
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise BundleError(f"output already exists, not overwriting: {out_dir}")
    sign_key = load_private_key(sign_key) if sign_key is not None else None  # fail before training
    head = load_head(head_dir, trusted_key=trusted_key)
    memory = ExternalMemory.open(memory_dir)
    checkpoints = out_dir.with_name(out_dir.name + ".checkpoints")  # beside the bundle: a stopped run resumes from it
    adapter, metrics = train_pema(memory, head, config, progress=progress, checkpoint_dir=checkpoints)
    path = save_pema_adapter(adapter, out_dir, head, memory, config, metrics, overwrite=overwrite, sign_key=sign_key)
    import shutil

    shutil.rmtree(checkpoints, ignore_errors=True)  # the bundle holds the result now
    return path


