"""The emulator-method interface: a config dataclass, the Emulator a method returns, the registry.

Every method module imports this (never the package), and the package imports every method, so
the registry is filled when `offsite.methods` is imported and nothing imports in a circle.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable

from transformers import PreTrainedModel

from ..errors import ConfigError
from ..surgery import BlockLayout, discover_layout
from .configs import EmulatorConfig  # noqa: F401  (re-exported: the base of every method's config)




@dataclass
class Emulator:
    """What a method produces: the emulator model and how its blocks relate to the original."""

    model: PreTrainedModel
    layout: BlockLayout
    block_map: list[int]  # emulator block i -> original block index
    adapter_blocks: list[int]  # original indices of the trainable blocks
    method: str
    params: dict = field(default_factory=dict)
    # Declared shape changes of middle-block modules, {module path: change} (see offsite.structure);
    # empty when the emulator has the original architecture.
    structure: dict = field(default_factory=dict)

    @property
    def trainable(self) -> list[int]:
        """Emulator indices of the adapter blocks."""
        return [i for i, orig in enumerate(self.block_map) if orig in self.adapter_blocks]


@dataclass(frozen=True)
class Method:
    name: str
    config_class: type[EmulatorConfig]
    build: Callable[..., Emulator]  # (model, layout, config) -> Emulator; + tokenizer= if needs_tokenizer
    needs_tokenizer: bool = False  # data-dependent methods tokenise a support set


METHODS: dict[str, Method] = {}


def register(name: str, config_class: type[EmulatorConfig], needs_tokenizer: bool = False):
    """Decorator that adds a build function to the registry under `name`."""

    def wrap(build):
        METHODS[name] = Method(name, config_class, build, needs_tokenizer)
        return build

    return wrap


BUILTIN_METHODS = ("layerdrop", "gradot", "scaleot", "crash")


def load_builtin_methods() -> None:
    """Import every built-in method module, each of which registers itself (idempotent)."""
    import importlib

    for name in BUILTIN_METHODS:
        importlib.import_module(f"{__package__}.{name}")


def get_method(name: str) -> Method:
    load_builtin_methods()
    if name not in METHODS:
        raise ConfigError(f"unknown emulator method {name!r}; available: {', '.join(sorted(METHODS))}")
    return METHODS[name]


def make_config(method: str, **params) -> EmulatorConfig:
    """Method config from keyword arguments, rejecting unknown ones by name."""
    config_class = get_method(method).config_class
    known = {f.name for f in dataclasses.fields(config_class)}
    unknown = sorted(set(params) - known)
    if unknown:
        raise ConfigError(f"method {method!r} has no parameter(s) {unknown}; it takes {sorted(known)}")
    return config_class(**params)


def build_emulator(
    model: PreTrainedModel, method: str = "layerdrop", config: EmulatorConfig | None = None, tokenizer=None
) -> Emulator:
    """Compress `model` into an emulator with the named method.

    Methods that look at data (GradOT's support set) also get the model's `tokenizer` (when
    needed and not given, they load it with `model_tokenizer`).
    """
    spec = get_method(method)
    config = config or spec.config_class()
    if not isinstance(config, spec.config_class):
        raise ConfigError(f"method {method!r} needs a {spec.config_class.__name__}, got {type(config).__name__}")
    if spec.needs_tokenizer:
        return spec.build(model, discover_layout(model), config, tokenizer=tokenizer)
    return spec.build(model, discover_layout(model), config)


def model_tokenizer(model: PreTrainedModel, method: str):
    """The tokenizer saved beside the model's checkpoint (`model.name_or_path`), or a clear error."""
    from transformers import AutoTokenizer

    message = f"method {method!r} needs the model's tokenizer: pass build_emulator(..., tokenizer=...)"
    if not model.name_or_path:
        raise ConfigError(message)
    try:
        return AutoTokenizer.from_pretrained(model.name_or_path, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError, TypeError):
        raise ConfigError(message) from None
