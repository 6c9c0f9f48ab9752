"""The job store: one interface (:class:`JobStore`) for the job table, and :class:`JobFiles` for the job folders.

Two implementations with one schema and the same semantics, run by the same tests (``tests/test_store.py``):
``store_sqlite.SQLiteStore`` (one file under ``--data_dir``, the default) and ``store_postgres.PostgresStore``
(one database that the service nodes of many machines share; the job folders then live on a shared
filesystem that every node mounts as ``--data_dir``). :func:`open_store` picks one from ``--store``.

A job moves queued → in_progress → completed | failed, or to cancelled from queued/in_progress. A worker
*claims* the oldest queued job (one transaction: a job is claimed by one worker only) and holds a *lease* on it
that it renews (``heartbeat``) while the job runs. A job whose lease ran out (its worker died) goes back to the
queue in its old place, ahead of every job queued after it, unless it has used up its attempts: then it is
failed with that reason (a job that kills its worker is not retried forever). A worker that stops on purpose
``release``\\ s its job (back to the queue, the attempt not counted). Cancellation is a status change in the
store: the worker sees it at its next heartbeat and stops between steps.

Each job names the *model* (a ``--model`` of the server) that runs it: a worker claims only jobs of its model,
and a queued job's ``queue_position`` counts the queued jobs of its model up to it (1: next).

Each job belongs to an *owner* (a hash of the API key that made it, "" without authentication); the API passes
the caller's owner to every read and write, and another owner's job does not exist for it. A row also names
the *node* (host) that wrote the job's files: the one that took the upload, then the one whose worker wrote
the video.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from runtime.procs import pid_gone

QUEUED, IN_PROGRESS, COMPLETED, FAILED, CANCELLED = "queued", "in_progress", "completed", "failed", "cancelled"
FINISHED = (COMPLETED, FAILED, CANCELLED)
VIDEO_NAME = "video.mp4"
STORE_MARKER = "job-store"   # in --data_dir: which store the job folders belong to
SQLITE_NAME = "jobs.sqlite3"
ANYONE = None  # the owner argument that matches every job (the server's own maintenance)
# Parameters a list view leaves out: a prompt can be kilobytes, and a listing shows many jobs.
_DETAIL_ONLY = ("prompt", "negative_prompt")


class StoreError(Exception):
    """The store cannot be read or written now (disk full, database locked or unreachable); ``full`` when the
    cause is a full disk. The caller keeps running and retries later."""

    def __init__(self, message: str, full: bool = False):
        super().__init__(message)
        self.full = full


class SchemaError(StoreError):
    """The store was written by a newer server, or holds tables that are not this server's: not usable as is."""


class QueueFull(Exception):
    """``add`` refused: the server's queue limit (``per_owner`` False) or the caller's is reached."""

    def __init__(self, limit: int, per_owner: bool):
        super().__init__(f"queue limit {limit} reached")
        self.limit, self.per_owner = limit, per_owner


@dataclass(frozen=True)
class Job:
    id: str
    status: str
    params: dict
    progress: float
    error: str | None
    attempts: int
    created_at: float
    started_at: float | None
    completed_at: float | None
    owner: str = ""
    worker: str | None = None
    lease_until: float | None = None
    warnings: tuple[str, ...] = field(default_factory=tuple)
    node: str | None = None     # the host that wrote the job's files (not shown by the API)
    model: str = ""
    queue_position: int | None = None   # queued jobs only: 1 = the next one its model's workers take

    def public(self, detail: bool = True) -> dict[str, Any]:
        """The API's view of the job (OpenAI ``video`` object plus this engine's parameters); ``detail`` False
        leaves the prompts out (list views)."""
        out: dict[str, Any] = {
            "id": self.id, "object": "video", "status": self.status, "progress": round(self.progress, 4),
            "created_at": int(self.created_at),
            "started_at": None if self.started_at is None else int(self.started_at),
            "completed_at": None if self.completed_at is None else int(self.completed_at),
            "attempts": self.attempts, "model": self.model,
            **{k: v for k, v in self.params.items() if k != "files" and (detail or k not in _DETAIL_ONLY)},
            "warnings": list(self.warnings),
        }
        if self.status == QUEUED and self.queue_position is not None:
            out["queue_position"] = self.queue_position
        if self.status == IN_PROGRESS and self.worker:
            name, _, device = self.worker.split("/", 2)[-1].partition("@")
            out["worker"] = {"name": name, "device": device or None}
        if self.error is not None:
            out["error"] = {"message": self.error}
        if self.status == COMPLETED:
            out["url"] = f"/v1/videos/{self.id}/content"
        return out


