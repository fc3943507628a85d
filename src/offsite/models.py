"""Resolve what the user names: a model (a local HF checkpoint directory, or a bundled asset name)
and a device ("auto" or a torch device string); and load a local Hugging Face checkpoint."""

from __future__ import annotations

from pathlib import Path

import torch

from .errors import BundleError, ConfigError


def resolve_model(name_or_path: str) -> tuple[Path, str]:
    """(checkpoint directory, display name). Asset names are converted and cached on first use."""
    from . import assets

    path = Path(name_or_path)
    if path.is_dir():
        return path, str(name_or_path)
    if name_or_path in assets.ASSETS:
        return assets.ensure_checkpoint(name_or_path), name_or_path
    raise ConfigError(
        f"model {name_or_path!r} is neither a checkpoint directory nor a known asset ({', '.join(sorted(assets.ASSETS))})"
    )


def resolve_device(name: str) -> torch.device:
    """"auto": the GPU when there is one, else the CPU; anything else as torch reads it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def checkpoint_tokenizer(path: str | Path, note: str = ""):
    """The tokenizer of the local HF checkpoint at `path`, before any weight is read: one BundleError line
    if `path` is not a checkpoint directory or its tokenizer does not load (`note` is added to that line)."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not (path / "config.json").is_file():
        raise BundleError(f"not a Hugging Face checkpoint directory (no config.json): {path}")
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise BundleError(f"the checkpoint's tokenizer cannot be loaded ({str(e).splitlines()[0][:200] if str(e) else type(e).__name__})"
                          f"{note}: {path}") from None


def load_checkpoint(path: str | Path, dtype: torch.dtype = torch.float32):
    """Load a local HF checkpoint (safetensors only) and its tokenizer, with one-line errors."""
    path = Path(path)
    if not path.is_dir() or not (path / "config.json").is_file():
        raise BundleError(f"not a Hugging Face checkpoint directory (no config.json): {path}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True, use_safetensors=True)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise BundleError(f"cannot load checkpoint {path} ({str(e).splitlines()[0]})") from None
    model.eval()
    return model, tokenizer
