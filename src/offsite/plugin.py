"""Owner side: plug a returned adapter into the full model, after checking everything about it.

Accepted: exactly the adapter blocks' parameters (or exactly the LoRA tensors PEFT expects for
the declared target modules), with the full model's shapes, floating dtypes and finite values,
from an adapter trained on an emulator of *this* base model. Anything else is rejected with a
one-line error; the full model is only modified once every check has passed.
"""

from __future__ import annotations

from pathlib import Path

import torch
from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from transformers import PreTrainedModel

from .adapter import PEFT_PREFIX, AdapterBundle, load_adapter
from .bundle import model_fingerprint, parse_dtype, write_bundle
from .emulator import LoadedEmulator, load_checkpoint
from .errors import PluginError
from .surgery import BlockLayout, discover_layout, linear_module_names


def _check_identity(model: PreTrainedModel, layout: BlockLayout, bundle: AdapterBundle, fingerprint: str | None) -> None:
    base = bundle.manifest["base"]
    if base.get("num_blocks") != layout.num_blocks or bundle.blocks_path != layout.blocks:
        raise PluginError(
            f"adapter is for a model with {base.get('num_blocks')} blocks at {bundle.blocks_path!r}, "
            f"this one has {layout.num_blocks} at {layout.blocks!r}"
        )
    if any(not 0 <= i < layout.num_blocks for i in bundle.blocks) or not bundle.blocks:
        raise PluginError(f"adapter declares invalid block indices {bundle.blocks}")
    actual = fingerprint or model_fingerprint(model)
    if actual != base["fingerprint"]:
        raise PluginError(
            f"adapter was trained for base model {base['fingerprint'][:12]}, this model is {actual[:12]} "
            "(different weights or dtype)"
        )


def _check_tensors(tensors: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    """Same keys, same shapes, floating and finite. `expected` maps key -> reference tensor."""
    unexpected = sorted(set(tensors) - set(expected))
    if unexpected:
        raise PluginError(f"adapter holds tensors outside the allowed adapter parameters: {unexpected[:3]}")
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise PluginError(f"adapter lacks tensors for: {missing[:3]}")
    for key, value in tensors.items():
        ref = expected[key]
        if tuple(value.shape) != tuple(ref.shape):
            raise PluginError(f"adapter tensor {key} has shape {tuple(value.shape)}, the model expects {tuple(ref.shape)}")
        if not value.dtype.is_floating_point:
            raise PluginError(f"adapter tensor {key} has non-floating dtype {value.dtype}")
        if not torch.isfinite(value).all():
            raise PluginError(f"adapter tensor {key} contains NaN or infinite values")


def plug_in(model: PreTrainedModel, adapter_dir: str | Path, merge: bool = True, fingerprint: str | None = None):
    """Return the full model with the adapter applied: full blocks copied in, or LoRA merged (or kept as PEFT)."""
    bundle = load_adapter(adapter_dir)
    layout = discover_layout(model)
    _check_identity(model, layout, bundle, fingerprint)
    return _apply(model, layout, bundle, merge)


def plug_into_emulator(emulator: LoadedEmulator, adapter_dir: str | Path, merge: bool = True):
    """The emulator with a trained adapter applied (the "emulator fine-tuned" setting)."""
    bundle = load_adapter(adapter_dir)
    if bundle.manifest.get("emulator", {}).get("fingerprint") != emulator.fingerprint:
        raise PluginError("adapter was trained on a different emulator than this one")
    index_of = {orig: i for i, orig in enumerate(emulator.block_map)}
    return _apply(emulator.model, emulator.layout, bundle.renumbered(emulator.layout, index_of), merge)


def _apply(model: PreTrainedModel, layout: BlockLayout, bundle: AdapterBundle, merge: bool):
    if bundle.lora is None:
        blocks = model.get_submodule(layout.blocks)
        expected = {layout.block_key(i, name): p for i in bundle.blocks for name, p in blocks[i].named_parameters()}
        _check_tensors(bundle.tensors, expected)
        with torch.no_grad():
            for key, value in bundle.tensors.items():
                expected[key].copy_(value)
        return model

    _check_tensors(bundle.tensors, _lora_shapes(model, layout, bundle))
    peft_model = get_peft_model(model, bundle.lora.to_peft(model.name_or_path))
    if set(get_peft_model_state_dict(peft_model)) != set(bundle.tensors):
        peft_model.unload()
        raise PluginError("PEFT built different LoRA tensors than the adapter holds")
    set_peft_model_state_dict(peft_model, bundle.tensors)
    return peft_model.merge_and_unload() if merge else peft_model


def _lora_shapes(model: PreTrainedModel, layout: BlockLayout, bundle: AdapterBundle) -> dict[str, torch.Tensor]:
    """Shapes of the LoRA tensors for the declared targets, computed before the model is touched."""
    allowed = set(linear_module_names(model, layout, bundle.blocks))
    outside = sorted(set(bundle.lora.target_modules) - allowed)
    if outside:
        raise PluginError(f"LoRA targets modules outside the adapter blocks: {outside[:3]}")
    r, expected = bundle.lora.r, {}
    for target in bundle.lora.target_modules:
        weight = model.get_submodule(target).weight
        # nn.Linear stores (out, in); GPT-2's Conv1D stores (in, out).
        out_f, in_f = weight.shape if not bundle.lora.fan_in_fan_out else weight.shape[::-1]
        expected[f"{PEFT_PREFIX}{target}.lora_A.weight"] = torch.empty(r, in_f, device="meta")
        expected[f"{PEFT_PREFIX}{target}.lora_B.weight"] = torch.empty(out_f, r, device="meta")
    return expected


def plugin_checkpoint(base_path: str | Path, adapter_dir: str | Path, out_dir: str | Path, merge: bool = True, overwrite: bool = False) -> Path:
    """Load the base checkpoint, plug the adapter in, write the adapted model (or PEFT adapter) as a bundle."""
    bundle = load_adapter(adapter_dir)  # fail fast, before loading a large model
    model, tokenizer = load_checkpoint(base_path, parse_dtype(bundle.manifest["base"].get("dtype", "float32")))
    plugged = plug_in(model, adapter_dir, merge=merge)
    manifest = {
        "base": bundle.manifest["base"],
        "adapter": {"fingerprint": bundle.fingerprint, "type": bundle.manifest["adapter"]["type"], "merged": merge},
    }

    def write(tmp: Path) -> None:
        plugged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    return write_bundle(out_dir, "plugged", manifest, write, overwrite=overwrite)
