"""OT uniform LayerDrop (Xiao, Lin, Han 2023): keep k of the M middle blocks by uniform stride."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from transformers import PreTrainedModel

from ..errors import ConfigError
from ..surgery import BlockLayout, build_reduced_model
from .base import Emulator, EmulatorConfig, register


@dataclass
class LayerDropConfig(EmulatorConfig):
    """Keep `num_kept` middle blocks spread uniformly, or exactly `kept_blocks` (original indices)."""

    num_kept: int | None = None
    kept_blocks: list[int] | None = None


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


@register("layerdrop", LayerDropConfig)
def build_layerdrop(model: PreTrainedModel, layout: BlockLayout, config: LayerDropConfig) -> Emulator:
    adapter = config.adapter_blocks(layout.num_blocks)
    kept_middle = select_middle(config, layout.num_blocks)
    bottom, top = adapter[: config.num_bottom], adapter[config.num_bottom:]
    block_map = bottom + kept_middle + top
    return Emulator(
        model=build_reduced_model(model, layout, block_map),
        layout=layout,
        block_map=block_map,
        adapter_blocks=adapter,
        method="layerdrop",
        params=dataclasses.asdict(config),
    )
