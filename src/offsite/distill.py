"""Owner-side emulator distillation (OT with knowledge distillation, Xiao et al. 2023 §3).

Trains the emulator's middle blocks so that, on generic text, the hidden state leaving them
matches the hidden state leaving the original middle blocks:

    loss = lm_weight * LM(emulator) + kd_weight * mean((t - s)^2) / mean(t^2)

t comes from the frozen base model (run under no_grad and stopped right after its last middle
block; not run at all when kd_weight is 0), s from the emulator; both are captured with forward
hooks. The adapter blocks stay frozen: they are the original blocks the data owner starts from.
The checkpoint with the lowest emulator perplexity on held-out text becomes the new bundle.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import torch
from transformers import AutoTokenizer

from .bundle import model_fingerprint
from .emulator import load_checkpoint, load_emulator, save_emulator
from .errors import ConfigError
from .lm import pack_blocks  # noqa: F401  (re-exported)
from .methods import Emulator
from .models import resolve_device
from .onload import block_activations
from .streaming import open_stored
from .surgery import discover_layout, get_blocks
from .configs import DistillConfig  # noqa: F401  (re-exported)
from .training import FinetuneConfig, causal_lm_loss, pad_token_id, train




class _Stop(Exception):
    """Raised by a hook to end the teacher's forward right after its last middle block."""


def _output(out):
    return out[0] if isinstance(out, tuple) else out


class LiveTeacher:
    """The base model in memory, run under no_grad for each batch and stopped after its last middle block."""

    def __init__(self, base, last_middle_base: int):
        self.base = base
        self.captured: dict[str, torch.Tensor] = {}

        def hook(module, args, out):
            self.captured["t"] = _output(out).detach()
            raise _Stop

        self.handle = get_blocks(base, discover_layout(base))[last_middle_base].register_forward_hook(hook)

    @torch.no_grad()
    def __call__(self, batch) -> torch.Tensor:
        try:
            self.base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        except _Stop:
            pass
        return self.captured.pop("t")

    def close(self):
        self.handle.remove()


class StoredTeacher:
    """The teacher's middle output for every training block, computed beforehand with one base block in
    memory at a time (offsite.onload) and looked up by the block's tokens: the teacher is frozen and the
    blocks are packed text of one length, so this is what the live teacher computes, without the model."""

    def __init__(self, features: list[dict], activations):
        self.activations = activations
        self.row = {tuple(f["input_ids"]): i for i, f in enumerate(features)}  # equal blocks have equal targets

    def __call__(self, batch) -> torch.Tensor:
        rows = [self.row[tuple(ids)] for ids in batch["input_ids"].tolist()]
        return torch.from_numpy(self.activations[rows]).to(batch["input_ids"].device)

    def close(self):
        pass


class KDLoss:
    """LM loss of the emulator plus normalised MSE to the teacher's middle output (`teacher(batch)`)."""

    def __init__(self, teacher, emulator_model, last_middle_emulator: int, config: DistillConfig):
        self.teacher, self.config = teacher, config
        self.captured: dict[str, torch.Tensor] = {}
        emu_blocks = get_blocks(emulator_model, discover_layout(emulator_model))

        def student_hook(module, args, out):
            self.captured["s"] = _output(out)

        self.handles = [emu_blocks[last_middle_emulator].register_forward_hook(student_hook)]
        self.last = {}

    def __call__(self, model, batch, head):
        lm = causal_lm_loss(model, batch, head)
        loss = self.config.lm_weight * lm
        kd = torch.zeros((), device=lm.device)
        s = self.captured.pop("s")
        if self.config.kd_weight > 0:
            t, s = self.teacher(batch).float(), s.float()
            mask = batch["attention_mask"].unsqueeze(-1).to(t.dtype)
            kd = ((t - s) ** 2 * mask).sum() / ((t**2) * mask).sum().clamp_min(1e-12)
            loss = loss + self.config.kd_weight * kd
        self.last = {"lm": float(lm.detach()), "kd": float(kd.detach())}
        return loss

    def close(self):
        for h in self.handles:
            h.remove()
        if self.teacher is not None:
            self.teacher.close()


def _check_base(fingerprint: str, emulator, emulator_dir, base_path) -> None:
    if fingerprint != emulator.manifest["base"]["fingerprint"]:
        raise ConfigError(f"{emulator_dir} was not made from the model at {base_path}")


