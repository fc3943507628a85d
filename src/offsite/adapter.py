"""Adapter bundles: the trained adapter, keyed by the *original* block indices of the full model.

Two kinds travel back to the owner:
- full blocks: `adapter.safetensors` with keys `<blocks path>.<original index>.<param>`;
- LoRA: a PEFT adapter directory (`adapter_config.json` + `adapter_model.safetensors`) whose
  target modules already name the full model's modules, so `PeftModel.from_pretrained(full, dir)`
  works as is; and in `emulator/` the same adapter keyed for the emulator it was trained on, so
  `PeftModel.from_pretrained(emulator, dir / "emulator")` (and lm-eval's `peft=`) loads it right
  there too. Only the fields offsite wrote are ever read back from `adapter_config.json`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model_state_dict
from safetensors.torch import save_file

from .bundle import (DTYPES, bundle_fingerprint, load_private_safetensors, load_verified_safetensors, read_json_member, read_manifest,
                     write_bundle)
from .cards import model_card
from .emulator import LoadedEmulator
from .errors import BundleError
from .surgery import BlockLayout

EMULATOR_VIEW = "emulator"  # LoRA bundles: the same adapter as a PEFT directory keyed for the emulator
FULL_WEIGHTS = "adapter.safetensors"
LORA_WEIGHTS = "adapter_model.safetensors"
LORA_CONFIG = "adapter_config.json"
PEFT_PREFIX = "base_model.model."
# The only LoRA settings a returned adapter may carry; anything else (e.g. modules_to_save,
# which would let it replace the LM head) makes the bundle invalid.
LORA_FIELDS = ("r", "lora_alpha", "lora_dropout", "target_modules", "fan_in_fan_out", "bias")
MAX_LORA_RANK = 4096
MAX_LORA_ALPHA = 1e6


@dataclass
class LoraSettings:
    r: int
    lora_alpha: float
    target_modules: list[str]
    lora_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: str = "none"

    def to_peft(self, base_name: str = "") -> LoraConfig:
        return LoraConfig(
            r=self.r,
            lora_alpha=self.lora_alpha,
            lora_dropout=self.lora_dropout,
            target_modules=list(self.target_modules),
            fan_in_fan_out=self.fan_in_fan_out,
            bias=self.bias,
            task_type="CAUSAL_LM",
            base_model_name_or_path=base_name or None,
        )


def _to_original(layout: BlockLayout, key: str, block_map: list[int]) -> str:
    """Rename a model-relative key from emulator block numbering to original numbering."""
    parsed = layout.parse_block_key(key)
    if parsed is None:
        raise BundleError(f"trained parameter {key} is outside the adapter blocks")
    return layout.block_key(block_map[parsed[0]], parsed[1])


def adapter_tensors(model, emulator: LoadedEmulator) -> dict[str, torch.Tensor]:
    """The adapter's trained tensors, renamed to the full model's keys."""
    layout, block_map = emulator.layout, emulator.block_map
    if isinstance(model, PeftModel):
        out = {}
        for key, value in get_peft_model_state_dict(model).items():
            rel = key.removeprefix(PEFT_PREFIX)
            out[PEFT_PREFIX + _to_original(layout, rel, block_map)] = value.detach().cpu().contiguous()
        return out
    blocks = model.get_submodule(layout.blocks)
    return {
        layout.block_key(block_map[i], name): p.detach().cpu().contiguous()
        for i in emulator.trainable
        for name, p in blocks[i].named_parameters()
    }


def save_adapter(
    model,
    emulator: LoadedEmulator,
    out_dir: str | Path,
    training: dict,
    metrics: dict | None = None,
    lora: LoraSettings | None = None,
    overwrite: bool = False,
    sign_key=None,
) -> Path:
    """Write the adapter bundle the data owner sends back (signed with `sign_key` when given).

    Full blocks travel in the base model's dtype (what plug-in stores them in anyway: a bf16 7B
    model's 2+2 blocks are 1.7 GB, not the 3.5 GB of their float32 master weights); LoRA factors
    stay as trained (small, and the merge computes in float32 from them).
    """
    tensors = adapter_tensors(model, emulator)
    if lora is None:
        base_dtype = DTYPES.get(emulator.manifest["base"].get("dtype", "float32"), torch.float32)
        tensors = {k: v.to(base_dtype) for k, v in tensors.items()}
    dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in tensors.values()})
    base = emulator.manifest["base"]
    manifest = {
        "base": base,
        "emulator": {"fingerprint": emulator.fingerprint, "method": emulator.manifest["method"]},
        "adapter": {
            "type": "lora" if lora else "full",
            "blocks_path": emulator.layout.blocks,
            "blocks": emulator.manifest["blocks"]["adapter"],
            "weights": LORA_WEIGHTS if lora else FULL_WEIGHTS,
            "dtypes": dtypes,
            "num_tensors": len(tensors),
            "num_parameters": sum(t.numel() for t in tensors.values()),
        },
        "training": training,
        "metrics": metrics or {},
    }

    def write(tmp: Path) -> None:
        (tmp / "README.md").write_text(model_card("adapter", manifest))
        if lora:
            save_file(tensors, tmp / LORA_WEIGHTS, metadata={"format": "pt"})
            lora.to_peft(base.get("name", "")).save_pretrained(tmp)
            # The top-level view names the full model's modules; PEFT would load it onto the emulator
            # silently wrong (only the blocks whose indices happen to agree). This one fits the emulator.
            view = tmp / EMULATOR_VIEW
            view.mkdir()
            emulator_side = {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(model).items()}
            save_file(emulator_side, view / LORA_WEIGHTS, metadata={"format": "pt"})
            to_emulator = {emulator.block_map[i]: i for i in emulator.trainable}
            targets = [emulator.layout.block_key(to_emulator[idx], rest)
                       for idx, rest in (emulator.layout.parse_block_key(t) for t in lora.target_modules)]
            dataclasses.replace(lora, target_modules=targets).to_peft(str(Path(emulator.path).resolve()) if emulator.path else "").save_pretrained(view)
        else:
            save_file(tensors, tmp / FULL_WEIGHTS, metadata={"format": "pt"})

    return write_bundle(out_dir, "adapter", manifest, write, overwrite=overwrite, sign_key=sign_key)


@dataclass
class AdapterBundle:
    manifest: dict
    tensors: dict[str, torch.Tensor]
    lora: LoraSettings | None

    @property
    def blocks(self) -> list[int]:
        return self.manifest["adapter"]["blocks"]

    @property
    def blocks_path(self) -> str:
        return self.manifest["adapter"]["blocks_path"]

    @property
    def fingerprint(self) -> str:
        return bundle_fingerprint(self.manifest)

    def renumbered(self, layout: BlockLayout, index_of: dict[int, int]) -> "AdapterBundle":
        """The same adapter with block indices mapped by `index_of` (e.g. original -> emulator).

        Keys outside the adapter's blocks are left as they are, for the allow-list to reject.
        """

        def rename(key: str) -> str:
            prefix = PEFT_PREFIX if key.startswith(PEFT_PREFIX) else ""
            parsed = layout.parse_block_key(key.removeprefix(prefix))
            if parsed is None or parsed[0] not in index_of:
                return key
            return prefix + layout.block_key(index_of[parsed[0]], parsed[1])

        manifest = {**self.manifest, "adapter": {**self.manifest["adapter"], "blocks": [index_of.get(i, i) for i in self.blocks]}}
        lora = None
        if self.lora is not None:
            lora = dataclasses.replace(self.lora, target_modules=[rename(t) for t in self.lora.target_modules])
        return AdapterBundle(manifest, {rename(k): v for k, v in self.tensors.items()}, lora)


# safetensors dtype names of the floating dtypes an adapter tensor may have.
FLOAT_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}


def load_adapter(bundle_dir: str | Path, trusted_key=None, lazy: bool = False) -> AdapterBundle:
    """Verify an adapter bundle (signature too, when a trusted key is configured) and read its
    tensors (safetensors only, header checked first) and LoRA settings. `lazy`: the tensors are read
    one at a time, when used, from a private verified copy (`bundle.PrivateTensors`), so a multi-GB
    adapter is never in memory whole."""
    bundle_dir = Path(bundle_dir)
    # Lazily read weights are hashed from the bytes copied into the private copy: not read a second time here.
    later = frozenset({FULL_WEIGHTS, LORA_WEIGHTS}) if lazy else frozenset()
    manifest = read_manifest(bundle_dir, kind="adapter", trusted_key=trusted_key, hashed_later=later)
    spec = manifest.get("adapter")
    if (
        not isinstance(spec, dict)
        or spec.get("type") not in ("full", "lora")
        or not isinstance(spec.get("blocks_path"), str)
        or not isinstance(spec.get("blocks"), list)
        or not spec["blocks"]
        or not all(type(i) is int for i in spec["blocks"])
        or len(set(spec["blocks"])) != len(spec["blocks"])
        or not isinstance(spec.get("dtypes"), list)
        or not all(isinstance(d, str) and d in DTYPES for d in spec["dtypes"])
        or not isinstance(manifest.get("base"), dict)
        or not isinstance(manifest["base"].get("fingerprint"), str)
        or not isinstance(manifest.get("emulator"), dict)
        or not isinstance(manifest["emulator"].get("fingerprint"), str)
    ):
        raise BundleError(f"adapter manifest has a malformed 'adapter', 'base' or 'emulator' section: {bundle_dir}")
    weights = LORA_WEIGHTS if spec["type"] == "lora" else FULL_WEIGHTS
    if weights not in manifest["files"]:
        raise BundleError(f"adapter bundle lacks {weights}: {bundle_dir}")
    # One read: the bytes hashed are the bytes parsed, never the file itself again.
    load = load_private_safetensors if lazy else load_verified_safetensors
    tensors, header = load(bundle_dir, weights, manifest)
    found = sorted({FLOAT_DTYPES.get(dtype, dtype) for dtype, _ in header.values()})
    if found != sorted(set(spec["dtypes"])):
        raise BundleError(f"{weights} holds tensors of dtype {found}, the manifest declares {spec['dtypes']}: {bundle_dir}")
    lora = _read_lora(bundle_dir, manifest) if spec["type"] == "lora" else None
    return AdapterBundle(manifest, tensors, lora)


def _read_lora(bundle_dir: Path, manifest: dict) -> LoraSettings:
    if LORA_CONFIG not in manifest["files"]:
        raise BundleError(f"LoRA adapter bundle lacks {LORA_CONFIG}: {bundle_dir}")
    raw = read_json_member(bundle_dir / LORA_CONFIG, LORA_CONFIG, max_bytes=1024 * 1024, meta=manifest["files"][LORA_CONFIG])
    if not isinstance(raw, dict):
        raise BundleError(f"{LORA_CONFIG} is not a JSON object: {bundle_dir}")
    for field in ("modules_to_save", "trainable_token_indices", "layers_to_transform"):
        if raw.get(field):
            raise BundleError(f"{LORA_CONFIG} sets {field}, which offsite adapters never use: {bundle_dir}")
    settings = {k: raw[k] for k in LORA_FIELDS if k in raw}
    r, alpha, targets = settings.get("r"), settings.get("lora_alpha"), settings.get("target_modules")
    ok = (
        type(r) is int
        and 0 < r <= MAX_LORA_RANK
        and type(alpha) in (int, float)
        and math.isfinite(alpha)
        and 0 < alpha <= MAX_LORA_ALPHA
        and isinstance(targets, list)
        and targets
        and all(isinstance(t, str) for t in targets)
        and len(set(targets)) == len(targets)
        and settings.get("bias", "none") == "none"
        and isinstance(settings.get("fan_in_fan_out", False), bool)
        and type(settings.get("lora_dropout", 0.0)) in (int, float)
        and 0 <= settings.get("lora_dropout", 0.0) < 1
    )
    if not ok:
        raise BundleError(f"{LORA_CONFIG} has invalid LoRA settings (r, lora_alpha, target_modules, bias): {bundle_dir}")
    return LoraSettings(**settings)
