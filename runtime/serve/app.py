"""The HTTP API (OpenAI-style ``/v1/videos``) and the web page at ``/``.

Every error is JSON ``{"error": {"message", "type", "param"}}``: 400 for an unusable field or file (``param``
names it), 401 for a missing or wrong API key (``code`` "invalid_api_key", OpenAI's shape), 404 for an unknown
job (or another key's) or route, 405 for a wrong method, 408 for a body that stopped arriving, 409 for content
that is not there yet, 411 for an upload without Content-Length, 413 for anything over the server's limits,
429 when the queue (or the caller's share of it) is full, 503 when no worker can run jobs, the store is
unavailable or a completed video cannot be read from the (shared) data folder, 507 when the disk is full, 500
for anything else (details only in the server log).
"""
from __future__ import annotations

import asyncio
import errno
import logging
import secrets
import time
from importlib import resources
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException

from .auth import KeyRing
from .guards import BodyTimeout
from .models import ModelSpec
from .store import COMPLETED, FINISHED, QUEUED, JobFiles, JobStore, QueueFull, StoreError
from .uploads import (FILE_FIELDS, Limits, RequestError, StrictMultiPartParser, check_files, discard, parse_fields,
                      save_upload)

log = logging.getLogger(__name__)

# Multipart overhead allowed beyond the files themselves (boundaries, headers, text fields).
_FORM_SLACK = 1 << 20
_TYPES = {401: "invalid_request_error", 429: "rate_limit_error"}


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers


def error(status: int, message: str, param: str | None = None, code: str | None = None,
          headers: dict | None = None) -> JSONResponse:
    kind = _TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
    body = {"message": message, "type": kind, "param": param}
    if code is not None:
        body["code"] = code
    return JSONResponse({"error": body}, status_code=status, headers=headers)


def _disk_full(exc: BaseException) -> bool:
    return (isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)) or \
        (isinstance(exc, StoreError) and exc.full)


def _not_found(job_id: str) -> ApiError:
    return ApiError(404, f"no video job {job_id!r}; list yours with GET /v1/videos", "id")


