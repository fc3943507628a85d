"""Emulator methods behind one small interface, PEFT-style: a config dataclass + a build function.

Every method takes the full model and returns an `Emulator`: an ordinary Hugging Face model
whose bottom/top blocks are verbatim copies of the original adapter blocks (these are what the
data owner trains) and whose middle is a lossy stand-in for the original middle.
"""

from .base import (  # noqa: F401  (the interface, re-exported)
    METHODS,
    Emulator,
    EmulatorConfig,
    Method,
    build_emulator,
    get_method,
    make_config,
    model_tokenizer,
    register,
)

from . import layerdrop  # noqa: E402,F401  (registers the built-in methods)
from . import gradot  # noqa: E402,F401
from . import scaleot  # noqa: E402,F401
from . import crash  # noqa: E402,F401
