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


def get_method(name: str) -> Method:
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
