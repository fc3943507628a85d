"""Starting Flower for `offsite federate`: the owner's SuperLink and run, a data owner's SuperNode.

The owner's side writes a Flower app folder (a pyproject.toml naming this package's ServerApp and
ClientApp, no code of its own) and a Flower config naming its SuperLink, starts `flower-superlink`,
submits the app with `flwr run` and streams the run's output until the last round is done. A data
owner's side starts `flower-supernode` towards the owner's SuperLink; the SuperNode runs the ClientApp
for every round it is sent until it is stopped. Everything Flower keeps lives under the side's folder
(FLWR_HOME = <folder>/flower), so two federations on one machine never share state.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from ..errors import ConfigError
from .aggregate import FederationError, latest_round
from .configs import ClientConfig, ServerConfig, write_settings

APP_NAME = "offsite-federation"
SERVER_APP = "offsite.federation.apps:server_app"
CLIENT_APP = "offsite.federation.apps:client_app"
CONNECTION = "offsite"  # the SuperLink connection's name in the owner's Flower config


def _bin(name: str) -> str:
    """A Flower executable of this environment (Flower spawns more of them by name: PATH must hold them too)."""
    path = Path(sys.executable).parent / name
    if not path.exists():
        found = shutil.which(name)
        if not found:
            raise ConfigError(f"{name} is not installed; install the federation extra: pip install 'offsite[federate]'")
        return found
    return str(path)


def flower_env(home: Path) -> dict[str, str]:
    env = dict(os.environ, FLWR_HOME=str(home))
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    return env


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def local_address(host: str) -> str:
    """Where this machine reaches a server bound to `host` (a wildcard bind is reached on loopback)."""
    return "127.0.0.1" if host in ("", "0.0.0.0", "::") else host


def wait_for_port(host: str, port: int, process: subprocess.Popen, timeout_s: float, what: str, log: Path) -> None:
    deadline = time.monotonic() + timeout_s
    target = local_address(host)
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise FederationError(f"{what} exited at start (code {process.returncode}); see {log}")
        try:
            with socket.create_connection((target, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.2)
    raise FederationError(f"{what} did not listen on {target}:{port} within {timeout_s:g} s; see {log}")


def stop(process: subprocess.Popen | None, grace_s: float = 10.0) -> None:
    """Stop a Flower process and what it spawned (it leads its own process group)."""
    if process is None or process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    except ProcessLookupError:
        pass


def write_app(app_dir: Path, settings: Path, serverapp: str = SERVER_APP, clientapp: str = CLIENT_APP) -> Path:
    """The Flower app folder `flwr run` packs: it only names offsite's apps and the settings file."""
    app_dir.mkdir(parents=True, exist_ok=True)
    (app_dir / "pyproject.toml").write_text(f"""[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "{APP_NAME}"
version = "1.0.0"
description = "offsite-tuning: FedAvg of adapters trained on an emulator (written by offsite federate server)"
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "offsite"

[tool.flwr.app.components]
serverapp = "{serverapp}"
clientapp = "{clientapp}"

[tool.flwr.app.config]
settings = {json.dumps(str(settings.resolve()))}
""")
    return app_dir


def write_flower_config(home: Path, address: str, insecure: bool, root_certificates: str | None) -> None:
    home.mkdir(parents=True, exist_ok=True)
    tls = "insecure = true" if insecure else f"root-certificates = {json.dumps(str(Path(root_certificates).resolve()))}"
    (home / "config.toml").write_text(f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
                                      f'address = "{address}"\n{tls}\n')


def _tls_flags(config: ServerConfig) -> list[str]:
    if config.insecure:
        return ["--insecure"]
    return ["--ssl-certfile", config.ssl_certfile, "--ssl-keyfile", config.ssl_keyfile, "--ssl-ca-certfile", config.ssl_ca_certfile]


def check_server(config: ServerConfig) -> None:
    """Everything a federation needs that can be wrong, checked before any process starts."""
    from ..bundle import read_manifest

    config.check_launch()
    read_manifest(config.emulator, kind="emulator")
    if config.eval_tasks:
        from .apps import RoundEvaluator

        RoundEvaluator(config)  # the model resolves and every eval task's docs load


