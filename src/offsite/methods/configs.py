"""The emulator methods' settings, with no torch: what the command line builds its flags and help from
(`offsite compress -h` imports nothing heavy), and what the method modules build emulators from.

One config dataclass per method (and ScaleOT's stage (a)); `METHOD_CONFIGS` names them as the
registry in `offsite.methods` does (a test keeps the two equal).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from ..errors import ConfigError

# The harmonizer activations offsite.structure builds (a test keeps the two equal).
ACTIVATION_NAMES = ("gelu", "relu", "silu")


@dataclass
class EmulatorConfig:
    """Settings shared by every method: the adapter is the bottom `num_bottom` and top `num_top` blocks."""

    num_bottom: int = 2
    num_top: int = 2

    def adapter_blocks(self, num_blocks: int) -> list[int]:
        if self.num_bottom < 0 or self.num_top < 0 or self.num_bottom + self.num_top == 0:
            raise ConfigError(f"adapter needs at least one block, got num_bottom={self.num_bottom} num_top={self.num_top}")
        if self.num_bottom + self.num_top >= num_blocks:
            raise ConfigError(
                f"adapter of {self.num_bottom}+{self.num_top} blocks leaves no middle in a model of {num_blocks} blocks"
            )
        return list(range(self.num_bottom)) + list(range(num_blocks - self.num_top, num_blocks))

    def middle_blocks(self, num_blocks: int) -> list[int]:
        self.adapter_blocks(num_blocks)
        return list(range(self.num_bottom, num_blocks - self.num_top))

    def kept_middle(self, num_blocks: int) -> list[int]:
        """The middle blocks the emulator is built from (all of them, unless a method drops some first)."""
        return self.middle_blocks(num_blocks)

    def block_map(self, num_blocks: int) -> list[int]:
        """Original indices of the blocks the emulator is built from: the adapter around `kept_middle`."""
        adapter = self.adapter_blocks(num_blocks)
        return adapter[: self.num_bottom] + self.kept_middle(num_blocks) + adapter[self.num_bottom :]


@dataclass
class LayerDropConfig(EmulatorConfig):
    """Keep `num_kept` middle blocks spread uniformly, or exactly `kept_blocks` (original indices)."""

    num_kept: int | None = None
    kept_blocks: list[int] | None = None

    def kept_middle(self, num_blocks: int) -> list[int]:
        return select_middle(self, num_blocks)


def uniform_indices(num_middle: int, k: int) -> list[int]:
    """round(i*(M-1)/(k-1)) for i in 0..k-1: first and last middle block always kept."""
    if k < 2:
        raise ConfigError(f"num_kept must be at least 2 (the first and last middle blocks are always kept), got {k}")
    if k > num_middle:
        raise ConfigError(f"num_kept={k} is more than the {num_middle} middle blocks")
    return [round(i * (num_middle - 1) / (k - 1)) for i in range(k)]


def select_middle(config: LayerDropConfig, num_blocks: int) -> list[int]:
    """Original indices of the middle blocks the emulator keeps."""
    middle = config.middle_blocks(num_blocks)
    if (config.num_kept is None) == (config.kept_blocks is None):
        raise ConfigError("give exactly one of num_kept or kept_blocks")
    if config.kept_blocks is not None:
        kept = list(config.kept_blocks)
        if sorted(set(kept)) != kept or any(i not in middle for i in kept):
            raise ConfigError(
                f"kept_blocks must be distinct ascending middle-block indices in [{middle[0]}, {middle[-1]}], got {kept}"
            )
        return kept
    return [middle[0] + i for i in uniform_indices(len(middle), config.num_kept)]


SCORES = ("gradient", "magnitude")


LAMBDA_SCALES = ("absolute", "balanced")


@dataclass
class GradOTConfig(EmulatorConfig):
    """GradOT settings. The support set is generic text, or a built-in task's training examples."""

    CHOICES: ClassVar[dict] = {"lambda_scale": LAMBDA_SCALES, "score": SCORES}

    target_fraction: float = 0.65  # emulator middle parameters / original middle parameters
    num_kept: int | None = None  # optional LayerDrop first (uniform stride), as in "layerdrop"
    kept_blocks: list[int] | None = None
    score: str = "gradient"  # "gradient" (GCS) or "magnitude" (ablation: singular values / channel norms)
    lambda_attn: float = 1.0
    lambda_mlp: float = 1.0
    # "absolute": lambda in the curvature term's units (model-dependent: ~1e-3 of it at 1 on SmolLM2);
    # "balanced": lambda times mean|curvature| / mean|loss term| over all items of its kind, so 1 weighs both equally.
    lambda_scale: str = "absolute"
    min_rank_fraction: float = 0.05  # share of each attention matrix's rank (and MLP channels) always kept
    support_task: str = "generic"  # "generic" text, or a task name (its train examples)
    support_size: int = 64  # sequences
    support_max_length: int = 128  # tokens per sequence
    support_batch_size: int = 8
    blocks_per_pass: int = 0  # K-FAC statistics for this many middle blocks per support pass (0: all at once)
    seed: int = 0

    def __post_init__(self):
        from ..tasks import TASKS

        if not 0 < self.target_fraction <= 1:
            raise ConfigError(f"target_fraction must be in (0, 1], got {self.target_fraction}")
        if self.lambda_scale not in LAMBDA_SCALES:
            raise ConfigError(f"lambda_scale must be one of {LAMBDA_SCALES}, got {self.lambda_scale!r}")
        if self.score not in SCORES:
            raise ConfigError(f"score must be one of {SCORES}, got {self.score!r}")
        if not 0 < self.min_rank_fraction <= 1:
            raise ConfigError(f"min_rank_fraction must be in (0, 1], got {self.min_rank_fraction}")
        if not (math.isfinite(self.lambda_attn) and math.isfinite(self.lambda_mlp)):
            raise ConfigError("lambda_attn and lambda_mlp must be finite")
        for name in ("support_size", "support_max_length", "support_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.blocks_per_pass < 0:
            raise ConfigError(f"blocks_per_pass must be >= 0 (0: all middle blocks in one pass), got {self.blocks_per_pass}")
        if self.support_task != "generic" and self.support_task not in TASKS:
            raise ConfigError(f"support_task must be 'generic' or one of {sorted(TASKS)}, got {self.support_task!r}")

    def kept_middle(self, num_blocks: int) -> list[int]:
        if self.num_kept is None and self.kept_blocks is None:
            return self.middle_blocks(num_blocks)
        return select_middle(self, num_blocks)


KEEP = ("medoid", "first", "last")


@dataclass
class CrashConfig(EmulatorConfig):
    """CRaSh: `num_clusters` clusters of consecutive middle blocks, one block kept per cluster."""

    CHOICES: ClassVar[dict] = {"keep": KEEP}

    num_clusters: int | None = None
    share: bool = True  # repeat the kept block at every position of its cluster (depth kept)
    keep: str = "medoid"  # which block of a cluster is kept: medoid | first | last
    support_size: int = 32  # sequences of generic text
    support_max_length: int = 128  # tokens per sequence
    support_batch_size: int = 8
    max_tokens: int = 2048  # token positions whose representations enter the CKA
    seed: int = 0

    def __post_init__(self):
        if self.num_clusters is None or isinstance(self.num_clusters, bool) or not isinstance(self.num_clusters, int):
            raise ConfigError(f"crash needs num_clusters, a whole number of clusters (= middle blocks kept), got {self.num_clusters!r}")
        if self.num_clusters < 1:
            raise ConfigError(f"num_clusters must be at least 1, got {self.num_clusters}")
        if self.keep not in KEEP:
            raise ConfigError(f"keep must be one of {KEEP}, got {self.keep!r}")
        for name in ("support_size", "support_max_length", "support_batch_size", "max_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.support_max_length < 2:
            raise ConfigError("support_max_length must be at least 2 (the first position of each sequence is skipped)")


OBJECTIVES = ("lm", "match", "local")


RANKINGS = ("learned", "direct")


# ------------------------------------------------------------------ stage (a): settings
@dataclass
class ImportanceConfig:
    """ScaleOT stage (a). Steps count (harmonizer step + importance step) pairs."""

    CHOICES: ClassVar[dict] = {"activation": ACTIVATION_NAMES, "objective": OBJECTIVES, "mixed_precision": ("auto", "no", "bf16")}

    num_bottom: int = 2  # adapter the artifact is made for: harmonizers cover the blocks in between
    num_top: int = 2
    rank: int = 64  # harmonizer rank
    rank_fraction: float | None = None  # rank as a fraction of the hidden size (overrides `rank`)
    activation: str = "relu"
    # What the harmonizers learn: "lm" the mixed network's LM loss; "match" that plus match_weight x the
    # normalised MSE between the mixed network's hidden state after each harmonized span and the original
    # network's at the same block; "local" each harmonizer regressed on its own block's input -> output
    # (normalised MSE, on the original network's activations; no mixed network in its step). "local" is the
    # default: on SmolLM2-135M it is the only objective whose plug-in beats size-matched LayerDrop without
    # narrowing the plug-in - emulator gap (README, ScaleOT study).
    objective: str = "local"
    match_weight: float = 30.0
    # Importance: K mixed networks per step, all scored on the same held-out batch. K = 1: REINFORCE
    # against an EMA baseline; K >= 2: against the leave-one-out mean of the other K - 1 rewards.
    policy_samples: int = 4
    # After training, measure each block directly: held-out loss with that block alone swapped for its
    # harmonizer, on this many held-out sequences (0: skip); the artifact records the Spearman
    # correlation of this with the learned importance.
    direct_sequences: int = 32
    group_size: int = 4
    steps: int = 300
    batch_size: int = 8
    block_size: int = 128  # tokens per packed sequence
    lr: float = 1e-3  # harmonizers (AdamW)
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    policy_lr: float = 0.05  # importance logits (Adam)
    baseline_decay: float = 0.9
    init_logit: float = 0.0
    data: str = "generic"  # "generic" text, a task name (its training examples), or a JSONL file
    data_chars: int | None = None  # characters of generic text to use (None: all)
    heldout_fraction: float = 0.1  # share of the packed blocks kept for the reward
    checkpoint_every: int = 50  # steps between checkpoints (0: none, no resume)
    log_every: int = 10
    mixed_precision: str = "auto"  # bf16 autocast on GPUs that support it; "no" for float32
    device: str = "auto"
    seed: int = 0
    # Block by block from the checkpoint, for models larger than memory (offsite.methods.scaleot_onload):
    # the "local" objective only, ranked by the direct swap measurement (no learned importance).
    onload: bool = False

    def __post_init__(self):
        if self.onload and (self.objective != "local" or self.direct_sequences < 1):
            raise ConfigError("onload runs the 'local' objective and ranks by the direct swap measurement: set objective='local' "
                              f"and direct_sequences >= 1 (got objective={self.objective!r}, direct_sequences={self.direct_sequences})")
        if self.activation not in ACTIVATION_NAMES:
            raise ConfigError(f"activation must be one of {ACTIVATION_NAMES}, got {self.activation!r}")
        if self.objective not in OBJECTIVES:
            raise ConfigError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if self.rank_fraction is not None and not (isinstance(self.rank_fraction, (int, float)) and 0 < self.rank_fraction <= 1):
            raise ConfigError(f"rank_fraction must be in (0, 1], got {self.rank_fraction!r}")
        if not (math.isfinite(self.match_weight) and self.match_weight >= 0):
            raise ConfigError(f"match_weight must be a finite number >= 0, got {self.match_weight}")
        if self.policy_samples < 1 or self.direct_sequences < 0:
            raise ConfigError(f"policy_samples must be >= 1 and direct_sequences >= 0, got {self.policy_samples}, {self.direct_sequences}")
        if self.group_size < 2:
            raise ConfigError(f"group_size must be at least 2 (half of each group is replaced), got {self.group_size}")
        for name in ("rank", "steps", "batch_size", "block_size", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.checkpoint_every < 0:
            raise ConfigError(f"checkpoint_every must be >= 0, got {self.checkpoint_every}")
        for name in ("lr", "policy_lr"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) > 0):
                raise ConfigError(f"{name} must be a positive number, got {getattr(self, name)}")
        if not 0 <= self.baseline_decay < 1:
            raise ConfigError(f"baseline_decay must be in [0, 1), got {self.baseline_decay}")
        if not 0 < self.heldout_fraction < 1:
            raise ConfigError(f"heldout_fraction must be in (0, 1), got {self.heldout_fraction}")
        if self.mixed_precision not in ("auto", "no", "bf16"):
            raise ConfigError(f"mixed_precision must be 'auto', 'no' or 'bf16', got {self.mixed_precision!r}")
        if not math.isfinite(self.init_logit):
            raise ConfigError("init_logit must be finite")

    def middle(self, num_blocks: int) -> list[int]:
        return EmulatorConfig(self.num_bottom, self.num_top).middle_blocks(num_blocks)

    def harmonizer_rank(self, hidden_size: int) -> int:
        return max(1, round(self.rank_fraction * hidden_size)) if self.rank_fraction is not None else self.rank


# ------------------------------------------------------------------ stage (b): the emulator
@dataclass
class ScaleOTConfig(EmulatorConfig):
    """ScaleOT emulator (N_a = num_bottom + num_top, alpha, beta) from a stage-(a) artifact.

    alpha: fraction of the middle blocks replaced by their harmonizers (the round(alpha * M) least
    important, round half up), in [0, 1]. beta: fraction of rank KEPT in the attention projections
    of the kept middle blocks, in (0, 1]: rank ceil(beta * min(in, out)); 1 = verbatim.
    """

    CHOICES: ClassVar[dict] = {"ranking": RANKINGS}

    artifact: str | None = None  # directory written by `offsite scaleot-importance`
    alpha: float = 0.5
    beta: float = 1.0
    # Never replace the first and last middle block (the adapter's neighbours), as LayerDrop always keeps them.
    protect_adapter_neighbours: bool = True
    ranking: str = "learned"  # "learned" importance logits, or "direct" (each block swapped alone, see stage (a))
    replaced_blocks: list[int] | None = None  # ablations: exactly these middle blocks become harmonizers (alpha unused)

    def __post_init__(self):
        if not self.artifact:
            raise ConfigError("scaleot needs an artifact: the directory written by `offsite scaleot-importance` (--artifact)")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not 0 <= self.alpha <= 1:
            raise ConfigError(f"alpha (fraction of middle blocks replaced by harmonizers) must be in [0, 1], got {self.alpha!r}")
        if isinstance(self.beta, bool) or not isinstance(self.beta, (int, float)) or not 0 < self.beta <= 1:
            raise ConfigError(f"beta (fraction of attention rank kept in the kept middle blocks) must be in (0, 1], got {self.beta!r}")
        if self.ranking not in RANKINGS:
            raise ConfigError(f"ranking must be one of {RANKINGS}, got {self.ranking!r}")
        if self.replaced_blocks is not None and (not isinstance(self.replaced_blocks, list) or not all(
                type(b) is int for b in self.replaced_blocks) or sorted(set(self.replaced_blocks)) != self.replaced_blocks):
            raise ConfigError(f"replaced_blocks must be distinct ascending block indices, got {self.replaced_blocks!r}")


METHOD_CONFIGS = {"layerdrop": LayerDropConfig, "gradot": GradOTConfig, "crash": CrashConfig, "scaleot": ScaleOTConfig}
