"""The data owner's client of the owner service, on the standard library's http.client.

Downloads resume: files land in a hidden `.NAME.partial` folder beside the output; a rerun
asks only for the missing bytes (`Range`, with `If-Range` set to the file's SHA-256, so a
file that changed on the server is fetched whole), checks each file against the manifest,
then verifies the whole bundle with `read_manifest` (signature too, with `trusted_key`) and
renames it into place. Uploads send the adapter bundle as a tar and check that the server
stored exactly the bundle that was sent.

One `Client` keeps one connection: use one per thread.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import tempfile
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path

from ..bundle import MANIFEST, MAX_SIGNATURE_BYTES, SIGNATURE, Limits, bundle_fingerprint, parse_json, read_manifest, sha256_file
from ..durable import atomic_write
from ..errors import BundleError, OffsiteError
from .errors import RemoteError
from .published import check_member_name
from .uploads import ARCHIVE_TYPE, pack_bundle

Progress = Callable[[str, int, int], None]  # (file, bytes so far, file size)
_TRANSIENT = (BrokenPipeError, ConnectionResetError, http.client.RemoteDisconnected)


from .config import TOKEN_ENV, URL_ENV  # noqa: E402,F401  (re-exported)
MAX_ANSWER_BYTES = 64 * 1024 * 1024  # any JSON answer (lists, reports, representations)


class Client:
    @classmethod
    def from_options(cls, url: str | None, token: str | None) -> "Client":
        """A client for --url/--token, each falling back to $OFFSITE_URL/$OFFSITE_TOKEN."""
        return cls(url or os.environ.get(URL_ENV, ""), token or os.environ.get(TOKEN_ENV, ""))

    def __init__(self, url: str, token: str, timeout: float = 300.0, chunk_size: int = 1 << 20):
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise RemoteError(f"server URL must be http(s)://HOST[:PORT], got {url!r}")
        if not token:
            raise RemoteError("no API token: give --token (or set OFFSITE_TOKEN) with the token from offsite serve-token")
        self.url, self.token, self.timeout, self.chunk_size = url.rstrip("/"), token, timeout, chunk_size
        self._scheme, self._host, self._port = parts.scheme, parts.hostname, parts.port
        self._prefix = parts.path.rstrip("/")
        self._conn: http.client.HTTPConnection | None = None
        self.requests_sent = 0  # for load tests and benchmarks

    # ------------------------------------------------------------ transport
    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _connection(self) -> http.client.HTTPConnection:
        if self._conn is None:
            cls = http.client.HTTPSConnection if self._scheme == "https" else http.client.HTTPConnection
            self._conn = cls(self._host, self._port, timeout=self.timeout, blocksize=self.chunk_size)
        return self._conn

    def _send(self, method: str, path: str, body=None, headers: dict | None = None) -> http.client.HTTPResponse:
        """Send a request and return the response (its body still to be read). A GET is retried
        once on a kept-alive connection the server had closed; a body is never sent twice."""
        headers = {"Authorization": f"Bearer {self.token}", **(headers or {})}
        if method != "GET":
            self.close()  # never send a body down a kept-alive connection the server may just have closed
        for attempt in range(2):
            conn = self._connection()
            self.requests_sent += 1
            try:
                try:
                    conn.request(method, self._prefix + path, body=body, headers=headers)
                except _TRANSIENT:
                    if method == "GET":
                        raise
                    # The server answered before reading the whole body (e.g. 413): read its answer.
                return conn.getresponse()
            except _TRANSIENT as e:
                self.close()
                if attempt == 1 or method != "GET":
                    raise RemoteError(f"{self.url} closed the connection during {method} {path} ({type(e).__name__})") from None
            except OSError as e:
                self.close()
                raise RemoteError(f"cannot reach {self.url} ({e.strerror or e})") from None
        raise AssertionError("unreachable")

    def _check(self, response: http.client.HTTPResponse, ok: tuple[int, ...] = (200,)) -> None:
        if response.status in ok:
            return
        data = response.read()
        if response.will_close:
            self.close()
        try:
            detail = json.loads(data)["detail"]
        except (ValueError, KeyError, TypeError):
            detail = data[:200].decode("utf-8", "replace") or response.reason
        raise RemoteError(f"server answered {response.status}: {detail}", response.status)

    def _json(self, method: str, path: str, payload=None, ok: tuple[int, ...] = (200,), body=None, headers=None):
        if payload is not None:
            body, headers = json.dumps(payload).encode(), {"Content-Type": "application/json"}
        response = self._send(method, path, body, headers)
        self._check(response, ok)
        data = self._read_bounded(response, MAX_ANSWER_BYTES, f"the answer to {method} {path}")
        if response.will_close:
            self.close()
        try:
            return json.loads(data)
        except (ValueError, UnicodeDecodeError):
            raise RemoteError(f"{self.url} answered {method} {path} with something that is not JSON") from None

    def _read_bounded(self, response: http.client.HTTPResponse, limit: int, what: str) -> bytes:
        """The whole body, refusing (before reading, when Content-Length says so) more than `limit` bytes."""
        declared = response.getheader("Content-Length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            self.close()
            raise RemoteError(f"server sent {what} of {declared} bytes, more than the limit of {limit}")
        data = response.read(limit + 1)
        if len(data) > limit:
            self.close()
            raise RemoteError(f"server sent {what} of more than {limit} bytes")
        return data

    def _get_bytes(self, path: str, missing_ok: bool = False, limit: int = MAX_ANSWER_BYTES) -> bytes | None:
        response = self._send("GET", path)
        if missing_ok and response.status == 404:
            response.read()
            return None
        self._check(response)
        return self._read_bounded(response, limit, path)

    # ------------------------------------------------------------ API
    def health(self) -> dict:
        return self._json("GET", "/v1/health")

    def list_bundles(self) -> list[dict]:
        return self._json("GET", "/v1/bundles")

    def bundle(self, name: str) -> dict:
        return self._json("GET", f"/v1/bundles/{_quote(name)}")

    def uploads(self) -> list[dict]:
        return self._json("GET", "/v1/uploads")

    def get_upload(self, upload_id: str) -> dict:
        return self._json("GET", f"/v1/uploads/{_quote(upload_id)}")

    def jobs(self) -> list[dict]:
        return self._json("GET", "/v1/jobs")

    def job(self, job_id: str) -> dict:
        return self._json("GET", f"/v1/jobs/{_quote(job_id)}")

    def report(self, job_id: str) -> dict:
        return self._json("GET", f"/v1/jobs/{_quote(job_id)}/report")

    def submit(self, upload_id: str, task: str | None = None, docs: list[dict] | None = None, eval_limit: int | None = None) -> dict:
        payload = {"upload_id": upload_id, "task": task, "docs": docs, "eval_limit": eval_limit}
        return self._json("POST", "/v1/jobs", {k: v for k, v in payload.items() if v is not None}, ok=(202,))

    def wait(self, job_id: str, timeout: float | None = None, poll: float = 0.5) -> dict:
        """Poll a job until it is done or failed (or `timeout` seconds pass); its last status."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            status = self.job(job_id)
            if status["state"] in ("done", "failed") or (deadline is not None and time.monotonic() > deadline):
                return status
            time.sleep(poll)

    def owner_info(self) -> dict:
        return self._json("GET", "/v1/representations/info")

    def representations(self, prompts: list[list[int]], forced: list[list[int]] | None = None,
                        greedy_steps: int | list[int] = 0, log_probs: int = 0) -> dict:
        """PEMA's representation query (see `offsite.pema.owner.RepresentationRequest`), as JSON."""
        return self._json("POST", "/v1/representations",
                          {"prompts": prompts, "forced": forced, "greedy_steps": greedy_steps, "log_probs": log_probs})

    def upload(self, adapter_dir: str | Path) -> dict:
        """Send an adapter bundle; the server's record of it, checked to be the bundle sent."""
        with tempfile.TemporaryDirectory(prefix="offsite-upload-") as tmp:
            archive = Path(tmp) / "adapter.tar"
            manifest = pack_bundle(adapter_dir, archive)
            digest, size = sha256_file(archive), archive.stat().st_size
            with open(archive, "rb") as body:
                info = self._json("POST", "/v1/uploads", ok=(201,), body=body,
                                  headers={"Content-Type": ARCHIVE_TYPE, "Content-Length": str(size)})
        if info.get("sha256") != digest or info.get("fingerprint") != bundle_fingerprint(manifest):
            raise RemoteError(f"server recorded upload {info.get('id')} with other content than was sent")
        return info

    def download(self, name: str, out: str | Path, trusted_key=None, overwrite: bool = False,
                 progress: Progress | None = None) -> Path:
        """Download emulator bundle `name` into `out`, resuming an interrupted download, and verify it."""
        out = Path(out)
        if out.exists() and not overwrite:
            raise BundleError(f"output already exists, not overwriting: {out}")
        partial = out.parent / f".{out.name}.partial"
        base = f"/v1/bundles/{_quote(name)}/files/"
        limits = Limits.from_env()
        manifest_bytes = self._get_bytes(base + MANIFEST, limit=limits.max_manifest_bytes)
        files = _file_table(parse_json(manifest_bytes, f"{name}/{MANIFEST} from {self.url}"), name, limits)
        if partial.is_dir() and (not (partial / MANIFEST).is_file() or (partial / MANIFEST).read_bytes() != manifest_bytes):
            shutil.rmtree(partial)  # another bundle, or a changed one: nothing to resume
        partial.mkdir(parents=True, exist_ok=True)
        atomic_write(partial / MANIFEST, manifest_bytes)
        signature = self._get_bytes(base + SIGNATURE, missing_ok=True, limit=MAX_SIGNATURE_BYTES)
        if signature is not None:
            atomic_write(partial / SIGNATURE, signature)
        else:
            (partial / SIGNATURE).unlink(missing_ok=True)
        for rel, meta in sorted(files.items()):
            self._fetch(base + urllib.parse.quote(rel), rel, partial / rel, meta, progress)
        read_manifest(partial, kind="emulator", trusted_key=trusted_key)  # every hash, and the signature when trusted
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
            os.replace(partial, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(partial, out)
        return out

    def _fetch(self, path: str, rel: str, dest: Path, meta: dict, progress: Progress | None) -> None:
        size, sha = meta["size"], meta["sha256"]
        dest.parent.mkdir(parents=True, exist_ok=True)
        have = dest.stat().st_size if dest.is_file() else 0
        if dest.is_file() and have == size and sha256_file(dest) == sha:
            return
        if have >= size:
            have = 0  # complete but wrong, or longer than it should be: fetch it anew
        headers = {"Range": f"bytes={have}-", "If-Range": f'"{sha}"'} if have else {}
        response = self._send("GET", path, headers=headers)
        try:
            self._check(response, ok=(200, 206))
            if response.status == 206:
                first = (response.getheader("Content-Range") or "").removeprefix("bytes ").split("-")[0]
                if first != str(have):
                    raise RemoteError(f"server sent {rel} from byte {first or '?'}, asked for {have}")
            else:
                have = 0
            declared = response.getheader("Content-Length")
            if declared is not None and (not declared.isdigit() or int(declared) > size - have):
                raise RemoteError(f"server would send {declared} bytes of {rel}, whose manifest size leaves {size - have}")
            with open(dest, "ab" if have else "wb") as f:
                # Never more than the manifest declares: one byte past it is the server lying.
                while chunk := response.read(min(self.chunk_size, size - have + 1)):
                    if have + len(chunk) > size:
                        raise RemoteError(f"server sent more of {rel} than the {size} bytes its manifest declares")
                    f.write(chunk)
                    have += len(chunk)
                    if progress is not None:
                        progress(rel, have, size)
                f.flush()
                os.fsync(f.fileno())
        except BaseException:
            self.close()  # the rest of the body is unread; this connection cannot be reused
            raise
        if have != size:
            raise RemoteError(f"download of {rel} stopped at {have} of {size} bytes; run again to resume")
        if sha256_file(dest) != sha:
            dest.unlink()
            raise BundleError(f"downloaded {rel} does not match its SHA-256 in the manifest; removed it, run again to fetch it anew")


class RemoteOwner:
    """`offsite.pema`'s owner interface (`represent`, `info`) over HTTP: pass it wherever PEMA
    takes a RepresentationServer (`build_memory`, `generate_ids` through a StatelessSession)."""

    def __init__(self, client: Client):
        self.client = client

    def info(self) -> dict:
        return self.client.owner_info()

    def represent(self, request):
        from ..pema.owner import RepresentationResponse

        return RepresentationResponse.from_dict(self.client.representations(**request.to_dict()))


def _quote(part: str) -> str:
    return urllib.parse.quote(part, safe="")


def _file_table(manifest: object, name: str, limits: Limits | None = None) -> dict:
    """The manifest's file table, with names that stay inside the download folder and sizes within the limits."""
    limits = limits or Limits.from_env()
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not files:
        raise BundleError(f"the manifest of {name} lists no files")
    if len(files) > limits.max_files:
        raise BundleError(f"the manifest of {name} lists {len(files)} files, more than the limit of {limits.max_files}")
    for rel, meta in files.items():
        try:
            check_member_name(rel)
        except OffsiteError:
            raise BundleError(f"the manifest of {name} names an unsafe path {str(rel)[:100]!r}") from None
        if rel in (MANIFEST, SIGNATURE) or not isinstance(meta, dict) or type(meta.get("size")) is not int \
                or meta["size"] < 0 or not isinstance(meta.get("sha256"), str):
            raise BundleError(f"the manifest of {name} has a malformed entry for {rel[:100]!r}")
        if meta["size"] > limits.max_file_bytes:
            raise BundleError(f"the manifest of {name} declares {rel[:100]!r} of {meta['size']} bytes, more than the limit "
                              f"of {limits.max_file_bytes} (OFFSITE_MAX_FILE_BYTES)")
    total = sum(meta["size"] for meta in files.values())
    if total > limits.max_bundle_bytes:
        raise BundleError(f"the manifest of {name} declares {total} bytes in all, more than the limit of "
                          f"{limits.max_bundle_bytes} (OFFSITE_MAX_BUNDLE_BYTES)")
    return files