def serve(config: ServerConfig, recipe: dict, serverapp: str = SERVER_APP, clientapp: str = CLIENT_APP,
          app_files: tuple[Path, ...] = (), start_timeout_s: float = 60.0) -> Path:
    """The owner's federation, from the last finished round on disk to `config.rounds`: returns the
    final aggregated adapter. `serverapp`/`clientapp`: other Flower components, shipped in `app_files`
    (tests; a data owner's SuperNode runs what the app names, see --trusted-entities)."""
    check_server(config)
    out = Path(config.out)
    done = latest_round(out)
    if done is not None and done.round >= config.rounds:  # nothing left to run: no Flower process is started
        print(f"offsite federate: all {config.rounds} rounds are done: {done.adapter}", flush=True)
        return done.adapter
    home = out / "flower"
    settings = write_settings(config, out / "server.json", recipe=recipe)
    app = write_app(out / "app", settings, serverapp, clientapp)
    for extra in app_files:
        shutil.copy(extra, app / Path(extra).name)
    write_flower_config(home, f"{local_address(config.host)}:{config.port}", config.insecure, config.ssl_ca_certfile)
    env = flower_env(home)
    log = out / "superlink.log"
    superlink = None
    try:
        with log.open("a") as sink:
            superlink = subprocess.Popen([_bin("flower-superlink"), *_tls_flags(config), "--host", config.host, "--port", str(config.port),
                                          "--disable-runtime-dependency-installation",
                                          # on disk: the data owners' SuperNodes stay registered across an owner's restart
                                          "--database", str(home / "superlink.db")],
                                         env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
        wait_for_port(config.host, config.port, superlink, start_timeout_s, "the Flower SuperLink", log)
        print(f"offsite federate: SuperLink on {config.host}:{config.port}; data owners join with "
              f"offsite federate client --superlink <this host>:{config.port} ...", flush=True)
        run = subprocess.run([_bin("flwr"), "run", str(app), CONNECTION, "--stream"], env=env)
        if run.returncode != 0:
            raise FederationError(f"flwr run failed (code {run.returncode}); see {log}")
    finally:
        stop(superlink)
    last = latest_round(out)
    if last is None or last.round < config.rounds:
        raise FederationError(f"the federation stopped after round {last.round if last else 0} of {config.rounds}; "
                              f"see the output above and {log} (rerun the same command to continue)")
    return last.adapter


def check_client(config: ClientConfig) -> None:
    from ..bundle import read_manifest

    config.check_launch()
    read_manifest(config.bundle, kind="emulator", trusted_key=config.trusted_key)
    if config.data and not Path(config.data).is_file():
        raise ConfigError(f"no such data file: {config.data}")
    if config.task:
        from ..tasks import load_train_examples

        load_train_examples(config.task, limit=1)


def join(config: ClientConfig, wait: bool = True) -> subprocess.Popen:
    """A data owner's SuperNode, connected to the owner's SuperLink; with `wait`, runs until stopped."""
    check_client(config)
    work = Path(config.work)
    home = work / "flower"
    home.mkdir(parents=True, exist_ok=True)
    settings = write_settings(config, work / "client.json")
    port = config.runtime_port or free_port()
    tls = ["--insecure"] if config.insecure else ["--root-certificates", config.root_certificates]
    trusted = ["--trusted-entities", config.trusted_entities] if config.trusted_entities else []
    log = work / "supernode.log"
    with log.open("a") as sink:
        node = subprocess.Popen([_bin("flower-supernode"), *tls, "--superlink", config.superlink, "--port", str(port), *trusted,
                                 "--node-config", f"settings={json.dumps(str(settings.resolve()))}"],
                                env=flower_env(home), stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
    if not wait:
        return node
    print(f"offsite federate: SuperNode connected to {config.superlink}; training each round the owner sends "
          f"(rounds under {work}, log {log}); Ctrl-C to leave", flush=True)
    try:
        node.wait()
    finally:
        stop(node)
    if node.returncode not in (0, -signal.SIGTERM):
        raise FederationError(f"the Flower SuperNode exited with code {node.returncode}; see {log}")
    return node


__all__ = ["CLIENT_APP", "SERVER_APP", "check_client", "check_server", "free_port", "join", "serve", "stop", "write_app"]
