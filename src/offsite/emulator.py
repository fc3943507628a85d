"""Emulator bundles: save an `Emulator` for the data owner, and load it back without the base model."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from .bundle import (
    bundle_fingerprint,
    model_fingerprint,
    parse_dtype,
    read_json_member,
    read_manifest,
    safetensors_header,
    write_bundle,
)
from .cards import model_card
from .errors import BundleError, ConfigError, UnsupportedModelError
from .methods import Emulator, build_emulator
from .models import checkpoint_tokenizer, load_checkpoint  # noqa: F401  (load_checkpoint re-exported: the Hugging Face checkpoint loader)
from .progress import bars_disabled
from .signing import load_private_key
from .streaming import DEFAULT_SHARD_BYTES, ShardedWriter, StoredCheckpoint, open_stored
from .structure import structured_class
from .surgery import BlockLayout, discover_layout, reduced_config

# Methods compress_checkpoint runs without the whole model in memory (offsite.streaming).
STREAMED_METHODS = frozenset({"layerdrop", "gradot"})


def save_emulator(
    emulator: Emulator,
    tokenizer,
    out_dir: str | Path,
    base_fingerprint: str,
    base_name: str = "",
    overwrite: bool = False,
    sign_key=None,
) -> Path:
    """Write the emulator as an HF checkpoint + tokenizer + manifest (no weights of dropped blocks),
    signed with `sign_key` (a private key file or key) when given."""
    manifest = emulator_manifest(emulator.layout, emulator.model.dtype, emulator.method, emulator.params, emulator.block_map,
                                 emulator.adapter_blocks, base_fingerprint, base_name, emulator.structure)

    def write(tmp: Path) -> None:
        emulator.model.save_pretrained(tmp)
        if emulator.structure:
            mark_structured(tmp / "config.json")
        (tmp / "README.md").write_text(model_card("emulator", manifest))
        tokenizer.save_pretrained(tmp)

    return write_bundle(out_dir, "emulator", manifest, write, overwrite=overwrite, sign_key=sign_key)


# The model_type a restructured emulator's config.json declares (the family's own moves to STRUCTURED_KEY):
# its smaller middle modules exist only once offsite applies the manifest's structure, so plain transformers
# (and lm-eval's hf loader) must refuse it by name instead of failing on shape mismatches.
STRUCTURED_MODEL_TYPE = "offsite_structured_emulator__load_with_offsite_emulator_load_emulator"
STRUCTURED_KEY = "offsite_model_type"


def mark_structured(config_path: Path) -> None:
    data = json.loads(config_path.read_text())
    data[STRUCTURED_KEY] = data["model_type"]
    data["model_type"] = STRUCTURED_MODEL_TYPE
    config_path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _structured_config(bundle_dir: Path):
    """The family config of a restructured emulator (see STRUCTURED_MODEL_TYPE)."""
    from transformers import CONFIG_MAPPING

    data = read_json_member(bundle_dir / "config.json", "config.json")
    family = data.pop(STRUCTURED_KEY, None) if isinstance(data, dict) else None
    if not isinstance(family, str) or family not in CONFIG_MAPPING:
        raise BundleError(f"emulator config.json declares a restructured model without a known {STRUCTURED_KEY}: {bundle_dir}")
    data["model_type"] = family
    return CONFIG_MAPPING[family].from_dict(data)


def emulator_manifest(layout: BlockLayout, dtype: torch.dtype, method: str, params: dict, block_map: list[int], adapter_blocks: list[int],
                      base_fingerprint: str, base_name: str = "", structure: dict | None = None) -> dict:
    """The emulator bundle's own manifest sections (what `load_emulator` and plug-in rely on)."""
    manifest = {
        "base": {
            "fingerprint": base_fingerprint,
            "name": base_name,
            "model_type": layout.model_type,
            "num_blocks": layout.num_blocks,
            "dtype": str(dtype).removeprefix("torch."),
            "layout": dataclasses.asdict(layout),
        },
        "method": {"name": method, "params": params},
        "blocks": {
            "map": block_map,
            "adapter": adapter_blocks,
            "trainable": [i for i, orig in enumerate(block_map) if orig in adapter_blocks],
        },
    }
    if structure:  # declared shape changes of middle modules (offsite.structure)
        manifest["structure"] = structure
    return manifest


