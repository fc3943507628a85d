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
from dataclasses import dataclass
from pathlib import Path

import torch

from .bundle import model_fingerprint
from .emulator import load_checkpoint, load_emulator, save_emulator
from .errors import ConfigError
from .lm import pack_blocks  # noqa: F401  (re-exported)
from .methods import Emulator
from .models import resolve_device
from .surgery import discover_layout, get_blocks
from .configs import DistillConfig  # noqa: F401  (re-exported)
from .training import FinetuneConfig, causal_lm_loss, pad_token_id, train




class _Stop(Exception):
    """Raised by a hook to end the teacher's forward right after its last middle block."""


def _output(out):
    return out[0] if isinstance(out, tuple) else out


class KDLoss:
    """LM loss of the emulator plus normalised MSE to the base model's middle output, via hooks."""

    def __init__(self, base, emulator_model, last_middle_base: int, last_middle_emulator: int, config: DistillConfig):
        self.base, self.config = base, config
        self.captured: dict[str, torch.Tensor] = {}
        base_blocks = get_blocks(base, discover_layout(base))
        emu_blocks = get_blocks(emulator_model, discover_layout(emulator_model))

        def teacher_hook(module, args, out):
            self.captured["t"] = _output(out).detach()
            raise _Stop

        def student_hook(module, args, out):
            self.captured["s"] = _output(out)

        self.handles = [emu_blocks[last_middle_emulator].register_forward_hook(student_hook)]
        if config.kd_weight > 0:
            self.handles.append(base_blocks[last_middle_base].register_forward_hook(teacher_hook))
        self.last = {}

    def __call__(self, model, batch, head):
        lm = causal_lm_loss(model, batch, head)
        loss = self.config.lm_weight * lm
        kd = torch.zeros((), device=lm.device)
        if self.config.kd_weight > 0:
            with torch.no_grad():
                try:
                    self.base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
                except _Stop:
                    pass
            t, s = self.captured.pop("t").float(), self.captured.pop("s").float()
            mask = batch["attention_mask"].unsqueeze(-1).to(t.dtype)
            kd = ((t - s) ** 2 * mask).sum() / ((t**2) * mask).sum().clamp_min(1e-12)
            loss = loss + self.config.kd_weight * kd
        self.last = {"lm": float(lm.detach()), "kd": float(kd.detach())}
        return loss

    def close(self):
        for h in self.handles:
            h.remove()


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
) -> Path:
    """Owner recipe: distil an emulator bundle into a new one at `out_dir` (checkpoints beside it),
    signed with `sign_key` when given."""
    from .evaluation import perplexity

    config = config or DistillConfig()
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise ConfigError(f"output already exists, not overwriting: {out_dir}")
    emulator = load_emulator(emulator_dir, dtype=torch.float32)
    base, tokenizer = load_checkpoint(base_path)
    fingerprint = model_fingerprint(base)
    if fingerprint != emulator.manifest["base"]["fingerprint"]:
        raise ConfigError(f"{emulator_dir} was not made from the model at {base_path}")
    base.requires_grad_(False)
    device = resolve_device("auto")
    base.to(device)

    middle = [i for i in range(len(emulator.block_map)) if i not in emulator.trainable]
    if not middle:
        raise ConfigError("the emulator has no middle blocks to distil")
    model = emulator.model
    model.requires_grad_(False)
    blocks = get_blocks(model, emulator.layout)
    for i in middle:
        blocks[i].requires_grad_(True)
    adapter = emulator.manifest["blocks"]["adapter"]
    num_bottom = next(i for i in range(len(adapter) + 1) if i == len(adapter) or adapter[i] != i)
    top_start = adapter[num_bottom] if num_bottom < len(adapter) else discover_layout(base).num_blocks
    last_middle_base = top_start - 1  # the teacher's middle ends here whether or not the emulator kept it
    loss_fn = KDLoss(base, model, last_middle_base, middle[-1], config)

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

    features = pack_blocks(tokenizer, texts, config.block_size)
    pad_id = pad_token_id(tokenizer)
    try:
        run = train(model, features, pad_id, config.train_config(), ckpt_dir=out_dir.with_name(out_dir.name + ".checkpoints"),
                    resume=resume, progress=progress, desc="distill", loss_fn=loss_fn, callback=on_checkpoint)
    finally:
        loss_fn.close()
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
        layout=discover_layout(base),
        block_map=emulator.block_map,
        adapter_blocks=emulator.manifest["blocks"]["adapter"],
        method=emulator.manifest["method"]["name"],
        params=emulator.manifest["method"]["params"] | {"distillation": record},
        structure=emulator.manifest.get("structure", {}),
    )
    return save_emulator(distilled, tokenizer, out_dir, fingerprint, emulator.manifest["base"].get("name", ""),
                         overwrite=overwrite, sign_key=sign_key)
