"""One federated round on the owner's side: check each client's adapter, FedAvg the good ones, save.

Every update passes the checks a plug-in applies (`offsite.plugin`): it must come from the emulator
the owner issued and cover exactly its trainable blocks, with the allowed keys, shapes and dtypes,
finite values and norms within the bound. A client that fails any of them, or whose adapter is of
another kind or LoRA shape than the round's first accepted one, is dropped from the round with its
reason and the round goes on. The accepted adapters are averaged tensor by tensor, weighted by their
examples, in float64 (FedAvg; for LoRA the A and B factors are averaged separately, as FATE-LLM and
FederatedScope-LLM do). The result is applied to the emulator and saved with `save_adapter`, so the
aggregated adapter is an ordinary adapter bundle: plug-in, evaluation and the next round take it as is.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from ..adapter import AdapterBundle, load_adapter, save_adapter
from ..durable import write_synced
from ..emulator import LoadedEmulator, load_emulator
from ..errors import OffsiteError
from ..plugin import MAX_NORM_RATIO, check_full_blocks, check_issued, check_lora, full_block_parameters

log = logging.getLogger(__name__)
ROUND_FILE = "round.json"
EVAL_FILE = "eval.json"  # the owner's plug-in scores of the round, beside round.json


class FederationError(OffsiteError):
    """A round cannot be aggregated (no update passed the checks)."""


@dataclass
class Update:
    """One data owner's contribution to a round: its adapter bundle and how many examples it trained on."""

    client: str
    adapter: str | Path | AdapterBundle
    examples: int


@dataclass
class RoundResult:
    round: int
    accepted: dict[str, int] = field(default_factory=dict)  # client -> examples
    dropped: dict[str, str] = field(default_factory=dict)  # client -> why
    adapter: Path | None = None
    info: dict = field(default_factory=dict)  # what the transport measured (seconds, bytes)

    @property
    def examples(self) -> int:
        return sum(self.accepted.values())


def check_update(emulator: LoadedEmulator, bundle: AdapterBundle, max_norm_ratio: float | None = MAX_NORM_RATIO) -> AdapterBundle:
    """The plug-in's checks against the issued emulator; returns the bundle keyed for the emulator's blocks."""
    check_issued(bundle, emulator.manifest)
    index_of = {orig: i for i, orig in enumerate(emulator.block_map)}
    local = bundle.renumbered(emulator.layout, index_of)
    model, layout = emulator.model, emulator.layout
    if local.lora is None:
        expected = full_block_parameters(model, layout, local)
        check_full_blocks(local, expected, expected.__getitem__, max_norm_ratio)
    else:
        check_lora(model, layout, local, lambda target: model.get_submodule(target).weight, max_norm_ratio)
    return local


def _signature(bundle: AdapterBundle) -> tuple:
    """What must agree between the updates of one round to be averaged."""
    lora = None if bundle.lora is None else (bundle.lora.r, bundle.lora.lora_alpha, tuple(sorted(bundle.lora.target_modules)),
                                             bundle.lora.fan_in_fan_out, bundle.lora.bias)
    return (bundle.manifest["adapter"]["type"], lora, tuple(sorted((k, tuple(v.shape)) for k, v in bundle.tensors.items())))


def fedavg(emulator: LoadedEmulator, updates: list[Update], max_norm_ratio: float | None = MAX_NORM_RATIO,
           trusted_key=None) -> tuple[dict[str, torch.Tensor], AdapterBundle, dict[str, int], dict[str, str]]:
    """(averaged tensors keyed for the emulator, the first accepted bundle as template, accepted, dropped)."""
    accepted: dict[str, int] = {}
    dropped: dict[str, str] = {}
    sums: dict[str, torch.Tensor] = {}
    template: AdapterBundle | None = None
    signature = None
    for update in updates:
        name = update.client
        if name in accepted or name in dropped:
            dropped[f"{name} (again)"] = "a second update from the same client in one round"
            continue
        try:
            if not isinstance(update.examples, int) or update.examples < 1:
                raise FederationError(f"reports {update.examples!r} training examples; a positive count is needed to weigh it")
            bundle = update.adapter if isinstance(update.adapter, AdapterBundle) else load_adapter(update.adapter, trusted_key)
            local = check_update(emulator, bundle, max_norm_ratio)
            if signature is None:
                signature = _signature(local)
            elif _signature(local) != signature:
                raise FederationError("its adapter has another kind, LoRA shape or set of tensors than the round's first accepted one")
        except OffsiteError as e:
            dropped[name] = str(e)
            log.warning("round: client %s dropped: %s", name, e)
            continue
        template = template or local
        for key, value in local.tensors.items():
            weighted = value.double() * update.examples
            sums[key] = sums[key] + weighted if key in sums else weighted
        accepted[name] = update.examples
    if not accepted:
        raise FederationError(f"no client update passed the checks this round ({len(dropped)} dropped: "
                              + "; ".join(f"{c}: {why}" for c, why in list(dropped.items())[:3]) + ")")
    total = sum(accepted.values())
    averaged = {key: (value / total).to(template.tensors[key].dtype) for key, value in sums.items()}
    return averaged, template, accepted, dropped


