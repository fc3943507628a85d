"""Owner side: plug a returned adapter into the full model, after checking everything about it.

Accepted: exactly the adapter blocks' parameters (or exactly the LoRA tensors PEFT expects for
the declared target modules), with the full model's shapes, float32/bfloat16/float16 dtypes,
finite values and bounded norms (`max_norm_ratio`), from an adapter trained on an emulator of
*this* base model. Given the owner's own record of the emulator it issued (`emulator=`), the
adapter must come from exactly that emulator and cover exactly the blocks it declared
trainable, so an edited adapter manifest cannot claim more blocks. Anything else is rejected
with a one-line error; the full model is only modified once every check has passed.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from transformers import PreTrainedModel

from .adapter import PEFT_PREFIX, AdapterBundle, load_adapter
from .bundle import DTYPES, bundle_fingerprint, model_fingerprint, parse_dtype, read_manifest, write_bundle
from .cards import model_card
from .emulator import LoadedEmulator, check_blocks, load_checkpoint
from .errors import BundleError, PluginError
from .signing import load_private_key
from .surgery import BlockLayout, discover_layout, linear_module_names

# Norm bound: an adapter tensor (full blocks), or a LoRA update (alpha/r) B A, may have a
# Frobenius norm of at most MAX_NORM_RATIO x max(|W|, NORM_FLOOR_RMS x sqrt(numel(W))), where W
# is the base weight it replaces or updates. The floor gives zero-initialised tensors (biases)
# room to train. Genuine fine-tunes stay far below it (tests/test_plugin.py measures the tiny
# models at lr 1e-2); it stops absurd values (overflow in bf16, a "model" that is just noise).
MAX_NORM_RATIO = 100.0
NORM_FLOOR_RMS = 0.1

EmulatorRecord = str | Path | dict | LoadedEmulator | None


def _check_identity(model: PreTrainedModel, layout: BlockLayout, bundle: AdapterBundle, fingerprint: str | None) -> None:
    base = bundle.manifest["base"]
    if base.get("num_blocks") != layout.num_blocks or bundle.blocks_path != layout.blocks:
        raise PluginError(
            f"adapter is for a model with {str(base.get('num_blocks'))[:20]} blocks at {bundle.blocks_path[:100]!r}, "
            f"this one has {layout.num_blocks} at {layout.blocks!r}"
        )
    if any(not 0 <= i < layout.num_blocks for i in bundle.blocks) or not bundle.blocks:
        raise PluginError(f"adapter declares invalid block indices {bundle.blocks[:10]}")
    actual = fingerprint or model_fingerprint(model)
    if actual != base["fingerprint"]:
        raise PluginError(
            f"adapter was trained for base model {base['fingerprint'][:12]!r}, this model is {actual[:12]} "
            "(different weights or dtype)"
        )


def issued_emulator(emulator: EmulatorRecord) -> dict:
    """The owner's record of an emulator it issued: a bundle directory (only its manifest is
    read; the weights need not be kept), a manifest dict, or a loaded emulator."""
    if isinstance(emulator, LoadedEmulator):
        return emulator.manifest
    if isinstance(emulator, dict):
        manifest, where = emulator, "emulator manifest"
    else:
        manifest, where = read_manifest(emulator, kind="emulator", verify=False, trusted_key=False), emulator
    check_blocks(manifest, where)
    return manifest


def check_issued(bundle: AdapterBundle, issued: dict) -> None:
    """The adapter comes from the emulator the owner issued, and covers exactly its trainable blocks."""
    expected = bundle_fingerprint(issued)
    claimed = bundle.manifest["emulator"]["fingerprint"]
    if claimed != expected:
        raise PluginError(f"adapter was trained on a different emulator ({claimed[:16]!r}) than the one given ({expected[:16]})")
    if bundle.manifest["base"]["fingerprint"] != issued["base"]["fingerprint"]:
        raise PluginError("adapter names another base model than the emulator it was trained on")
    layout = issued["base"].get("layout")
    issued_path = layout.get("blocks") if isinstance(layout, dict) else None
    if sorted(bundle.blocks) != sorted(issued["blocks"]["adapter"]) or (issued_path is not None and bundle.blocks_path != issued_path):
        raise PluginError(
            f"adapter claims blocks {bundle.blocks[:10]} at {bundle.blocks_path[:100]!r}, but the emulator "
            f"declared only blocks {issued['blocks']['adapter']} trainable"
        )


def norm_bound(reference: torch.Tensor, ratio: float) -> float:
    """Largest Frobenius norm accepted for a tensor that replaces or updates `reference`."""
    ref = float(torch.linalg.vector_norm(reference.detach().float()))
    return ratio * max(ref, NORM_FLOOR_RMS * math.sqrt(reference.numel()))


def _check_tensors(tensors: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    """Same keys, same shapes, float32/bfloat16/float16 and finite. `expected` maps key -> reference tensor."""
    unexpected = sorted(set(tensors) - set(expected))
    if unexpected:
        raise PluginError(f"adapter holds tensors outside the allowed adapter parameters: {[k[:100] for k in unexpected[:3]]}")
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise PluginError(f"adapter lacks tensors for: {missing[:3]}")
    for key, value in tensors.items():
        ref = expected[key]
        if tuple(value.shape) != tuple(ref.shape):
            raise PluginError(f"adapter tensor {key} has shape {tuple(value.shape)}, the model expects {tuple(ref.shape)}")
        if value.dtype not in DTYPES.values():
            raise PluginError(f"adapter tensor {key} has dtype {value.dtype}; only floating float32, bfloat16, float16 are accepted")
        if not torch.isfinite(value).all():
            raise PluginError(f"adapter tensor {key} contains NaN or infinite values")


def _check_norm(key: str, norm: float, reference: torch.Tensor, ratio: float | None) -> None:
    if ratio is None:
        return
    bound = norm_bound(reference, ratio)
    if not norm <= bound:
        raise PluginError(f"adapter tensor {key} has norm {norm:.4g}, over the bound {bound:.4g} (max_norm_ratio {ratio:g})")


def plug_in(
    model: PreTrainedModel,
    adapter: str | Path | AdapterBundle,
    merge: bool = True,
    fingerprint: str | None = None,
    emulator: EmulatorRecord = None,
    trusted_key=None,
    max_norm_ratio: float | None = MAX_NORM_RATIO,
):
    """Return the full model with the adapter applied: full blocks copied in, or LoRA merged (or kept as PEFT).

    `emulator`: the owner's record of the emulator it issued (see `issued_emulator`); strongly
    recommended, since without it the adapter's own declaration of its blocks is trusted.
    `trusted_key`: verify the adapter bundle's signature (default: $OFFSITE_TRUSTED_KEY).
    """
    bundle = adapter if isinstance(adapter, AdapterBundle) else load_adapter(adapter, trusted_key)
    if emulator is not None:
        check_issued(bundle, issued_emulator(emulator))
    layout = discover_layout(model)
    _check_identity(model, layout, bundle, fingerprint)
    return _apply(model, layout, bundle, merge, max_norm_ratio)


def plug_into_emulator(
    emulator: LoadedEmulator, adapter_dir: str | Path, merge: bool = True, trusted_key=None, max_norm_ratio: float | None = MAX_NORM_RATIO
):
    """The emulator with a trained adapter applied (the "emulator fine-tuned" setting)."""
    bundle = load_adapter(adapter_dir, trusted_key)
    check_issued(bundle, emulator.manifest)
    index_of = {orig: i for i, orig in enumerate(emulator.block_map)}
    return _apply(emulator.model, emulator.layout, bundle.renumbered(emulator.layout, index_of), merge, max_norm_ratio)


def _apply(model: PreTrainedModel, layout: BlockLayout, bundle: AdapterBundle, merge: bool, max_norm_ratio: float | None):
    if bundle.lora is None:
        blocks = model.get_submodule(layout.blocks)
        expected = {layout.block_key(i, name): p for i in bundle.blocks for name, p in blocks[i].named_parameters()}
        _check_tensors(bundle.tensors, expected)
        for key, value in bundle.tensors.items():
            _check_norm(key, float(torch.linalg.vector_norm(value.float())), expected[key], max_norm_ratio)
            if not torch.isfinite(value.to(expected[key].dtype)).all():  # e.g. float32 values past bfloat16's range
                raise PluginError(f"adapter tensor {key} overflows the model's {expected[key].dtype} (infinite once stored)")
        with torch.no_grad():
            for key, value in bundle.tensors.items():
                expected[key].copy_(value)
        return model

    _check_tensors(bundle.tensors, _lora_shapes(model, layout, bundle))
    _check_lora_norms(model, bundle, max_norm_ratio)
    _check_merged_finite(model, bundle)
    # Everything is checked; PEFT wraps the model in place, so any failure from here unwraps it again.
    peft_model = None
    try:
        peft_model = get_peft_model(model, bundle.lora.to_peft(model.name_or_path))
        if set(get_peft_model_state_dict(peft_model)) != set(bundle.tensors):
            raise PluginError("PEFT built different LoRA tensors than the adapter holds")
        set_peft_model_state_dict(peft_model, bundle.tensors)
        return peft_model.merge_and_unload() if merge else peft_model
    except Exception as e:
        if peft_model is not None:
            peft_model.unload()
        if isinstance(e, PluginError):
            raise
        raise PluginError(f"LoRA adapter could not be applied ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})") from None


def _lora_shapes(model: PreTrainedModel, layout: BlockLayout, bundle: AdapterBundle) -> dict[str, torch.Tensor]:
    """Shapes of the LoRA tensors for the declared targets, computed before the model is touched."""
    allowed = set(linear_module_names(model, layout, bundle.blocks))
    outside = sorted(set(bundle.lora.target_modules) - allowed)
    if outside:
        raise PluginError(f"LoRA targets modules outside the adapter blocks: {[t[:100] for t in outside[:3]]}")
    r, expected = bundle.lora.r, {}
    for target in bundle.lora.target_modules:
        module = model.get_submodule(target)
        is_conv1d = type(module).__name__ == "Conv1D"
        if bundle.lora.fan_in_fan_out != is_conv1d:  # PEFT would fail (or silently transpose) after wrapping
            raise PluginError(f"LoRA config sets fan_in_fan_out={bundle.lora.fan_in_fan_out}, but {target[:100]} is "
                              f"{'a Conv1D (in, out)' if is_conv1d else 'an nn.Linear (out, in)'}")
        weight = module.weight
        # nn.Linear stores (out, in); GPT-2's Conv1D stores (in, out).
        out_f, in_f = weight.shape if not bundle.lora.fan_in_fan_out else weight.shape[::-1]
        expected[f"{PEFT_PREFIX}{target}.lora_A.weight"] = torch.empty(r, in_f, device="meta")
        expected[f"{PEFT_PREFIX}{target}.lora_B.weight"] = torch.empty(out_f, r, device="meta")
    return expected


@torch.no_grad()
def _check_merged_finite(model: PreTrainedModel, bundle: AdapterBundle) -> None:
    """W + (alpha/r) B A must be finite in the model's own dtype for every target, whatever the norm bound."""
    scale = bundle.lora.lora_alpha / bundle.lora.r
    for target in bundle.lora.target_modules:
        weight = model.get_submodule(target).weight
        a = bundle.tensors[f"{PEFT_PREFIX}{target}.lora_A.weight"].float()
        b = bundle.tensors[f"{PEFT_PREFIX}{target}.lora_B.weight"].float()
        delta = scale * (b @ a)
        merged = weight.float() + (delta.T if bundle.lora.fan_in_fan_out else delta)
        if not torch.isfinite(merged.to(weight.dtype)).all():
            raise PluginError(f"LoRA update of {target[:100]} merges to infinite or NaN weights in {weight.dtype}")


