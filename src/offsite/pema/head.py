"""The head bundle: the only weights a PEMA model owner shares, its final norm and LM head.

The data owner needs them to turn a representation f(c) (the hidden state entering the final
norm) into next-token logits, both for the PEMA adapter's own prediction head(h_pd) and for the
model's distribution P_LM = softmax(head(f)). `Head` rebuilds exactly what the model computes:
logits = lm_head(norm(f)) (plus the bias and final-logit soft-capping when the family has them),
bit for bit, which `export_head` checks on a probe before anything is written.

The norm is declared as data, never as code: `layernorm` (weight, bias, eps), `rmsnorm`
(weight, eps, `offset` 0 for Llama-style `w * x̂`, 1 for Gemma-style `(1 + w) * x̂`) or `none`.
Which one a model uses is decided by probing its norm module, not by its class name.

With tied embeddings the LM head matrix *is* the input embedding matrix: sharing the head
shares the token embeddings too (the bundle records `tied_embeddings` so this is visible).
The bundle also carries the tokenizer, which the data owner needs to encode its data and decode
generations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoTokenizer, PreTrainedModel

from ..bundle import DTYPES, bundle_fingerprint, model_fingerprint, parse_dtype, read_json_member, read_manifest, safetensors_header, write_bundle
from ..errors import BundleError, ConfigError, UnsupportedModelError
from ..surgery import discover_layout

KIND = "pema-head"
WEIGHTS = "head.safetensors"
NORM_TYPES = ("layernorm", "rmsnorm", "none")
# safetensors dtype name -> our dtype name
_ST_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}


class Norm(nn.Module):
    """The final norm of a causal LM, rebuilt from its declaration (same arithmetic as the
    transformers implementations, so outputs match bit for bit)."""

    def __init__(self, spec: dict, hidden_size: int, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.type, self.eps, self.offset = spec["type"], spec.get("eps", 0.0), spec.get("offset", 0)
        if self.type == "none":
            return
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype), requires_grad=False)
        if self.type == "layernorm" and spec.get("bias", True):
            self.bias = nn.Parameter(torch.zeros(hidden_size, dtype=dtype), requires_grad=False)
        else:
            self.bias = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.type == "none":
            return x
        if self.type == "layernorm":
            return F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)
        normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        if self.offset:  # Gemma: (1 + w) in float32, then back to the input dtype
            return (normed * (1.0 + self.weight.float())).type_as(x)
        return self.weight * normed.to(x.dtype)  # Llama, Qwen2, Mistral


class Head(nn.Module):
    """logits = lm_head(norm(f)), optionally soft-capped: what the model computes after its last block."""

    def __init__(self, spec: dict, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.hidden_size, self.vocab_size = spec["hidden_size"], spec["vocab_size"]
        self.norm = Norm(spec["norm"], self.hidden_size, dtype)
        self.lm_head = nn.Linear(self.hidden_size, self.vocab_size, bias=spec["bias"], dtype=dtype)
        self.lm_head.requires_grad_(False)
        self.softcap = spec.get("logit_softcap")

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(self.norm(f.to(self.lm_head.weight.dtype)))
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


# ---------------------------------------------------------------- owner: describe and export
def representation_module(model: PreTrainedModel) -> nn.Module:
    """The module whose input is f(c): the final norm, or the LM head when there is none."""
    layout = discover_layout(model)
    return model.get_submodule(layout.norm) if layout.norm else model.get_output_embeddings()


def _norm_spec(norm: nn.Module | None, hidden_size: int) -> dict:
    if norm is None:
        return {"type": "none"}
    if isinstance(norm, nn.LayerNorm):
        if norm.normalized_shape != (hidden_size,) or not norm.elementwise_affine:
            raise UnsupportedModelError(f"final norm {type(norm).__name__} is not an affine LayerNorm over the hidden size")
        return {"type": "layernorm", "eps": float(norm.eps), "bias": norm.bias is not None}
    weight = getattr(norm, "weight", None)
    eps = getattr(norm, "eps", getattr(norm, "variance_epsilon", None))
    if not isinstance(weight, torch.Tensor) or tuple(weight.shape) != (hidden_size,) or not isinstance(eps, float):
        raise UnsupportedModelError(f"final norm {type(norm).__name__} is neither a LayerNorm nor an RMSNorm offsite can rebuild")
    probe = torch.randn(3, hidden_size, generator=torch.Generator().manual_seed(0)).to(weight.device, weight.dtype)
    with torch.no_grad():
        expected = norm(probe)
        for offset in (0, 1):
            spec = {"type": "rmsnorm", "eps": eps, "offset": offset}
            candidate = Norm(spec, hidden_size, weight.dtype).to(weight.device)
            candidate.weight.copy_(weight)
            if torch.equal(candidate(probe), expected):
                return spec
    raise UnsupportedModelError(f"final norm {type(norm).__name__} computes neither w*x̂ nor (1+w)*x̂ of an RMSNorm")


def head_state(model: PreTrainedModel) -> tuple[dict, dict[str, torch.Tensor]]:
    """(spec, tensors) of the model's final norm + LM head, checked to reproduce its logits exactly."""
    layout = discover_layout(model)
    lm_head = model.get_output_embeddings()
    if not isinstance(lm_head, nn.Linear):
        raise UnsupportedModelError(f"{layout.model_type}: the LM head is a {type(lm_head).__name__}, not a linear layer")
    norm = model.get_submodule(layout.norm) if layout.norm else None
    hidden_size, vocab_size = lm_head.in_features, lm_head.out_features
    spec = {
        "hidden_size": hidden_size,
        "vocab_size": vocab_size,
        "dtype": str(lm_head.weight.dtype).removeprefix("torch."),
        "bias": lm_head.bias is not None,
        "norm": _norm_spec(norm, hidden_size),
        "logit_softcap": getattr(model.config, "final_logit_softcapping", None) or None,
        "tied_embeddings": lm_head.weight is model.get_input_embeddings().weight,
    }
    tensors = {"lm_head.weight": lm_head.weight}
    if lm_head.bias is not None:
        tensors["lm_head.bias"] = lm_head.bias
    if norm is not None:
        tensors["norm.weight"] = norm.weight
        if getattr(norm, "bias", None) is not None:
            tensors["norm.bias"] = norm.bias
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
    _check_reproduces_logits(model, spec, tensors)
    return spec, tensors


