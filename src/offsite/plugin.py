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
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from .adapter import PEFT_PREFIX, AdapterBundle, load_adapter
from .bundle import DTYPES, bundle_fingerprint, model_fingerprint, parse_dtype, read_manifest, tensor_bytes, write_bundle
from .cards import model_card
from .emulator import LoadedEmulator, check_blocks, load_checkpoint
from .errors import BundleError, ConfigError, PluginError
from .models import checkpoint_tokenizer
from .progress import bars_disabled
from .signing import load_private_key
from .streaming import DEFAULT_SHARD_BYTES, ShardedWriter, StoredCheckpoint, open_stored
from .surgery import BlockLayout, discover_layout, linear_module_names


from .configs import MAX_NORM_RATIO, NORM_FLOOR_RMS  # noqa: E402,F401  (the bound's constants; see there)

EmulatorRecord = str | Path | dict | LoadedEmulator | None


def _check_identity(model: PreTrainedModel, layout: BlockLayout, bundle: AdapterBundle, fingerprint: str | None) -> None:
    _check_layout(layout, bundle)
    _check_fingerprint(bundle, fingerprint or model_fingerprint(model))


def _check_fingerprint(bundle: AdapterBundle, actual: str) -> None:
    base = bundle.manifest["base"]
    if actual != base["fingerprint"]:
        raise PluginError(
            f"adapter was trained for base model {base['fingerprint'][:12]!r}, this model is {actual[:12]} "
            "(different weights or dtype)"
        )


def _check_layout(layout: BlockLayout, bundle: AdapterBundle) -> None:
    base = bundle.manifest["base"]
    if base.get("num_blocks") != layout.num_blocks or bundle.blocks_path != layout.blocks:
        raise PluginError(
            f"adapter is for a model with {str(base.get('num_blocks'))[:20]} blocks at {bundle.blocks_path[:100]!r}, "
            f"this one has {layout.num_blocks} at {layout.blocks!r}"
        )
    if any(not 0 <= i < layout.num_blocks for i in bundle.blocks) or not bundle.blocks:
        raise PluginError(f"adapter declares invalid block indices {bundle.blocks[:10]}")


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
    ref = float(torch.linalg.vector_norm(reference.detach(), dtype=torch.float32)) if reference.numel() else 0.0
    return ratio * max(ref, NORM_FLOOR_RMS * math.sqrt(reference.numel()))


def _check_keys(tensors, expected: dict[str, torch.Tensor]) -> None:
    unexpected = sorted(set(tensors) - set(expected))
    if unexpected:
        raise PluginError(f"adapter holds tensors outside the allowed adapter parameters: {[k[:100] for k in unexpected[:3]]}")
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise PluginError(f"adapter lacks tensors for: {missing[:3]}")


def _check_value(key: str, value: torch.Tensor, ref: torch.Tensor) -> float:
    """Shape, dtype and finite values of one adapter tensor; returns its Frobenius norm. One pass: the
    norm is finite exactly when every value is (a NaN or infinity anywhere makes it so), and only a
    non-finite norm pays for the element-wise check that tells NaN apart from mere overflow."""
    if tuple(value.shape) != tuple(ref.shape):
        raise PluginError(f"adapter tensor {key} has shape {tuple(value.shape)}, the model expects {tuple(ref.shape)}")
    if value.dtype not in DTYPES.values():
        raise PluginError(f"adapter tensor {key} has dtype {value.dtype}; only floating float32, bfloat16, float16 are accepted")
    norm = float(torch.linalg.vector_norm(value, dtype=torch.float32)) if value.numel() else 0.0
    if not math.isfinite(norm) and not torch.isfinite(value).all():
        raise PluginError(f"adapter tensor {key} contains NaN or infinite values")
    return norm


