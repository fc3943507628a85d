"""The owner service's HTTP API (FastAPI). `create_app(Service(config))` builds it.

Every endpoint but /v1/health and the OpenAPI document needs `Authorization: Bearer TOKEN`
(`offsite serve-token`). A data owner sees only its own uploads and jobs: another owner's ids
answer 404, exactly as ids that do not exist. Errors are JSON `{"detail": "one line"}`.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Annotated, Any, Literal

import anyio
from fastapi import Depends, FastAPI, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from .. import __version__
from ..errors import OffsiteError
from .config import ServeConfig
from .errors import ServiceError
from .guard import BodyRefused, Guard
from .jobs import JobSettings, Worker
from .published import Catalog, RangeNotSatisfiable, find_member, parse_range
from .representations import HTTP_LIMITS, MAX_TOP_K, RepresentationSource
from .store import Job, Owner, Store, StoreClosed, Upload
from .uploads import ARCHIVE_TYPE, SizeLimitedWriter, accept_upload

log = logging.getLogger("offsite.service")

MAX_JOB_DOCS = 10_000
_CHUNK = 1 << 20


class Service:
    """Everything the API works with: the catalog of bundles, the store, the job worker, the model."""

    def __init__(self, config: ServeConfig):
        from ..models import resolve_model

        self.config = config
        self.catalog = Catalog(config.bundles)
        model_path, model_name = resolve_model(config.model) if config.model else (None, "")
        model_name = Path(model_name).name or model_name  # a checkpoint's folder name, not the owner's path
        self.settings = JobSettings(model_path, model_name, config.device, config.eval_batch_size,
                                    config.max_norm_ratio if config.max_norm_ratio > 0 else None)
        self.store = Store(config.state)
        self.worker = Worker(self.store, self.settings)
        self.representations = RepresentationSource(self._load_model)

    def start(self) -> None:
        """Take the state directory, recover interrupted jobs, start the worker."""
        for job_id, action in self.store.open_for_server(self.config.max_attempts):
            log.warning("job %s: %s", job_id, action)
        self.worker.start()

    def stop(self) -> None:
        self.worker.stop()
        self.store.close()

    def _load_model(self):
        from ..emulator import load_checkpoint
        from ..models import resolve_device

        model, _ = load_checkpoint(self.settings.model_path)
        return model.to(resolve_device(self.settings.device)), self.settings.model_name


# ---------------------------------------------------------------- API models
class ErrorInfo(BaseModel):
    detail: str


class Health(BaseModel):
    status: Literal["ok"]
    version: str
    max_upload_bytes: int
    jobs: bool  # whether a base model is configured (jobs and representation queries)
    tasks: list[str]


class FileInfo(BaseModel):
    path: str
    size: int
    sha256: str


class BundleInfo(BaseModel):
    name: str
    fingerprint: str
    method: str
    method_params: dict[str, Any]
    base_model: str
    base_fingerprint: str
    num_blocks: int
    blocks: list[int]  # emulator block -> original block
    adapter_blocks: list[int]  # original indices of the trainable blocks
    signed: bool
    size: int
    files: list[FileInfo]


class UploadInfo(BaseModel):
    id: str
    created: float
    emulator: str
    fingerprint: str  # of the adapter bundle's manifest (offsite.bundle.bundle_fingerprint)
    sha256: str  # of the archive as received
    size: int
    adapter_type: str
    blocks: list[int]
    signed_by: str | None


class EvalDoc(BaseModel):
    model_config = ConfigDict(extra="forbid")
    context: str = Field(max_length=100_000)
    choices: list[Annotated[str, Field(max_length=100_000)]] = Field(min_length=2, max_length=26)
    gold: int = Field(ge=0)


class JobRequest(BaseModel):
    """Plug upload `upload_id` into the owner's model and score it on a built-in task or on `docs`."""

    model_config = ConfigDict(extra="forbid")
    upload_id: str = Field(max_length=64)
    task: str | None = Field(None, max_length=64)
    docs: list[EvalDoc] | None = Field(None, min_length=1, max_length=MAX_JOB_DOCS)
    eval_limit: int | None = Field(None, ge=1)


