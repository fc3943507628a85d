"""Declared shape changes of an emulator's modules: plain data in the manifest, applied by offsite.

A method that makes the emulator's middle smaller than the original architecture (GradOT's
low-rank attention projections and pruned MLP channels) cannot ship its result as an ordinary
checkpoint of the original class: the shapes differ. Instead the emulator manifest declares,
as data, what differs from the config's architecture,

    "structure": {
        "model.layers.5.self_attn.q_proj": {"low_rank": 37},
        "model.layers.5.mlp.up_proj": {"out_features": 900},
        "model.layers.5.mlp.gate_proj": {"out_features": 900},
        "model.layers.5.mlp.down_proj": {"in_features": 900}
    }

keyed by the module's path in the emulator model, and `load_emulator` rebuilds it: it builds the
model from its config, applies `apply_structure` and loads the safetensors weights strictly. The
data owner needs offsite only, never the method's code, and nothing from the bundle is executed.

Each declared module is a linear layer (`nn.Linear`, or GPT-2's `Conv1D`) inside a non-trainable
block, and becomes

- `{"low_rank": r}`: a `LowRankLinear`, x -> up(down(x)) with down: in -> r (no bias) and
  up: r -> out (the original bias), stored as two thin `nn.Linear`s (r * (in + out) weights);
- `{"out_features": n}` and/or `{"in_features": n}`: the same layer type with fewer output rows
  (bias included) and/or input columns.

Sizes are positive integers no larger than the original; anything else is a BundleError.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .errors import BundleError

LINEAR_TYPES = (nn.Linear, Conv1D)
RESIZE_KEYS = ("in_features", "out_features")


class LowRankLinear(nn.Module):
    """A linear map of rank `rank`: x -> up(down(x)); `up` carries the bias."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True, dtype=None, device=None):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.down = nn.Linear(in_features, rank, bias=False, dtype=dtype, device=device)
        self.up = nn.Linear(rank, out_features, bias=bias, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of an nn.Linear or a Conv1D."""
    if isinstance(module, Conv1D):
        return module.weight.shape[0], module.weight.shape[1]
    return module.in_features, module.out_features


def dense_weight(module: nn.Module) -> torch.Tensor:
    """The (out, in) matrix of an nn.Linear or a Conv1D (Conv1D stores it transposed)."""
    return module.weight.T if isinstance(module, Conv1D) else module.weight


def _resized(module: nn.Module, in_features: int, out_features: int) -> nn.Module:
    """An empty layer of the same type as `module` with the new sizes."""
    factory = dict(dtype=module.weight.dtype, device=module.weight.device)
    if isinstance(module, Conv1D):
        new = Conv1D(out_features, in_features)
        return new.to(**factory)
    return nn.Linear(in_features, out_features, bias=module.bias is not None, **factory)


def structured_module(module: nn.Module, change: dict) -> nn.Module:
    """The (uninitialised) module that replaces `module` under a validated `change`."""
    in_f, out_f = linear_shape(module)
    if "low_rank" in change:
        return LowRankLinear(in_f, out_f, change["low_rank"], bias=module.bias is not None,
                             dtype=module.weight.dtype, device=module.weight.device)
    return _resized(module, change.get("in_features", in_f), change.get("out_features", out_f))


def _check_change(path: str, module: nn.Module, change) -> None:
    def fail(why: str):
        raise BundleError(f"structure entry {path!r} {why}")

    if not isinstance(module, LINEAR_TYPES):
        fail(f"names a {type(module).__name__}, not a linear layer")
    if not isinstance(change, dict) or not change:
        fail("must be a non-empty mapping")
    keys = set(change)
    if keys != {"low_rank"} and not (keys and keys <= set(RESIZE_KEYS)):
        fail(f"has keys {sorted(keys)}; expected 'low_rank' alone, or 'in_features' and/or 'out_features'")
    in_f, out_f = linear_shape(module)
    limits = {"low_rank": min(in_f, out_f), "in_features": in_f, "out_features": out_f}
    for key, value in change.items():
        if type(value) is not int or not 1 <= value <= limits[key]:
            fail(f"sets {key}={value!r}; it must be an integer in [1, {limits[key]}]")


def apply_structure(model: nn.Module, structure: dict, allowed_prefixes: list[str] | None = None) -> list[str]:
    """Replace the declared modules of `model` in place by empty modules of the declared shapes.

    Every path must name an existing linear layer of `model` (exactly, as in `named_modules`),
    under one of `allowed_prefixes` when given. Validates every entry before changing anything.
    Returns the replaced paths. The new modules' weights are uninitialised: load them next.
    """
    if not isinstance(structure, dict):
        raise BundleError("emulator structure must be a mapping of module paths to changes")
    modules = dict(model.named_modules())
    for path, change in structure.items():
        if not isinstance(path, str) or not path or path not in modules:
            raise BundleError(f"structure entry {path!r} is not a module of the model")
        if allowed_prefixes is not None and not any(path.startswith(p) for p in allowed_prefixes):
            raise BundleError(f"structure entry {path!r} is outside the blocks that may be compressed")
        _check_change(path, modules[path], change)
    for path, change in structure.items():
        parent, _, name = path.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, name, structured_module(modules[path], change))
    return list(structure)


def structured_class(config, manifest: dict):
    """A model class for `from_pretrained` that applies the manifest's declared structure right
    after building the model from `config`, before any weight is loaded.

    transformers' own loading then runs unchanged on the restructured model (strict key and shape
    checks, tied weights, the family's key renaming). Only non-trainable blocks may be
    restructured (the adapter blocks must stay the original ones). Once restructured, the model
    is an instance of its family's ordinary class.
    """
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    from .surgery import discover_layout

    structure, trainable = manifest["structure"], set(manifest["blocks"]["trainable"])
    base_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]

    class Structured(base_class):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            layout = discover_layout(self)
            allowed = [f"{layout.blocks}.{i}." for i in range(layout.num_blocks) if i not in trainable]
            apply_structure(self, structure, allowed)
            self.__class__ = base_class

    # To transformers it is the family's own class (same name and module: same key renaming on load).
    Structured.__name__, Structured.__qualname__, Structured.__module__ = base_class.__name__, base_class.__qualname__, base_class.__module__
    return Structured


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
