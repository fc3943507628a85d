"""The service's state: SQLite for owners, tokens, uploads and jobs; files on disk written atomically.

Layout of the state directory:

    state.db            SQLite (WAL, synchronous=FULL): every row is committed before the
                        request that made it is answered
    uploads/<id>/       accepted adapter bundles, exactly as verified
    reports/<job>.json  job reports
    tmp/                uploads in flight (emptied when a server starts)
    server.lock         held (flock) by the one server that uses this directory

Files are made complete elsewhere (tmp/, or a temp name beside them), fsynced, then renamed
into place, and only then is the row that points at them committed; a server that starts
removes upload folders without a row (a crash between the two steps: that upload was never
acknowledged). A job a server was running when it stopped is re-queued at the next start, at
most `max_attempts` times in all, then marked failed with the reason: evaluating is
deterministic and reads only verified inputs, so running it again gives the same report, and
the cap stops a job that kills the server (out of memory) from looping. Nothing is dropped
silently.
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import shutil
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from ..durable import atomic_write, fsync_path
from ..errors import ConfigError
from . import auth

SCHEMA_VERSION = 1
SCHEMA = """
CREATE TABLE IF NOT EXISTS owners (
    name TEXT PRIMARY KEY,
    public_key TEXT,               -- PEM; when set, this owner's uploads must be signed with it
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS tokens (
    token_id TEXT PRIMARY KEY,
    owner TEXT NOT NULL REFERENCES owners(name),
    secret_sha256 TEXT NOT NULL,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS uploads (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL REFERENCES owners(name),
    created REAL NOT NULL,
    emulator TEXT NOT NULL,         -- name of the published emulator bundle it was trained on
    emulator_manifest TEXT NOT NULL,-- the owner's record of that emulator, kept for the job
    fingerprint TEXT NOT NULL,      -- bundle_fingerprint of the adapter manifest
    sha256 TEXT NOT NULL,           -- of the uploaded archive, as received
    size INTEGER NOT NULL,
    adapter_type TEXT NOT NULL,
    blocks TEXT NOT NULL,           -- JSON list of original block indices
    signed_by TEXT                  -- key id of the verified signature, if one was required
);
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL REFERENCES owners(name),
    upload_id TEXT NOT NULL REFERENCES uploads(id),
    request TEXT NOT NULL,          -- JSON: task / docs / eval_limit
    state TEXT NOT NULL CHECK (state IN ('queued', 'running', 'done', 'failed')),
    attempts INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    created REAL NOT NULL,
    started REAL,
    finished REAL
);
CREATE INDEX IF NOT EXISTS uploads_owner ON uploads(owner, created);
CREATE INDEX IF NOT EXISTS jobs_owner ON jobs(owner, created);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state, created);
"""
JOB_STATES = ("queued", "running", "done", "failed")


class StoreClosed(RuntimeError):
    """The store was closed (the server is stopping); the caller's result is not recorded."""


@dataclass(frozen=True)
class Owner:
    name: str
    public_key: str | None


@dataclass(frozen=True)
class Upload:
    id: str
    owner: str
    created: float
    emulator: str
    emulator_manifest: str
    fingerprint: str
    sha256: str
    size: int
    adapter_type: str
    blocks: list[int]
    signed_by: str | None


@dataclass(frozen=True)
class Job:
    id: str
    owner: str
    upload_id: str
    request: dict
    state: str
    attempts: int
    error: str | None
    created: float
    started: float | None
    finished: float | None


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(8)}"


