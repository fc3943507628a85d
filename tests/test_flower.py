"""#19: federated offsite-tuning on the real Flower engine over 127.0.0.1 (SuperLink, SuperNodes, flwr run)."""

import json
from pathlib import Path
from unittest import mock

import pytest
import torch

from offsite.adapter import load_adapter
from offsite.data import Example, save_examples
from offsite.emulator import compress_checkpoint
from offsite.errors import ConfigError
from offsite.federation.aggregate import latest_round, load_round
from offsite.federation.configs import ClientConfig, ServerConfig
from offsite.federation.launch import free_port, join, serve, stop
from offsite.methods import make_config
from offsite.plugin import plugin_checkpoint

HERE = Path(__file__).parent
RECIPE = {"batch_size": 2, "lr": 1e-2, "max_steps": 2, "max_length": 24}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from tiny import save_tiny_checkpoint

    root = tmp_path_factory.mktemp("flower")
    save_tiny_checkpoint("llama", root / "base")
    emulator = compress_checkpoint(root / "base", root / "emu", "layerdrop", make_config("layerdrop", num_kept=2))
    return root, emulator


def client(root: Path, emulator: Path, name: str, n: int, port: int, poison: str | None = None):
    work = root / name
    work.mkdir()
    data = work / "data.jsonl"
    save_examples([Example(f"{name} question {j}:", f" answer {j % 3}") for j in range(n)], data)
    if poison:
        (work / "poison").write_text(poison)
    return join(ClientConfig(superlink=f"127.0.0.1:{port}", bundle=str(emulator), data=str(data), work=str(work), insecure=True),
                wait=False)


@pytest.mark.slow
def test_three_owners_two_rounds_poisoned_dropped_and_a_restart_resumes(world, tmp_path, capsys):
    root, emulator = world
    port = free_port()
    sizes = {"alice": 4, "bob": 6, "carol": 8}
    nodes = [client(tmp_path, emulator, name, n, port) for name, n in sizes.items()]
    nodes += [client(tmp_path, emulator, f"mallory-{kind}", 5, port, poison=kind) for kind in ("nan", "key", "norm")]
    out = tmp_path / "federation"
    docs = tmp_path / "held_out.jsonl"
    docs.write_text("".join(json.dumps({"context": f"Question {j}:", "choices": [" answer 0", " answer 1", " answer 2"], "gold": j % 3})
                            + "\n" for j in range(6)))
    config = ServerConfig(emulator=str(emulator), out=str(out), rounds=1, min_clients=6, wait_s=120, round_timeout_s=300,
                          port=port, insecure=True, model=str(root / "base"), eval_tasks=str(docs))
    try:
        serve(config, RECIPE, "flower_apps:server_app", "flower_apps:client_app", app_files=(HERE / "flower_apps.py",))
        first = load_round(out / "round-0001")
        assert first is not None and latest_round(out).round == 1
        stamp = (out / "round-0001" / "round.json").stat().st_mtime_ns
        # the owner restarts with more rounds: round 1 is kept as it is, round 2 runs from its aggregate
        config.rounds = 2
        final = serve(config, RECIPE, "flower_apps:server_app", "flower_apps:client_app", app_files=(HERE / "flower_apps.py",))
    finally:
        for node in nodes:
            stop(node)
    assert (out / "round-0001" / "round.json").stat().st_mtime_ns == stamp
    for number in (1, 2):
        result = load_round(out / f"round-{number:04d}")
        assert sorted(result.accepted.values()) == sorted(sizes.values())
        assert len(result.dropped) == 3, result.dropped
        reasons = " | ".join(result.dropped.values())
        assert "finite" in reasons and "norm" in reasons, reasons
        assert result.info["clients"] == 6 and result.info["bytes_received"] > 0
        scores = json.loads((out / f"round-{number:04d}" / "eval.json").read_text())  # the owner's plug-in, scored each round
        assert scores[str(docs)]["n"] == 6 and 0 <= scores[str(docs)]["acc"] <= 1
        # the aggregate is the example-weighted mean of the accepted clients' updates, as received
        updates = {c: load_adapter(out / f"round-{number:04d}" / "updates" / c) for c in result.accepted}
        total = sum(result.accepted.values())
        got = load_adapter(result.adapter)
        for key, value in got.tensors.items():
            mean = sum(updates[c].tensors[key].double() * n for c, n in result.accepted.items()) / total
            torch.testing.assert_close(value.double(), mean.to(value.dtype).double(), rtol=0, atol=0)
    assert load_round(out / "round-0002").info["bytes_sent_per_client"] > 0  # round 2 starts from round 1's aggregate
    round2_start = json.loads((tmp_path / "alice" / "round-0002" / "start" / "manifest.json").read_text())
    assert round2_start["training"]["federated"]["round"] == 1
    assert final == load_round(out / "round-0002").adapter
    with mock.patch("subprocess.Popen", side_effect=AssertionError("a Flower process was started")):
        assert serve(config, RECIPE) == final  # all rounds done: answered from disk
    plugin_checkpoint(root / "base", final, tmp_path / "plugged", emulator=emulator)
    from offsite.cli import main

    capsys.readouterr()
    assert main(["federate", "status", "--out", str(out)]) == 0  # the owner's summary of the rounds on disk
    status = capsys.readouterr().out.splitlines()
    assert status[0].startswith("round 1: 3 accepted (18 examples), 3 dropped") and "plug-in" in status[0]
    assert sum(line.startswith("round ") for line in status) == 2 and sum("dropped node-" in line for line in status) == 6