def _check_lora_norms(model: PreTrainedModel, bundle: AdapterBundle, ratio: float | None) -> None:
    """|(alpha/r) B A|_F for every target, exactly and cheaply: |BA|_F^2 = sum((B^T B) * (A A^T))."""
    if ratio is None:
        return
    scale = bundle.lora.lora_alpha / bundle.lora.r
    for target in bundle.lora.target_modules:
        a = bundle.tensors[f"{PEFT_PREFIX}{target}.lora_A.weight"].double()
        b = bundle.tensors[f"{PEFT_PREFIX}{target}.lora_B.weight"].double()
        squared = float(torch.sum((b.T @ b) * (a @ a.T)))
        _check_norm(f"{target} (LoRA update)", abs(scale) * math.sqrt(max(squared, 0.0)), model.get_submodule(target).weight, ratio)


def plugin_checkpoint(
    base_path: str | Path,
    adapter_dir: str | Path,
    out_dir: str | Path,
    merge: bool = True,
    overwrite: bool = False,
    emulator: EmulatorRecord = None,
    trusted_key=None,
    sign_key=None,
    max_norm_ratio: float | None = MAX_NORM_RATIO,
) -> Path:
    """Load the base checkpoint, plug the adapter in, write the adapted model (or PEFT adapter) as a bundle.

    Every check that needs no model (signature, hashes, emulator record, output path, signing
    key) runs before the base model is loaded.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise BundleError(f"output already exists, not overwriting: {out_dir}")
    sign_key = load_private_key(sign_key) if sign_key is not None else None
    bundle = load_adapter(adapter_dir, trusted_key)
    issued = issued_emulator(emulator) if emulator is not None else None
    if issued is not None:
        check_issued(bundle, issued)
    model, tokenizer = load_checkpoint(base_path, parse_dtype(bundle.manifest["base"].get("dtype", "float32")))
    plugged = plug_in(model, bundle, merge=merge, emulator=issued, max_norm_ratio=max_norm_ratio)
    manifest = {
        "base": bundle.manifest["base"],
        "adapter": {"fingerprint": bundle.fingerprint, "type": bundle.manifest["adapter"]["type"], "merged": merge},
    }
    if issued is not None:
        manifest["emulator"] = {"fingerprint": bundle_fingerprint(issued)}

    def write(tmp: Path) -> None:
        plugged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "README.md").write_text(model_card("plugged", manifest))  # after PEFT's own card, which it replaces

    return write_bundle(out_dir, "plugged", manifest, write, overwrite=overwrite, sign_key=sign_key)