class Store:
    """All state of one service. Thread-safe: one connection, one lock, short transactions."""

    def __init__(self, state_dir: str | Path):
        self.root = Path(state_dir)
        self.root.mkdir(parents=True, exist_ok=True)
        self.uploads_dir, self.reports_dir, self.tmp_dir = self.root / "uploads", self.root / "reports", self.root / "tmp"
        for folder in (self.uploads_dir, self.reports_dir, self.tmp_dir):
            folder.mkdir(exist_ok=True)
        self.closed = False
        self._lock = threading.RLock()
        self._lock_file = None
        self._db = sqlite3.connect(self.root / "state.db", check_same_thread=False, isolation_level=None, timeout=30)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version not in (0, SCHEMA_VERSION):
            raise ConfigError(f"{self.root / 'state.db'} has schema version {version}; this offsite knows {SCHEMA_VERSION}")
        self._db.executescript(SCHEMA)
        self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    # ------------------------------------------------------------ server lifecycle
    def open_for_server(self, max_attempts: int) -> list[tuple[str, str]]:
        """Take the directory's lock, clear what a stopped server left, recover its jobs.

        Returns (job id, what was done) for each job that was running.
        """
        self._lock_file = open(self.root / "server.lock", "a+")
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_file.close()
            self._lock_file = None
            raise ConfigError(f"state directory {self.root} is in use by another offsite serve") from None
        for entry in self.tmp_dir.iterdir():
            _remove(entry)
        with self._tx() as db:
            known = {row[0] for row in db.execute("SELECT id FROM uploads")}
        for entry in self.uploads_dir.iterdir():
            if entry.name not in known:
                _remove(entry)
        return self.recover_interrupted(max_attempts)

    def recover_interrupted(self, max_attempts: int) -> list[tuple[str, str]]:
        """Jobs left 'running' by a server that stopped: re-queued, or failed once out of attempts."""
        actions = []
        with self._tx() as db:
            for row in db.execute("SELECT id, attempts FROM jobs WHERE state = 'running'").fetchall():
                if row["attempts"] < max_attempts:
                    db.execute("UPDATE jobs SET state = 'queued', started = NULL WHERE id = ?", (row["id"],))
                    actions.append((row["id"], f"re-queued after a server restart (attempt {row['attempts']} of {max_attempts} was interrupted)"))
                else:
                    reason = f"interrupted by a server restart during attempt {row['attempts']} of {max_attempts}; not retried again"
                    db.execute("UPDATE jobs SET state = 'failed', error = ?, finished = ? WHERE id = ?", (reason, time.time(), row["id"]))
                    actions.append((row["id"], "failed: " + reason))
        return actions

    def close(self) -> None:
        with self._lock:
            if self.closed:
                return
            self.closed = True
            self._db.close()
            if self._lock_file is not None:
                self._lock_file.close()  # releases the flock
                self._lock_file = None

    def _tx(self):
        return _Transaction(self)

    # ------------------------------------------------------------ owners and tokens
    def create_token(self, owner: str, public_key: str | None = None) -> str:
        """A new token for `owner` (created if new; `public_key` replaces its key when given)."""
        auth.check_owner_name(owner)
        token, token_id, digest = auth.new_token()
        now = time.time()
        with self._tx() as db:
            db.execute("INSERT OR IGNORE INTO owners (name, public_key, created) VALUES (?, NULL, ?)", (owner, now))
            if public_key is not None:
                db.execute("UPDATE owners SET public_key = ? WHERE name = ?", (public_key, owner))
            db.execute("INSERT INTO tokens (token_id, owner, secret_sha256, created) VALUES (?, ?, ?, ?)", (token_id, owner, digest, now))
        return token

    def authenticate(self, token: str) -> Owner | None:
        parts = auth.split_token(token)
        if parts is None:
            return None
        with self._tx() as db:
            row = db.execute(
                "SELECT o.name, o.public_key, t.secret_sha256 FROM tokens t JOIN owners o ON o.name = t.owner WHERE t.token_id = ?",
                (parts[0],),
            ).fetchone()
        if row is None or not auth.secret_matches(parts[1], row["secret_sha256"]):
            return None
        return Owner(row["name"], row["public_key"])

    def owner(self, name: str) -> Owner | None:
        with self._tx() as db:
            row = db.execute("SELECT name, public_key FROM owners WHERE name = ?", (name,)).fetchone()
        return Owner(row["name"], row["public_key"]) if row else None

    # ------------------------------------------------------------ uploads
    def upload_dir(self, upload_id: str) -> Path:
        return self.uploads_dir / upload_id

    def add_upload(self, upload: Upload, bundle_dir: Path) -> None:
        """Move a verified bundle into place, then commit its row (the folder goes if the row fails)."""
        final = self.upload_dir(upload.id)
        with self._lock:
            if self.closed:
                raise StoreClosed("the server is stopping")
            os.replace(bundle_dir, final)
            fsync_path(self.uploads_dir)
            try:
                with self._tx() as db:
                    db.execute(
                        "INSERT INTO uploads VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (upload.id, upload.owner, upload.created, upload.emulator, upload.emulator_manifest, upload.fingerprint,
                         upload.sha256, upload.size, upload.adapter_type, json.dumps(upload.blocks), upload.signed_by),
                    )
            except BaseException:
                shutil.rmtree(final, ignore_errors=True)
                raise

    def get_upload(self, owner: str, upload_id: str) -> Upload | None:
        """The upload if it exists *and* belongs to `owner` (another owner's looks absent)."""
        with self._tx() as db:
            row = db.execute("SELECT * FROM uploads WHERE id = ? AND owner = ?", (upload_id, owner)).fetchone()
        return _upload(row) if row else None

    def list_uploads(self, owner: str) -> list[Upload]:
        with self._tx() as db:
            rows = db.execute("SELECT * FROM uploads WHERE owner = ? ORDER BY created, id", (owner,)).fetchall()
        return [_upload(r) for r in rows]

    # ------------------------------------------------------------ jobs
    def add_job(self, owner: str, upload_id: str, request: dict) -> Job:
        job_id, now = new_id("job"), time.time()
        with self._tx() as db:
            db.execute(
                "INSERT INTO jobs (id, owner, upload_id, request, state, created) VALUES (?, ?, ?, ?, 'queued', ?)",
                (job_id, owner, upload_id, json.dumps(request), now),
            )
            return _job(db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone())

    def get_job(self, owner: str, job_id: str) -> Job | None:
        with self._tx() as db:
            row = db.execute("SELECT * FROM jobs WHERE id = ? AND owner = ?", (job_id, owner)).fetchone()
        return _job(row) if row else None

    def list_jobs(self, owner: str) -> list[Job]:
        with self._tx() as db:
            rows = db.execute("SELECT * FROM jobs WHERE owner = ? ORDER BY created, id", (owner,)).fetchall()
        return [_job(r) for r in rows]

    def claim_next_job(self) -> Job | None:
        """The oldest queued job, now marked running (one more attempt), or None."""
        with self._tx() as db:
            row = db.execute("SELECT id FROM jobs WHERE state = 'queued' ORDER BY created, id LIMIT 1").fetchone()
            if row is None:
                return None
            db.execute("UPDATE jobs SET state = 'running', attempts = attempts + 1, started = ?, error = NULL WHERE id = ?",
                       (time.time(), row["id"]))
            return _job(db.execute("SELECT * FROM jobs WHERE id = ?", (row["id"],)).fetchone())

    def report_path(self, job_id: str) -> Path:
        return self.reports_dir / f"{job_id}.json"

    def finish_job(self, job_id: str, report: dict) -> None:
        """Write the report atomically, then mark the job done."""
        data = (json.dumps(report, indent=2, allow_nan=False) + "\n").encode()
        with self._lock:
            if self.closed:
                raise StoreClosed("the server is stopping")
            atomic_write(self.report_path(job_id), data)
            with self._tx() as db:
                db.execute("UPDATE jobs SET state = 'done', finished = ? WHERE id = ?", (time.time(), job_id))

    def fail_job(self, job_id: str, reason: str) -> None:
        with self._tx() as db:
            db.execute("UPDATE jobs SET state = 'failed', error = ?, finished = ? WHERE id = ?", (reason, time.time(), job_id))

    def read_report(self, job_id: str) -> dict:
        return json.loads(self.report_path(job_id).read_text())


class _Transaction:
    """`with store._tx() as db:` one SQLite transaction under the store's lock."""

    def __init__(self, store: Store):
        self.store = store

    def __enter__(self) -> sqlite3.Connection:
        self.store._lock.acquire()
        if self.store.closed:
            self.store._lock.release()
            raise StoreClosed("the server is stopping")
        self.store._db.execute("BEGIN IMMEDIATE")
        return self.store._db

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self.store._db.execute("COMMIT" if exc_type is None else "ROLLBACK")
        finally:
            self.store._lock.release()


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _upload(row: sqlite3.Row) -> Upload:
    return Upload(**{**dict(row), "blocks": json.loads(row["blocks"])})


def _job(row: sqlite3.Row) -> Job:
    return Job(**{**dict(row), "request": json.loads(row["request"])})
