"""PEMA's settings, with no torch: what the command line builds its flags and help from, and what
offsite.pema.memory, .train and .generate run with."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..errors import ConfigError


CONTEXTS = ("greedy", "gold")


@dataclass
class MemoryConfig:
    """How the external memory is built. Every field is also a CLI flag and a YAML key."""

    CHOICES: ClassVar[dict] = {"contexts": CONTEXTS}

    contexts: str = "greedy"  # greedy: prompt + the model's own predictions (PEMA); gold: teacher forcing
    batch_size: int = 8  # prompts per representation request
    max_prompt_tokens: int = 512  # longer prompts keep their last tokens
    max_target_tokens: int = 64  # longer targets keep their first tokens
    # One more row per example: the context after the whole target, labelled with the tokenizer's EOS,
    # so PEMA learns where an answer ends (generation stops at EOS). Needs a tokenizer with an EOS.
    end_row: bool = True

    def __post_init__(self):
        if self.contexts not in CONTEXTS:
            raise ConfigError(f"contexts must be one of {CONTEXTS}, got {self.contexts!r}")
        for name in ("batch_size", "max_prompt_tokens", "max_target_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")


@dataclass
class PemaConfig:
    """How the PEMA adapter is trained. Every field is also a CLI flag and a YAML key."""

    rank: int | None = None  # default d // 4 (the paper's r/d is 1/4 to 1/14)
    dropout: float = 0.2
    kappa: float = 0.2  # weight of L_rct in phase 2
    lr: float = 1e-3
    epochs: int = 100  # a cap per phase; validation with patience is what stops it (the metrics say which did)
    batch_size: int = 256  # memory rows per step
    patience: int = 5  # validations without improvement before a phase stops
    eval_every: int = 200  # steps between validations; 0 = once per epoch
    # Reconstruction measured on what the head sees, norm(h_rct) against norm(f) (the head normalises
    # first, so a scale error the head never sees is not a reconstruction error); False: the raw states.
    reconstruct_normed: bool = True
    val_fraction: float = 0.1  # of the examples
    seed: int = 0
    device: str = "auto"

    def __post_init__(self):
        if self.rank is not None and self.rank < 1:
            raise ConfigError(f"rank must be at least 1, got {self.rank}")
        for name in ("epochs", "batch_size", "patience"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 0 <= self.dropout < 1 or not 0 <= self.kappa <= 1 or not 0 < self.val_fraction < 1:
            raise ConfigError("dropout must be in [0, 1), kappa in [0, 1] and val_fraction in (0, 1)")
        if self.lr <= 0 or self.eval_every < 0:
            raise ConfigError("lr must be positive and eval_every non-negative")


@dataclass
class GenerateConfig:
    """How PEMA generates. Every field is also a CLI flag and a YAML key."""

    lambda_max: float = 0.9
    gradual_unrolling: bool = True
    expected_length: float | None = None  # tokens; default: the adapter's mean target length in its memory
    unroll_over: str = "prompt+answer"  # L = prompt length + expected length (reference code), or "answer": expected length only
    max_new_tokens: int = 32
    batch_size: int = 16
    max_prompt_tokens: int = 512  # longer prompts keep their last tokens (as in the memory)
    stop_at_newline: bool = True  # a generated line break ends the answer

    def __post_init__(self):
        if not 0 <= self.lambda_max <= 1:
            raise ConfigError(f"lambda_max must be in [0, 1], got {self.lambda_max}")
        if self.expected_length is not None and not self.expected_length > 0:
            raise ConfigError(f"expected_length must be positive, got {self.expected_length}")
        if self.unroll_over not in ("prompt+answer", "answer"):
            raise ConfigError(f"unroll_over must be 'prompt+answer' or 'answer', got {self.unroll_over!r}")
        for name in ("max_new_tokens", "batch_size", "max_prompt_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
