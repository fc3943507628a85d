"""Emulator bundles: save an `Emulator` for the data owner, and load it back without the base model."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from .bundle import bundle_fingerprint, model_fingerprint, parse_dtype, read_manifest, write_bundle
from .errors import BundleError
from .methods import Emulator, build_emulator
from .surgery import BlockLayout, discover_layout


def save_emulator(
    emulator: Emulator,
    tokenizer,
    out_dir: str | Path,
    base_fingerprint: str,
    base_name: str = "",
    overwrite: bool = False,
) -> Path:
    """Write the emulator as an HF checkpoint + tokenizer + manifest (no weights of dropped blocks)."""
    layout = emulator.layout
    manifest = {
        "base": {
            "fingerprint": base_fingerprint,
            "name": base_name,
            "model_type": layout.model_type,
            "num_blocks": layout.num_blocks,
            "dtype": str(emulator.model.dtype).removeprefix("torch."),
            "layout": dataclasses.asdict(layout),
        },
        "method": {"name": emulator.method, "params": emulator.params},
        "blocks": {
            "map": emulator.block_map,
            "adapter": emulator.adapter_blocks,
            "trainable": emulator.trainable,
        },
    }

    def write(tmp: Path) -> None:
        emulator.model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    return write_bundle(out_dir, "emulator", manifest, write, overwrite=overwrite)


@dataclass
class LoadedEmulator:
    model: PreTrainedModel
    tokenizer: object
    manifest: dict
    layout: BlockLayout  # of the emulator model (same block path as the base)

    @property
    def block_map(self) -> list[int]:
        return self.manifest["blocks"]["map"]

    @property
    def trainable(self) -> list[int]:
        return self.manifest["blocks"]["trainable"]

    @property
    def fingerprint(self) -> str:
        return bundle_fingerprint(self.manifest)


def _check_blocks(manifest: dict, bundle_dir: Path) -> None:
    blocks, base = manifest.get("blocks"), manifest.get("base")
    ok = (
        isinstance(blocks, dict)
        and isinstance(base, dict)
        and isinstance(base.get("fingerprint"), str)
        and isinstance(base.get("num_blocks"), int)
        and all(isinstance(blocks.get(k), list) and all(type(i) is int for i in blocks[k]) for k in ("map", "adapter", "trainable"))
    )
    if not ok:
        raise BundleError(f"emulator manifest has a malformed 'base' or 'blocks' section: {bundle_dir}")
    n, emap = base["num_blocks"], blocks["map"]
    if any(not 0 <= i < n for i in emap + blocks["adapter"]) or any(not 0 <= i < len(emap) for i in blocks["trainable"]):
        raise BundleError(f"emulator manifest block indices are out of range: {bundle_dir}")
    if [emap[i] for i in blocks["trainable"]] != blocks["adapter"]:
        raise BundleError(f"emulator manifest: trainable blocks do not map to the adapter blocks: {bundle_dir}")


def load_emulator(bundle_dir: str | Path, dtype: torch.dtype | None = None, device: str | None = None) -> LoadedEmulator:
    """Verify and load an emulator bundle. Never touches the base model."""
    bundle_dir = Path(bundle_dir)
    manifest = read_manifest(bundle_dir, kind="emulator")
    _check_blocks(manifest, bundle_dir)
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            bundle_dir,
            dtype=dtype or parse_dtype(manifest["base"].get("dtype", "float32")),
            local_files_only=True,
            use_safetensors=True,
            trust_remote_code=False,
            output_loading_info=True,
        )
        tokenizer = AutoTokenizer.from_pretrained(bundle_dir, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError, KeyError) as e:
        raise BundleError(f"emulator bundle cannot be loaded as a checkpoint ({str(e).splitlines()[0]}): {bundle_dir}") from None
    if info.get("missing_keys") or info.get("mismatched_keys"):
        raise BundleError(f"emulator checkpoint is missing weights {sorted(info['missing_keys'])[:3]}: {bundle_dir}")

    layout = discover_layout(model)
    if layout.num_blocks != len(manifest["blocks"]["map"]):
        raise BundleError(f"emulator has {layout.num_blocks} blocks but its manifest maps {len(manifest['blocks']['map'])}: {bundle_dir}")
    if device:
        model.to(device)
    model.eval()
    return LoadedEmulator(model, tokenizer, manifest, layout)


def compress_checkpoint(
    model_path: str | Path,
    out_dir: str | Path,
    method: str = "layerdrop",
    config=None,
    dtype: torch.dtype = torch.float32,
    base_name: str = "",
    overwrite: bool = False,
) -> Path:
    """Owner recipe: load the base checkpoint, build the emulator, write the emulator bundle."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise BundleError(f"output already exists, not overwriting: {out_dir}")
    model, tokenizer = load_checkpoint(model_path, dtype)
    emulator = build_emulator(model, method, config)
    return save_emulator(emulator, tokenizer, out_dir, model_fingerprint(model), base_name or str(model_path), overwrite=overwrite)


def load_checkpoint(path: str | Path, dtype: torch.dtype = torch.float32):
    """Load a local HF checkpoint (safetensors only) and its tokenizer, with one-line errors."""
    path = Path(path)
    if not path.is_dir() or not (path / "config.json").is_file():
        raise BundleError(f"not a Hugging Face checkpoint directory (no config.json): {path}")
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True, use_safetensors=True)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise BundleError(f"cannot load checkpoint {path} ({str(e).splitlines()[0]})") from None
    model.eval()
    return model, tokenizer