@dataclass
class LoadedEmulator:
    model: PreTrainedModel
    tokenizer: object
    manifest: dict
    layout: BlockLayout  # of the emulator model (same block path as the base)
    path: Path | None = None  # the bundle it was loaded from

    @property
    def block_map(self) -> list[int]:
        return self.manifest["blocks"]["map"]

    @property
    def trainable(self) -> list[int]:
        return self.manifest["blocks"]["trainable"]

    @property
    def fingerprint(self) -> str:
        return bundle_fingerprint(self.manifest)


def check_blocks(manifest: dict, bundle_dir: Path | str) -> None:
    """The emulator manifest's 'base' and 'blocks' sections are well-formed and consistent."""
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


# Config keys that make transformers fetch or run code from elsewhere (remote modelling code,
# hub kernels, quantisation back-ends): an emulator bundle is plain weights, so they are refused.
FORBIDDEN_CONFIG_KEYS = frozenset(
    {"auto_map", "quantization_config", "attn_implementation", "_attn_implementation",
     "_attn_implementation_internal", "custom_pipelines", "trust_remote_code"}
)


# The families whose emulators offsite builds and tests (tests/tiny.py); a bundle naming any other
# model_type is refused before transformers builds anything from its config.
SUPPORTED_MODEL_TYPES = frozenset({"llama", "qwen2", "mistral", "gemma3_text", "gpt2", "opt", "gpt_neox", "bloom", "phi"})
# The model a config implies (parameters and buffers, in the load dtype) may be at most this many times
# the bundle's weight bytes, plus MODEL_SIZE_SLACK: a float16 bundle loaded in float32 doubles, a GradOT
# middle rebuilt from its declaration is smaller than the plain architecture the estimate builds.
MODEL_SIZE_FACTOR = 4
MODEL_SIZE_SLACK = 1 << 30


@contextlib.contextmanager
def transformers_quiet():
    """transformers' warnings and info off while it loads a bundle (offsite reports what matters itself)."""
    from transformers.utils import logging as hf_logging

    from .progress import bars_disabled

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    if bars_disabled():  # TQDM_DISABLE / --quiet reach transformers' own bars too
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def check_config_size(config, dtype: torch.dtype, weight_bytes: int, where: Path) -> int:
    """Bytes of the model `config` describes, from a meta-device build (nothing allocated), or a one-line
    BundleError when that is far more than the bundle's weights can fill (a config-size bomb)."""
    limit = int(os.environ.get("OFFSITE_MAX_MODEL_BYTES") or MODEL_SIZE_FACTOR * weight_bytes + MODEL_SIZE_SLACK)
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=False)
    except Exception as e:  # noqa: BLE001 - whatever transformers makes of a hostile config becomes one line
        raise BundleError(f"emulator config.json does not describe a model ({_first_line(e)}): {where}") from None
    size = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    if size > limit:
        raise BundleError(f"emulator config.json describes a model of {size / 2**30:,.1f} GiB, far more than its "
                          f"{weight_bytes / 2**20:,.1f} MiB of weights can fill (limit {limit / 2**30:,.1f} GiB, "
                          f"OFFSITE_MAX_MODEL_BYTES): {where}")
    return size


def _forbidden_keys(value, found: set[str]) -> set[str]:
    if isinstance(value, dict):
        found |= FORBIDDEN_CONFIG_KEYS & set(value)
        for item in value.values():
            _forbidden_keys(item, found)
    elif isinstance(value, list):
        for item in value:
            _forbidden_keys(item, found)
    return found


