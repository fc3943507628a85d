"""Plug-in + evaluation jobs, run one at a time by a background thread of the server.

A job plugs an accepted adapter into a fresh copy of the owner's model and scores both the
model alone (full zero-shot) and the plugged model on the same multiple-choice docs: a
built-in task's evaluation split, or docs the data owner sent with the job (its own test
set). The adapter is verified again from disk, and `plug_in` runs every check against the
base model (fingerprint, issued emulator, allow-list, shapes, dtypes, finite values, norms)
before the model is touched; any failure marks the job failed with that one-line reason.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import traceback
from dataclasses import dataclass

from ..adapter import load_adapter
from ..bundle import parse_dtype
from ..emulator import load_checkpoint
from ..errors import OffsiteError
from ..plugin import plug_in
from ..tasks import MCDoc
from .store import Job, Store, StoreClosed
from .uploads import public_key_from_pem

log = logging.getLogger("offsite.service")


@dataclass(frozen=True)
class JobSettings:
    model_path: object  # the owner's base model checkpoint (None: jobs cannot run)
    model_name: str
    device: str = "cpu"
    eval_batch_size: int = 16
    max_norm_ratio: float | None = 100.0


def job_docs(request: dict) -> list[MCDoc]:
    """The docs a job scores: the given ones, or the first `eval_limit` of a built-in task."""
    if request.get("docs") is not None:
        docs = request["docs"][: request.get("eval_limit")]
        return [MCDoc(i, d["context"], list(d["choices"]), d["gold"]) for i, d in enumerate(docs)]
    from ..tasks import load_eval_docs

    return load_eval_docs(request["task"], request.get("eval_limit"))


def run_job(job: Job, store: Store, settings: JobSettings) -> dict:
    """Plug the job's adapter into the owner's model and score it; the report (raises OffsiteError)."""
    from ..evaluation import score_multiple_choice
    from ..models import resolve_device

    start = time.perf_counter()
    upload = store.get_upload(job.owner, job.upload_id)
    owner = store.owner(job.owner)
    if upload is None or owner is None:
        raise OffsiteError(f"upload {job.upload_id} is no longer stored")
    keys = [public_key_from_pem(owner.public_key)] if owner.public_key else False
    adapter = load_adapter(store.upload_dir(upload.id), trusted_key=keys)
    if adapter.fingerprint != upload.fingerprint:
        raise OffsiteError(f"upload {upload.id} changed on disk since it was accepted")
    issued = json.loads(upload.emulator_manifest)
    docs = job_docs(job.request)
    device = resolve_device(settings.device)
    model, tokenizer = load_checkpoint(settings.model_path, parse_dtype(issued["base"].get("dtype", "float32")))

    def score(m) -> dict:
        return score_multiple_choice(m.to(device), tokenizer, docs, batch_size=settings.eval_batch_size, progress=False)

    full = score(model)
    plugged = plug_in(model.cpu(), adapter, emulator=issued, max_norm_ratio=settings.max_norm_ratio)
    result = score(plugged)
    del model, plugged
    return {
        "job": job.id,
        "upload": upload.id,
        "owner": job.owner,
        "model": settings.model_name,
        "emulator": upload.emulator,
        "adapter": {"fingerprint": upload.fingerprint, "type": upload.adapter_type, "blocks": upload.blocks},
        "task": job.request.get("task") or "docs",
        "n": len(docs),
        "results": {"full_zs": full, "plugin": result},
        "gain": {"acc": result["acc"] - full["acc"], "acc_norm": result["acc_norm"] - full["acc_norm"]},
        "attempt": job.attempts,
        "seconds": round(time.perf_counter() - start, 2),
    }


class Worker:
    """Runs queued jobs in order, one at a time, in a daemon thread."""

    def __init__(self, store: Store, settings: JobSettings, poll_seconds: float = 1.0):
        self.store, self.settings, self.poll_seconds = store, settings, poll_seconds
        self._wake, self._stop = threading.Event(), threading.Event()
        self._thread = threading.Thread(target=self._loop, name="offsite-jobs", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def stop(self, timeout: float = 5.0) -> None:
        """Start no new job; wait up to `timeout` for the running one. One still running then
        stays 'running' in the store, and the next server start re-queues it."""
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                job = self.store.claim_next_job()
            except StoreClosed:
                return
            if job is None:
                self._wake.wait(self.poll_seconds)
                self._wake.clear()
                continue
            self._run(job)

    def _run(self, job: Job) -> None:
        log.info("job %s (owner %s, upload %s): attempt %d", job.id, job.owner, job.upload_id, job.attempts)
        try:
            report = run_job(job, self.store, self.settings)
        except OffsiteError as e:
            reason = str(e)
        except Exception as e:  # noqa: BLE001 - a job's crash must not stop the worker; the reason goes to the data owner
            log.error("job %s crashed:\n%s", job.id, traceback.format_exc())
            first = str(e).strip().splitlines()
            reason = f"internal error ({type(e).__name__}: {first[0][:200] if first else ''})"
        else:
            try:
                self.store.finish_job(job.id, report)
                log.info("job %s done in %.1f s", job.id, report["seconds"])
            except StoreClosed:
                pass  # the server stopped meanwhile: the job stays 'running' and is re-queued at the next start
            return
        try:
            self.store.fail_job(job.id, reason)
            log.info("job %s failed: %s", job.id, reason)
        except StoreClosed:
            pass
