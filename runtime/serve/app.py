"""The HTTP API (OpenAI-style ``/v1/videos``) and the web page at ``/``.

Errors are JSON ``{"error": {"message", "type", "param"}}``: 400 for an unusable field or file (``param``
names it), 413 for anything over the server's limits, 404 for an unknown job, 409 for content that is not
there yet, 411 for an upload without Content-Length.
"""
from __future__ import annotations

import asyncio
import logging
from importlib import resources
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from starlette.datastructures import UploadFile

from .store import COMPLETED, FINISHED, QUEUED, JobStore
from .uploads import FILE_FIELDS, Limits, RequestError, check_files, discard, parse_fields, save_upload
from .worker import Worker

log = logging.getLogger(__name__)

# Multipart overhead allowed beyond the files themselves (boundaries, headers, text fields).
_FORM_SLACK = 1 << 20


def error(status: int, message: str, param: str | None = None) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse({"error": {"message": message, "type": kind, "param": param}}, status_code=status)


def create_app(store: JobStore, worker: Worker, limits: Limits, default_size: str, model: str) -> FastAPI:
    app = FastAPI(title="wan-s2v-trt", description="Wan2.2-S2V speech-to-video: OpenAI-style /v1/videos API",
                  docs_url="/docs", redoc_url=None)

    @app.exception_handler(RequestError)
    async def _request_error(request: Request, exc: RequestError):
        return error(exc.status, exc.message, exc.param)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def index():
        return HTMLResponse(resources.files(__package__).joinpath("static/index.html").read_text(encoding="utf-8"))

    @app.get("/health")
    def health():
        body = {"status": "ok" if worker.state == "ready" else worker.state, "model": model,
                "queued": store.queued_count(), "running": worker.current}
        if worker.load_error:
            body["error"] = worker.load_error
        return JSONResponse(body, status_code=503 if worker.state == "failed" else 200)

    @app.post("/v1/videos", status_code=202)
    async def create(request: Request):
        length = request.headers.get("content-length")
        if length is None:
            return error(411, "send the upload with a Content-Length header (curl -F does)")
        if not length.isdigit() or int(length) > limits.max_upload_bytes + _FORM_SLACK:
            return error(413, f"request is {length} bytes, over this server's limit of "
                              f"{limits.max_upload_bytes >> 20} MiB of uploads; send smaller files")
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            return error(400, "send the job as multipart/form-data (fields image, audio, prompt, ...)")
        try:
            form = await request.form(max_files=len(FILE_FIELDS), max_fields=64)
        except Exception as exc:  # noqa: BLE001 -- malformed multipart
            return error(400, f"unreadable multipart body ({exc})")
        job_id, folder = store.new_job_dir()
        try:
            try:
                text, files, budget = {}, {}, limits.max_upload_bytes
                for name, value in form.multi_items():
                    if isinstance(value, UploadFile):
                        if name not in FILE_FIELDS:
                            raise RequestError(name, f"unknown file field {name!r}; send image, audio, pose_video")
                        if name in files:
                            raise RequestError(name, f"file field {name!r} sent twice; send it once")
                        saved, size = save_upload(value, name, folder, budget)
                        files[name], budget = saved, budget - size
                    elif name in FILE_FIELDS:
                        raise RequestError(name, f"{name} must be a file upload (curl: -F {name}=@path)")
                    else:
                        text[name] = value
                params = parse_fields(text, limits, default_size)
                # Decoding checks are CPU work: keep the event loop answering meanwhile.
                await asyncio.to_thread(check_files, folder, files, limits)
            finally:
                await form.close()
            params["max_audio_s"] = limits.max_audio_s  # the limit the upload was checked against
            params["files"] = {k: str(v) for k, v in files.items()}
            job = store.add(job_id, folder, params)
        except BaseException:
            discard(folder)
            raise
        worker.notify()
        log.info("job %s: queued", job_id)
        return JSONResponse(job.public(), status_code=202)

    @app.get("/v1/videos")
    def list_jobs(limit: int = 100):
        return {"object": "list", "data": [j.public() for j in store.list(max(1, min(limit, 1000)))]}

    @app.get("/v1/videos/{job_id}")
    def get_job(job_id: str):
        job = store.get(job_id)
        if job is None:
            return error(404, f"no video job {job_id!r}; list them with GET /v1/videos", "id")
        return job.public()

    @app.get("/v1/videos/{job_id}/content")
    def content(job_id: str):
        job = store.get(job_id)
        if job is None:
            return error(404, f"no video job {job_id!r}; list them with GET /v1/videos", "id")
        path: Path = store.video_path(job_id)
        if job.status != COMPLETED or not path.is_file():
            return error(409, f"video job {job_id} is {job.status}, not completed; poll GET /v1/videos/{job_id}")
        return FileResponse(path, media_type="video/mp4", filename=f"{job_id}.mp4", content_disposition_type="inline")

    @app.delete("/v1/videos/{job_id}")
    def delete(job_id: str):
        job = store.get(job_id)
        if job is None:
            return error(404, f"no video job {job_id!r}; list them with GET /v1/videos", "id")
        if job.status in FINISHED:
            if store.delete(job_id):
                return {"id": job_id, "object": "video", "deleted": True}
        elif store.cancel(job_id):
            worker.cancel(job_id)  # the worker stops after its current step
            if job.status == QUEUED:
                store.remove_inputs(job_id)
            return store.get(job_id).public()
        return get_job(job_id)  # it finished meanwhile: report what it is now

    return app