class JobInfo(BaseModel):
    id: str
    upload_id: str
    state: Literal["queued", "running", "done", "failed"]
    task: str
    attempts: int
    error: str | None
    created: float
    started: float | None
    finished: float | None


TokenId = Annotated[int, Field(ge=0, lt=2**31)]
Steps = Annotated[int, Field(ge=0, le=HTTP_LIMITS.max_steps)]


class RepresentationQuery(BaseModel):
    """PEMA's representation request (`offsite.pema.owner.RepresentationRequest`): row j of
    prompt i's answer is the context prompt_i + extension_i[:j], the extension being `forced`
    tokens, then `greedy_steps` of the model's own greedy tokens."""

    model_config = ConfigDict(extra="forbid")
    prompts: list[Annotated[list[TokenId], Field(min_length=1, max_length=HTTP_LIMITS.max_tokens)]] = Field(
        min_length=1, max_length=HTTP_LIMITS.max_prompts
    )
    forced: list[Annotated[list[TokenId], Field(max_length=HTTP_LIMITS.max_tokens)]] | None = Field(None, max_length=HTTP_LIMITS.max_prompts)
    greedy_steps: Steps | Annotated[list[Steps], Field(max_length=HTTP_LIMITS.max_prompts)] = 0
    log_probs: int = Field(0, ge=0, le=MAX_TOP_K)  # 0: none; k: the k most likely next tokens per row


class RepresentationAnswer(BaseModel):
    """`RepresentationResponse.to_dict()`: per prompt, rows x hidden_size representations (the
    input of the final norm), the extension tokens, and with log_probs > 0 rows x k log-probabilities and token ids."""

    representations: list[list[list[float]]]
    extension: list[list[int]]
    log_probs: list[list[list[float]]] | None = None
    top_tokens: list[list[list[int]]] | None = None


class OwnerInfo(BaseModel):
    base_fingerprint: str
    model_type: str
    hidden_size: int
    vocab_size: int


_REASONS = {
    400: "the body is not JSON", 401: "missing or invalid API token", 404: "not found (or not yours)",
    409: "not ready", 413: "upload too large", 416: "range not satisfiable",
    422: "rejected: the reason is in `detail`", 429: "too many of your requests waiting; retry later",
    503: "no base model configured on this server",
}


def errors(*codes: int) -> dict:
    return {code: {"model": ErrorInfo, "description": _REASONS[code]} for code in codes}


_BINARY = {"schema": {"type": "string", "format": "binary"}}


# ---------------------------------------------------------------- responses
class FileRangeResponse(Response):
    """A file, or one byte range of it, streamed from an open file in a worker thread."""

    media_type = "application/octet-stream"

    def __init__(self, file, size: int, span: tuple[int, int] | None, etag: str):
        self.file = file
        self.first, last = span if span is not None else (0, size - 1)
        self.length = last - self.first + 1
        headers = {"accept-ranges": "bytes", "etag": etag, "content-length": str(self.length)}
        if span is not None:
            headers["content-range"] = f"bytes {self.first}-{last}/{size}"
        super().__init__(status_code=206 if span is not None else 200, headers=headers)

    async def __call__(self, scope, receive, send) -> None:
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            position, end = self.first, self.first + self.length
            fd = self.file.fileno()
            while position < end:
                chunk = await anyio.to_thread.run_sync(os.pread, fd, min(_CHUNK, end - position), position)
                if not chunk:
                    raise OSError(f"{self.file.name} shrank while it was being sent")
                position += len(chunk)
                await send({"type": "http.response.body", "body": chunk, "more_body": position < end})
            if self.length == 0:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            self.file.close()


def _bundle_info(bundle) -> BundleInfo:
    m = bundle.manifest
    method = m.get("method") if isinstance(m.get("method"), dict) else {}
    params = method.get("params") if isinstance(method.get("params"), dict) else {}
    return BundleInfo(
        name=bundle.name,
        fingerprint=bundle.fingerprint,
        method=str(method.get("name", "")),
        method_params=params,
        base_model=str(m["base"].get("name", "")),
        base_fingerprint=m["base"]["fingerprint"],
        num_blocks=m["base"]["num_blocks"],
        blocks=m["blocks"]["map"],
        adapter_blocks=m["blocks"]["adapter"],
        signed=bundle.signed,
        size=bundle.size,
        files=[FileInfo(path=p, size=meta["size"], sha256=meta["sha256"]) for p, meta in sorted(m["files"].items())],
    )


