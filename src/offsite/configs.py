"""Training and distillation settings, with no torch: what the command line builds its flags and help from,
and what offsite.training and offsite.distill run with."""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from typing import ClassVar

from .errors import ConfigError


SCHEDULES = ("linear", "cosine", "constant_with_warmup")


PRECISIONS = ("auto", "no", "bf16", "fp16")
REPORTERS = ("none", "tensorboard")
TENSORBOARD_INSTALL = "pip install tensorboard==2.21.0 (the 'logs' extra)"


@dataclass
class FinetuneConfig:
    """How the data owner trains the adapter. Every field is also a CLI flag and a YAML key."""

    CHOICES: ClassVar[dict] = {"schedule": SCHEDULES, "mixed_precision": PRECISIONS, "report_to": REPORTERS}

    lora: bool = False  # LoRA on the adapter blocks' linear layers instead of training them fully
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lr: float | None = None  # default: 5e-5 for full blocks, 3e-4 for LoRA
    weight_decay: float = 0.0
    epochs: int = 1
    max_steps: int | None = None  # optimizer steps; overrides epochs
    batch_size: int = 8  # per device, per micro-step
    grad_accum: int = 1
    warmup_ratio: float = 0.05
    schedule: str = "linear"
    max_length: int = 256
    max_grad_norm: float = 1.0
    mixed_precision: str = "auto"  # bf16 autocast on GPUs that support it
    seed: int = 0
    checkpoint_every: int = 0  # optimizer steps between checkpoints (needed for --resume); 0 = none
    log_every: int = 10
    # Batches of similar length, random across groups of 50 batches: on real task data it cut padding from 55% to 14% and
    # doubled tokens/s (benchmarks/throughput.py); False: plain shuffled batches.
    group_by_length: bool = True
    report_to: str = "none"  # "tensorboard": loss and lr every log step as TensorBoard events in the run directory
    gradient_checkpointing: bool = False  # recompute each block's activations in the backward pass: less memory, ~30% more compute

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.report_to not in REPORTERS:
            raise ConfigError(f"report_to must be one of {REPORTERS}, got {self.report_to!r}")
        if self.mixed_precision not in PRECISIONS:
            raise ConfigError(f"mixed_precision must be one of {PRECISIONS}, got {self.mixed_precision!r}")
        for name in ("batch_size", "grad_accum", "epochs", "max_length", "lora_r"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"max_steps must be at least 1, got {self.max_steps}")

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else (3e-4 if self.lora else 5e-5)


@dataclass
class DistillConfig:
    """Owner-side distillation settings. Steps are optimizer steps, independent of the GPU count."""

    lm_weight: float = 1.0
    kd_weight: float = 30.0
    lr: float = 1e-4
    schedule: str = "cosine"
    warmup_ratio: float = 0.0
    block_size: int = 512
    batch_size: int = 4
    grad_accum: int = 1
    tokens: int = 2_000_000  # token budget; steps = tokens / (block_size * batch_size * grad_accum * processes)
    eval_every: int = 50  # steps between held-out perplexity checks (and checkpoints)
    eval_chars: int = 20_000  # held-out text for checkpoint selection
    mixed_precision: str = "auto"
    seed: int = 0

    def __post_init__(self):
        if self.lm_weight < 0 or self.kd_weight < 0 or self.lm_weight + self.kd_weight == 0:
            raise ConfigError("lm_weight and kd_weight must be >= 0 and not both 0")
        if self.block_size < 8 or self.tokens < self.block_size:
            raise ConfigError(f"need block_size >= 8 and tokens >= block_size, got {self.block_size}, {self.tokens}")

    def train_config(self) -> FinetuneConfig:
        steps = max(1, self.tokens // (self.block_size * self.batch_size * self.grad_accum))
        return FinetuneConfig(
            lr=self.lr, schedule=self.schedule, warmup_ratio=self.warmup_ratio, batch_size=self.batch_size,
            grad_accum=self.grad_accum, max_steps=steps, max_length=self.block_size, mixed_precision=self.mixed_precision,
            seed=self.seed, checkpoint_every=self.eval_every, log_every=10,
        )


# Norm bound: an adapter tensor (full blocks), or a LoRA update (alpha/r) B A, may have a
# Frobenius norm of at most MAX_NORM_RATIO x max(|W|, NORM_FLOOR_RMS x sqrt(numel(W))), where W
# is the base weight it replaces or updates. The floor gives zero-initialised tensors (biases)
# room to train. Genuine fine-tunes stay far below it (tests/test_plugin.py measures the tiny
# models at lr 1e-2); it stops absurd values (overflow in bf16, a "model" that is just noise).
MAX_NORM_RATIO = 100.0
NORM_FLOOR_RMS = 0.1


# ---------------------------------------------------------------- typed values (YAML, manifests, env)
def build_dataclass(cls, values: dict):
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"{cls.__name__} has no option(s) {unknown}")
    return cls(**typed_values(cls, values))


def typed_values(cls, values: dict) -> dict:
    """`values` (from YAML or a manifest) checked against the dataclass's field types, with one-line errors:
    PyYAML reads `1e-4` as a string (a float field takes it), and a quoted "no" is not false."""
    hints = typing.get_type_hints(cls)
    return {name: _typed(cls.__name__, name, hints[name], value) if name in hints else value for name, value in values.items()}


def _typed(owner: str, name: str, hint, value):
    where = f"{owner}.{name}"
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        errors = []
        for candidate in inner:
            try:
                return _typed(owner, name, candidate, value)
            except ConfigError as e:
                errors.append(e)
        raise errors[0]
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where} must be true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where} must be a whole number, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # PyYAML leaves 1e-4 (no dot) a string
            except ValueError:
                pass
        raise ConfigError(f"{where} must be a number, got {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where} must be a string, got {value!r}")
    if typing.get_origin(hint) is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        return [_typed(owner, f"{name}[{i}]", args[0], v) for i, v in enumerate(value)] if args else value
    return value
