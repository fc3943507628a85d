"""OT uniform LayerDrop (Xiao, Lin, Han 2023): keep k of the M middle blocks by uniform stride."""

from __future__ import annotations

import dataclasses

from transformers import PreTrainedModel

from ..surgery import BlockLayout, build_reduced_model
from .base import Emulator, register
from .configs import LayerDropConfig, select_middle, uniform_indices  # noqa: F401  (re-exported)








@register("layerdrop", LayerDropConfig)
def build_layerdrop(model: PreTrainedModel, layout: BlockLayout, config: LayerDropConfig) -> Emulator:
    adapter = config.adapter_blocks(layout.num_blocks)
    block_map = config.block_map(layout.num_blocks)
    return Emulator(
        model=build_reduced_model(model, layout, block_map),
        layout=layout,
        block_map=block_map,
        adapter_blocks=adapter,
        method="layerdrop",
        params=dataclasses.asdict(config),
    )
