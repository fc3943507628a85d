"""Resolve what the user calls a model: a local HF checkpoint directory, or a bundled asset name."""

from __future__ import annotations

from pathlib import Path

from .errors import ConfigError


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