def _upload_info(upload: Upload) -> UploadInfo:
    return UploadInfo(id=upload.id, created=upload.created, emulator=upload.emulator, fingerprint=upload.fingerprint,
                      sha256=upload.sha256, size=upload.size, adapter_type=upload.adapter_type, blocks=upload.blocks,
                      signed_by=upload.signed_by)


def _job_info(job: Job) -> JobInfo:
    return JobInfo(id=job.id, upload_id=job.upload_id, state=job.state, task=job.request.get("task") or "docs",
                   attempts=job.attempts, error=job.error, created=job.created, started=job.started, finished=job.finished)


def _one_line(exc: RequestValidationError) -> str:
    parts = []
    for error in exc.errors()[:3]:
        where = ".".join(str(p) for p in error.get("loc", ()) if p != "body") or "body"
        parts.append(f"{where}: {error.get('msg', 'invalid')}")
    more = len(exc.errors()) - 3
    return "invalid request: " + "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")


# ---------------------------------------------------------------- the app
def create_app(service: Service) -> FastAPI:
    from ..tasks import TASKS

    app = FastAPI(
        title="offsite owner service",
        version=__version__,
        description="Offsite-tuning between a model owner and data owners: emulator bundles out, adapter bundles in, "
        "plug-in + evaluation jobs, and representation queries (PEMA).",
    )
    config, store, catalog = service.config, service.store, service.catalog
    bearer = HTTPBearer(auto_error=False, description="API token from `offsite serve-token`")

    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError):
        return JSONResponse({"detail": str(exc)}, status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        return JSONResponse({"detail": _one_line(exc)}, status_code=422)

    @app.exception_handler(OffsiteError)
    async def _offsite_error(request: Request, exc: OffsiteError):
        return JSONResponse({"detail": str(exc)}, status_code=422)

    @app.exception_handler(StoreClosed)
    async def _closed(request: Request, exc: StoreClosed):
        return JSONResponse({"detail": "the server is stopping"}, status_code=503)

    @app.exception_handler(BodyRefused)
    async def _body_refused(request: Request, exc: BodyRefused):
        return JSONResponse({"detail": exc.detail}, status_code=exc.status, headers={"Connection": "close"})

    # Token, body caps and stalled bodies are checked before FastAPI reads a body (see offsite.service.guard).
    app.add_middleware(Guard, authenticate=store.authenticate, max_json_bytes=config.max_json_bytes,
                       max_upload_bytes=config.max_upload_bytes, body_timeout=config.body_timeout)

    def current_owner(credentials: HTTPAuthorizationCredentials | None = Security(bearer)) -> Owner:
        owner = store.authenticate(credentials.credentials) if credentials is not None else None
        if owner is None:
            raise ServiceError(401, "missing or invalid API token (send Authorization: Bearer TOKEN from offsite serve-token)",
                               headers={"WWW-Authenticate": "Bearer"})
        return owner

    def require_model() -> None:
        if service.settings.model_path is None:
            raise ServiceError(503, "this server has no base model configured (offsite serve --model)")

    @app.get("/v1/health", response_model=Health, tags=["service"])
    def health() -> Health:
        """Liveness and limits; needs no token."""
        return Health(status="ok", version=__version__, max_upload_bytes=config.max_upload_bytes,
                      jobs=service.settings.model_path is not None, tasks=sorted(TASKS))

    # -------------------------------------------------------- emulator bundles
    @app.get("/v1/bundles", response_model=list[BundleInfo], responses=errors(401), tags=["bundles"])
    def list_bundles(owner: Owner = Depends(current_owner)) -> list[BundleInfo]:
        """The emulator bundles this owner publishes."""
        return [_bundle_info(b) for b in catalog.bundles()]

    @app.get("/v1/bundles/{name}", response_model=BundleInfo, responses=errors(401, 404, 422), tags=["bundles"])
    def get_bundle(name: str, owner: Owner = Depends(current_owner)) -> BundleInfo:
        bundle = catalog.get(name)
        if bundle is None:
            raise ServiceError(404, f"no published bundle named {name[:100]!r}")
        return _bundle_info(bundle)

    @app.get(
        "/v1/bundles/{name}/files/{path:path}",
        response_class=Response,
        responses={
            200: {"content": {"application/octet-stream": _BINARY}, "description": "the whole file"},
            206: {"content": {"application/octet-stream": _BINARY}, "description": "the requested byte range"},
            **errors(401, 404, 416, 422),
        },
        tags=["bundles"],
    )
    def download_file(name: str, path: str, request: Request, owner: Owner = Depends(current_owner)):
        """One file of a bundle (a listed file, `manifest.json` or `manifest.sig`). Supports
        `Range: bytes=a-b | a- | -n` (206 with Content-Range; 416 past the end) and `If-Range`
        with the ETag (the file's SHA-256), so an interrupted download resumes safely."""
        bundle = catalog.get(name)
        member = find_member(bundle, path) if bundle is not None else None
        opened = member.open() if member is not None else None
        if opened is None:
            raise ServiceError(404, f"no file {path[:200]!r} in a published bundle {name[:100]!r}")
        file, size = opened
        etag = f'"{member.etag}"'
        if_range = request.headers.get("if-range")
        try:
            span = parse_range(request.headers.get("range"), size) if if_range in (None, etag) else None
        except RangeNotSatisfiable:
            file.close()
            raise ServiceError(416, f"range not satisfiable: {path[:200]} has {size} bytes", headers={"Content-Range": f"bytes */{size}"}) from None
        return FileRangeResponse(file, size, span, etag)

    # -------------------------------------------------------- uploads
    @app.post(
        "/v1/uploads",
        status_code=201,
        response_model=UploadInfo,
        responses=errors(401, 413, 422),
        openapi_extra={"requestBody": {"required": True, "content": {ARCHIVE_TYPE: _BINARY}}},
        tags=["uploads"],
    )
    async def upload(request: Request, owner: Owner = Depends(current_owner)) -> UploadInfo:
        """An adapter bundle as a plain tar of its files (what `offsite remote upload` sends).
        Streamed to disk under the size limit, unpacked strictly, verified (manifest, hashes,
        signature when the owner registered a key, trained on an emulator this server
        publishes, exactly its trainable blocks). Rejected uploads leave nothing behind."""
        limit = config.max_upload_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise ServiceError(413, f"upload of {declared} bytes is larger than the limit of {limit} bytes")
        tmp = Path(await run_in_threadpool(tempfile.mkdtemp, "", "up-", str(store.tmp_dir)))
        try:
            writer = SizeLimitedWriter(tmp / "archive.tar", limit)
            try:
                async for chunk in request.stream():
                    writer.write(chunk)
            finally:
                await run_in_threadpool(writer.close)
            if writer.size == 0:
                raise ServiceError(422, "empty upload: send the adapter bundle as a tar archive")
            accepted = await run_in_threadpool(accept_upload, store, catalog, owner, writer.path, writer.hash.hexdigest(), writer.size, limit)
        finally:
            await run_in_threadpool(shutil.rmtree, tmp, True)
        log.info("upload %s from %s accepted (%d bytes, adapter %s)", accepted.id, owner.name, accepted.size, accepted.fingerprint[:16])
        return _upload_info(accepted)

    @app.get("/v1/uploads", response_model=list[UploadInfo], responses=errors(401), tags=["uploads"])
    def list_uploads(owner: Owner = Depends(current_owner)) -> list[UploadInfo]:
        """Your uploads."""
        return [_upload_info(u) for u in store.list_uploads(owner.name)]

    @app.get("/v1/uploads/{upload_id}", response_model=UploadInfo, responses=errors(401, 404, 422), tags=["uploads"])
    def get_upload(upload_id: str, owner: Owner = Depends(current_owner)) -> UploadInfo:
        upload = store.get_upload(owner.name, upload_id)
        if upload is None:
            raise ServiceError(404, f"no upload {upload_id[:100]!r}")
        return _upload_info(upload)

    # -------------------------------------------------------- jobs
    @app.post("/v1/jobs", status_code=202, response_model=JobInfo, responses=errors(400, 401, 404, 422, 429, 503), tags=["jobs"])
    def submit_job(request: JobRequest, owner: Owner = Depends(current_owner)) -> JobInfo:
        """Queue a plug-in + evaluation job: give exactly one of `task` (a built-in task's
        evaluation split) or `docs` (your own multiple-choice docs); `eval_limit` keeps the first N."""
        require_model()
        if store.get_upload(owner.name, request.upload_id) is None:
            raise ServiceError(404, f"no upload {request.upload_id[:100]!r}")
        if (request.task is None) == (request.docs is None):
            raise ServiceError(422, "give exactly one of task (a built-in task name) or docs (a list of multiple-choice docs)")
        if request.task is not None and request.task not in TASKS:
            raise ServiceError(422, f"unknown task {request.task[:64]!r}; choose one of: {', '.join(TASKS)}")
        for i, doc in enumerate(request.docs or []):
            if doc.gold >= len(doc.choices):
                raise ServiceError(422, f"docs[{i}].gold is {doc.gold}, but the doc has {len(doc.choices)} choices")
        waiting = sum(1 for j in store.list_jobs(owner.name) if j.state in ("queued", "running"))
        if waiting >= config.max_jobs_per_owner:
            raise ServiceError(429, f"{waiting} jobs of yours are queued or running (limit {config.max_jobs_per_owner}); "
                                    "wait for one to finish")
        job = store.add_job(owner.name, request.upload_id, request.model_dump(exclude_none=True, exclude={"upload_id"}))
        service.worker.wake()
        log.info("job %s queued for %s (upload %s)", job.id, owner.name, job.upload_id)
        return _job_info(job)

    @app.get("/v1/jobs", response_model=list[JobInfo], responses=errors(401), tags=["jobs"])
    def list_jobs(owner: Owner = Depends(current_owner)) -> list[JobInfo]:
        """Your jobs, oldest first."""
        return [_job_info(j) for j in store.list_jobs(owner.name)]

    @app.get("/v1/jobs/{job_id}", response_model=JobInfo, responses=errors(401, 404, 422), tags=["jobs"])
    def job_status(job_id: str, owner: Owner = Depends(current_owner)) -> JobInfo:
        job = store.get_job(owner.name, job_id)
        if job is None:
            raise ServiceError(404, f"no job {job_id[:100]!r}")
        return _job_info(job)

    @app.get("/v1/jobs/{job_id}/report", response_model=dict[str, Any], responses=errors(401, 404, 409, 422), tags=["jobs"])
    def job_report(job_id: str, owner: Owner = Depends(current_owner)) -> JSONResponse:
        """The report of a finished job: full zero-shot and plug-in accuracy on the same docs."""
        job = store.get_job(owner.name, job_id)
        if job is None:
            raise ServiceError(404, f"no job {job_id[:100]!r}")
        if job.state != "done":
            raise ServiceError(409, f"job {job.id} is {job.state}" + (f": {job.error}" if job.error else "; no report yet"))
        return JSONResponse(store.read_report(job.id))

    # -------------------------------------------------------- representations (PEMA)
    @app.get("/v1/representations/info", response_model=OwnerInfo, responses=errors(401, 503), tags=["representations"])
    def owner_info(owner: Owner = Depends(current_owner)) -> OwnerInfo:
        """Which model answers representation queries (a PEMA head bundle checks it)."""
        require_model()
        return OwnerInfo(**service.representations.info())

    @app.post("/v1/representations", response_model=RepresentationAnswer, responses=errors(400, 401, 422, 429, 503), tags=["representations"])
    def representations(query: RepresentationQuery, owner: Owner = Depends(current_owner)) -> JSONResponse:
        """Context representations f(c) of the owner's model (and top-k next-token
        log-probabilities) for token-id prompts of the owner's tokenizer; no weights leave."""
        require_model()
        return JSONResponse(service.representations.represent(query.model_dump(), owner.name))

    return app
