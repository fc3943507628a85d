"""The service refuses what it must before reading a body: no token, too large, stalled; connections
are bounded. Raw sockets on loopback, so a body that is never sent shows the server did not wait for it."""

import json
import socket
import time
from urllib.parse import urlparse

import pytest

from offsite.service.config import ServeConfig
from offsite.service.server import ServerThread


@pytest.fixture(scope="module")
def guarded(tmp_path_factory):
    root = tmp_path_factory.mktemp("guard")
    (root / "bundles").mkdir()
    config = ServeConfig(bundles=str(root / "bundles"), state=str(root / "state"), port=0, max_json_bytes=10_000,
                         body_timeout=0.5, max_connections=4)
    with ServerThread(config) as srv:
        yield srv


def request(srv, head: str, body: bytes = b"", wait: float = 5.0) -> tuple[int, dict]:
    """Send the request head (and `body`, possibly less than it declares); return (status, JSON)."""
    url = urlparse(srv.url)
    with socket.create_connection((url.hostname, url.port), timeout=wait) as sock:
        sock.sendall(head.encode() + b"\r\n" + body)
        data = b""
        while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < _length(data):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    status = int(data.split(b" ", 2)[1])
    payload = data.split(b"\r\n\r\n", 1)[1]
    return status, json.loads(payload) if payload.startswith(b"{") else {"text": payload.decode(errors="replace")}


def _length(data: bytes) -> int:
    for line in data.split(b"\r\n\r\n", 1)[0].split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return int(line.split(b":", 1)[1])
    return 0


def head(method: str, path: str, length: int | None, token: str | None = None, chunked: bool = False) -> str:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", "Content-Type: application/json"]
    if token:
        lines.append(f"Authorization: Bearer {token}")
    if length is not None:
        lines.append(f"Content-Length: {length}")
    if chunked:
        lines.append("Transfer-Encoding: chunked")
    return "\r\n".join(lines) + "\r\n"


@pytest.fixture(scope="module")
def secret(guarded):
    return guarded.service.store.create_token("alice")


def test_no_token_is_refused_before_the_body_is_read(guarded):
    """Regression (#23.5): a 60 MB body without a token was read and parsed before its 401."""
    status, body = request(guarded, head("POST", "/v1/jobs", 60_000_000), b"")  # the body is never sent
    assert status == 401 and "token" in body["detail"]
    status, _ = request(guarded, head("POST", "/v1/jobs", 60_000_000, token="ofs.bogus.secret"), b"")
    assert status == 401


def test_a_declared_body_over_the_cap_is_refused_at_once(guarded, secret):
    status, body = request(guarded, head("POST", "/v1/jobs", 1_000_000_000, token=secret), b"")
    assert status == 413 and "limit of 10000 bytes" in body["detail"]


