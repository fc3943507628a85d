"""The data owner's client against a hostile owner server (stdlib HTTP on loopback): it writes no
more than the manifest declares, reads no manifest past the limit, and answers malformed replies
with one-line errors."""

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from offsite.errors import BundleError
from offsite.service.client import Client
from offsite.service.errors import RemoteError

SMALL = b"0123456789"


class Hostile(BaseHTTPRequestHandler):
    routes: dict = {}

    def do_GET(self):  # noqa: N802 - http.server's name
        action = self.routes.get(self.path)
        if action is None:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        action(self)

    def log_message(self, *args):
        pass


def send(handler, body: bytes, length: int | None = None, close_delimited: bool = False):
    handler.send_response(200)
    handler.send_header("Content-Type", "application/json")
    if not close_delimited:
        handler.send_header("Content-Length", str(len(body) if length is None else length))
    else:
        handler.send_header("Connection", "close")
    handler.end_headers()
    try:
        handler.wfile.write(body)
    except (BrokenPipeError, ConnectionResetError):
        pass
    if close_delimited:
        handler.close_connection = True


@pytest.fixture
def hostile():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Hostile)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    Hostile.routes = {}


def manifest_for(files: dict[str, bytes]) -> bytes:
    table = {rel: {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)} for rel, data in files.items()}
    return json.dumps({"format": "offsite-bundle", "format_version": 1, "kind": "emulator", "files": table}).encode()


BASE = "/v1/bundles/emu/files/"


@pytest.mark.parametrize("close_delimited", [False, True])
def test_a_file_longer_than_its_manifest_says_is_never_written_past_it(hostile, tmp_path, close_delimited):
    """Regression (#23.7): the client wrote 67 MB for a file the manifest declares as 10 bytes."""
    server, url = hostile
    flood = SMALL + b"x" * 5_000_000
    Hostile.routes = {
        BASE + "manifest.json": lambda h: send(h, manifest_for({"config.json": SMALL})),
        BASE + "config.json": lambda h: send(h, flood, close_delimited=close_delimited),
    }
    with pytest.raises(RemoteError, match="(more of config.json than the 10 bytes|would send 5000010 bytes)"):
        Client(url, "ofs.a.b").download("emu", tmp_path / "out")
    partial = tmp_path / ".out.partial" / "config.json"
    assert not partial.exists() or partial.stat().st_size <= len(SMALL)
    assert not (tmp_path / "out").exists()


def test_a_manifest_past_the_limit_is_not_read(hostile, tmp_path, monkeypatch):
    """Regression (#23.7): a 40 MB manifest was read whole."""
    server, url = hostile
    monkeypatch.setenv("OFFSITE_MAX_MANIFEST_BYTES", "100000")
    big = b"{" + b" " * 2_000_000 + b"}"
    Hostile.routes = {BASE + "manifest.json": lambda h: send(h, big)}
    with pytest.raises(RemoteError, match="more than the limit of 100000"):
        Client(url, "ofs.a.b").download("emu", tmp_path / "out")
    Hostile.routes = {BASE + "manifest.json": lambda h: send(h, big, close_delimited=True)}
    with pytest.raises(RemoteError, match="more than 100000 bytes"):
        Client(url, "ofs.a.b").download("emu", tmp_path / "out")


def test_declared_sizes_are_bounded_before_downloading(hostile, tmp_path, monkeypatch):
    server, url = hostile
    monkeypatch.setenv("OFFSITE_MAX_FILE_BYTES", "1000")
    manifest = json.dumps({"files": {"model.safetensors": {"sha256": "0" * 64, "size": 10**12}}}).encode()
    Hostile.routes = {BASE + "manifest.json": lambda h: send(h, manifest)}
    with pytest.raises(BundleError, match="more than the limit of 1000"):
        Client(url, "ofs.a.b").download("emu", tmp_path / "out")


@pytest.mark.parametrize("body", [b"<html>not json</html>", b"\xff\xfe", b'{"unterminated": '])
def test_malformed_answers_are_one_line_errors(hostile, body):
    server, url = hostile
    Hostile.routes = {"/v1/bundles": lambda h: send(h, body)}
    with pytest.raises(RemoteError, match="not JSON"):
        Client(url, "ofs.a.b").list_bundles()


def test_an_oversized_answer_is_refused(hostile, monkeypatch):
    import offsite.service.client as C

    server, url = hostile
    monkeypatch.setattr(C, "MAX_ANSWER_BYTES", 1000)
    Hostile.routes = {"/v1/bundles": lambda h: send(h, b"[" + b"1," * 5000 + b"1]")}
    with pytest.raises(RemoteError, match="more than the limit of 1000"):
        Client(url, "ofs.a.b").list_bundles()


from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(declared=st.integers(0, 64), sent=st.binary(max_size=3000), length=st.sampled_from(["true", "lie", "none"]),
       manifest=st.sampled_from(["valid", "garbage", "no files", "negative size"]))
def test_fuzz_a_lying_server_never_gets_more_written_than_declared(hostile, tmp_path_factory, declared, sent, length, manifest):
    from offsite.errors import OffsiteError

    server, url = hostile
    expected = SMALL[:declared] if declared <= len(SMALL) else SMALL + b"x" * (declared - len(SMALL))
    table = manifest_for({"config.json": expected})
    body = {"valid": table, "garbage": b"{not json", "no files": b'{"files": {}}',
            "negative size": json.dumps({"files": {"config.json": {"sha256": "0" * 64, "size": -1}}}).encode()}[manifest]
    header_length = {"true": len(sent), "lie": max(0, len(sent) // 2), "none": None}[length]
    Hostile.routes = {
        BASE + "manifest.json": lambda h: send(h, body),
        BASE + "config.json": lambda h: send(h, sent, length=header_length, close_delimited=header_length is None),
    }
    out = tmp_path_factory.mktemp("dl") / "out"
    try:
        Client(url, "ofs.a.b", timeout=5).download("emu", out)
    except OffsiteError as e:
        assert "\n" not in str(e)
    partial = out.parent / ".out.partial" / "config.json"
    for path in (partial, out / "config.json"):
        if path.exists():
            assert path.stat().st_size <= declared
    if (out / "config.json").exists():
        assert (out / "config.json").read_bytes() == expected  # only a verified file is ever in place