def distill(
    base_path: str | Path,
    emulator_dir: str | Path,
    out_dir: str | Path,
    texts: list[str],
    held_out: str,
    config: DistillConfig | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    log=print,
    sign_key=None,
    stream_teacher: bool = True,
) -> Path:
    """Owner recipe: distil an emulator bundle into a new one at `out_dir` (checkpoints beside it),
    signed with `sign_key` when given. `stream_teacher`: the teacher's targets from one base block in
    memory at a time (default, for safetensors checkpoints); False runs the whole base model live."""
    from .evaluation import perplexity

    config = config or DistillConfig()
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise ConfigError(f"output already exists, not overwriting: {out_dir}")
    emulator = load_emulator(emulator_dir, dtype=torch.float32)
    device = resolve_device("auto")
    middle = [i for i in range(len(emulator.block_map)) if i not in emulator.trainable]
    if not middle:
        raise ConfigError("the emulator has no middle blocks to distil")
    adapter = emulator.manifest["blocks"]["adapter"]
    num_bottom = next(i for i in range(len(adapter) + 1) if i == len(adapter) or adapter[i] != i)
    # A safetensors checkpoint is never loaded whole: the teacher's targets are computed one base block
    # at a time (peak: one block plus the activations' memory map); other checkpoints load the model.
    stored = open_stored(base_path, torch.float32, required=False) if stream_teacher else None
    if stored is not None:
        with stored:
            fingerprint, layout = stored.fingerprint(), stored.layout
            _check_base(fingerprint, emulator, emulator_dir, base_path)
            tokenizer = AutoTokenizer.from_pretrained(base_path, local_files_only=True)
            top_start = adapter[num_bottom] if num_bottom < len(adapter) else layout.num_blocks
            features = pack_blocks(tokenizer, texts, config.block_size)
            teacher = None
            if config.kd_weight > 0:
                log(f"[distill] teacher: base blocks 0-{top_start - 1} one at a time over {len(features)} blocks of text")
                ids = torch.tensor([f["input_ids"] for f in features])
                work = out_dir.with_name(out_dir.name + ".teacher")
                teacher = StoredTeacher(features, block_activations(stored, ids, top_start - 1, work, config.batch_size, device, progress))
    else:
        base, tokenizer = load_checkpoint(base_path)
        fingerprint, layout = model_fingerprint(base), discover_layout(base)
        _check_base(fingerprint, emulator, emulator_dir, base_path)
        base.requires_grad_(False)
        base.to(device)
        top_start = adapter[num_bottom] if num_bottom < len(adapter) else layout.num_blocks
        features = pack_blocks(tokenizer, texts, config.block_size)
        # the teacher's middle ends at top_start - 1 whether or not the emulator kept that block
        teacher = LiveTeacher(base, top_start - 1) if config.kd_weight > 0 else None

    model = emulator.model
    model.requires_grad_(False)
    blocks = get_blocks(model, emulator.layout)
    for i in middle:
        blocks[i].requires_grad_(True)
    loss_fn = KDLoss(teacher, model, middle[-1], config)

    def held_out_ppl(m) -> float:
        return perplexity(m, tokenizer, held_out, block_size=config.block_size, progress=False)["ppl"]

    best = {"step": 0, "ppl": held_out_ppl(model), "state": None}
    log(f"[distill] emulator perplexity before: {best['ppl']:.2f}")

    def on_checkpoint(step: int, m) -> None:
        ppl = held_out_ppl(m)
        log(f"[distill] step {step}: held-out perplexity {ppl:.2f} (lm {loss_fn.last.get('lm', 0):.3f}, kd {loss_fn.last.get('kd', 0):.4f})")
        if ppl < best["ppl"]:
            best.update(step=step, ppl=ppl, state={k: v.detach().cpu().clone() for k, v in m.state_dict().items()})
        m.train()

    pad_id = pad_token_id(tokenizer)
    try:
        run = train(model, features, pad_id, config.train_config(), ckpt_dir=out_dir.with_name(out_dir.name + ".checkpoints"),
                    resume=resume, progress=progress, desc="distill", loss_fn=loss_fn, callback=on_checkpoint)
    finally:
        loss_fn.close()
    shutil.rmtree(out_dir.with_name(out_dir.name + ".teacher"), ignore_errors=True)
    final = run.model
    if best["state"] is not None:
        final.load_state_dict(best["state"])
    log(f"[distill] kept step {best['step']} (held-out perplexity {best['ppl']:.2f})")

    record = {
        **dataclasses.asdict(config),
        "selected_step": best["step"],
        "selected_perplexity": best["ppl"],
        "steps": run.metrics["steps"],
        "train_tokens": run.metrics["train_tokens"],
        "source_emulator": emulator.fingerprint,
    }
    distilled = Emulator(
        model=final.cpu(),
        layout=layout,
        block_map=emulator.block_map,
        adapter_blocks=emulator.manifest["blocks"]["adapter"],
        method=emulator.manifest["method"]["name"],
        params=emulator.manifest["method"]["params"] | {"distillation": record},
        structure=emulator.manifest.get("structure", {}),
    )
    return save_emulator(distilled, tokenizer, out_dir, fingerprint, emulator.manifest["base"].get("name", ""),
                         overwrite=overwrite, sign_key=sign_key)
