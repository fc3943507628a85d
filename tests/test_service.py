"""The owner service over real HTTP: a uvicorn server on 127.0.0.1 (thread or subprocess) and the real client."""

from __future__ import annotations

import http.client
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import schemathesis
import torch
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from safetensors.torch import save_file

from offsite.adapter import FULL_WEIGHTS, load_adapter
from offsite.bundle import MANIFEST, bundle_fingerprint, read_manifest, write_bundle
from offsite.cli import main
from offsite.data import Example, save_examples
from offsite.emulator import compress_checkpoint, load_checkpoint
from offsite.evaluation import score_multiple_choice
from offsite.methods import make_config
from offsite.plugin import plug_in
from offsite.service.client import Client, RemoteOwner
from offsite.service.config import ServeConfig
from offsite.service.errors import RemoteError
from offsite.service.server import ServerThread
from offsite.service.store import Store
from offsite.signing import generate_keypair
from offsite.tasks import MCDoc
from offsite.training import FinetuneConfig, finetune
from tiny import save_tiny_checkpoint

EMULATOR = "tiny-2-2-2"
EXAMPLES = [Example(f"Question {i}: what is {i} plus one? Answer:", f" {i + 1}") for i in range(24)]
DOCS = [{"context": f"Question {i}: what is {i} plus one? Answer:", "choices": [f" {i + 1}", f" {i + 7}", f" {2 * i}"], "gold": 0}
        for i in range(8)]
