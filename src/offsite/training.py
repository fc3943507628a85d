"""Data-owner fine-tuning of the adapter on a frozen emulator, from the emulator bundle alone.

`finetune` is a short recipe over reusable pieces (trainable-parameter setup, batching,
optimizer/schedule, checkpoints, adapter export). accelerate runs it unchanged on one CPU,
one GPU or several GPUs (`accelerate launch -m offsite.cli finetune ...`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from peft import get_peft_model
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_scheduler

from .adapter import LoraSettings, save_adapter
from .checkpoint import checkpoint_position, clear_checkpoints, list_checkpoints, restore_checkpoint, save_checkpoint
from .data import Example, epoch_order, length_grouped_order, pad_batch
from .emulator import LoadedEmulator, load_emulator
from .configs import PRECISIONS, SCHEDULES, TENSORBOARD_INSTALL, FinetuneConfig  # noqa: F401  (re-exported)
from .errors import ConfigError
from .lm import causal_lm_loss, pad_token_id, tokenize_examples  # noqa: F401  (re-exported)
from .progress import bars_disabled
from .signing import load_private_key
from .surgery import get_blocks, linear_module_names





def resolve_precision(requested: str) -> str:
    if requested != "auto":
        return requested
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


def frozen_dtype(stored: torch.dtype, precision: str) -> torch.dtype:
    """The dtype the frozen emulator weights are held in while the adapter trains.

    With mixed precision (bf16/fp16 autocast, the default on GPUs that support bf16) they stay in
    the bundle's own dtype: a bf16 emulator of a 7B model needs half the memory float32 would.
    Without it (the CPU default) every weight is float32, since a bf16 weight can only meet the
    float32 activations of the trainable blocks inside autocast. The trainable tensors are always
    float32 (`make_trainable`), so updates are never rounded to bf16.
    """
    return stored if precision in ("bf16", "fp16") else torch.float32


def load_emulator_dtype(bundle_dir) -> torch.dtype:
    """The dtype an emulator bundle's weights are stored in, from its manifest alone (`load_emulator`
    verifies the whole bundle right after; a manifest that lies fails there)."""
    from .bundle import parse_dtype, read_manifest

    return parse_dtype(read_manifest(Path(bundle_dir), kind="emulator", verify=False, trusted_key=False)["base"].get("dtype", "float32"))


def make_trainable(emulator: LoadedEmulator, config: FinetuneConfig):
    """Freeze everything but the adapter blocks (or LoRA on them). Returns (model, LoRA settings or None)."""
    model = emulator.model
    model.requires_grad_(False)
    if not config.lora:
        for i in emulator.trainable:
            block = get_blocks(model, emulator.layout)[i]
            block.float()  # float32 master weights, whatever the frozen rest is held in
            block.requires_grad_(True)
        return model, None
    targets = linear_module_names(model, emulator.layout, emulator.trainable)
    conv1d = any(type(model.get_submodule(t)).__name__ == "Conv1D" for t in targets)
    emulator_side = LoraSettings(config.lora_r, config.lora_alpha, targets, config.lora_dropout, fan_in_fan_out=conv1d)
    peft_model = get_peft_model(model, emulator_side.to_peft())
    # The bundle names the full model's modules: same paths, original block indices.
    layout, block_map = emulator.layout, emulator.block_map
    full_side = dataclasses.replace(
        emulator_side,
        target_modules=[
            layout.block_key(block_map[idx], rest) for idx, rest in (layout.parse_block_key(t) for t in targets)
        ],
    )
    return peft_model, full_side


def trainable_parameters(model) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def count_steps(num_examples: int, config: FinetuneConfig, num_processes: int) -> tuple[int, int]:
    """(optimizer steps per epoch, total optimizer steps)."""
    batches = math.ceil(num_examples / (config.batch_size * num_processes))
    per_epoch = max(1, math.ceil(batches / config.grad_accum))
    return per_epoch, config.max_steps or per_epoch * config.epochs


def finetune(
    bundle_dir: str | Path,
    examples: list[Example],
    output_dir: str | Path,
    config: FinetuneConfig | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    sign_key=None,
    trusted_key=None,
    start=None,
) -> Path:
    """Data-owner recipe: train the adapter of an emulator bundle on `examples`.

    `start(emulator, config)`: where training starts, for rounds after the first (federation): it may
    set the emulator's adapter blocks, and returns LoRA tensors (keyed as PEFT's state dict of the
    emulator) to load once LoRA is attached, or None. Default: the emulator's own blocks, fresh LoRA.

    Writes the adapter bundle to `output_dir/adapter` (checkpoints go to `output_dir/checkpoints`)
    and returns its path. `trusted_key`: the owner's public key the emulator bundle must be
    signed with (default: $OFFSITE_TRUSTED_KEY); `sign_key`: the data owner's private key to
    sign the adapter bundle with.
    """
    config = config or FinetuneConfig()
    output_dir = Path(output_dir)
    ckpt_dir, adapter_dir = output_dir / "checkpoints", output_dir / "adapter"
    if adapter_dir.exists() and not overwrite:
        raise ConfigError(f"an adapter already exists at {adapter_dir}; choose another output or pass --overwrite")
    if list_checkpoints(ckpt_dir) and not resume and not overwrite:
        raise ConfigError(f"{ckpt_dir} holds checkpoints of an earlier run; pass --resume to continue it or --overwrite")

    sign_key = load_private_key(sign_key) if sign_key is not None else None  # fail before training
    if overwrite and not resume:
        clear_checkpoints(ckpt_dir)  # starting over: the old run's checkpoints must never be resumed

    set_seed(config.seed)
    stored = load_emulator_dtype(bundle_dir)
    emulator = load_emulator(bundle_dir, dtype=frozen_dtype(stored, resolve_precision(config.mixed_precision)), trusted_key=trusted_key)
    lora_start = start(emulator, config) if start is not None else None
    model, lora = make_trainable(emulator, config)
    if lora_start is not None:
        from peft import get_peft_model_state_dict, set_peft_model_state_dict

        if set(lora_start) != set(get_peft_model_state_dict(model)):
            raise ConfigError("the starting LoRA adapter has other tensors than this run's LoRA (rank, alpha and targets must match)")
        set_peft_model_state_dict(model, lora_start)
    features = tokenize_examples(emulator.tokenizer, examples, config.max_length)
    run = train(model, features, pad_token_id(emulator.tokenizer), config, ckpt_dir=ckpt_dir, resume=resume, progress=progress,
                log_dir=output_dir)
    if run.accelerator.is_main_process:
        # The loss curve, appended (a resumed run continues the file): one JSON line per log step.
        output_dir.mkdir(parents=True, exist_ok=True)
        with (output_dir / TRAIN_LOG).open("a" if resume else "w", encoding="utf-8") as f:
            for entry in run.history:
                f.write(json.dumps(entry) + "\n")
        training = {**dataclasses.asdict(config), "learning_rate": config.learning_rate, "precision": run.accelerator.mixed_precision}
        save_adapter(run.model, emulator, adapter_dir, training, run.metrics, lora, overwrite=overwrite, sign_key=sign_key)
    run.accelerator.wait_for_everyone()
    return adapter_dir


TRAIN_LOG = "train_log.jsonl"  # in the run directory, beside adapter/ and checkpoints/
# FinetuneConfig fields that may change when a run is resumed (they do not change what a step computes).
RESUMABLE_CHANGES = ("checkpoint_every", "log_every")


def load_training_examples(bundle_dir, data=None, task=None, limit: int | None = None, seed: int = 0, trusted_key=None) -> list[Example]:
    """A data owner's examples: a JSONL file (`data`; chat records use the bundle's own tokenizer, read
    only once the bundle is verified) or a built-in task's train split (`task`)."""
    if bool(data) == bool(task):
        raise ConfigError("give exactly one of a data file (JSONL) or a built-in task")
    if task:
        from .tasks import load_train_examples

        return load_train_examples(task, limit=limit, seed=seed)
    from .data import load_examples

    def bundle_tokenizer():
        from transformers import AutoTokenizer

        from .bundle import read_manifest

        read_manifest(bundle_dir, kind="emulator", trusted_key=trusted_key)
        return AutoTokenizer.from_pretrained(bundle_dir, local_files_only=True, trust_remote_code=False)

    return load_examples(data, tokenizer=bundle_tokenizer)[:limit]


