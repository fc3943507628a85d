"""Emulator methods behind one small interface, PEFT-style: a config dataclass + a build function.

Every method takes the full model and returns an `Emulator`: an ordinary Hugging Face model
whose bottom/top blocks are verbatim copies of the original adapter blocks (these are what the
data owner trains) and whose middle is a lossy stand-in for the original middle.

The interface loads on first use, and with it every built-in method (which registers itself);
`offsite.methods.configs` alone (the settings, what the command line's help needs) imports no torch.
"""

_INTERFACE = ("METHODS", "Emulator", "EmulatorConfig", "Method", "build_emulator", "get_method", "make_config", "model_tokenizer",
              "register")
__all__ = list(_INTERFACE)


def __getattr__(name: str):
    if name in _INTERFACE:
        from . import base

        base.load_builtin_methods()
        value = getattr(base, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
