"""Model surgery: find the parts of any Hugging Face decoder-only LM and rebuild it with fewer blocks.

Discovery works on structure, not on class names: the transformer blocks are the ModuleList
whose length is `config.num_hidden_layers`, the embedding and head come from the standard
`get_input_embeddings` / `get_output_embeddings`, and the final norm is the one norm-like module
that sits beside the blocks. `OVERRIDES` names the parts for an architecture where that fails.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from torch import nn
from transformers import PreTrainedModel
from transformers.initialization import no_init_weights

from .errors import ConfigError, UnsupportedModelError

# model_type -> dotted paths, for architectures whose layout discovery gets wrong.
# Keys: "blocks", "norm" (None = the model has no final norm). Empty while every tested
# family is discovered; add an entry instead of special-casing code.
OVERRIDES: dict[str, dict[str, str | None]] = {}

# Config flags that make a block's behaviour depend on its index in code (not in config), so a
# block moved to another index would silently compute something else.
INDEX_DEPENDENT_FLAGS = {
    "scale_attn_by_inverse_layer_idx": "attention is scaled by the block's index",
}


@dataclass(frozen=True)
class BlockLayout:
    """Where the parts of a causal LM live, as dotted module paths."""

    model_type: str
    blocks: str
    num_blocks: int
    embedding: str
    norm: str | None
    head: str | None

    def block_key(self, index: int, param: str) -> str:
        """State-dict key of `param` inside block `index`."""
        return f"{self.blocks}.{index}.{param}"

    def parse_block_key(self, key: str) -> tuple[int, str] | None:
        """(block index, param name) for a key inside a block, else None."""
        prefix = self.blocks + "."
        if not key.startswith(prefix):
            return None
        index, _, rest = key[len(prefix):].partition(".")
        if not index.isdigit() or not rest:
            return None
        return int(index), rest


def _num_layers(config) -> int:
    n = getattr(config, "num_hidden_layers", None)
    if not isinstance(n, int) or n < 1:
        raise UnsupportedModelError(f"{type(config).__name__} has no num_hidden_layers; not a decoder-only LM offsite can split")
    return n


def _is_norm(module: nn.Module) -> bool:
    return "norm" in type(module).__name__.lower()


def discover_layout(model: nn.Module) -> BlockLayout:
    """Find embedding, blocks, final norm and LM head of a decoder-only causal LM."""
    config = getattr(model, "config", None)
    if config is None or not isinstance(model, PreTrainedModel):
        raise UnsupportedModelError(f"{type(model).__name__} is not a Hugging Face PreTrainedModel")
    model_type = getattr(config, "model_type", type(model).__name__)
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedModelError(f"{model_type}: encoder-decoder models are not supported, only decoder-only causal LMs")
    if model.get_output_embeddings() is None:
        raise UnsupportedModelError(f"{model_type}: {type(model).__name__} has no LM head; load it with AutoModelForCausalLM")
    num_blocks = _num_layers(config)
    names = {id(m): n for n, m in model.named_modules()}
    override = OVERRIDES.get(model_type, {})

    if "blocks" in override:
        blocks = override["blocks"]
    else:
        lists = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) == num_blocks]
        if not lists:
            raise UnsupportedModelError(
                f"{model_type}: found no list of {num_blocks} transformer blocks; add an entry to offsite.surgery.OVERRIDES"
            )
        # Several candidates (e.g. per-layer norms kept in a list): the blocks hold the weights.
        blocks = max(lists, key=lambda nm: sum(p.numel() for p in nm[1].parameters()))[0]

    if "norm" in override:
        norm = override["norm"]
    else:
        parent = model.get_submodule(blocks.rpartition(".")[0]) if "." in blocks else model
        candidates = [
            f"{names[id(parent)]}.{n}".lstrip(".")
            for n, m in parent.named_children()
            if m is not None and _is_norm(m) and "emb" not in n
        ]
        if len(candidates) > 1:
            raise UnsupportedModelError(
                f"{model_type}: cannot tell the final norm among {candidates}; add an entry to offsite.surgery.OVERRIDES"
            )
        norm = candidates[0] if candidates else None

    return BlockLayout(
        model_type=model_type,
        blocks=blocks,
        num_blocks=num_blocks,
        embedding=names[id(model.get_input_embeddings())],
        norm=norm,
        head=names.get(id(model.get_output_embeddings())),
    )


def get_blocks(model: nn.Module, layout: BlockLayout) -> nn.ModuleList:
    return model.get_submodule(layout.blocks)


def per_layer_config_keys(config) -> list[str]:
    """Config entries that hold one value per block (e.g. Gemma3/Qwen2 `layer_types`)."""
    n = _num_layers(config)
    return [k for k, v in config.to_dict().items() if isinstance(v, (list, tuple)) and len(v) == n]


def reduced_config(config, kept: list[int]):
    """Config of the same model keeping only blocks `kept` (original indices, ascending)."""
    for flag, why in INDEX_DEPENDENT_FLAGS.items():
        if getattr(config, flag, False):
            raise UnsupportedModelError(f"{config.model_type}: `{flag}` is set ({why}); blocks cannot be removed safely")
    data = config.to_dict()
    for key in per_layer_config_keys(config):
        data[key] = [data[key][i] for i in kept]
    data[config.attribute_map.get("num_hidden_layers", "num_hidden_layers")] = len(kept)
    new = type(config).from_dict(data)
    if _num_layers(new) != len(kept):
        raise UnsupportedModelError(f"{config.model_type}: could not set the number of blocks in its config")
    return new


def build_reduced_model(
    model: PreTrainedModel,
    layout: BlockLayout,
    kept: list[int],
    replacements: dict[int, nn.Module] | None = None,
    allow_repeats: bool = False,
) -> PreTrainedModel:
    """A new model of the same class holding the non-block weights and blocks `kept`, renumbered.

    The result is an ordinary model of the original architecture: its config says how many
    blocks it has, each block carries its new `layer_idx` (the KV cache is indexed by it) and
    per-layer config such as `layer_types` follows the block it belongs to. Weights are copied
    with a strict load, so nothing is silently left at its random initialisation.
    `replacements` maps a position in `kept` to a block module that replaces the original
    (used by methods that compress a block in place); its state dict must match the block's.
    With `allow_repeats`, a block may appear at several consecutive positions (CRaSh's sharing):
    each position gets its own copy of the weights and its own `layer_idx`.
    """
    ascending = sorted(kept) == list(kept) if allow_repeats else sorted(set(kept)) == list(kept)
    if not ascending or not kept or kept[0] < 0 or kept[-1] >= layout.num_blocks:
        order = "non-decreasing" if allow_repeats else "distinct ascending"
        raise ConfigError(f"kept blocks must be {order} indices in [0, {layout.num_blocks}), got {kept}")
    config = reduced_config(model.config, kept)
    with no_init_weights():
        reduced = type(model)._from_config(config, dtype=model.dtype)
    reduced.to(next(model.parameters()).device)

    positions: dict[int, list[int]] = {}
    for new, orig in enumerate(kept):
        positions.setdefault(orig, []).append(new)
    state = {}
    for key, value in model.state_dict().items():
        parsed = layout.parse_block_key(key)
        if parsed is None:
            state[key] = value
        else:
            for new in positions.get(parsed[0], ()):
                state[layout.block_key(new, parsed[1])] = value
    for new_index, block in (replacements or {}).items():
        for param, value in block.state_dict().items():
            state[layout.block_key(new_index, param)] = value
    missing, unexpected = reduced.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise UnsupportedModelError(
            f"{layout.model_type}: rebuilt model does not match its weights (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    reduced.tie_weights()  # copied weights arrive untied; a tied head must not be saved twice
    reduced.generation_config = copy.deepcopy(model.generation_config)
    reduced.eval()
    return reduced


def block_param_names(model: nn.Module, layout: BlockLayout, index: int) -> list[str]:
    """Names of the parameters of one block, relative to the block."""
    return [n for n, _ in get_blocks(model, layout)[index].named_parameters()]


def linear_module_names(model: nn.Module, layout: BlockLayout, indices: list[int]) -> list[str]:
    """Full names of the linear layers (nn.Linear or GPT-2's Conv1D) inside the given blocks."""
    out = []
    for i in indices:
        prefix = f"{layout.blocks}.{i}."
        for name, module in get_blocks(model, layout)[i].named_modules():
            if isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D":
                out.append(prefix + name)
    return out


def attention_linear_names(model: nn.Module, layout: BlockLayout, index: int) -> list[str]:
    """Full names of the linear layers of block `index`'s attention (q/k/v/o, or a fused qkv + output).

    The attention is the one child of the block whose name contains "attn"/"attention" and holds
    linear layers (self_attn, attn, attention, self_attention in the tested families).
    """
    block = get_blocks(model, layout)[index]
    children = [
        n for n, m in block.named_children()
        if ("attn" in n.lower() or "attention" in n.lower())
        and any(isinstance(x, nn.Linear) or type(x).__name__ == "Conv1D" for x in m.modules())
    ]
    if len(children) != 1:
        raise UnsupportedModelError(f"{layout.model_type}: cannot tell the attention module of block {index} (candidates {children})")
    prefix = f"{layout.blocks}.{index}."
    return [n for n in linear_module_names(model, layout, [index]) if n.startswith(prefix + children[0] + ".")]
