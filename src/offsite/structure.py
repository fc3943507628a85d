"""Declared shape changes of an emulator's modules: plain data in the manifest, applied by offsite.

A method that makes the emulator's middle smaller than the original architecture (GradOT's
low-rank attention projections and pruned MLP channels, ScaleOT's harmonizers) cannot ship its
result as an ordinary checkpoint of the original class: the shapes differ. Instead the emulator
manifest declares, as data, what differs from the config's architecture,

    "structure": {
        "model.layers.5.self_attn.q_proj": {"low_rank": 37},
        "model.layers.5.mlp.up_proj": {"out_features": 900},
        "model.layers.5.mlp.gate_proj": {"out_features": 900},
        "model.layers.5.mlp.down_proj": {"in_features": 900},
        "model.layers.6": {"harmonizer": {"rank": 64, "activation": "relu"}}
    }

keyed by the module's path in the emulator model, and `load_emulator` rebuilds it: it builds the
model from its config, applies `apply_structure` and loads the safetensors weights strictly. The
data owner needs offsite only, never the method's code, and nothing from the bundle is executed.

Each declared module is a linear layer (`nn.Linear`, or GPT-2's `Conv1D`) inside a non-trainable
block, or a whole non-trainable block, and becomes

- `{"low_rank": r}`: a `LowRankLinear`, x -> up(down(x)) with down: in -> r (no bias) and
  up: r -> out (the original bias), stored as two thin `nn.Linear`s (r * (in + out) weights);
- `{"out_features": n}` and/or `{"in_features": n}`: the same layer type with fewer output rows
  (bias included) and/or input columns;
- (a whole block) `{"harmonizer": {"rank": r, "activation": "relu"}}`: a `Harmonizer`, the residual
  low-rank MLP x -> x + up(act(down(x))) (hidden -> r -> hidden, with biases) that stands in
  for the block; "activation" is optional (default "relu", else "gelu" or "silu"). No entry may
  lie inside a block that becomes a harmonizer.

Sizes are positive integers no larger than the original (a harmonizer's rank at most the hidden
size); anything else is a BundleError.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .errors import BundleError

LINEAR_TYPES = (nn.Linear, Conv1D)
RESIZE_KEYS = ("in_features", "out_features")
ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU}
HARMONIZER_KEYS = ("rank", "activation")
# Families whose blocks return (hidden_states, attention weights) rather than the hidden states
# alone; a harmonizer must answer in the same form. (offsite.methods.scaleot checks the form on
# the real block before it builds an emulator, so a family missing here is a clear error.)
TUPLE_OUTPUT_BLOCKS = frozenset({"bloom"})


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


class Harmonizer(nn.Module):
    """Stand-in for a whole transformer block (ScaleOT): x -> x + up(act(down(x))).

    `up` starts at zero, so a new harmonizer is exactly the identity. It is called as the block it
    replaces (hidden states first, then whatever the family passes: masks, cache, positions),
    ignores everything but the hidden states (it mixes nothing across positions, so it keeps no
    KV cache), and answers in the block's form: the hidden states, or (hidden states, None).
    """

    def __init__(self, hidden_size: int, rank: int, activation: str = "relu", tuple_output: bool = False,
                 dtype=None, device=None):
        super().__init__()
        self.hidden_size, self.rank, self.activation, self.tuple_output = hidden_size, rank, activation, tuple_output
        self.down = nn.Linear(hidden_size, rank, dtype=dtype, device=device)
        self.act = ACTIVATIONS[activation]()
        self.up = nn.Linear(rank, hidden_size, dtype=dtype, device=device)
        with torch.no_grad():
            self.up.weight.zero_()
            self.up.bias.zero_()

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        out = hidden_states + self.up(self.act(self.down(hidden_states)))
        return (out, None) if self.tuple_output else out

    def extra_repr(self) -> str:
        return f"hidden_size={self.hidden_size}, rank={self.rank}, activation={self.activation}"


def harmonizer_parameters(hidden_size: int, rank: int) -> int:
    """Weights and biases of one harmonizer."""
    return 2 * hidden_size * rank + rank + hidden_size


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


def structured_module(module: nn.Module, change: dict, hidden_size: int | None = None, tuple_output: bool = False) -> nn.Module:
    """The (uninitialised) module that replaces `module` under a validated `change`."""
    if "harmonizer" in change:
        spec = change["harmonizer"]
        parameter = next(module.parameters(), None)
        factory = dict(dtype=parameter.dtype, device=parameter.device) if parameter is not None else {}
        return Harmonizer(hidden_size, spec["rank"], spec.get("activation", "relu"), tuple_output, **factory)
    in_f, out_f = linear_shape(module)
    if "low_rank" in change:
        return LowRankLinear(in_f, out_f, change["low_rank"], bias=module.bias is not None,
                             dtype=module.weight.dtype, device=module.weight.device)
    return _resized(module, change.get("in_features", in_f), change.get("out_features", out_f))


def _check_change(path: str, module: nn.Module, change, is_block: bool = False, hidden_size: int | None = None) -> None:
    def fail(why: str):
        raise BundleError(f"structure entry {path!r} {why}")

    if isinstance(change, dict) and "harmonizer" in change:
        _check_harmonizer(change, is_block, hidden_size, type(module).__name__, fail)
        return
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


def _check_harmonizer(change: dict, is_block: bool, hidden_size: int | None, module_type: str, fail) -> None:
    if set(change) != {"harmonizer"}:
        fail(f"has keys {sorted(change)}; 'harmonizer' stands alone")
    if not is_block:
        fail(f"names a {module_type}, not a transformer block (only whole blocks become harmonizers)")
    spec = change["harmonizer"]
    if not isinstance(spec, dict) or "rank" not in spec or not set(spec) <= set(HARMONIZER_KEYS):
        fail(f"declares a harmonizer as {spec!r:.80}; expected {{'rank': r}} and optionally 'activation'")
    if hidden_size is None:
        fail("declares a harmonizer, but the model's config has no hidden_size")
    if type(spec["rank"]) is not int or not 1 <= spec["rank"] <= hidden_size:
        fail(f"sets harmonizer rank={spec['rank']!r:.40}; it must be an integer in [1, {hidden_size}]")
    if not isinstance(spec.get("activation", "relu"), str) or spec.get("activation", "relu") not in ACTIVATIONS:
        fail(f"sets harmonizer activation={spec['activation']!r:.40}; it must be one of {sorted(ACTIVATIONS)}")


def _block_paths(model: nn.Module) -> set[str]:
    """Module paths of the transformer blocks of a Hugging Face causal LM (empty for anything else)."""
    from .errors import UnsupportedModelError
    from .surgery import discover_layout

    try:
        layout = discover_layout(model)
    except UnsupportedModelError:
        return set()
    return {f"{layout.blocks}.{i}" for i in range(layout.num_blocks)}


def apply_structure(model: nn.Module, structure: dict, allowed_prefixes: list[str] | None = None) -> list[str]:
    """Replace the declared modules of `model` in place by empty modules of the declared shapes.

    Every path must name an existing linear layer of `model` (exactly, as in `named_modules`), or
    for a harmonizer one of its transformer blocks, under one of `allowed_prefixes` when given
    (a prefix "model.layers.5." also admits the block "model.layers.5" itself). Validates every
    entry before changing anything. Returns the replaced paths. The new modules' weights are
    uninitialised: load them next.
    """
    if not isinstance(structure, dict):
        raise BundleError("emulator structure must be a mapping of module paths to changes")
    modules = dict(model.named_modules())
    blocks = _block_paths(model)
    config = getattr(model, "config", None)
    hidden_size = getattr(config, "hidden_size", None)
    for path, change in structure.items():
        if not isinstance(path, str) or not path or path not in modules:
            raise BundleError(f"structure entry {path!r} is not a module of the model")
        if allowed_prefixes is not None and not any(path.startswith(p) or path + "." == p for p in allowed_prefixes):
            raise BundleError(f"structure entry {path!r} is outside the blocks that may be compressed")
        _check_change(path, modules[path], change, path in blocks, hidden_size)
    harmonized = [p for p, c in structure.items() if "harmonizer" in c]
    for path in structure:
        inside = next((h for h in harmonized if path.startswith(h + ".")), None)
        if inside is not None:
            raise BundleError(f"structure entry {path!r} lies inside block {inside!r}, which the structure replaces by a harmonizer")
    tuple_output = getattr(config, "model_type", None) in TUPLE_OUTPUT_BLOCKS
    for path, change in structure.items():
        parent, _, name = path.rpartition(".")
        new = structured_module(modules[path], change, hidden_size, tuple_output)
        setattr(model.get_submodule(parent) if parent else model, name, new)
    return list(structure)


def structured_class(config, manifest: dict):
    """A model class for `from_pretrained` that applies the manifest's declared structure right
    after building the model from `config`, before any weight is loaded.

    transformers' own loading then runs unchanged on the restructured model (strict key and shape
    checks, tied weights, the family's key renaming). Only non-trainable blocks may be
    restructured or replaced (the adapter blocks must stay the original ones). Once restructured,
    the model is an instance of its family's ordinary class.
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
            for path in apply_structure(self, structure, allowed):
                # The family's weight init may reach into the original children of a replaced
                # module's parent (GPT-2 re-initialises attn.c_proj.weight, which a LowRankLinear
                # lacks). Every weight comes from the bundle under a strict load, so skip it there.
                parent = path.rpartition(".")[0]
                self.get_submodule(parent)._is_hf_initialized = True
            self.__class__ = base_class

    # To transformers it is the family's own class (same name and module: same key renaming on load).
    Structured.__name__, Structured.__qualname__, Structured.__module__ = base_class.__name__, base_class.__qualname__, base_class.__module__
    return Structured


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
