"""The job table: one SQLite file (WAL) under ``--data_dir``, plus one folder of inputs and output per job.

A job's folder exists before its row (the row is inserted only once the inputs are written and checked), so
every row has its inputs. Status moves queued → in_progress → completed | failed, or to cancelled from
queued/in_progress. ``recover()`` at start-up puts a job that was in progress when the process died back in
the queue, in its old place (the queue is ordered by insertion), so it runs again from the start.
"""
from __future__ import annotations

import json
import secrets
import shutil
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

QUEUED, IN_PROGRESS, COMPLETED, FAILED, CANCELLED = "queued", "in_progress", "completed", "failed", "cancelled"
FINISHED = (COMPLETED, FAILED, CANCELLED)
VIDEO_NAME = "video.mp4"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq          INTEGER PRIMARY KEY AUTOINCREMENT,   -- FIFO order
    id           TEXT NOT NULL UNIQUE,
    status       TEXT NOT NULL,
    params       TEXT NOT NULL,                       -- JSON: the generation arguments and input file names
    progress     REAL NOT NULL DEFAULT 0,
    error        TEXT,
    attempts     INTEGER NOT NULL DEFAULT 0,
    created_at   REAL NOT NULL,
    started_at   REAL,
    completed_at REAL
);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs (status, seq);
"""


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

    def public(self) -> dict[str, Any]:
        """The API's view of the job (OpenAI ``video`` object plus this engine's parameters)."""
        out: dict[str, Any] = {
            "id": self.id, "object": "video", "status": self.status, "progress": round(self.progress, 4),
            "created_at": int(self.created_at),
            "started_at": None if self.started_at is None else int(self.started_at),
            "completed_at": None if self.completed_at is None else int(self.completed_at),
            "attempts": self.attempts,
            **{k: v for k, v in self.params.items() if k != "files"},
        }
        if self.error is not None:
            out["error"] = {"message": self.error}
        if self.status == COMPLETED:
            out["url"] = f"/v1/videos/{self.id}/content"
        return out


class JobStore:
    """Thread-safe access to the job table (one connection, one lock: every statement is short)."""

    def __init__(self, data_dir: str | Path):
        self.root = Path(data_dir)
        self.jobs_dir = self.root / "jobs"
        self.jobs_dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.root / "jobs.sqlite3", check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # a job accepted with 202 must survive a crash
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # ------------------------------------------------------------------ folders
    def new_job_dir(self) -> tuple[str, Path]:
        """A fresh job id and its (hidden, not yet a job) folder; ``commit_job_dir`` makes it the job's."""
        job_id = "video_" + secrets.token_hex(12)
        tmp = self.jobs_dir / f".{job_id}.upload"
        tmp.mkdir()
        return job_id, tmp

    def job_dir(self, job_id: str) -> Path:
        return self.jobs_dir / job_id

    def video_path(self, job_id: str) -> Path:
        return self.job_dir(job_id) / VIDEO_NAME

    # ------------------------------------------------------------------ writes
    def add(self, job_id: str, upload_dir: Path, params: dict) -> Job:
        """Publish the checked upload folder as the job's and queue the job."""
        upload_dir.rename(self.job_dir(job_id))
        with self._lock:
            self._db.execute("INSERT INTO jobs (id, status, params, created_at) VALUES (?, ?, ?, ?)",
                             (job_id, QUEUED, json.dumps(params), time.time()))
        return self.get(job_id)

    def claim_next(self) -> Job | None:
        """The oldest queued job, now marked in progress (one attempt more), or None."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                row = self._db.execute("SELECT id FROM jobs WHERE status = ? ORDER BY seq LIMIT 1", (QUEUED,)).fetchone()
                if row is not None:
                    self._db.execute("UPDATE jobs SET status = ?, progress = 0, started_at = ?, attempts = attempts + 1 "
                                     "WHERE id = ?", (IN_PROGRESS, time.time(), row["id"]))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return None if row is None else self.get(row["id"])

    def set_progress(self, job_id: str, progress: float) -> None:
        with self._lock:
            self._db.execute("UPDATE jobs SET progress = ? WHERE id = ? AND status = ?", (progress, job_id, IN_PROGRESS))

    def finish(self, job_id: str, status: str, error: str | None = None) -> bool:
        """In progress → completed/failed/cancelled. False when the job was cancelled (or deleted) meanwhile."""
        with self._lock:
            cur = self._db.execute("UPDATE jobs SET status = ?, error = ?, completed_at = ?, "
                                   "progress = CASE WHEN ? = 'completed' THEN 1 ELSE progress END "
                                   "WHERE id = ? AND status = ?",
                                   (status, error, time.time(), status, job_id, IN_PROGRESS))
        return cur.rowcount == 1

    def cancel(self, job_id: str) -> bool:
        """Queued/in progress → cancelled; False if the job is not (or no longer) waiting or running."""
        with self._lock:
            cur = self._db.execute("UPDATE jobs SET status = ?, completed_at = ? WHERE id = ? AND status IN (?, ?)",
                                   (CANCELLED, time.time(), job_id, QUEUED, IN_PROGRESS))
        return cur.rowcount == 1

    def delete(self, job_id: str) -> bool:
        """Remove a finished job: its row, then its folder. False if it is not finished."""
        with self._lock:
            cur = self._db.execute(f"DELETE FROM jobs WHERE id = ? AND status IN ({', '.join('?' * len(FINISHED))})",
                                   (job_id, *FINISHED))
        if cur.rowcount != 1:
            return False
        shutil.rmtree(self.job_dir(job_id), ignore_errors=True)
        return True

    def remove_inputs(self, job_id: str) -> None:
        """A cancelled or failed job keeps its record, not its uploads."""
        d = self.job_dir(job_id)
        if d.is_dir():
            for p in d.iterdir():
                if p.name != VIDEO_NAME:
                    p.unlink(missing_ok=True)

    def recover(self) -> list[str]:
        """After a crash: running jobs go back to the queue; half-written uploads and outputs are removed."""
        with self._lock:
            rows = self._db.execute("SELECT id FROM jobs WHERE status = ?", (IN_PROGRESS,)).fetchall()
            self._db.execute("UPDATE jobs SET status = ?, progress = 0 WHERE status = ?", (QUEUED, IN_PROGRESS))
            known = {r["id"] for r in self._db.execute("SELECT id FROM jobs")}
        for d in self.jobs_dir.iterdir():
            if d.name.startswith(".") or d.name not in known:  # an upload the crash cut short
                shutil.rmtree(d, ignore_errors=True)
            else:
                for part in d.glob(f".{VIDEO_NAME}.*.part"):  # Mp4Writer's temp file of a killed run
                    part.unlink(missing_ok=True)
        return [r["id"] for r in rows]

    # ------------------------------------------------------------------ reads
    def get(self, job_id: str) -> Job | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return None if row is None else _job(row)

    def list(self, limit: int = 100) -> list[Job]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM jobs ORDER BY seq DESC LIMIT ?", (limit,)).fetchall()
        return [_job(r) for r in rows]

    def queued_count(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM jobs WHERE status = ?", (QUEUED,)).fetchone()[0]


def _job(row: sqlite3.Row) -> Job:
    return Job(id=row["id"], status=row["status"], params=json.loads(row["params"]), progress=row["progress"],
               error=row["error"], attempts=row["attempts"], created_at=row["created_at"],
               started_at=row["started_at"], completed_at=row["completed_at"])