class JobStore(ABC):
    """The job table. Every method is one short transaction; every failure to read or write it is a
    :class:`StoreError`. ``owner`` None (``ANYONE``) matches every job. ``identity`` names the store in the
    data folder's marker (:meth:`JobFiles.bind`)."""

    identity = "sqlite"

    # ------------------------------------------------------------------ the API's side
    @abstractmethod
    def add(self, job_id: str, owner: str, params: dict, *, model: str = "", max_queued: int | None = None,
            max_queued_per_owner: int | None = None) -> Job:
        """Queue a job of ``model`` (its folder is already published). Raises :class:`QueueFull` when
        ``max_queued`` jobs are queued, or ``max_queued_per_owner`` of this owner's; the check and the insert are
        one transaction."""

    @abstractmethod
    def get(self, job_id: str, owner: str | None = ANYONE) -> Job | None: ...

    @abstractmethod
    def list(self, owner: str | None = ANYONE, limit: int = 100) -> list[Job]:
        """Newest first."""

    @abstractmethod
    def cancel(self, job_id: str, owner: str | None = ANYONE) -> bool:
        """Queued/in progress → cancelled; False if the job is not (or no longer) waiting or running."""

    @abstractmethod
    def delete(self, job_id: str, owner: str | None = ANYONE) -> bool:
        """Remove a finished job's row; False if there is no such finished job."""

    @abstractmethod
    def count(self, status: str, owner: str | None = ANYONE) -> int: ...

    @abstractmethod
    def queued_by_model(self) -> dict[str, int]:
        """How many jobs wait in the queue, by the model they name."""

    # ------------------------------------------------------------------ the workers' side
    @abstractmethod
    def claim(self, worker: str, lease_s: float, model: str | None = None) -> Job | None:
        """The oldest queued job (of ``model``; of any model when None), now in progress under ``worker``'s lease
        (one attempt more), or None."""

    @abstractmethod
    def heartbeat(self, job_id: str, worker: str, lease_s: float, progress: float | None = None) -> bool:
        """Renew the lease (and record progress); False when the job is no longer this worker's: cancelled,
        deleted, or its lease ran out and it went back to the queue. The worker then stops the job."""

    @abstractmethod
    def finish(self, job_id: str, worker: str, status: str, error: str | None = None,
               warnings: Iterable[str] = ()) -> bool:
        """This worker's in-progress job → completed/failed/cancelled; False when it is no longer its job."""

    @abstractmethod
    def release(self, job_id: str, worker: str) -> bool:
        """A worker stopping on purpose: its job goes back to the queue in its place, the attempt not counted."""

    # ------------------------------------------------------------------ maintenance
    @abstractmethod
    def expire_leases(self, max_attempts: int, now: float | None = None) -> list[tuple[str, str]]:
        """In-progress jobs whose lease ran out, or whose worker is a process of this host that no longer exists:
        back to the queue, or failed once they have had ``max_attempts`` runs. Returns (job id, new status)."""

    @abstractmethod
    def purge_finished(self, before: float) -> list[str]:
        """Delete the rows of jobs finished before ``before`` (epoch seconds); returns their ids."""

    @abstractmethod
    def ids(self) -> set[str]:
        """Every job id (for sweeping folders without a row)."""

    def close(self) -> None:
        pass


# A queued job's place in its model's queue, as a column of the row (the same SQL in both dialects).
POSITION = (f"CASE WHEN status = '{QUEUED}' THEN (SELECT COUNT(*) FROM jobs q WHERE q.status = '{QUEUED}' "
            f"AND q.model = jobs.model AND q.seq <= jobs.seq) END AS queue_position")


def job_from_row(row) -> Job:
    """A row of either implementation (the same columns) as a :class:`Job`."""
    position = row["queue_position"] if "queue_position" in row.keys() else None
    return Job(id=row["id"], status=row["status"], params=json.loads(row["params"]), progress=row["progress"],
               error=row["error"], attempts=row["attempts"], created_at=row["created_at"],
               started_at=row["started_at"], completed_at=row["completed_at"], owner=row["owner"],
               worker=row["worker"], lease_until=row["lease_until"], warnings=tuple(json.loads(row["warnings"])),
               node=row["node"], model=row["model"], queue_position=None if position is None else int(position))


POSTGRES_SCHEMES = ("postgresql://", "postgres://")


def redact(url: str) -> str:
    """A store URL fit for messages and logs: its password (if any) replaced by ``***``."""
    url = re.sub(r"^([a-z]+://[^/@:]*):[^/@]*@", r"\1:***@", url)
    return re.sub(r"([?&]password=)[^&]*", r"\1***", url)


def open_store(url: str | None, data_dir: str | Path, default_model: str = "") -> JobStore:
    """The store ``--store`` names: None or "sqlite" for the SQLite file under ``data_dir``, a
    ``postgresql://USER@HOST/DB`` URL for PostgreSQL. Raises ValueError for anything else, ImportError when
    psycopg is not installed, :class:`StoreError` when the store cannot be opened or is of a newer schema.
    ``default_model``: the model that the rows of a store written before jobs named one are given."""
    if url is None or url == "sqlite":
        from .store_sqlite import SQLiteStore

        return SQLiteStore(data_dir, default_model)
    if url.startswith(POSTGRES_SCHEMES):
        from .store_postgres import PostgresStore

        return PostgresStore(url, default_model)
    raise ValueError(f"--store {redact(url)!r} is not a job store; use postgresql://USER@HOST/DB, or leave it out "
                     "for SQLite under --data_dir")