def _check_checkpoint_files(bundle_dir: Path, files: dict) -> None:
    """What transformers will read must be plain data that stays inside the bundle."""
    if "config.json" not in files:
        raise BundleError(f"emulator bundle lacks config.json: {bundle_dir}")
    for name in files:
        if name.endswith(".json") and "/" not in name:
            data = read_json_member(bundle_dir / name, name)
            bad = _forbidden_keys(data, set())
            if bad:
                raise BundleError(f"emulator bundle file {name} sets {sorted(bad)}, which a plain checkpoint never needs: {bundle_dir}")
            if name.endswith(".index.json"):
                weight_map = data.get("weight_map") if isinstance(data, dict) else None
                if not isinstance(weight_map, dict) or not all(isinstance(v, str) and v in files for v in weight_map.values()):
                    raise BundleError(f"{name} refers to files that are not in the bundle: {bundle_dir}")
        elif name.endswith(".safetensors"):
            safetensors_header(bundle_dir / name)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200]}" if text else type(e).__name__


def load_emulator(
    bundle_dir: str | Path, dtype: torch.dtype | None = None, device: str | None = None, trusted_key=None
) -> LoadedEmulator:
    """Verify and load an emulator bundle (signature too, when a trusted key is configured).

    Never touches the base model, never runs code from the bundle, never reads outside it.
    """
    bundle_dir = Path(bundle_dir)
    manifest = read_manifest(bundle_dir, kind="emulator", trusted_key=trusted_key)
    check_blocks(manifest, bundle_dir)
    _check_checkpoint_files(bundle_dir, manifest["files"])
    dtype = dtype or parse_dtype(manifest["base"].get("dtype", "float32"))
    try:
        declared = read_json_member(bundle_dir / "config.json", "config.json")
        if isinstance(declared, dict) and declared.get("model_type") == STRUCTURED_MODEL_TYPE:
            if "structure" not in manifest:
                raise BundleError(f"emulator config.json declares a restructured model, its manifest no structure: {bundle_dir}")
            config = _structured_config(bundle_dir)
        else:
            config = AutoConfig.from_pretrained(bundle_dir, local_files_only=True, trust_remote_code=False)
        if config.model_type not in SUPPORTED_MODEL_TYPES:
            raise BundleError(f"emulator config.json names model_type {str(config.model_type)[:40]!r}, not one of the supported "
                              f"families {sorted(SUPPORTED_MODEL_TYPES)}: {bundle_dir}")
        if getattr(config, "num_hidden_layers", None) != len(manifest["blocks"]["map"]):
            raise BundleError(f"emulator config.json does not have the {len(manifest['blocks']['map'])} blocks its manifest maps: {bundle_dir}")
        weight_bytes = sum(meta["size"] for name, meta in manifest["files"].items() if name.endswith(".safetensors"))
        check_config_size(config, dtype, weight_bytes, bundle_dir)
        # A restructured middle (e.g. GradOT) is rebuilt from its declaration before the weights load.
        model_class = structured_class(config, manifest) if "structure" in manifest else AutoModelForCausalLM
        with transformers_quiet():  # its multi-line load report would precede our one-line verdict below
            model, info = model_class.from_pretrained(
                bundle_dir,
                config=config,
                dtype=dtype,
                local_files_only=True,
                use_safetensors=True,
                trust_remote_code=False,
                output_loading_info=True,
            )
        with transformers_quiet():  # it reads config.json too, and would warn about a restructured bundle's model type
            tokenizer = AutoTokenizer.from_pretrained(bundle_dir, local_files_only=True, trust_remote_code=False)
    except BundleError:
        raise
    except Exception as e:  # noqa: BLE001 - whatever transformers makes of hostile input becomes one line
        raise BundleError(f"emulator bundle cannot be loaded as a checkpoint ({_first_line(e)}): {bundle_dir}") from None
    if info.get("missing_keys") or info.get("mismatched_keys") or info.get("unexpected_keys"):
        problems = sorted(info.get("missing_keys") or []) + sorted(info.get("unexpected_keys") or [])
        raise BundleError(f"emulator checkpoint does not match its config {problems[:3]}: {bundle_dir}")

    layout = discover_layout(model)
    if layout.num_blocks != len(manifest["blocks"]["map"]):
        raise BundleError(f"emulator has {layout.num_blocks} blocks but its manifest maps {len(manifest['blocks']['map'])}: {bundle_dir}")
    if "structure" in manifest:
        # Each declared shape is checked on its own when applied; that they fit together (an MLP whose
        # gate and up projections disagree) only shows when data flows: one token through the model.
        try:
            with torch.no_grad():
                model(input_ids=torch.zeros((1, 1), dtype=torch.long), use_cache=False)
        except Exception as e:  # noqa: BLE001 - a broken structure becomes one line here, not in fine-tuning
            raise BundleError(f"emulator's declared structure does not compute ({_first_line(e)}): {bundle_dir}") from None
    if device:
        model.to(device)
    model.eval()
    return LoadedEmulator(model, tokenizer, manifest, layout, bundle_dir)