def _check_tensors(tensors: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    """Same keys, same shapes, float32/bfloat16/float16 and finite. `expected` maps key -> reference tensor."""
    _check_keys(tensors, expected)
    for key, value in tensors.items():
        _check_value(key, value, expected[key])


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
        expected = full_block_parameters(model, layout, bundle)
        check_full_blocks(bundle, expected, expected.__getitem__, max_norm_ratio)
        with torch.no_grad():
            for key, value in bundle.tensors.items():
                expected[key].copy_(value)
        return model

    check_lora(model, layout, bundle, lambda target: model.get_submodule(target).weight, max_norm_ratio)
    # Everything is checked; PEFT wraps the model in place, so any failure from here unwraps it again.
    peft_model = None
    try:
        peft_model = get_peft_model(model, bundle.lora.to_peft(model.name_or_path))
        if set(get_peft_model_state_dict(peft_model)) != set(bundle.tensors):
            raise PluginError("PEFT built different LoRA tensors than the adapter holds")
        set_peft_model_state_dict(peft_model, dict(bundle.tensors))
        return peft_model.merge_and_unload() if merge else peft_model
    except Exception as e:
        if peft_model is not None:
            peft_model.unload()
        if isinstance(e, PluginError):
            raise
        raise PluginError(f"LoRA adapter could not be applied ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})") from None


def full_block_parameters(model: PreTrainedModel, layout: BlockLayout, bundle: AdapterBundle) -> dict[str, torch.Tensor]:
    """The parameters a full-block adapter replaces, by key (a meta-device model gives their shapes only)."""
    blocks = model.get_submodule(layout.blocks)
    return {layout.block_key(i, name): p for i in bundle.blocks for name, p in blocks[i].named_parameters()}


def check_full_blocks(bundle: AdapterBundle, expected: dict[str, torch.Tensor], reference_of, max_norm_ratio: float | None) -> None:
    """Every check a full-block adapter passes before it replaces anything: the allow-list and shapes
    (`expected`, key -> tensor of the model's shape and dtype), finite values, the norm bound against
    `reference_of(key)` (the weights it replaces) and finiteness in the model's dtype."""
    _check_keys(bundle.tensors, expected)
    for key in bundle.tensors:
        value = bundle.tensors[key]  # read once (a lazily loaded adapter reads it from its private copy)
        norm = _check_value(key, value, expected[key])
        if max_norm_ratio is not None:
            _check_norm(key, norm, reference_of(key), max_norm_ratio)
        target = expected[key].dtype
        if value.dtype != target and value.numel() and float(value.abs().amax()) > torch.finfo(target).max:
            raise PluginError(f"adapter tensor {key} overflows the model's {target} (infinite once stored)")


def check_lora(model: PreTrainedModel, layout: BlockLayout, bundle: AdapterBundle, weight_of, max_norm_ratio: float | None,
               merged_finite: bool = True) -> None:
    """Every check a LoRA adapter passes before it is merged: targets inside the adapter blocks, shapes
    (from `model`, which may be on the meta device), the norm bound and (`merged_finite`) a finite merge
    against `weight_of(target)`, the target's real weight. The streamed plug-in checks the merge as it
    computes it instead (a 7B model's merges cost as much as the copy), before anything is published."""
    _check_tensors(bundle.tensors, _lora_shapes(model, layout, bundle))
    if max_norm_ratio is None and not merged_finite:
        return
    for target in bundle.lora.target_modules:  # each weight fetched once (a streamed plug-in reads it from disk)
        weight = weight_of(target)
        _check_lora_norm(bundle, target, weight, max_norm_ratio)
        if merged_finite:
            _check_merged_finite(bundle, target, weight)


def lora_delta(bundle: AdapterBundle, target: str) -> torch.Tensor:
    """(alpha/r) B A for one target in float32, as PEFT's merge computes it (transposed for Conv1D)."""
    a = bundle.tensors[f"{PEFT_PREFIX}{target}.lora_A.weight"].float()
    b = bundle.tensors[f"{PEFT_PREFIX}{target}.lora_B.weight"].float()
    delta = b @ a
    return (delta.T if bundle.lora.fan_in_fan_out else delta) * (bundle.lora.lora_alpha / bundle.lora.r)


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
def _check_merged_finite(bundle: AdapterBundle, target: str, weight: torch.Tensor) -> None:
    """W + (alpha/r) B A must be finite in the model's own dtype, whatever the norm bound."""
    merged = weight.float() + lora_delta(bundle, target)
    if not torch.isfinite(merged.to(weight.dtype)).all():
        raise PluginError(f"LoRA update of {target[:100]} merges to infinite or NaN weights in {weight.dtype}")


def _check_lora_norm(bundle: AdapterBundle, target: str, weight: torch.Tensor, ratio: float | None) -> None:
    """|(alpha/r) B A|_F, exactly and cheaply: |BA|_F^2 = sum((B^T B) * (A A^T))."""
    if ratio is None:
        return
    scale = bundle.lora.lora_alpha / bundle.lora.r
    a = bundle.tensors[f"{PEFT_PREFIX}{target}.lora_A.weight"].double()
    b = bundle.tensors[f"{PEFT_PREFIX}{target}.lora_B.weight"].double()
    squared = float(torch.sum((b.T @ b) * (a @ a.T)))
    _check_norm(f"{target} (LoRA update)", abs(scale) * math.sqrt(max(squared, 0.0)), weight, ratio)


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
    stream: bool | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> Path:
    """Load the base checkpoint, plug the adapter in, write the adapted model (or PEFT adapter) as a bundle.

    Every check that needs no model (signature, hashes, emulator record, output path, signing
    key) runs before the base model is loaded. A merged plug-in streams by default (`stream`):
    the base checkpoint is read tensor by tensor and written back with the adapter's blocks
    replaced or its LoRA merged, never loaded whole (offsite.streaming).
    """
    explicit_stream = stream is True
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise BundleError(f"output already exists, not overwriting: {out_dir}")
    sign_key = load_private_key(sign_key) if sign_key is not None else None
    bundle = load_adapter(adapter_dir, trusted_key, lazy=True)  # tensors read when used: a 7B model's blocks are GBs
    issued = issued_emulator(emulator) if emulator is not None else None
    if issued is not None:
        check_issued(bundle, issued)
    dtype = parse_dtype(bundle.manifest["base"].get("dtype", "float32"))
    manifest = {
        "base": bundle.manifest["base"],
        "adapter": {"fingerprint": bundle.fingerprint, "type": bundle.manifest["adapter"]["type"], "merged": merge},
    }
    if issued is not None:
        manifest["emulator"] = {"fingerprint": bundle_fingerprint(issued)}
    streamable = merge and (bundle.lora is None or bundle.lora.bias == "none")
    if stream is None:
        stream = streamable
    elif stream and not streamable:
        raise ConfigError("only a merged plug-in of full blocks or of LoRA without bias terms streams; pass stream=False")
    if stream:
        base_path = Path(base_path)
        tokenizer = checkpoint_tokenizer(base_path)
        stored = open_stored(base_path, dtype, required=explicit_stream)
        if stored is not None:
            with stored:
                return _stream_plugin(stored, bundle, tokenizer, out_dir, manifest, max_norm_ratio, overwrite, sign_key, max_shard_bytes)
    model, tokenizer = load_checkpoint(base_path, dtype)
    plugged = plug_in(model, bundle, merge=merge, emulator=issued, max_norm_ratio=max_norm_ratio)

    def write(tmp: Path) -> None:
        plugged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "README.md").write_text(model_card("plugged", manifest))  # after PEFT's own card, which it replaces

    return write_bundle(out_dir, "plugged", manifest, write, overwrite=overwrite, sign_key=sign_key)


