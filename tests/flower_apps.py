"""Flower components for the loopback tests: offsite's own apps, with a ClientApp that misbehaves on
purpose in the SuperNodes whose work folder holds a file `poison` (nan, key or norm): it trains as
every client does, then corrupts its update as a malicious data owner would (re-hashing the manifest,
so that the owner's content checks, not the hash check, must catch it)."""

import hashlib
import json
import shutil
import tempfile
from pathlib import Path

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp
from safetensors.torch import load_file, save_file

from offsite.federation import apps
from offsite.federation.apps import SETTINGS_KEY, train_round
from offsite.federation.configs import ClientConfig, read_settings
from offsite.federation.wire import bundle_record, write_record

server_app = apps.server_app  # an assignment: Flower finds components by reading the module's source
client_app = ClientApp()


def _rehash(bundle_dir: Path) -> None:
    path = bundle_dir / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["files"] = {p.relative_to(bundle_dir).as_posix(): {"sha256": hashlib.sha256(p.read_bytes()).hexdigest(),
                                                                "size": p.stat().st_size}
                         for p in sorted(bundle_dir.rglob("*")) if p.is_file() and p.name not in ("manifest.json", "manifest.sig")}
    path.write_text(json.dumps(manifest))


def _poison(record, kind: str):
    with tempfile.TemporaryDirectory() as tmp:
        bundle = write_record(record, Path(tmp) / "update")
        name = "adapter.safetensors" if (bundle / "adapter.safetensors").exists() else "adapter_model.safetensors"
        tensors = load_file(bundle / name)
        first = sorted(tensors)[0]
        if kind == "nan":
            tensors[first][0] = float("nan")
        elif kind == "norm":
            tensors[first] *= 1e6
        elif kind == "key":
            tensors[first.replace("layers.", "layers.9")] = tensors.pop(first)
        save_file(tensors, bundle / name)
        _rehash(bundle)
        return bundle_record(bundle)


@client_app.train()
def _train(message: Message, context: Context) -> Message:
    config, _ = read_settings(ClientConfig, context.node_config[SETTINGS_KEY])
    reply = train_round(message, config)
    poison = Path(config.work) / "poison"
    if poison.exists():
        content = reply.content
        reply = Message(RecordDict({"adapter": _poison(content["adapter"], poison.read_text().strip()),
                                    "metrics": content["metrics"]}), reply_to=message)
    shutil.rmtree(Path(config.work) / "scratch", ignore_errors=True)
    return reply