# ---------------------------------------------------------------------------------------------- workers
_HOST = socket.gethostname()


def this_node() -> str:
    """The name a row records for files this process writes (the host name, as in worker names)."""
    return _HOST


def node_of(worker: str) -> str:
    """The host part of a worker's lease name."""
    return worker.split("/", 1)[0]


def worker_name(tag: str = "w0") -> str:
    """A worker's lease name, ``host/pid/tag``: a lease of a process of this host that no longer exists is
    expired at once (a restart after kill -9 does not wait out the lease)."""
    return f"{_HOST}/{os.getpid()}/{tag}"


def worker_is_dead(worker: str | None) -> bool:
    """True only when ``worker`` names a process of this host that is gone or a zombie (pid reuse errs on alive)."""
    if not worker:
        return False
    parts = worker.split("/")
    if len(parts) < 3 or parts[0] != _HOST or not parts[1].isdigit():
        return False
    pid = int(parts[1])
    if pid == os.getpid():
        return False
    return pid_gone(pid)


def expired_reason(attempts: int) -> str:
    return (f"the worker running this job stopped (crash, kill or lost machine) {attempts} times; not retried. "
            "The job may need more memory than the server has: try a shorter audio or a smaller size")


# ---------------------------------------------------------------------------------------------- folders
_ORPHAN_AGE_S = 600        # a published folder whose row never came (the row is inserted right after the rename)
_UPLOAD_AGE_S = 86_400     # an upload folder of a process that cannot be checked (another host)


class JobFiles:
    """The job folders under ``<data_dir>/jobs``: an upload is written into a hidden folder named after its
    process, which becomes ``jobs/<id>`` once checked; the row is inserted after that rename."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.jobs_dir = self.root / "jobs"

    def create(self) -> None:
        self.jobs_dir.mkdir(parents=True, exist_ok=True)

    def bind(self, identity: str) -> str | None:
        """Tie this folder to one job store, so that a server started with another store (a node without
        ``--store`` on the shared folder) cannot sweep the other store's job folders as rows it lacks. Writes the
        marker when the folder has none; returns the identity of the store the folder belongs to when that is
        another one, else None. A folder without a marker but with a SQLite job file belongs to SQLite."""
        marker = self.root / STORE_MARKER
        try:
            owner = marker.read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            owner = "sqlite" if (self.root / SQLITE_NAME).exists() else None
        if owner not in (None, identity):
            return owner
        if not marker.exists():
            tmp = marker.with_name(f".{STORE_MARKER}.{os.getpid()}.tmp")
            tmp.write_text(identity + "\n", encoding="utf-8")
            os.replace(tmp, marker)
        return None

    def new_upload_dir(self, job_id: str) -> Path:
        tmp = self.jobs_dir / f".{job_id}.{_HOST}.{os.getpid()}.upload"
        tmp.mkdir()
        return tmp

    def publish(self, upload_dir: Path, job_id: str) -> Path:
        dest = self.job_dir(job_id)
        upload_dir.rename(dest)
        return dest

    def job_dir(self, job_id: str) -> Path:
        return self.jobs_dir / job_id

    def video_path(self, job_id: str) -> Path:
        return self.job_dir(job_id) / VIDEO_NAME

    def remove_inputs(self, job_id: str) -> None:
        """A finished job keeps its record (and video), not its uploads."""
        d = self.job_dir(job_id)
        if d.is_dir():
            for p in d.iterdir():
                if p.name != VIDEO_NAME:
                    p.unlink(missing_ok=True)

    def remove_partial_outputs(self, job_id: str) -> None:
        """Temp files of an earlier run of this job (its worker died); called by the worker that claimed it."""
        for part in self.job_dir(job_id).glob(f".{VIDEO_NAME}.*.part"):
            part.unlink(missing_ok=True)

    def remove(self, job_id: str) -> None:
        shutil.rmtree(self.job_dir(job_id), ignore_errors=True)

    def sweep(self, known: set[str], now: float | None = None) -> list[str]:
        """Remove what dead uploads left: upload folders of processes of this host that are gone (or very old
        ones), and published folders without a row that are old enough not to be an insert in flight."""
        now = time.time() if now is None else now
        removed = []
        for d in self.jobs_dir.iterdir():
            try:
                age = now - d.stat().st_mtime
            except FileNotFoundError:
                continue
            if d.name.startswith("."):
                parts = d.name.split(".")  # "", id, host..., pid, "upload"
                dead = len(parts) >= 5 and parts[-1] == "upload" and parts[-2].isdigit() and worker_is_dead(
                    f"{'.'.join(parts[2:-2])}/{parts[-2]}/upload")
                if dead or age > _UPLOAD_AGE_S:
                    shutil.rmtree(d, ignore_errors=True)
                    removed.append(d.name)
            elif d.name not in known and age > _ORPHAN_AGE_S:
                shutil.rmtree(d, ignore_errors=True)
                removed.append(d.name)
        return removed