def portable_name(model_path: str | Path) -> str:
    """The base model's name as other tools should see it: the absolute path of a local checkpoint (a
    path as typed, e.g. `work/base`, means nothing from another directory and sends PEFT to the hub)."""
    path = Path(model_path)
    return str(path.resolve()) if path.is_dir() else str(model_path)


def compress_checkpoint(
    model_path: str | Path,
    out_dir: str | Path,
    method: str = "layerdrop",
    config=None,
    dtype: torch.dtype | str = "auto",
    base_name: str = "",
    overwrite: bool = False,
    sign_key=None,
    stream: bool | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> Path:
    """Owner recipe: load the base checkpoint, build the emulator, write the (signed) emulator bundle.

    `dtype="auto"` keeps the checkpoint's own dtype (a bf16 checkpoint gives a bf16 bundle of half
    the float32 size). Everything cheap is checked before a weight is read: the output, the signing
    key, the method and its parameters, the checkpoint's config and its tokenizer.

    `stream` (default: for LayerDrop) never loads the model: tensors are read and written in
    pieces (offsite.streaming), so peak memory stays far below the checkpoint's size. A
    checkpoint transformers must convert on load falls back to loading it, unless stream=True.
    """
    from .methods import get_method

    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise BundleError(f"output already exists, not overwriting: {out_dir}")
    sign_key = load_private_key(sign_key) if sign_key is not None else None  # fail before the heavy work
    spec = get_method(method)
    if config is not None and not isinstance(config, spec.config_class):
        raise ConfigError(f"method {method!r} needs a {spec.config_class.__name__}, got {type(config).__name__}")
    model_path = Path(model_path)
    explicit_stream = stream is True
    tokenizer = checkpoint_tokenizer(model_path, note="; an emulator bundle ships it")
    if dtype == "auto":
        declared = getattr(AutoConfig.from_pretrained(model_path, local_files_only=True), "dtype", None)
        dtype = declared if isinstance(declared, torch.dtype) and declared in (torch.float32, torch.bfloat16, torch.float16) else torch.float32
    base_name = base_name or portable_name(model_path)
    config = config or spec.config_class()
    if stream is None:  # LayerDrop only selects tensors, GradOT computes on the blocks it keeps: neither needs the whole model
        stream = method in STREAMED_METHODS
    if stream:
        if method not in STREAMED_METHODS:
            raise ConfigError(f"method {method!r} needs the whole model; only {sorted(STREAMED_METHODS)} compress without loading it")
        stored = open_stored(model_path, dtype, required=explicit_stream)
        if stored is not None:
            with stored:
                if method == "layerdrop":
                    return stream_layerdrop(stored, tokenizer, out_dir, config, base_name, overwrite, sign_key, max_shard_bytes)
                # The kept blocks only, tensor by tensor, and the fingerprint, from one streamed read of the checkpoint.
                block_map = config.block_map(stored.layout.num_blocks)  # a bad parameter fails here, before any weight
                reduced, fingerprint = stored.load_blocks(block_map, with_fingerprint=True)
                emulator = spec.build(stored.model, stored.layout, config, tokenizer=tokenizer, reduced=reduced)
                return save_emulator(emulator, tokenizer, out_dir, fingerprint, base_name, overwrite=overwrite, sign_key=sign_key)
    model, tokenizer = load_checkpoint(model_path, dtype)
    emulator = build_emulator(model, method, config, tokenizer=tokenizer)
    return save_emulator(emulator, tokenizer, out_dir, model_fingerprint(model), base_name, overwrite=overwrite, sign_key=sign_key)


def stream_layerdrop(stored: StoredCheckpoint, tokenizer, out_dir: Path, config, base_name: str, overwrite: bool, sign_key,
                     max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    """LayerDrop without the model in memory: one pass over the checkpoint's tensors in sorted order hashes
    all of them (the base fingerprint) and copies the kept ones, renumbered, into new shards. The result
    equals `build_emulator(model, "layerdrop", config)` saved, tensor for tensor."""
    layout = stored.layout
    adapter = config.adapter_blocks(layout.num_blocks)
    block_map = config.block_map(layout.num_blocks)
    reduced = reduced_config(stored.config, block_map)
    new_index = {orig: new for new, orig in enumerate(block_map)}
    file_layout = file_block_prefix(stored)

    def output_name(name: str) -> str | None:
        file_key = stored.source[name]
        parsed = file_layout.parse_block_key(file_key)
        if parsed is None:
            return file_key
        return file_layout.block_key(new_index[parsed[0]], parsed[1]) if parsed[0] in new_index else None

    written = {name: output_name(name) for name in stored.primary_names()}
    plan = [(out, stored.dtype_of(name), tuple(stored.state[name].shape)) for name, out in written.items() if out is not None]
    manifest = emulator_manifest(layout, stored.dtype, "layerdrop", dataclasses.asdict(config), block_map, adapter, "", base_name)

    def write(tmp: Path) -> None:
        with ShardedWriter(tmp, plan, max_shard_bytes) as writer:  # a failure closes its open shard
            names = sorted(stored.source)
            with stored.read_ahead(names) as reader:  # it hashes every tensor (the base fingerprint) as it reads
                for name in tqdm(names, desc="layerdrop (streamed)", unit="tensor", disable=bars_disabled()):
                    out = written.get(name)
                    for chunk in reader.chunks(name):
                        if out is not None:
                            writer.write(out, chunk)
                fingerprint = reader.fingerprint()
            hashed = writer.close()
        manifest["base"]["fingerprint"] = fingerprint  # known only now; the manifest is written after this
        stored.save_configs(tmp, reduced)
        (tmp / "README.md").write_text(model_card("emulator", manifest))
        tokenizer.save_pretrained(tmp)
        return hashed

    return write_bundle(out_dir, "emulator", manifest, write, overwrite=overwrite, sign_key=sign_key)


def file_block_prefix(stored: StoredCheckpoint) -> BlockLayout:
    """The layout as the checkpoint's file names spell it: the blocks' path with or without the base model
    prefix (a GPT-2 or OPT checkpoint from the hub stores `h.0...` where the model has `transformer.h.0...`)."""
    blocks = stored.layout.blocks
    prefix = stored.model.base_model_prefix
    for candidate in (blocks, blocks.removeprefix(prefix + ".") if prefix else blocks):
        if any(key.startswith(candidate + ".") for key in stored.entries):
            return dataclasses.replace(stored.layout, blocks=candidate)
    raise UnsupportedModelError(f"{stored.layout.model_type}: the checkpoint stores no tensors under {blocks}")


