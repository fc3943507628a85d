"""The two sides of a federation, with no torch and no Flower: what `offsite federate server|client`
build their flags from, and what the Flower apps read back from the settings file each side writes."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import ClassVar
from pathlib import Path

from ..configs import MAX_NORM_RATIO
from ..errors import ConfigError

DEFAULT_PORT = 9092


def _check_tls(insecure: bool, certificates: list[str | None], side: str) -> None:
    given = [c for c in certificates if c]
    if insecure and given:
        raise ConfigError(f"the {side} got --insecure and TLS certificate files; choose one")
    if not insecure and not given:
        raise ConfigError(f"the {side} needs TLS certificate files (see --help) or --insecure for a trusted network "
                          "(adapters would travel unencrypted)")


@dataclass
class ServerConfig:
    """The model owner's side: one emulator issued to every data owner, `rounds` rounds of FedAvg.

    The training recipe (offsite.configs.FinetuneConfig; `max_steps` = local steps per round) is the
    federation's, sent to every client each round, so all updates of a round are alike."""

    REQUIRED: ClassVar[tuple] = ("emulator", "out")

    emulator: str = ""  # the emulator bundle issued to the data owners (its manifest is the owner's record)
    out: str = ""  # federation directory: round-NNNN/ (aggregated adapter, round.json, updates/), flower/
    rounds: int = 3
    min_clients: int = 2  # a round starts once this many data owners are connected
    wait_s: float = 600.0  # how long to wait for them before giving up
    round_timeout_s: float = 3600.0  # a client that has not replied by then is dropped from the round
    host: str = "127.0.0.1"  # 0.0.0.0 to accept data owners on other machines
    port: int = DEFAULT_PORT
    insecure: bool = False  # plain HTTP (a trusted network or loopback only)
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    ssl_ca_certfile: str | None = None
    max_norm_ratio: float = MAX_NORM_RATIO  # the plug-in's norm bound on each update; 0 disables
    model: str | None = None  # the full model: with eval_tasks, the plug-in is evaluated after each round
    eval_tasks: str = ""  # comma-separated built-in tasks or MC JSONL files (held-out docs)
    eval_limit: int | None = 200

    def __post_init__(self):
        if self.rounds < 1 or self.min_clients < 1:
            raise ConfigError(f"rounds and min_clients must be at least 1, got {self.rounds} and {self.min_clients}")
        if self.wait_s <= 0 or self.round_timeout_s <= 0:
            raise ConfigError("wait_s and round_timeout_s must be positive")
        if not 0 < self.port < 65536:
            raise ConfigError(f"port must be in 1..65535, got {self.port}")
        if self.eval_tasks and not self.model:
            raise ConfigError("eval_tasks needs --model (the full model the adapter is plugged into)")

    def check_launch(self) -> None:
        for name in ("emulator", "out"):
            if not getattr(self, name):
                raise ConfigError(f"missing required option --{name}")
        _check_tls(self.insecure, [self.ssl_certfile, self.ssl_keyfile, self.ssl_ca_certfile], "server")
        if not self.insecure and not (self.ssl_certfile and self.ssl_keyfile and self.ssl_ca_certfile):
            raise ConfigError("TLS needs all of --ssl-certfile, --ssl-keyfile and --ssl-ca-certfile")


@dataclass
class ClientConfig:
    """A data owner's side: its private data and the emulator bundle it was issued; its SuperNode
    trains the federation's recipe on them each round and returns only the adapter."""

    REQUIRED: ClassVar[tuple] = ("bundle", "work")

    superlink: str = f"127.0.0.1:{DEFAULT_PORT}"  # the owner's server, host:port
    bundle: str = ""  # the emulator bundle (as downloaded from the owner)
    data: str | None = None  # JSONL of {context, continuation} (or {text}) records
    task: str | None = None  # or a built-in task's train split
    limit: int | None = None  # use at most this many examples
    work: str = ""  # this client's directory: round-NNNN/ (the start adapter, the run), flower/
    insecure: bool = False
    root_certificates: str | None = None  # the CA that signed the server's certificate
    trusted_key: str | None = None  # the owner's public key: the emulator bundle must be signed with it
    sign_key: str | None = None  # this data owner's private key: sign every update
    trusted_entities: str | None = None  # Flower's YAML of public keys whose signed apps this SuperNode runs
    max_norm_ratio: float = MAX_NORM_RATIO  # the bound the round's starting adapter is checked against
    runtime_port: int = 0  # the SuperNode's local runtime API (0: any free port)

    def __post_init__(self):
        if self.data and self.task:
            raise ConfigError("give one of data (a JSONL file) or task (a built-in task), not both")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"limit must be at least 1, got {self.limit}")

    def check_launch(self) -> None:
        for name in ("bundle", "work"):
            if not getattr(self, name):
                raise ConfigError(f"missing required option --{name}")
        if not (self.data or self.task):
            raise ConfigError("give one of --data FILE.jsonl or --task NAME")
        host, _, port = self.superlink.rpartition(":")
        if not host or not port.isdigit():
            raise ConfigError(f"superlink must be host:port, got {self.superlink!r}")
        _check_tls(self.insecure, [self.root_certificates], "client")


def write_settings(config, path: Path, **extra) -> Path:
    """The settings a side's Flower app reads (its paths made absolute): Flower passes only the file's path."""
    values = dataclasses.asdict(config)
    for name in ("emulator", "out", "bundle", "work", "data", "trusted_key", "sign_key", "model"):
        if values.get(name):
            values[name] = str(Path(values[name]).resolve())
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**values, **extra}, indent=2) + "\n")
    return path


def read_settings(cls, path: str | Path) -> tuple[object, dict]:
    """(the config, the extra values) from a settings file `write_settings` wrote."""
    from ..options import build_dataclass

    try:
        values = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read the federation settings {path}: {e}") from None
    names = {f.name for f in dataclasses.fields(cls)}
    return build_dataclass(cls, {k: v for k, v in values.items() if k in names}), {k: v for k, v in values.items() if k not in names}