@torch.no_grad()
def _check_reproduces_logits(model: PreTrainedModel, spec: dict, tensors: dict[str, torch.Tensor]) -> None:
    head = build_head(spec, tensors)
    device = next(model.parameters()).device
    ids = torch.arange(3, 3 + 6, device=device).remainder(spec["vocab_size"]).unsqueeze(0)
    captured = {}
    hook = representation_module(model).register_forward_pre_hook(lambda m, args: captured.setdefault("f", args[0]))
    try:
        logits = model(input_ids=ids, use_cache=False).logits
    finally:
        hook.remove()
    if not torch.equal(head.to(device)(captured["f"]), logits):
        raise UnsupportedModelError(
            f"{model.config.model_type}: the model's logits are not lm_head(norm(f)); its head cannot be shared as a PEMA head bundle"
        )


def build_head(spec: dict, tensors: dict[str, torch.Tensor]) -> Head:
    head = Head(spec, parse_dtype(spec["dtype"]))
    head.load_state_dict(tensors, strict=True)
    head.eval()
    return head


def export_head(
    model: PreTrainedModel,
    tokenizer,
    out_dir: str | Path,
    base_name: str = "",
    base_fingerprint: str | None = None,
    overwrite: bool = False,
    sign_key=None,
) -> Path:
    """Owner: write the head bundle (final norm + LM head + tokenizer + manifest), signed with `sign_key` when given."""
    spec, tensors = head_state(model)
    manifest = {
        "base": {
            "fingerprint": base_fingerprint or model_fingerprint(model),
            "name": base_name,
            "model_type": model.config.model_type,
            "num_blocks": discover_layout(model).num_blocks,
            "dtype": spec["dtype"],
        },
        "head": spec,
    }

    def write(tmp: Path) -> None:
        save_file(tensors, tmp / WEIGHTS, metadata={"format": "pt"})
        tokenizer.save_pretrained(tmp)

    return write_bundle(out_dir, KIND, manifest, write, overwrite=overwrite, sign_key=sign_key)


def export_head_checkpoint(model_path, out_dir, overwrite: bool = False, sign_key=None, base_name: str = "") -> Path:
    """Owner recipe: load a checkpoint and export its head bundle."""
    from ..emulator import load_checkpoint
    from ..signing import load_private_key

    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise BundleError(f"output already exists, not overwriting: {out_dir}")
    sign_key = load_private_key(sign_key) if sign_key is not None else None  # fail before loading the model
    model, tokenizer = load_checkpoint(model_path)
    return export_head(model, tokenizer, out_dir, base_name or str(model_path), overwrite=overwrite, sign_key=sign_key)


# ---------------------------------------------------------------- data owner: load
@dataclass
class LoadedHead:
    head: Head
    tokenizer: object
    manifest: dict

    @property
    def fingerprint(self) -> str:
        return bundle_fingerprint(self.manifest)

    @property
    def base_fingerprint(self) -> str:
        return self.manifest["base"]["fingerprint"]

    @property
    def hidden_size(self) -> int:
        return self.head.hidden_size

    def check_owner(self, info: dict) -> None:
        """The representation server answers for the model this head bundle came from."""
        if info.get("base_fingerprint") != self.base_fingerprint or info.get("hidden_size") != self.hidden_size:
            raise ConfigError(f"the representation server's model ({str(info.get('base_fingerprint'))[:16]}) is not the one "
                              f"the head bundle came from ({self.base_fingerprint[:16]})")