def test_bad_settings_are_refused_before_anything_starts(world, tmp_path):
    root, emulator = world
    with pytest.raises(ConfigError, match="--insecure"):
        serve(ServerConfig(emulator=str(emulator), out=str(tmp_path / "f")), RECIPE)
    with pytest.raises(ConfigError, match="eval_tasks needs --model"):
        ServerConfig(emulator=str(emulator), out=str(tmp_path / "f"), eval_tasks="arc_easy")
    with pytest.raises(ConfigError, match="host:port"):
        join(ClientConfig(superlink="nowhere", bundle=str(emulator), task="arc_easy", work=str(tmp_path / "c"), insecure=True))
    with pytest.raises(ConfigError, match="one of --data"):
        join(ClientConfig(bundle=str(emulator), work=str(tmp_path / "c"), insecure=True))
    assert not (tmp_path / "f").exists() and not (tmp_path / "c").exists()


def test_the_cli_refuses_in_one_line(world, tmp_path, capsys):
    from offsite.cli import main

    root, emulator = world
    assert main(["federate", "server", "--emulator", str(emulator), "--out", str(tmp_path / "f"), "--max-steps", "2"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--insecure" in err
    assert main(["federate", "client", "--bundle", str(tmp_path / "missing"), "--task", "arc_easy", "--work", str(tmp_path / "c"),
                 "--insecure"]) == 1
    assert "missing" in capsys.readouterr().err
    assert not (tmp_path / "f").exists() and not (tmp_path / "c").exists()


def test_late_failed_and_malformed_replies_are_dropped_with_their_reason(world, tmp_path):
    """The owner's side of a round's replies, without the engine: a client that errors, one whose reply is
    not an update, and one that never answered within the timeout are each dropped with why."""
    from types import SimpleNamespace

    from flwr.app import ConfigRecord, RecordDict

    from offsite.federation.apps import receive_updates
    from offsite.federation.wire import bundle_record
    from offsite.training import FinetuneConfig, finetune

    root, emulator = world
    adapter = finetune(emulator, [Example("Q:", " a")] * 4, tmp_path / "run", FinetuneConfig(max_steps=1, batch_size=2, max_length=16),
                       progress=False)

    def reply(node, content=None, error=None):
        return SimpleNamespace(metadata=SimpleNamespace(src_node_id=node), has_error=lambda: error is not None,
                               error=SimpleNamespace(reason=error), content=content)

    from flwr.app import MetricRecord

    good = RecordDict({"adapter": bundle_record(adapter), "metrics": MetricRecord({"num-examples": 4})})
    replies = [reply(1, good), reply(2, error="CUDA out of memory"), reply(3, RecordDict({"metrics": ConfigRecord({"x": 1})}))]
    updates, dropped, received = receive_updates(replies, [1, 2, 3, 4], tmp_path / "updates", timeout_s=30)
    assert [u.client for u in updates] == ["node-1"] and updates[0].examples == 4 and received > 0
    assert load_adapter(updates[0].adapter).tensors.keys() == load_adapter(adapter).tensors.keys()
    assert "CUDA out of memory" in dropped["node-2"]
    assert "not an adapter update" in dropped["node-3"]
    assert "no reply within the round timeout (30 s)" in dropped["node-4"]


def test_a_received_bundle_cannot_write_outside_its_folder(tmp_path):
    from flwr.app import Array, ArrayRecord

    from offsite.errors import BundleError
    from offsite.federation.wire import STYPE, write_record

    def file(data: bytes):
        return Array(dtype="uint8", shape=(len(data),), stype=STYPE, data=data)

    for name in ("../escape.txt", "/abs.txt", "a/../../b", "a\\b"):
        with pytest.raises(BundleError, match="unsafe path"):
            write_record(ArrayRecord({"manifest.json": file(b"{}"), name: file(b"x")}), tmp_path / "in")
    with pytest.raises(BundleError, match="not a byte array"):
        write_record(ArrayRecord({"manifest.json": Array(dtype="float32", shape=(1,), stype="numpy.ndarray", data=b"\0" * 4)}),
                     tmp_path / "in")
    assert not (tmp_path / "in").exists() and not (tmp_path / "escape.txt").exists()


@pytest.mark.slow
def test_lora_rounds_travel_whole_and_start_from_the_aggregate(world, tmp_path):
    """LoRA through the engine: the bundle's PEFT view folder travels too, and round 2 starts from
    round 1's averaged factors."""
    root, emulator = world
    port = free_port()
    nodes = [client(tmp_path, emulator, name, n, port) for name, n in (("dana", 4), ("erin", 6))]
    out = tmp_path / "federation"
    config = ServerConfig(emulator=str(emulator), out=str(out), rounds=2, min_clients=2, wait_s=120, round_timeout_s=300,
                          port=port, insecure=True)
    try:
        final = serve(config, {**RECIPE, "lora": True, "lora_r": 4, "lr": 1e-2})
    finally:
        for node in nodes:
            stop(node)
    got = load_adapter(final)
    assert got.lora is not None and got.lora.r == 4
    assert (final / "emulator" / "adapter_model.safetensors").exists()  # the PEFT view of the aggregate
    for number in (1, 2):
        result = load_round(out / f"round-{number:04d}")
        assert sorted(result.accepted.values()) == [4, 6] and not result.dropped
    start = load_adapter(tmp_path / "dana" / "round-0002" / "start")
    first = load_adapter(out / "round-0001" / "adapter")
    for key in first.tensors:
        assert torch.equal(start.tensors[key], first.tensors[key])


def make_certificates(directory: Path) -> tuple[Path, Path, Path]:
    """A throwaway CA and a server certificate for 127.0.0.1 / localhost (ca.pem, server.pem, server.key)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    valid = dict(not_valid_before=now - datetime.timedelta(minutes=5), not_valid_after=now + datetime.timedelta(days=1))

    def build(subject, issuer, public_key, signer, extensions):
        builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(public_key)
                   .serial_number(x509.random_serial_number()).not_valid_before(valid["not_valid_before"])
                   .not_valid_after(valid["not_valid_after"]))
        for extension, critical in extensions:
            builder = builder.add_extension(extension, critical=critical)
        return builder.sign(signer, hashes.SHA256())

    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "offsite test CA")])
    ca = build(ca_name, ca_name, ca_key.public_key(), ca_key, [(x509.BasicConstraints(ca=True, path_length=None), True)])
    san = x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    cert = build(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]), ca_name, key.public_key(), ca_key, [(san, False)])
    paths = directory / "ca.pem", directory / "server.pem", directory / "server.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return paths


@pytest.mark.slow
def test_a_federation_over_tls(world, tmp_path):
    """The README's TLS flags work: the SuperLink serves HTTPS with the owner's certificate, and the
    SuperNodes and flwr run verify it against the CA."""
    root, emulator = world
    ca, cert, key = make_certificates(tmp_path)
    port = free_port()
    nodes = []
    for name, n in (("fay", 4), ("gus", 5)):
        work = tmp_path / name
        work.mkdir()
        save_examples([Example(f"{name} question {j}:", f" answer {j % 3}") for j in range(n)], work / "data.jsonl")
        nodes.append(join(ClientConfig(superlink=f"127.0.0.1:{port}", bundle=str(emulator), data=str(work / "data.jsonl"),
                                       work=str(work), root_certificates=str(ca)), wait=False))
    out = tmp_path / "federation"
    config = ServerConfig(emulator=str(emulator), out=str(out), rounds=1, min_clients=2, wait_s=120, round_timeout_s=300,
                          port=port, ssl_certfile=str(cert), ssl_keyfile=str(key), ssl_ca_certfile=str(ca))
    try:
        final = serve(config, RECIPE)
    finally:
        for node in nodes:
            stop(node)
    assert sorted(load_round(out / "round-0001").accepted.values()) == [4, 5]
    assert load_adapter(final).lora is None