def create_app(store: JobStore, files: JobFiles, workers: list, limits: Limits, default_size: str,
               models: list[ModelSpec], keys: KeyRing, *, max_queued: int | None = None,
               max_queued_per_key: int | None = None) -> FastAPI:
    """``workers``: the worker handles (``supervisor.WorkerProcess``: state, current job, ``notify``), each serving
    the ``model`` it names; ``models``: the ``--model`` variants, the first the default."""
    by_name = {m.name: m for m in models}
    started = int(time.time())
    app = FastAPI(title="wan-s2v-trt", description="Wan2.2-S2V speech-to-video: OpenAI-style /v1/videos API",
                  docs_url="/docs", redoc_url=None)

    # ------------------------------------------------------------------ one error format
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return error(exc.status, exc.message, exc.param, exc.code, exc.headers)

    @app.exception_handler(RequestError)
    async def _request_error(request: Request, exc: RequestError):
        return error(exc.status, exc.message, exc.param)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 404:
            message = f"no route {request.method} {request.url.path}; the API is /v1/videos (see /docs)"
        elif exc.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}"
        else:
            message = str(exc.detail)
        return error(exc.status_code, message, headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        first = (exc.errors() or [{}])[0]
        param = str(first.get("loc", ["", None])[-1])
        return error(400, f"{param}: {first.get('msg', 'invalid value')}", param)

    @app.exception_handler(StoreError)
    async def _store_error(request: Request, exc: StoreError):
        log.error("%s %s: %s", request.method, request.url.path, exc)
        if exc.full:
            return error(507, "the server's disk is full; try again later")
        return error(503, "the job store is unavailable; try again later", headers={"Retry-After": "10"})

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        if _disk_full(exc):
            return error(507, "the server's disk is full; try again later")
        log.exception("%s %s: internal error", request.method, request.url.path)
        return error(500, f"internal error ({type(exc).__name__}); see the server log")

    def caller(request: Request) -> str:
        """The caller's owner id ("" without keys); 401 for a missing or wrong key."""
        if not keys.enabled:
            return ""
        key = keys.check(request.headers.get("authorization"))
        if key is None:
            given = bool(request.headers.get("authorization"))
            raise ApiError(401, "Incorrect API key provided" if given else
                           "You didn't provide an API key; send it as Authorization: Bearer KEY",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        request.state.key_name = key.name
        return key.owner

    # ------------------------------------------------------------------ routes
    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def index():
        return HTMLResponse(resources.files(__package__).joinpath("static/index.html").read_text(encoding="utf-8"))

    def load_failure(model: str | None = None) -> str | None:
        """Why no job (of ``model``) can run: every worker of it failed to load (or stopped); None while one is
        starting, loading, ready or being restarted."""
        mine = [w for w in workers if model is None or w.model == model]
        if any(w.is_alive() for w in mine):
            return None
        failed = [w.load_error for w in mine if w.load_error]
        what = "the model" if model is None else f"the model {model}"
        if failed:
            return f"{what} failed to load ({failed[0]}); the server's operator must fix it and restart it"
        return f"no worker of {what} is running; the server's operator must restart it"

    def model_of(text: dict) -> ModelSpec:
        name = text.get("model", "").strip() or models[0].name
        if name not in by_name:
            raise RequestError("model", f"unknown model {name!r}; this server serves {', '.join(by_name)} "
                                        "(GET /v1/models)")
        return by_name[name]

    @app.get("/health")
    def health():
        described = [w.describe() for w in workers]
        body = {"model": models[0].name, "models": list(by_name), "workers": described,
                "running": next((w.current for w in workers if w.current), None)}
        try:
            body["queued"] = store.count(QUEUED)
        except StoreError as exc:
            log.error("health: %s", exc)
            body.update(status="unavailable", error="the job store is unavailable (see the server log)")
            return JSONResponse(body, status_code=503)
        if any(w.alive and not w.store_error for w in workers):
            body["status"] = "ok"
            return JSONResponse(body)
        failure = load_failure()
        if failure is not None:
            body.update(status="failed", error=failure)
        elif any(w.alive for w in workers):
            body.update(status="unavailable", error="the workers cannot write the job store (disk full?); "
                                                    "see the server log")
        else:
            body["status"] = "loading"
        return JSONResponse(body, status_code=503)

    @app.get("/v1/models")
    def list_models(request: Request):
        caller(request)
        return {"object": "list", "data": [
            {"id": m.name, "object": "model", "created": started, "owned_by": "wan-s2v-trt", **m.public(),
             "workers": [{k: v for k, v in w.describe().items() if k in ("name", "device", "state")}
                         for w in workers if w.model == m.name]} for m in models]}

    @app.post("/v1/videos", status_code=202)
    async def create(request: Request):
        owner = caller(request)
        failure = load_failure()
        if failure is not None:
            return error(503, failure)
        length = request.headers.get("content-length")
        if length is None:
            return error(411, "send the upload with a Content-Length header (curl -F does)")
        if not (length.isascii() and length.isdigit()) or int(length) > limits.max_upload_bytes + _FORM_SLACK:
            return error(413, f"request is {length} bytes, over this server's limit of "
                              f"{limits.max_upload_bytes >> 20} MiB of uploads; send smaller files")
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            return error(400, "send the job as multipart/form-data (fields image, audio, prompt, ...)")
        _check_room(owner)  # before reading a large body that could not be queued
        parser = StrictMultiPartParser(request.headers, request.stream(), max_files=len(FILE_FIELDS), max_fields=64,
                                       max_text_bytes=max(limits.max_prompt_bytes, 4096) + 1)
        try:
            form = await parser.parse()
        except BodyTimeout:
            return error(408, "the request body stopped arriving; send it again", headers={"Connection": "close"})
        except MultiPartException as exc:
            return error(400, f"unreadable multipart body ({exc.message})")
        job_id = "video_" + secrets.token_hex(12)
        folder = None
        try:
            try:
                folder = files.new_upload_dir(job_id)
                text, saved, budget = {}, {}, limits.max_upload_bytes
                for name, value in form.multi_items():
                    if isinstance(value, UploadFile):
                        if name not in FILE_FIELDS:
                            raise RequestError(name, f"unknown file field {name!r}; send image, audio, pose_video")
                        if name in saved:
                            raise RequestError(name, f"file field {name!r} sent twice; send it once")
                        path, size = await asyncio.to_thread(save_upload, value, name, folder, budget)
                        saved[name], budget = path, budget - size
                    elif name in FILE_FIELDS:
                        raise RequestError(name, f"{name} must be a file upload (curl: -F {name}=@path)")
                    else:
                        text[name] = value
                model = model_of(text)
                failure = load_failure(model.name)
                if failure is not None:
                    raise ApiError(503, failure)
                params = parse_fields(text, limits, default_size, model.recipe())
                # Decoding checks are CPU work: keep the event loop answering meanwhile.
                audio_s = await asyncio.to_thread(check_files, folder, saved, limits, params)
            finally:
                await form.close()
            params["max_audio_s"] = limits.max_audio_s  # the limit the upload was checked against
            params["audio_s"] = round(audio_s, 3)
            params["files"] = {k: str(v) for k, v in saved.items()}
            files.publish(folder, job_id)
            folder = files.job_dir(job_id)
            job = store.add(job_id, owner, params, model=model.name, max_queued=max_queued,
                            max_queued_per_owner=max_queued_per_key)
        except QueueFull as exc:
            discard(folder)
            return _queue_full(exc)
        except (OSError, StoreError) as exc:
            if folder is not None:
                discard(folder)
            if _disk_full(exc):
                log.error("POST /v1/videos: disk full (%s)", exc)
                return error(507, "the server's disk is full; try again later")
            raise
        except BaseException:
            if folder is not None:
                discard(folder)
            raise
        for w in workers:
            if w.model == model.name:
                w.notify()
        log.info("job %s: queued for %s by %s", job_id, model.name, getattr(request.state, "key_name", "anonymous"))
        return JSONResponse(job.public(), status_code=202)

    def _check_room(owner: str) -> None:
        if max_queued is not None and store.count(QUEUED) >= max_queued:
            raise _queue_full_error(QueueFull(max_queued, per_owner=False))
        if max_queued_per_key is not None and store.count(QUEUED, owner) >= max_queued_per_key:
            raise _queue_full_error(QueueFull(max_queued_per_key, per_owner=True))

    def _queue_full_error(exc: QueueFull) -> ApiError:
        who = "your API key has" if exc.per_owner else "the server has"
        return ApiError(429, f"{who} {exc.limit} jobs queued already (the limit); wait for some to finish",
                        code="queue_full", headers={"Retry-After": "30"})

    def _queue_full(exc: QueueFull) -> JSONResponse:
        e = _queue_full_error(exc)
        return error(e.status, e.message, e.param, e.code, e.headers)

    @app.get("/v1/videos")
    def list_jobs(request: Request, limit: str = "100"):
        owner = caller(request)
        if not (limit.isascii() and limit.isdigit()) or not 1 <= int(limit) <= 1000:
            raise ApiError(400, f"limit={limit!r}; use an integer 1..1000", "limit")
        return {"object": "list", "data": [j.public(detail=False) for j in store.list(owner, int(limit))]}

    @app.get("/v1/videos/{job_id}")
    def get_job(request: Request, job_id: str):
        job = store.get(job_id, caller(request))
        if job is None:
            raise _not_found(job_id)
        return job.public()

    @app.get("/v1/videos/{job_id}/content")
    def content(request: Request, job_id: str):
        job = store.get(job_id, caller(request))
        if job is None:
            raise _not_found(job_id)
        path: Path = files.video_path(job_id)
        if job.status == COMPLETED and not path.is_file():
            # Written by a node whose --data_dir this one does not share (or a shared folder that is down).
            log.error("job %s: completed on node %s, but %s is not there on this node; every node must mount the "
                      "same shared --data_dir", job_id, job.node, path)
            raise ApiError(503, f"the video of job {job_id} cannot be read on this server now; try again later",
                           headers={"Retry-After": "10"})
        if job.status != COMPLETED:
            raise ApiError(409, f"video job {job_id} is {job.status}, not completed; poll GET /v1/videos/{job_id}")
        return FileResponse(path, media_type="video/mp4", filename=f"{job_id}.mp4", content_disposition_type="inline")

    @app.delete("/v1/videos/{job_id}")
    def delete(request: Request, job_id: str):
        owner = caller(request)
        job = store.get(job_id, owner)
        if job is None:
            raise _not_found(job_id)
        if job.status in FINISHED:
            if store.delete(job_id, owner):
                files.remove(job_id)
                return {"id": job_id, "object": "video", "deleted": True}
        elif store.cancel(job_id, owner):
            for w in workers:
                w.cancel(job_id)  # a local worker stops after its current step (a remote one at its heartbeat)
            if job.status == QUEUED:
                files.remove_inputs(job_id)
            return store.get(job_id, owner).public()
        return get_job(request, job_id)  # it finished meanwhile: report what it is now

    return app