@torch.no_grad()
def _stream_plugin(stored: StoredCheckpoint, bundle: AdapterBundle, tokenizer, out_dir: Path, manifest: dict,
                   max_norm_ratio: float | None, overwrite: bool, sign_key, max_shard_bytes: int) -> Path:
    """The merged plug-in without the base model in memory. First every check that reads only the tensors
    the adapter replaces (allow-list, shapes, norms, finite merges); then one pass over the checkpoint in
    sorted order hashes every tensor (the base fingerprint, verified before the bundle is published)
    and writes it back, replaced by the adapter's block tensor or merged with its LoRA update."""
    layout = stored.layout
    _check_layout(layout, bundle)
    if bundle.lora is None:
        # The weights each block tensor replaces (its norm bound), read ahead in the order the checks ask.
        with stored.read_ahead(list(bundle.tensors), fingerprint=False) as reader:
            check_full_blocks(bundle, full_block_parameters(stored.model, layout, bundle),
                              lambda key: stored.as_tensor(key, reader.chunks(key)), max_norm_ratio)
        targets = {}
    else:
        weights = [f"{target}.weight" for target in bundle.lora.target_modules] if max_norm_ratio is not None else []
        with stored.read_ahead(weights, fingerprint=False) as reader:  # in the order the norm checks ask
            check_lora(stored.model, layout, bundle, lambda target: stored.as_tensor(f"{target}.weight", reader.chunks(f"{target}.weight")),
                       max_norm_ratio, merged_finite=False)
        targets = {f"{target}.weight": target for target in bundle.lora.target_modules}
    primary = stored.primary_names()
    plan = [(stored.source[name], stored.dtype_of(name), tuple(stored.state[name].shape)) for name in primary]
    primary = set(primary)

    def write(tmp: Path) -> None:
        with ShardedWriter(tmp, plan, max_shard_bytes) as writer:  # a failure closes its open shard
            names = sorted(stored.source)
            with stored.read_ahead(names) as reader:  # it hashes the base (its fingerprint) as it reads
                for name in tqdm(names, desc="plug-in (streamed)", unit="tensor", disable=bars_disabled()):
                    dtype = stored.dtype_of(name)
                    out = stored.source[name] if name in primary else None
                    if name in bundle.tensors:  # replaced: its base bytes are only hashed (by the reader)
                        for _ in reader.chunks(name):
                            pass
                        if out is not None:
                            writer.write(out, tensor_bytes(bundle.tensors[name].to(dtype)))
                    elif name in targets:
                        value = stored.as_tensor(name, reader.chunks(name))
                        if out is not None:  # W += (alpha/r) B A, in W's dtype, as PEFT's merge does
                            value += lora_delta(bundle, targets[name])
                            if not torch.isfinite(value).all():
                                raise PluginError(f"LoRA update of {targets[name][:100]} merges to infinite or NaN weights in {dtype}")
                            writer.write(out, tensor_bytes(value))
                    else:
                        for chunk in reader.chunks(name):
                            if out is not None:
                                writer.write(out, chunk)
                fingerprint = reader.fingerprint()
            hashed = writer.close()
        _check_fingerprint(bundle, fingerprint)  # raising here publishes nothing
        stored.save_configs(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "README.md").write_text(model_card("plugged", manifest))
        return hashed

    return write_bundle(out_dir, "plugged", manifest, write, overwrite=overwrite, sign_key=sign_key)