def run_identity(config: FinetuneConfig, features: list[dict], params: dict[str, torch.nn.Parameter]) -> str:
    """SHA-256 of what a run computes from: its settings, its tokenised data and the starting values of
    the trainable tensors (which ties it to the emulator). Saved in every checkpoint; resume requires it."""
    from .bundle import tensor_bytes

    h = hashlib.sha256()
    settings = {k: v for k, v in dataclasses.asdict(config).items() if k not in RESUMABLE_CHANGES}
    h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    h.update(json.dumps(features, sort_keys=True).encode())
    for name in sorted(params):
        h.update(name.encode())
        h.update(tensor_bytes(params[name].detach()))
    return h.hexdigest()


@dataclass
class TrainResult:
    model: torch.nn.Module  # unwrapped
    metrics: dict
    accelerator: Accelerator
    history: list[dict] = dataclasses.field(default_factory=list)  # {"step", "loss", "lr"} every log_every steps


def train(
    model: torch.nn.Module,
    features: list[dict[str, list[int]]],
    pad_id: int,
    config: FinetuneConfig,
    ckpt_dir: Path | None = None,
    resume: bool = False,
    progress: bool = True,
    desc: str = "finetune",
    loss_fn=causal_lm_loss,
    callback=None,
    log_dir: Path | None = None,
) -> TrainResult:
    """Train whatever parameters of `model` require grad on tokenised `features` (input_ids, labels).

    AdamW + warmup/decay schedule in optimizer steps, gradient accumulation, clipping, mixed
    precision and multi-process data parallelism via accelerate; periodic checkpoints to
    `ckpt_dir` and exact resume from the latest one. `loss_fn(model, batch, head)` defaults to
    the answer-only causal-LM loss; `callback(step, unwrapped_model)` runs at every checkpoint step.
    With `config.report_to="tensorboard"`, accelerate's TensorBoard tracker writes the loss and lr of
    every log step under `log_dir/tensorboard`.
    """
    if not features:
        raise ConfigError("no training examples")
    # Without a GPU, accelerate only treats torchrun / `accelerate launch` ranks as one multi-CPU (gloo) run
    # when told cpu=True; otherwise every rank trains alone on its own copy.
    on_cpu = not (torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())
                  or torch.backends.mps.is_available())
    precision = resolve_precision(config.mixed_precision)
    from accelerate.state import AcceleratorState

    # accelerate keeps one process-wide state and refuses a second Accelerator with another precision; a
    # library (or the owner service) trains many runs in one process, so that state is renewed per run.
    # The distributed part (PartialState: ranks, process group) is kept.
    if AcceleratorState._shared_state and AcceleratorState._shared_state.get("_mixed_precision") != precision:
        AcceleratorState._reset_state(reset_partial_state=False)
    tracking = config.report_to == "tensorboard"
    if tracking:
        import importlib.util

        if importlib.util.find_spec("tensorboard") is None:
            raise ConfigError(f"report_to tensorboard needs the tensorboard package: {TENSORBOARD_INSTALL}")
        if log_dir is None:
            raise ConfigError("report_to tensorboard needs a run directory to write the events to")
    accelerator = Accelerator(mixed_precision=precision, gradient_accumulation_steps=config.grad_accum, cpu=on_cpu,
                              log_with="tensorboard" if tracking else None, project_dir=str(log_dir) if tracking else None)
    if tracking:
        accelerator.init_trackers("tensorboard", config={k: v for k, v in dataclasses.asdict(config).items()
                                                         if isinstance(v, (int, float, str, bool))})
    set_seed(config.seed)
    params = trainable_parameters(model)
    if not params:
        raise ConfigError("nothing to train: no parameter requires grad")

    _, total_steps = count_steps(len(features), config, accelerator.num_processes)
    optimizer = torch.optim.AdamW(
        list(params.values()), lr=config.learning_rate, weight_decay=config.weight_decay, fused=torch.cuda.is_available()
    )
    # accelerate steps a prepared scheduler once per process per optimizer step.
    scheduler = get_scheduler(
        config.schedule,
        optimizer,
        num_warmup_steps=int(config.warmup_ratio * total_steps) * accelerator.num_processes,
        num_training_steps=total_steps * accelerator.num_processes,
    )
    head = model.get_output_embeddings()
    if config.gradient_checkpointing:
        # Non-reentrant: gradients reach the trainable blocks even where the embeddings are frozen.
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)

    step, epoch, skip = 0, 0, 0
    # Only a run that writes or reads checkpoints needs its identity (hashing every trainable tensor costs).
    identity = run_identity(config, features, params) if ckpt_dir and (resume or config.checkpoint_every) else None
    if resume and ckpt_dir and list_checkpoints(ckpt_dir):
        latest = list_checkpoints(ckpt_dir)[-1]
        if checkpoint_position(latest).get("run") != identity:
            raise ConfigError(f"{latest} belongs to another run (other settings, data or starting weights); "
                              "resume needs the same run, or pass --overwrite to start over")
        pos = restore_checkpoint(latest, trainable_parameters(accelerator.unwrap_model(model)), optimizer, scheduler)
        step, epoch, skip = pos["step"], pos["epoch"], pos["batches_done"]
        accelerator.print(f"resumed from {latest} at step {step}")

    bar = tqdm(total=total_steps, initial=step, disable=bars_disabled(progress and accelerator.is_main_process), desc=desc, unit="step")
    model.train()
    start, tokens, padded, losses = time.perf_counter(), 0, 0, []
    history: list[dict] = []  # mean loss and lr every log_every steps (of this process run)
    while step < total_steps:
        if config.group_by_length:
            order = length_grouped_order([len(f["input_ids"]) for f in features], config.batch_size, config.seed, epoch)
        else:
            order = epoch_order(len(features), config.seed, epoch)
        # Own generator: iterating a DataLoader must not draw from the global RNG (dropout's),
        # or a resumed run would see different dropout masks than an uninterrupted one.
        loader = DataLoader(
            [features[i] for i in order],
            batch_size=config.batch_size,
            collate_fn=lambda b: pad_batch(b, pad_id),
            generator=torch.Generator().manual_seed(config.seed + epoch),
        )
        loader = accelerator.prepare(loader)
        epoch_len = len(loader)
        if skip:
            loader = accelerator.skip_first_batches(loader, skip)
        batches_done = skip
        for batch in loader:
            with accelerator.accumulate(model):
                loss = loss_fn(model, batch, head)
                accelerator.backward(loss)
                if accelerator.sync_gradients and config.max_grad_norm:
                    accelerator.clip_grad_norm_(list(params.values()), config.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            batches_done += 1
            tokens += int(batch["attention_mask"].sum())
            padded += batch["attention_mask"].numel()
            losses.append(loss.item())
            if not accelerator.sync_gradients:
                continue
            step += 1
            bar.update(1)
            recent = losses[-config.log_every * config.grad_accum:]
            if step % config.log_every == 0 or step == total_steps:
                history.append({"step": step, "loss": round(sum(recent) / len(recent), 6), "lr": scheduler.get_last_lr()[0]})
                if tracking:
                    accelerator.log({"train/loss": history[-1]["loss"], "train/lr": history[-1]["lr"]}, step=step)
                bar.set_postfix(loss=f"{history[-1]['loss']:.4f}", lr=f"{history[-1]['lr']:.2e}")
            if config.checkpoint_every and step % config.checkpoint_every == 0:
                if ckpt_dir and accelerator.is_main_process:
                    done_epoch = batches_done >= epoch_len
                    position = {"epoch": epoch + 1 if done_epoch else epoch, "batches_done": 0 if done_epoch else batches_done,
                                "run": identity}
                    save_checkpoint(ckpt_dir, step, trainable_parameters(accelerator.unwrap_model(model)), optimizer, scheduler, position)
                if callback:
                    callback(step, accelerator.unwrap_model(model))
            if step >= total_steps:
                break
        epoch, skip = epoch + 1, 0
    bar.close()
    if tracking:
        accelerator.end_training()
    accelerator.wait_for_everyone()
    model.eval()
    recent = losses[-config.log_every * config.grad_accum:]
    # Tokens over every process (each saw its own shard of the batches); the effective batch is what one
    # optimizer step averages over.
    all_tokens, all_padded = (int(v) for v in accelerator.reduce(torch.tensor([tokens, padded], device=accelerator.device),
                                                                  reduction="sum").tolist())
    metrics = {
        "steps": step,
        "first_loss": losses[0] if losses else None,
        "final_loss": sum(recent) / max(1, len(recent)),
        "train_tokens": all_tokens,
        "padding_fraction": round(1 - all_tokens / all_padded, 4) if all_padded else 0.0,  # of the positions computed
        "num_processes": accelerator.num_processes,
        "effective_batch": config.batch_size * config.grad_accum * accelerator.num_processes,
        "seconds": round(time.perf_counter() - start, 2),
        "num_examples": len(features),
    }
    return TrainResult(accelerator.unwrap_model(model), metrics, accelerator, history)