def aggregate_round(emulator_dir: str | Path, updates: list[Update], out_dir: str | Path, round_number: int,
                    max_norm_ratio: float | None = MAX_NORM_RATIO, trusted_key=None, emulator_key=None,
                    dropped: dict[str, str] | None = None, info: dict | None = None) -> RoundResult:
    """Round `round_number`: FedAvg of the updates that pass the checks, written as `out_dir/round-NNNN/adapter`
    (an adapter bundle) beside `round.json` (who was accepted with how many examples, who was dropped and why).
    `dropped`: clients the transport already dropped (no reply, an error), kept in the record with their reason.
    A round already on disk is returned as it is: a restarted owner resumes after its last finished round."""
    round_dir = Path(out_dir) / f"round-{round_number:04d}"
    done = load_round(round_dir)
    if done is not None:
        return done
    emulator = load_emulator(emulator_dir, dtype=torch.float32, trusted_key=emulator_key)
    earlier = dict(dropped or {})
    try:
        averaged, template, accepted, dropped = fedavg(emulator, updates, max_norm_ratio, trusted_key)
    except FederationError as e:
        if earlier:
            raise FederationError(f"{e}; before the checks: " + "; ".join(f"{c}: {why}" for c, why in list(earlier.items())[:3])) from None
        raise
    dropped = {**earlier, **dropped}
    model, lora = _apply(emulator, averaged, template)
    training = {"federated": {"round": round_number, "clients": accepted, "examples": sum(accepted.values()),
                              "dropped": sorted(dropped), "aggregation": "fedavg (example-weighted)"}}
    adapter = save_adapter(model, emulator, round_dir / "adapter", training, lora=lora, overwrite=(round_dir / "adapter").exists())
    result = RoundResult(round_number, accepted, dropped, adapter, dict(info or {}))
    write_synced(round_dir / ROUND_FILE, (json.dumps({**asdict(result), "adapter": str(adapter)}, indent=2) + "\n").encode())
    return result


def _set_blocks(emulator: LoadedEmulator, bundle: AdapterBundle, tensors) -> None:
    """Copy full-block adapter `tensors` (keyed for the emulator, already checked) into its blocks."""
    params = full_block_parameters(emulator.model, emulator.layout, bundle)
    with torch.no_grad():
        for key, value in tensors.items():
            params[key].copy_(value)


def _apply(emulator: LoadedEmulator, averaged: dict[str, torch.Tensor], template: AdapterBundle):
    """The emulator carrying the averaged adapter, and the full model's LoRA settings (None for full blocks)."""
    model = emulator.model
    if template.lora is None:
        _set_blocks(emulator, template, averaged)
        return model, None
    from peft import get_peft_model, set_peft_model_state_dict

    peft_model = get_peft_model(model, template.lora.to_peft())
    set_peft_model_state_dict(peft_model, averaged)
    layout, block_map = emulator.layout, emulator.block_map
    full_targets = [layout.block_key(block_map[idx], rest) for idx, rest in (layout.parse_block_key(t) for t in template.lora.target_modules)]
    return peft_model, replace(template.lora, target_modules=full_targets)


def start_from(adapter: str | Path, max_norm_ratio: float | None = MAX_NORM_RATIO, trusted_key=None):
    """`finetune(..., start=start_from(previous_round_adapter))`: a data owner's next round begins at the
    aggregate, checked as the owner checks every update (it must come from the same emulator)."""

    def start(emulator: LoadedEmulator, config):
        bundle = load_adapter(adapter, trusted_key)
        local = check_update(emulator, bundle, max_norm_ratio)
        if (local.lora is not None) != bool(config.lora):
            raise FederationError(f"the round's adapter is {'LoRA' if local.lora else 'full blocks'}; this run trains "
                                  f"{'LoRA' if config.lora else 'full blocks'}")
        if local.lora is None:
            _set_blocks(emulator, local, local.tensors)
            return None
        return dict(local.tensors)

    return start


def load_round(round_dir: str | Path) -> RoundResult | None:
    """A finished round from disk, or None."""
    path = Path(round_dir) / ROUND_FILE
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    return RoundResult(data["round"], data["accepted"], data["dropped"], Path(data["adapter"]), data.get("info", {}))


def latest_round(out_dir: str | Path) -> RoundResult | None:
    """The last finished round under `out_dir` (where a restarted federation continues), or None."""
    rounds = sorted(Path(out_dir).glob("round-*/" + ROUND_FILE)) if Path(out_dir).exists() else []
    return load_round(rounds[-1].parent) if rounds else None


__all__ = ["FederationError", "RoundResult", "Update", "aggregate_round", "check_update", "fedavg",
           "latest_round", "load_round", "start_from"]
