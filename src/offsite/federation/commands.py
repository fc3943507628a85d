"""`offsite federate server` (the model owner) and `offsite federate client` (each data owner).

Both need the `federate` extra (Flower). Their flags come from torch-free config dataclasses
(federation.configs; the server's training recipe from offsite.configs.FinetuneConfig), so `-h`
never imports torch or Flower.
"""

from __future__ import annotations

import argparse
import dataclasses

from ..configs import FinetuneConfig
from ..errors import ConfigError
from ..options import _reject_leftovers, add_dataclass_flags, build_dataclass, split_for, take, terminal_safe
from .configs import ClientConfig, ServerConfig

FEDERATE_INSTALL = "pip install 'offsite[federate]'"


def add_federate_actions(parser: argparse.ArgumentParser) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", help="YAML file with option values (flags given here override it)")
    sides = parser.add_subparsers(dest="side", required=True)
    p = sides.add_parser("server", parents=[common],
                         help="Owner: run the federation (Flower SuperLink + ServerApp) over an issued emulator.",
                         description="Owner: run R rounds of FedAvg over the adapters the data owners train on the emulator "
                                     "you issued. The training flags (--max-steps = local steps per round, --lr, --lora, ...) "
                                     "are the federation's recipe, sent to every client. Rerun to continue after the last "
                                     "finished round.")
    add_dataclass_flags(p, ServerConfig)
    add_dataclass_flags(p, FinetuneConfig)
    p = sides.add_parser("client", parents=[common],
                         help="Data owner: join a federation (Flower SuperNode + ClientApp) with your private data.",
                         description="Data owner: connect to the owner's SuperLink and train each round it sends on your "
                                     "data, from the round's aggregated adapter; only the adapter leaves. Ctrl-C to leave.")
    add_dataclass_flags(p, ClientConfig)
    p = sides.add_parser("status", parents=[common], help="Owner: the rounds done so far (accepted, dropped and why, bytes, scores).",
                         description="Owner: print every finished round of a federation directory from its round.json files.")
    p.add_argument("--out", default=argparse.SUPPRESS, help="(required) the federation directory (the server's --out)")


def round_lines(out) -> list[str]:
    """One line per finished round, then one per dropped client with its reason."""
    import json
    from pathlib import Path

    from .aggregate import EVAL_FILE, ROUND_FILE, load_round

    lines = []
    for path in sorted(Path(out).glob(f"round-*/{ROUND_FILE}")):
        result = load_round(path.parent)
        info = result.info
        scores = path.parent / EVAL_FILE
        scores = json.loads(scores.read_text()) if scores.exists() else {}
        line = (f"round {result.round}: {len(result.accepted)} accepted ({result.examples} examples), {len(result.dropped)} dropped"
                + (f", {info['seconds']:.0f} s, {info['bytes_received'] / 1e6:.1f} MB received" if "seconds" in info else "")
                + "".join(f", plug-in {task} acc {100 * s['acc']:.1f}" for task, s in scores.items()))
        lines.append(line)
        lines += [f"  dropped {client}: {why}" for client, why in result.dropped.items()]
    return lines


def cmd_federate(opts: dict) -> None:
    side = opts.pop("side")
    if side == "status":
        out = take(opts, "out")
        _reject_leftovers(opts)
        lines = round_lines(out)
        if not lines:
            raise ConfigError(f"no finished round under {out}")
        print("\n".join(terminal_safe(line) for line in lines))
        return
    try:
        from . import launch
    except ImportError as e:
        raise ConfigError(f"offsite federate needs the federate extra ({e.name} is missing): {FEDERATE_INSTALL}") from None
    if side == "server":
        config = build_dataclass(ServerConfig, split_for(ServerConfig, opts))
        recipe = build_dataclass(FinetuneConfig, split_for(FinetuneConfig, opts))
        _reject_leftovers(opts)
        adapter = launch.serve(config, dataclasses.asdict(recipe))
        print(f"federated adapter: {adapter}  (plug it in: offsite plugin --adapter {adapter} --emulator {config.emulator} ...)")
    else:
        config = build_dataclass(ClientConfig, split_for(ClientConfig, opts))
        _reject_leftovers(opts)
        launch.join(config)