TRAIN = FinetuneConfig(batch_size=4, lr=1e-3, max_steps=3)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The owner's base model and published emulator, an adapter trained on it, and one trained
    on an emulator the owner never published."""
    root = tmp_path_factory.mktemp("service")
    save_tiny_checkpoint("llama", root / "base")
    (root / "bundles").mkdir()
    compress_checkpoint(root / "base", root / "bundles" / EMULATOR, "layerdrop", make_config("layerdrop", num_kept=2))
    compress_checkpoint(root / "base", root / "unpublished", "layerdrop", make_config("layerdrop", num_kept=3))
    adapter = finetune(root / "bundles" / EMULATOR, EXAMPLES, root / "run", TRAIN, progress=False)
    foreign = finetune(root / "unpublished", EXAMPLES, root / "run-foreign", TRAIN, progress=False)
    return {"root": root, "base": root / "base", "bundles": root / "bundles", "adapter": adapter, "foreign": foreign}


def config(world, state: Path, **overrides) -> ServeConfig:
    return ServeConfig(bundles=str(world["bundles"]), state=str(state), model=str(world["base"]), port=0, **overrides)


@pytest.fixture(scope="module")
def server(world, tmp_path_factory):
    with ServerThread(config(world, tmp_path_factory.mktemp("state"))) as srv:
        yield srv


def token(srv: ServerThread, name: str) -> str:
    return srv.service.store.create_token(name)


def adapter_variant(src: Path, out: Path, seed: int, scale: float = 1e-3) -> Path:
    """A valid adapter bundle with different weights (same emulator, same blocks), so uploads can be told apart."""
    bundle = load_adapter(src)
    generator = torch.Generator().manual_seed(seed)
    tensors = {k: v + scale * torch.randn(v.shape, generator=generator) for k, v in bundle.tensors.items()}
    manifest = {k: v for k, v in bundle.manifest.items() if k not in ("format", "format_version", "kind", "created_by", "files")}
    return write_bundle(out, "adapter", manifest, lambda tmp: save_file(tensors, tmp / FULL_WEIGHTS, metadata={"format": "pt"}))


def nothing_stored(srv: ServerThread, client: Client) -> None:
    store = srv.service.store
    assert client.uploads() == []
    assert list(store.tmp_dir.iterdir()) == []
    assert list(store.uploads_dir.iterdir()) == []


# ---------------------------------------------------------------- the round trip
def test_round_trip_over_http(world, server, tmp_path):
    client = Client(server.url, token(server, "alice"))
    listed = client.list_bundles()
    assert [b["name"] for b in listed] == [EMULATOR]
    assert listed[0]["adapter_blocks"] == [0, 1, 6, 7]

    emulator = client.download(EMULATOR, tmp_path / "emulator")
    for rel in read_manifest(world["bundles"] / EMULATOR)["files"]:
        assert (emulator / rel).read_bytes() == (world["bundles"] / EMULATOR / rel).read_bytes()
    adapter = finetune(emulator, EXAMPLES, tmp_path / "run", TRAIN, progress=False)

    upload = client.upload(adapter)
    assert upload["emulator"] == EMULATOR and upload["fingerprint"] == bundle_fingerprint(read_manifest(adapter))
    job = client.submit(upload["id"], docs=DOCS)
    assert job["state"] == "queued"
    status = client.wait(job["id"], timeout=120)
    assert status["state"] == "done", status
    report = client.report(job["id"])

    # The job's numbers are what the owner gets by plugging the adapter in locally.
    docs = [MCDoc(i, d["context"], d["choices"], d["gold"]) for i, d in enumerate(DOCS)]
    base, tokenizer = load_checkpoint(world["base"])
    full = score_multiple_choice(base, tokenizer, docs, progress=False)
    plugged = score_multiple_choice(plug_in(base, adapter, emulator=world["bundles"] / EMULATOR), tokenizer, docs, progress=False)
    assert report["n"] == len(DOCS) and report["task"] == "docs"
    assert report["results"]["full_zs"] == full
    assert report["results"]["plugin"] == plugged
    assert report["adapter"]["fingerprint"] == upload["fingerprint"]
    assert [j["id"] for j in client.jobs()] == [job["id"]]


def test_cli_round_trip(world, server, tmp_path, capsys):
    assert main(["serve-token", "--state", str(server.service.store.root), "--name", "carol"]) == 0
    secret = capsys.readouterr().out.splitlines()[1]
    remote = ["--url", server.url, "--token", secret]
    assert main(["remote", "list", *remote]) == 0
    assert EMULATOR in capsys.readouterr().out
    assert main(["remote", "upload", str(world["adapter"]), *remote]) == 0
    upload_id = capsys.readouterr().out.split()[1].rstrip(":")
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    assert main(["remote", "submit", "--upload", upload_id, "--docs", str(docs), "--eval-limit", "3", "--wait", *remote]) == 0
    out = capsys.readouterr().out
    assert "plug-in" in out and "(n=3)" in out
    job_id = out.split()[1]
    assert main(["remote", "report", job_id, "--out", str(tmp_path / "report.json"), *remote]) == 0
    assert json.loads((tmp_path / "report.json").read_text())["n"] == 3
    assert main(["remote", "status", *remote]) == 0
    assert job_id in capsys.readouterr().out
    assert main(["remote", "list", "--url", server.url, "--token", "ofs.000000000000." + "x" * 43]) == 1
    assert "401" in capsys.readouterr().err


# ---------------------------------------------------------------- downloads
class Interrupt(Exception):
    pass


def test_download_resumes_after_interruption(world, server, tmp_path):
    client = Client(server.url, token(server, "dave"), chunk_size=16 * 1024)
    files = read_manifest(world["bundles"] / EMULATOR)["files"]
    largest = max(files, key=lambda rel: files[rel]["size"])
    assert files[largest]["size"] > 64 * 1024

    def stop_midway(rel, done, total):
        if rel == largest and done >= 32 * 1024:
            raise Interrupt

    with pytest.raises(Interrupt):
        client.download(EMULATOR, tmp_path / "emu", progress=stop_midway)
    partial = tmp_path / ".emu.partial" / largest
    assert 0 < partial.stat().st_size < files[largest]["size"] and not (tmp_path / "emu").exists()

    first_offsets = {}
    client.download(EMULATOR, tmp_path / "emu", progress=lambda rel, done, total: first_offsets.setdefault(rel, done))
    # Only the missing part of the interrupted file was fetched: its first progress report
    # already counts the bytes it had.
    assert first_offsets[largest] > 32 * 1024
    for rel in files:
        assert (tmp_path / "emu" / rel).read_bytes() == (world["bundles"] / EMULATOR / rel).read_bytes()
    assert not (tmp_path / ".emu.partial").exists()
    with pytest.raises(Exception, match="already exists"):
        client.download(EMULATOR, tmp_path / "emu")


def test_download_verifies_signature(world, tmp_path):
    keys = tmp_path / "keys"
    private, public = generate_keypair(keys)
    bundles = tmp_path / "bundles"
    bundles.mkdir()
    compress_checkpoint(world["base"], bundles / "signed", "layerdrop", make_config("layerdrop", num_kept=2), sign_key=private)
    other, _ = generate_keypair(tmp_path / "other")
    with ServerThread(ServeConfig(bundles=str(bundles), state=str(tmp_path / "state"), port=0)) as srv:
        client = Client(srv.url, token(srv, "erin"))
        assert client.list_bundles()[0]["signed"] is True
        client.download("signed", tmp_path / "ok", trusted_key=public)
        with pytest.raises(Exception, match="signature"):
            client.download("signed", tmp_path / "bad", trusted_key=tmp_path / "other" / "offsite.pub")
        assert not (tmp_path / "bad").exists()


def raw_get(url: str, path: str, secret: str, headers: dict | None = None):
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request("GET", path, headers={"Authorization": f"Bearer {secret}", **(headers or {})})
    response = conn.getresponse()
    body = response.read()
    conn.close()
    return response.status, response, body


def test_range_semantics(world, server):
    secret = token(server, "frank")
    rel = max(read_manifest(world["bundles"] / EMULATOR)["files"].items(), key=lambda kv: kv[1]["size"])
    name, meta = rel
    data = (world["bundles"] / EMULATOR / name).read_bytes()
    path = f"/v1/bundles/{EMULATOR}/files/{name}"
    size = len(data)

    status, response, body = raw_get(server.url, path, secret)
    assert (status, body) == (200, data)
    assert response.getheader("Accept-Ranges") == "bytes" and response.getheader("ETag") == f'"{meta["sha256"]}"'

    for header, first, last in [("bytes=0-9", 0, 9), ("bytes=100-", 100, size - 1), ("bytes=-5", size - 5, size - 1),
                                (f"bytes=10-{size + 50}", 10, size - 1)]:
        status, response, body = raw_get(server.url, path, secret, {"Range": header})
        assert status == 206, header
        assert response.getheader("Content-Range") == f"bytes {first}-{last}/{size}"
        assert body == data[first : last + 1] and int(response.getheader("Content-Length")) == last - first + 1

    for header in (f"bytes={size}-", f"bytes={size + 10}-{size + 20}", "bytes=-0"):
        status, response, body = raw_get(server.url, path, secret, {"Range": header})
        assert status == 416, header
        assert response.getheader("Content-Range") == f"bytes */{size}"
        assert "detail" in json.loads(body)

    # Malformed or multiple ranges are ignored (RFC 9110): the whole file.
    for header in ("bytes=5-2", "lines=1-2", "bytes=0-1,4-5"):
        assert raw_get(server.url, path, secret, {"Range": header})[0] == 200, header
    # If-Range with another validator: the file changed, send it whole.
    status, _, body = raw_get(server.url, path, secret, {"Range": "bytes=0-9", "If-Range": '"0000"'})
    assert (status, body) == (200, data)
    status, _, body = raw_get(server.url, path, secret, {"Range": "bytes=0-9", "If-Range": f'"{meta["sha256"]}"'})
    assert (status, body) == (206, data[:10])

    # Only listed files (and the manifest) are served; no way out of the bundle.
    for bad in ("config.json.bak", "../bundles", "%2e%2e/unpublished/config.json", "model.safetensors/x"):
        assert raw_get(server.url, f"/v1/bundles/{EMULATOR}/files/{bad}", secret)[0] == 404, bad
    assert raw_get(server.url, "/v1/bundles/unpublished/files/config.json", secret)[0] == 404
    assert raw_get(server.url, f"/v1/bundles/{EMULATOR}/files/{MANIFEST}", secret)[2] == (world["bundles"] / EMULATOR / MANIFEST).read_bytes()
    assert raw_get(server.url, path, "nope")[0] == 401


# ---------------------------------------------------------------- uploads
def tar_of(files: dict[str, bytes], links: dict[str, str] | None = None) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            tar.addfile(info)
    return buffer.getvalue()


def post_raw(url: str, secret: str, body: bytes):
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request("POST", "/v1/uploads", body=body, headers={"Authorization": f"Bearer {secret}", "Content-Type": "application/x-tar"})
    response = conn.getresponse()
    data = json.loads(response.read())
    conn.close()
    return response.status, data["detail"]


def test_rejected_uploads_leave_nothing(world, tmp_path):
    with ServerThread(config(world, tmp_path / "state")) as srv:
        secret = token(srv, "gina")
        client = Client(srv.url, secret)
        bundle = {p.relative_to(world["adapter"]).as_posix(): p.read_bytes() for p in world["adapter"].rglob("*") if p.is_file()}

        corrupt = dict(bundle)
        weights = bytearray(corrupt[FULL_WEIGHTS])
        weights[-1] ^= 0xFF
        corrupt[FULL_WEIGHTS] = bytes(weights)
        bad_manifest = {**bundle, MANIFEST: b'{"format": "offsite-bundle", '}
        cases = {
            "corrupt weights": (tar_of(corrupt), 422, "does not match its SHA-256"),
            "bad manifest": (tar_of(bad_manifest), 422, "not valid JSON"),
            "extra file": (tar_of({**bundle, "evil.py": b"import os"}), 422, "does not list"),
            "no manifest": (tar_of({FULL_WEIGHTS: bundle[FULL_WEIGHTS]}), 422, "no manifest.json"),
            "symlink": (tar_of(bundle, {"link": "/etc/passwd"}), 422, "not a regular file"),
            "path escape": (tar_of({**bundle, "../escape": b"x"}), 422, "unsafe name"),
            "not a tar": (os.urandom(3000), 422, "not a readable tar archive"),
            "empty": (b"", 422, "empty upload"),
        }
        for what, (body, status, reason) in cases.items():
            got = post_raw(srv.url, secret, body)
            assert got[0] == status and reason in got[1], (what, got)
            assert "tmp" not in got[1] and str(srv.service.store.root) not in got[1], (what, got)  # no server paths
            nothing_stored(srv, client)

        with pytest.raises(RemoteError, match="does not publish") as error:
            client.upload(world["foreign"])
        assert error.value.status == 422
        nothing_stored(srv, client)
        assert not (tmp_path / "escape").exists() and not (tmp_path / "state" / "escape").exists()

    # Oversized: the declared length, and a body that only turns out too long while streaming.
    with ServerThread(config(world, tmp_path / "small", max_upload_bytes=20_000)) as srv:
        secret = token(srv, "gina")
        client = Client(srv.url, secret)
        with pytest.raises(RemoteError, match="larger than the limit of 20000 bytes") as error:
            client.upload(world["adapter"])
        assert error.value.status == 413
        host, port = srv.url.removeprefix("http://").split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        conn.putrequest("POST", "/v1/uploads")
        conn.putheader("Authorization", f"Bearer {secret}")
        conn.putheader("Transfer-Encoding", "chunked")
        conn.endheaders()
        try:
            for _ in range(10):
                conn.send(b"1000\r\n" + b"\0" * 4096 + b"\r\n")
            conn.send(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass
        response = conn.getresponse()
        assert response.status == 413 and "larger than the limit" in json.loads(response.read())["detail"]
        conn.close()
        nothing_stored(srv, client)


def test_signed_uploads_required_when_owner_key_registered(world, tmp_path, capsys):
    keys = tmp_path / "keys"
    private, public = generate_keypair(keys)
    signed = finetune(world["bundles"] / EMULATOR, EXAMPLES, tmp_path / "run", TRAIN, progress=False, sign_key=private)
    with ServerThread(config(world, tmp_path / "state")) as srv:
        assert main(["serve-token", "--state", str(srv.service.store.root), "--name", "hank", "--trusted-key", str(public)]) == 0
        secret = capsys.readouterr().out.splitlines()[1]
        client = Client(srv.url, secret)
        with pytest.raises(RemoteError, match="not signed"):
            client.upload(world["adapter"])
        nothing_stored(srv, client)
        assert client.upload(signed)["signed_by"] is not None


def test_token_isolation(world, server):
    alice, bob = Client(server.url, token(server, "iris")), Client(server.url, token(server, "jack"))
    upload = alice.upload(world["adapter"])
    job = alice.submit(upload["id"], docs=DOCS[:2])
    assert [u["id"] for u in alice.uploads()] == [upload["id"]]
    assert bob.uploads() == [] and bob.jobs() == []
    for call in (lambda: bob.get_upload(upload["id"]), lambda: bob.job(job["id"]), lambda: bob.report(job["id"]),
                 lambda: bob.submit(upload["id"], docs=DOCS[:2])):
        with pytest.raises(RemoteError) as error:
            call()
        assert error.value.status == 404
    assert alice.wait(job["id"], timeout=60)["state"] == "done"
    with pytest.raises(RemoteError) as error:
        bob.report(job["id"])
    assert error.value.status == 404
    for bad in ("", "ofs.abc", "ofs." + upload["id"]):
        with pytest.raises(RemoteError) as error:
            Client(server.url, bad or "x").uploads()
        assert error.value.status == 401


def test_queued_jobs_are_capped_per_owner(world, tmp_path):
    """Regression (#23.8): a data owner could queue unlimited jobs."""
    with ServerThread(config(world, tmp_path / "state", max_jobs_per_owner=2)) as srv:
        srv.service.worker.stop()  # nothing runs: every job stays queued
        alice, bob = Client(srv.url, token(srv, "alice")), Client(srv.url, token(srv, "bob"))
        upload = alice.upload(world["adapter"])
        alice.submit(upload["id"], docs=DOCS[:2])
        alice.submit(upload["id"], docs=DOCS[:2])
        with pytest.raises(RemoteError) as error:
            alice.submit(upload["id"], docs=DOCS[:2])
        assert error.value.status == 429 and "limit 2" in str(error.value)
        other = bob.upload(world["adapter"])
        assert bob.submit(other["id"], docs=DOCS[:2])["state"] == "queued"  # another owner is not affected


def test_job_failures_are_reported(world, server, tmp_path):
    client = Client(server.url, token(server, "kate"))
    upload = client.upload(world["adapter"])
    with pytest.raises(RemoteError, match="exactly one of task"):
        client.submit(upload["id"])
    with pytest.raises(RemoteError, match="gold"):
        client.submit(upload["id"], docs=[{"context": "a", "choices": ["b", "c"], "gold": 2}])
    with pytest.raises(RemoteError, match="unknown task"):
        client.submit(upload["id"], task="nope")
    # Norms need the base model: an absurd adapter is accepted as a bundle, and its job fails with the reason.
    absurd = client.upload(adapter_variant(world["adapter"], tmp_path / "absurd", seed=0, scale=1e4))
    job = client.submit(absurd["id"], docs=DOCS[:2])
    status = client.wait(job["id"], timeout=60)
    assert status["state"] == "failed" and "over the bound" in status["error"], status
    with pytest.raises(RemoteError, match="is failed: .*over the bound") as error:
        client.report(job["id"])
    assert error.value.status == 409


# ---------------------------------------------------------------- restarts
def start_subprocess(world, state: Path, *extra: str) -> tuple[subprocess.Popen, str]:
    process = subprocess.Popen(
        [sys.executable, "-m", "offsite.cli", "serve", "--bundles", str(world["bundles"]), "--state", str(state),
         "--model", str(world["base"]), "--port", "0", "--log-level", "warning", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"},
    )
    line = process.stdout.readline()
    assert "listening on" in line, line
    return process, line.split("listening on ")[1].split()[0]


@pytest.mark.slow
def test_jobs_survive_server_restart(world, tmp_path, capsys):
    state = tmp_path / "state"
    assert main(["serve-token", "--state", str(state), "--name", "liam"]) == 0
    secret = capsys.readouterr().out.splitlines()[1]
    # Slow enough to be caught running: many docs, scored one sequence at a time.
    many = [{"context": f"Question {i}: what is {i} plus one? Answer:", "choices": [f" {i + 1}", f" {i + 2}"], "gold": 0}
            for i in range(200)]
    process, url = start_subprocess(world, state, "--eval-batch-size", "1")
    try:
        client = Client(url, secret)
        upload = client.upload(world["adapter"])
        running = client.submit(upload["id"], docs=many)
        queued = client.submit(upload["id"], docs=DOCS)
        deadline = time.monotonic() + 60
        while client.job(running["id"])["state"] != "running":
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        process.send_signal(signal.SIGKILL)  # a crash: nothing gets to clean up
        process.wait(30)
    client.close()
    with ServerThread(config(world, state)) as srv:
        client = Client(srv.url, secret)
        assert client.get_upload(upload["id"])["fingerprint"] == upload["fingerprint"]
        first = client.wait(running["id"], timeout=120)
        assert first["state"] == "done" and first["attempts"] == 2, first
        second = client.wait(queued["id"], timeout=120)
        assert second["state"] == "done" and second["attempts"] == 1, second
        assert client.report(running["id"])["n"] == len(many)


@pytest.mark.slow
def test_serve_command_stops_cleanly_on_sigterm(world, tmp_path, capsys):
    assert main(["serve-token", "--state", str(tmp_path / "state"), "--name", "lena"]) == 0
    secret = capsys.readouterr().out.splitlines()[1]
    process, url = start_subprocess(world, tmp_path / "state")
    try:
        client = Client(url, secret)
        assert client.health()["jobs"] is True
        client.close()
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0
    store = Store(tmp_path / "state")
    store.open_for_server(2)  # the lock was released
    store.close()


def test_store_recovers_interrupted_jobs(world, tmp_path):
    state = tmp_path / "state"
    with ServerThread(config(world, state)) as srv:
        client = Client(srv.url, token(srv, "mia"))
        upload = client.upload(world["adapter"])
    store = Store(state)
    jobs = [store.add_job("mia", upload["id"], {"docs": DOCS}) for _ in range(3)]
    for _ in range(2):  # two jobs taken by a worker that then died; the first of them twice
        store.claim_next_job()
    with store._tx() as db:
        db.execute("UPDATE jobs SET attempts = 2 WHERE id = ?", (jobs[0].id,))
    (store.tmp_dir / "up-dead").mkdir()
    (store.uploads_dir / "up_orphan").mkdir()
    store.close()

    srv_store = Store(state)
    actions = dict(srv_store.open_for_server(max_attempts=2))
    assert actions[jobs[0].id].startswith("failed: interrupted by a server restart during attempt 2 of 2")
    assert actions[jobs[1].id].startswith("re-queued")
    assert jobs[2].id not in actions
    assert [srv_store.get_job("mia", j.id).state for j in jobs] == ["failed", "queued", "queued"]
    assert "not retried" in srv_store.get_job("mia", jobs[0].id).error
    assert list(srv_store.tmp_dir.iterdir()) == [] and [p.name for p in srv_store.uploads_dir.iterdir()] == [upload["id"]]
    with pytest.raises(Exception, match="in use by another offsite serve"):
        Store(state).open_for_server(2)
    srv_store.close()


# ---------------------------------------------------------------- representations (PEMA)
def test_pema_representations_over_http(world, server, tmp_path):
    """PEMA's data owner works against the service exactly as against an in-process owner."""
    from offsite.pema.memory import KEYS, VALUES, MemoryConfig, build_memory
    from offsite.pema.owner import RepresentationRequest, RepresentationServer

    client = Client(server.url, token(server, "noah"))
    remote = RemoteOwner(client)
    model, tokenizer = load_checkpoint(world["base"])
    local = RepresentationServer(model)
    assert remote.info() == local.info()

    request = RepresentationRequest([[1, 40, 41, 42, 43], [1, 50, 51]], forced=[[44, 45], []], greedy_steps=[1, 3], log_probs=4)
    there, here = remote.represent(request), local.represent(request)
    assert there.extension == here.extension and [r.shape for r in there.representations] == [(4, 32), (4, 32)]
    for name in ("representations", "log_probs", "top_tokens"):
        for a, b in zip(getattr(there, name), getattr(here, name)):
            assert np.array_equal(a, b), name  # JSON carries float32 values exactly

    examples = EXAMPLES[:6]
    build_memory(remote, tokenizer, examples, tmp_path / "remote", MemoryConfig(batch_size=4), progress=False)
    build_memory(local, tokenizer, examples, tmp_path / "local", MemoryConfig(batch_size=4), progress=False)
    for name in (KEYS, VALUES):
        assert np.array_equal(np.load(tmp_path / "remote" / name), np.load(tmp_path / "local" / name)), name

    for bad, reason in [({"prompts": [[1, 10_000]]}, "token ids"), ({"prompts": [[1, 2]], "forced": [[3], [4]]}, "one token list per prompt"),
                        ({"prompts": [[1]] * 65}, "prompts"), ({"prompts": [[1]], "log_probs": None}, "log_probs")]:
        with pytest.raises(RemoteError, match=reason) as error:
            client._json("POST", "/v1/representations", bad)
        assert error.value.status == 422, bad


def test_pema_commands_ask_the_service_with_url_and_token(world, server, tmp_path, capsys, monkeypatch):
    """`pema-memory` and `pema-generate` with --url/--token give what the in-process owner gives."""
    from offsite.cli import main

    data = tmp_path / "train.jsonl"
    save_examples(EXAMPLES[:6], data)
    assert main(["pema-head", "--model", str(world["base"]), "--out", str(tmp_path / "head")]) == 0
    secret = token(server, "pia")
    common = ["--head", str(tmp_path / "head"), "--data", str(data)]
    assert main(["pema-memory", *common, "--out", str(tmp_path / "remote"), "--url", server.url, "--token", secret, "--batch-size", "4"]) == 0
    assert main(["pema-memory", *common, "--out", str(tmp_path / "local"), "--model", str(world["base"]), "--batch-size", "4"]) == 0
    for name in ("keys.npy", "values.npy"):
        assert np.array_equal(np.load(tmp_path / "remote" / name), np.load(tmp_path / "local" / name)), name

    monkeypatch.setenv("OFFSITE_URL", server.url)
    monkeypatch.setenv("OFFSITE_TOKEN", secret)
    generate = ["pema-generate", *common, "--max-new-tokens", "3"]
    assert main([*generate, "--out", str(tmp_path / "remote.jsonl")]) == 0  # from the environment
    assert main([*generate, "--out", str(tmp_path / "local.jsonl"), "--model", str(world["base"])]) == 0
    assert (tmp_path / "remote.jsonl").read_text() == (tmp_path / "local.jsonl").read_text()
    capsys.readouterr()

    monkeypatch.delenv("OFFSITE_URL")
    for extra, message in [([], "no owner to ask for representations"), (["--url", server.url, "--model", str(world["base"])], "not both"),
                           (["--model", str(world["base"]), "--token", secret], "--token goes with --url"),
                           (["--url", server.url, "--device", "cpu"], "--device is for an in-process owner")]:
        assert main([*generate, *extra]) == 2
        assert message in capsys.readouterr().err
    monkeypatch.setenv("OFFSITE_TOKEN", "wrong")
    assert main([*generate, "--url", server.url]) != 0
    assert "token" in capsys.readouterr().err.lower()


# ---------------------------------------------------------------- load
def test_concurrent_clients_lose_and_mix_nothing(world, tmp_path):
    """8 clients (two data owners) download and upload for a few seconds on loopback."""
    variants = [adapter_variant(world["adapter"], tmp_path / f"variant-{i}", seed=i) for i in range(8)]
    expected = [bundle_fingerprint(read_manifest(v)) for v in variants]
    assert len(set(expected)) == 8
    with ServerThread(ServeConfig(bundles=str(world["bundles"]), state=str(tmp_path / "state"), port=0)) as srv:
        secrets = {"olga": token(srv, "olga"), "pete": token(srv, "pete")}
        owners = ["olga", "pete"] * 4
        got: dict[int, list[str]] = {i: [] for i in range(8)}
        counts, errors = [0] * 8, []
        downloaded_bytes = [0] * 8
        deadline = time.monotonic() + 3.0

        def work(i: int) -> None:
            client = Client(srv.url, secrets[owners[i]])
            try:
                n = 0
                while time.monotonic() < deadline:
                    if n % 2 == 0:
                        out = client.download(EMULATOR, tmp_path / f"dl-{i}-{n}")
                        downloaded_bytes[i] += sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
                        shutil.rmtree(out)
                    else:
                        got[i].append(client.upload(variants[i])["id"])
                    n += 1
                counts[i] = client.requests_sent
            except Exception as e:  # noqa: BLE001 - reported below
                errors.append(f"client {i}: {e!r}")
            finally:
                client.close()

        start = time.monotonic()
        threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        elapsed = time.monotonic() - start
        assert not errors, errors
        print(f"\nservice load: 8 clients, {sum(counts)} requests in {elapsed:.1f} s = {sum(counts) / elapsed:.0f} requests/s, "
              f"{sum(len(v) for v in got.values())} uploads, {sum(downloaded_bytes) / elapsed / 1e6:.1f} MB/s downloaded")
        assert all(got.values()), "every client uploaded at least once"

        for owner, secret in secrets.items():
            listed = {u["id"]: u["fingerprint"] for u in Client(srv.url, secret).uploads()}
            mine = {uid: expected[i] for i in range(8) if owners[i] == owner for uid in got[i]}
            assert listed == mine  # nothing lost, nothing extra, nothing of the other owner
        for i in range(8):  # and what is on disk is what each client sent
            for uid in got[i]:
                assert bundle_fingerprint(read_manifest(srv.service.store.upload_dir(uid))) == expected[i]


# ---------------------------------------------------------------- the OpenAPI contract
@pytest.fixture(scope="module")
def api_schema(server):
    return schemathesis.openapi.from_url(server.url + "/openapi.json")


@pytest.fixture(scope="module")
def api_token(server):
    return token(server, "schemathesis")


schema = schemathesis.pytest.from_fixture("api_schema")
schemathesis.serializer.alias("application/x-tar", "application/octet-stream")  # uploads are raw bytes


@schema.parametrize()
@settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_openapi_contract(case, api_token):
    """Generated requests against every operation: never a 5xx, and every answer as documented."""
    case.call_and_validate(
        headers={"Authorization": f"Bearer {api_token}"},
        checks=[not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
                response_headers_conformance],
    )