def _check_spec(spec: object, where: Path) -> dict:
    def positive_int(v):
        return type(v) is int and 0 < v <= 1 << 24

    def finite(v, low=0.0):
        return type(v) in (int, float) and math.isfinite(v) and v >= low

    norm = spec.get("norm") if isinstance(spec, dict) else None
    ok = (
        isinstance(spec, dict)
        and positive_int(spec.get("hidden_size"))
        and positive_int(spec.get("vocab_size"))
        and spec.get("dtype") in DTYPES
        and isinstance(spec.get("bias"), bool)
        and isinstance(spec.get("tied_embeddings", False), bool)
        and (spec.get("logit_softcap") is None or (finite(spec["logit_softcap"]) and spec["logit_softcap"] > 0))
        and isinstance(norm, dict)
        and norm.get("type") in NORM_TYPES
        and (norm["type"] == "none" or finite(norm.get("eps")))
        and (norm["type"] != "rmsnorm" or norm.get("offset") in (0, 1))
        and (norm["type"] != "layernorm" or isinstance(norm.get("bias", True), bool))
    )
    if not ok:
        raise BundleError(f"head bundle manifest has a malformed 'head' section: {where}")
    return spec


def expected_tensors(spec: dict) -> dict[str, tuple[int, ...]]:
    d, v = spec["hidden_size"], spec["vocab_size"]
    shapes = {"lm_head.weight": (v, d)}
    if spec["bias"]:
        shapes["lm_head.bias"] = (v,)
    if spec["norm"]["type"] != "none":
        shapes["norm.weight"] = (d,)
        if spec["norm"]["type"] == "layernorm" and spec["norm"].get("bias", True):
            shapes["norm.bias"] = (d,)
    return shapes


def read_tensors(bundle_dir: Path, name: str, shapes: dict[str, tuple[int, ...]], dtype: str) -> dict[str, torch.Tensor]:
    """Exactly the tensors `shapes` names, of dtype `dtype`, finite; header checked before reading."""
    header = safetensors_header(bundle_dir / name)
    found = {k: tuple(s) for k, (_, s) in header.items()}
    if found != shapes:
        missing, extra = sorted(set(shapes) - set(found)), sorted(set(found) - set(shapes))
        wrong = sorted(k for k in set(shapes) & set(found) if shapes[k] != found[k])
        raise BundleError(f"{name} does not hold the expected tensors (missing {missing[:3]}, unexpected {extra[:3]}, wrong shape {wrong[:3]}): {bundle_dir}")
    bad = sorted(k for k, (st, _) in header.items() if _ST_DTYPES.get(st) != dtype)
    if bad:
        raise BundleError(f"{name}: tensor {bad[0]!r} is not {dtype} as the manifest declares: {bundle_dir}")
    try:
        tensors = load_file(bundle_dir / name)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise BundleError(f"{name} is not a readable safetensors file ({str(e)[:200]}): {bundle_dir}") from None
    for key, value in tensors.items():
        if not torch.isfinite(value).all():
            raise BundleError(f"{name}: tensor {key!r} holds NaN or infinite values: {bundle_dir}")
    return tensors


def load_head(bundle_dir: str | Path, trusted_key=None) -> LoadedHead:
    """Data owner: verify a head bundle (signature too, when a trusted key is configured) and
    rebuild its `Head` and tokenizer. Only safetensors and JSON are read; nothing is executed."""
    from ..emulator import FORBIDDEN_CONFIG_KEYS, _forbidden_keys

    bundle_dir = Path(bundle_dir)
    manifest = read_manifest(bundle_dir, kind=KIND, trusted_key=trusted_key)
    base = manifest.get("base")
    if not isinstance(base, dict) or not isinstance(base.get("fingerprint"), str):
        raise BundleError(f"head bundle manifest has a malformed 'base' section: {bundle_dir}")
    spec = _check_spec(manifest.get("head"), bundle_dir)
    if WEIGHTS not in manifest["files"]:
        raise BundleError(f"head bundle lacks {WEIGHTS}: {bundle_dir}")
    tensors = read_tensors(bundle_dir, WEIGHTS, expected_tensors(spec), spec["dtype"])
    for name in manifest["files"]:
        if name.endswith(".json") and "/" not in name:
            bad = _forbidden_keys(read_json_member(bundle_dir / name, name), set())
            if bad:
                raise BundleError(f"head bundle file {name} sets {sorted(bad & FORBIDDEN_CONFIG_KEYS)}, which a tokenizer never needs: {bundle_dir}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(bundle_dir, local_files_only=True, trust_remote_code=False)
    except Exception as e:  # noqa: BLE001 - whatever transformers makes of hostile input becomes one line
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise BundleError(f"head bundle tokenizer cannot be loaded ({type(e).__name__}: {first}): {bundle_dir}") from None
    return LoadedHead(build_head(spec, tensors), tokenizer, manifest)