def test_a_chunked_body_over_the_cap_is_refused(guarded, secret):
    chunk = b"a" * 8_000
    body = b"".join(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n" for _ in range(3)) + b"0\r\n\r\n"
    status, detail = request(guarded, head("POST", "/v1/jobs", None, token=secret, chunked=True), body)
    assert status == 413 and "larger than the limit" in detail["detail"]


def test_a_stalled_body_ends_with_408(guarded, secret):
    """Regression (#23.5): a body that never arrives held its connection open forever."""
    start = time.monotonic()
    status, body = request(guarded, head("POST", "/v1/jobs", 500, token=secret), b'{"upload": ', wait=10)
    assert status == 408 and "stalled" in body["detail"] and time.monotonic() - start < 8


def test_a_stalled_upload_ends_with_408(guarded, secret):
    lines = head("POST", "/v1/uploads", 5_000, token=secret).replace("application/json", "application/x-tar")
    status, body = request(guarded, lines, b"x" * 100, wait=10)
    assert status == 408 and "stalled" in body["detail"]


def test_an_upload_over_the_cap_is_refused_at_once(guarded, secret):
    lines = head("POST", "/v1/uploads", 10**12, token=secret).replace("application/json", "application/x-tar")
    status, body = request(guarded, lines, b"")
    assert status == 413


def test_open_paths_need_no_token(guarded):
    status, body = request(guarded, head("GET", "/v1/health", None))
    assert status == 200


def test_connections_are_bounded(guarded):
    """Past max_connections, uvicorn answers 503 instead of queueing without bound."""
    url = urlparse(guarded.url)
    idle = [socket.create_connection((url.hostname, url.port), timeout=5) for _ in range(6)]
    try:
        for s in idle:  # each holds a request open by never finishing its head
            s.sendall(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n")
        time.sleep(0.3)
        status, _ = request(guarded, head("GET", "/v1/health", None))
        assert status == 503
    finally:
        for s in idle:
            s.close()


def test_links_inside_a_published_bundle_are_never_followed(tmp_path):
    """Regression (#23.9): a folder link inside a published bundle was followed (O_NOFOLLOW guards only the
    last path component) and the service returned a file from outside the bundles directory."""
    import hashlib
    import os

    from conftest import edit_manifest
    from tiny import save_tiny_checkpoint

    from offsite.emulator import compress_checkpoint
    from offsite.methods import make_config
    from offsite.service.client import Client

    save_tiny_checkpoint("llama", tmp_path / "base")
    bundles = tmp_path / "bundles"
    emu = compress_checkpoint(tmp_path / "base", bundles / "emu", "layerdrop", make_config("layerdrop", num_kept=2))
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_bytes(b"owner's secret")
    (emu / "extra").mkdir()
    (emu / "extra" / "secret.txt").write_bytes(b"owner's secret")  # a real folder first: published, listed
    entry = {"sha256": hashlib.sha256(b"owner's secret").hexdigest(), "size": 14}
    edit_manifest(emu, lambda m: m["files"].update({"extra/secret.txt": entry}))
    config = ServeConfig(bundles=str(bundles), state=str(tmp_path / "state"), port=0)
    with ServerThread(config) as srv:
        client = Client(srv.url, srv.service.store.create_token("alice"))
        assert [b["name"] for b in client.list_bundles()] == ["emu"]
        assert client._get_bytes("/v1/bundles/emu/files/extra/secret.txt") == b"owner's secret"
        # swapped for a link to a folder outside, after the bundle was published (and cached)
        for f in (emu / "extra").iterdir():
            f.unlink()
        (emu / "extra").rmdir()
        os.symlink(outside, emu / "extra")
        with pytest.raises(Exception, match="404"):
            client._get_bytes("/v1/bundles/emu/files/extra/secret.txt")
    # a bundle holding a link anywhere is not published at all
    with ServerThread(ServeConfig(bundles=str(bundles), state=str(tmp_path / "state2"), port=0)) as srv:
        client = Client(srv.url, srv.service.store.create_token("bob"))
        assert client.list_bundles() == []


def test_representation_queries_take_owners_in_turn():
    """Regression (#23.8): one lock served queries in arrival order, so one data owner's stream starved
    the others. Waiting queries are now served one owner after another, and each owner may have only a
    few waiting."""
    import threading

    from offsite.service.errors import ServiceError
    from offsite.service.representations import FairTurns

    turns = FairTurns(max_pending=3)
    served, started = [], []
    turns.acquire("holder")  # the model is busy

    def query(owner, tag):
        started.append(tag)
        with turns(owner):
            served.append(tag)

    threads = []
    for owner, tag in [("a", "a1"), ("a", "a2"), ("a", "a3"), ("b", "b1"), ("c", "c1")]:
        t = threading.Thread(target=query, args=(owner, tag))
        t.start()
        threads.append(t)
        while tag not in started:
            time.sleep(0.001)
        time.sleep(0.05)  # queued in this order
    with pytest.raises(ServiceError, match="already waiting") as e:
        turns.acquire("a")  # a has 3 waiting
    assert e.value.status == 429
    turns.release()
    for t in threads:
        t.join(5)
    assert served == ["a1", "b1", "c1", "a2", "a3"]


def test_absurd_range_headers_are_ignored_not_a_500():
    from offsite.service.published import parse_range

    assert parse_range("bytes=" + "9" * 5000 + "-", 100) is None
    assert parse_range("bytes=-" + "1" * 5000, 100) is None
    assert parse_range("bytes=10-19", 100) == (10, 19)


def test_a_file_vanishing_during_the_walk_is_a_bundle_error(tmp_path, monkeypatch):
    import os

    from offsite.bundle import bundle_members
    from offsite.errors import BundleError

    (tmp_path / "a.bin").write_bytes(b"x")
    real = os.scandir

    class Vanishing:
        def __init__(self, entry):
            self.entry, self.name, self.path = entry, entry.name, entry.path

        def stat(self, follow_symlinks=True):
            raise FileNotFoundError(2, "No such file or directory")

    monkeypatch.setattr(os, "scandir", lambda p: [Vanishing(e) for e in real(p)])
    with pytest.raises(BundleError, match="a.bin vanished"):
        bundle_members(tmp_path)
