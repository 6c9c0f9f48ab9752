"""The job store in one SQLite file (WAL, synchronous=FULL) under ``--data_dir``: the default store.

Several processes may open one file (two servers on one ``--data_dir``, worker processes): claims and
expiries run in ``BEGIN IMMEDIATE`` transactions, so each job is claimed once.
"""
from __future__ import annotations

import errno
import json
import sqlite3
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from .store import (ANYONE, CANCELLED, COMPLETED, FAILED, FINISHED, IN_PROGRESS, POSITION, QUEUED, SQLITE_NAME, Job,
                    JobStore, QueueFull, SchemaError, StoreError, expired_reason, job_from_row, node_of, this_node,
                    worker_is_dead)

DB_NAME = SQLITE_NAME
SCHEMA_VERSION = 4

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
    completed_at REAL,
    owner        TEXT NOT NULL DEFAULT '',            -- hash of the API key that made the job
    worker       TEXT,                                -- the lease holder while in progress
    lease_until  REAL,
    warnings     TEXT NOT NULL DEFAULT '[]',          -- JSON list of input warnings
    node         TEXT,                                -- the host that wrote the job's files (upload, then video)
    model        TEXT NOT NULL DEFAULT ''             -- the --model that runs it
);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs (status, seq);
CREATE INDEX IF NOT EXISTS jobs_owner ON jobs (owner, seq);
CREATE INDEX IF NOT EXISTS jobs_model ON jobs (model, status, seq);
"""
# Version 1 (before leases and owners) had the first ten columns, version 2 all but ``node`` and ``model``,
# version 3 all but ``model``.
_ADDED_COLUMNS = ("ALTER TABLE jobs ADD COLUMN owner TEXT NOT NULL DEFAULT ''",
                  "ALTER TABLE jobs ADD COLUMN worker TEXT", "ALTER TABLE jobs ADD COLUMN lease_until REAL",
                  "ALTER TABLE jobs ADD COLUMN warnings TEXT NOT NULL DEFAULT '[]'",
                  "ALTER TABLE jobs ADD COLUMN node TEXT", "ALTER TABLE jobs ADD COLUMN model TEXT NOT NULL DEFAULT ''")


def _store_error(exc: BaseException) -> StoreError:
    full = (isinstance(exc, sqlite3.OperationalError) and "full" in str(exc)) or \
           (isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT))
    return StoreError(f"job store: {exc}", full=full)


class SQLiteStore(JobStore):
    """One connection per process, one lock: every statement is short. ``busy_timeout`` covers the other
    processes' transactions."""

    def __init__(self, data_dir: str | Path, default_model: str = ""):
        self.path = Path(data_dir) / DB_NAME
        self._default_model = default_model
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=10.0)
            self._db.row_factory = sqlite3.Row
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")  # a job accepted with 202 must survive a crash
            with self._tx():
                self._migrate()
        except sqlite3.Error as exc:
            raise _store_error(exc) from None

    def _migrate(self) -> None:
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise SchemaError(f"{self.path.name} has schema version {version}, newer than this server's "
                             f"{SCHEMA_VERSION}; run the newer server or another --data_dir")
        exists = self._db.execute("SELECT 1 FROM sqlite_master WHERE name = 'jobs'").fetchone()
        if exists and version < SCHEMA_VERSION:
            cols = {r["name"] for r in self._db.execute("PRAGMA table_info(jobs)")}
            for stmt in _ADDED_COLUMNS:
                if stmt.split()[5] not in cols:
                    self._db.execute(stmt)
            if "model" not in cols:  # jobs from before named models: the server's default model runs them
                self._db.execute("UPDATE jobs SET model = ?", (self._default_model,))
        for stmt in _SCHEMA.split(";"):
            if stmt.strip():
                self._db.execute(stmt)
        if version != SCHEMA_VERSION:
            self._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _tx(self, immediate: bool = True):
        """One transaction under the lock; sqlite3 errors become StoreError."""
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE" if immediate else "BEGIN")
                try:
                    yield self._db
                    self._db.execute("COMMIT")
                except BaseException:
                    if self._db.in_transaction:
                        self._db.execute("ROLLBACK")
                    raise
            except sqlite3.Error as exc:
                raise _store_error(exc) from None

    def _read(self, sql: str, args: tuple = ()) -> list[sqlite3.Row]:
        with self._lock:
            try:
                return self._db.execute(sql, args).fetchall()
            except sqlite3.Error as exc:
                raise _store_error(exc) from None

    @staticmethod
    def _owned(owner: str | None) -> tuple[str, tuple]:
        return ("", ()) if owner is ANYONE else (" AND owner = ?", (owner,))

    # ------------------------------------------------------------------ the API's side
    def add(self, job_id, owner, params, *, model="", max_queued=None, max_queued_per_owner=None) -> Job:
        with self._tx() as db:
            if max_queued is not None:
                n = db.execute("SELECT COUNT(*) FROM jobs WHERE status = ?", (QUEUED,)).fetchone()[0]
                if n >= max_queued:
                    raise QueueFull(max_queued, per_owner=False)
            if max_queued_per_owner is not None:
                n = db.execute("SELECT COUNT(*) FROM jobs WHERE status = ? AND owner = ?", (QUEUED, owner)).fetchone()[0]
                if n >= max_queued_per_owner:
                    raise QueueFull(max_queued_per_owner, per_owner=True)
            db.execute("INSERT INTO jobs (id, status, params, created_at, owner, node, model) "
                       "VALUES (?, ?, ?, ?, ?, ?, ?)",
                       (job_id, QUEUED, json.dumps(params), time.time(), owner, this_node(), model))
            row = db.execute(f"SELECT *, {POSITION} FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return job_from_row(row)

    def get(self, job_id, owner=ANYONE):
        where, args = self._owned(owner)
        rows = self._read(f"SELECT *, {POSITION} FROM jobs WHERE id = ?{where}", (job_id, *args))
        return job_from_row(rows[0]) if rows else None

    def list(self, owner=ANYONE, limit=100):
        where, args = self._owned(owner)
        rows = self._read(f"SELECT *, {POSITION} FROM jobs WHERE 1{where} ORDER BY seq DESC LIMIT ?", (*args, limit))
        return [job_from_row(r) for r in rows]

    def cancel(self, job_id, owner=ANYONE) -> bool:
        where, args = self._owned(owner)
        with self._tx() as db:
            cur = db.execute(f"UPDATE jobs SET status = ?, completed_at = ?, worker = NULL, lease_until = NULL "
                             f"WHERE id = ? AND status IN (?, ?){where}",
                             (CANCELLED, time.time(), job_id, QUEUED, IN_PROGRESS, *args))
        return cur.rowcount == 1

    def delete(self, job_id, owner=ANYONE) -> bool:
        where, args = self._owned(owner)
        with self._tx() as db:
            cur = db.execute(f"DELETE FROM jobs WHERE id = ? AND status IN (?, ?, ?){where}", (job_id, *FINISHED, *args))
        return cur.rowcount == 1

    def count(self, status, owner=ANYONE) -> int:
        where, args = self._owned(owner)
        return self._read(f"SELECT COUNT(*) FROM jobs WHERE status = ?{where}", (status, *args))[0][0]

    def queued_by_model(self) -> dict[str, int]:
        return dict(self._read("SELECT model, COUNT(*) FROM jobs WHERE status = ? GROUP BY model", (QUEUED,)))

    # ------------------------------------------------------------------ the workers' side
    def claim(self, worker, lease_s, model=None):
        now = time.time()
        of_model, args = ("", ()) if model is None else (" AND model = ?", (model,))
        with self._tx() as db:
            row = db.execute(f"SELECT id FROM jobs WHERE status = ?{of_model} ORDER BY seq LIMIT 1",
                             (QUEUED, *args)).fetchone()
            if row is None:
                return None
            db.execute("UPDATE jobs SET status = ?, progress = 0, started_at = ?, attempts = attempts + 1, "
                       "worker = ?, lease_until = ?, error = NULL WHERE id = ?",
                       (IN_PROGRESS, now, worker, now + lease_s, row["id"]))
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (row["id"],)).fetchone()
        return job_from_row(row)

    def heartbeat(self, job_id, worker, lease_s, progress=None) -> bool:
        with self._tx() as db:
            cur = db.execute("UPDATE jobs SET lease_until = ?, progress = COALESCE(?, progress) "
                             "WHERE id = ? AND status = ? AND worker = ?",
                             (time.time() + lease_s, progress, job_id, IN_PROGRESS, worker))
        return cur.rowcount == 1

    def finish(self, job_id, worker, status, error=None, warnings=()) -> bool:
        with self._tx() as db:
            done = status == COMPLETED  # the video is this worker's node's file now
            cur = db.execute("UPDATE jobs SET status = ?, error = ?, completed_at = ?, warnings = ?, worker = NULL, "
                             "lease_until = NULL, progress = CASE WHEN ? THEN 1 ELSE progress END, "
                             "node = CASE WHEN ? THEN ? ELSE node END WHERE id = ? AND status = ? AND worker = ?",
                             (status, error, time.time(), json.dumps(list(warnings)), done, done, node_of(worker),
                              job_id, IN_PROGRESS, worker))
        return cur.rowcount == 1

    def release(self, job_id, worker) -> bool:
        with self._tx() as db:
            cur = db.execute("UPDATE jobs SET status = ?, progress = 0, worker = NULL, lease_until = NULL, "
                             "attempts = MAX(attempts - 1, 0) WHERE id = ? AND status = ? AND worker = ?",
                             (QUEUED, job_id, IN_PROGRESS, worker))
        return cur.rowcount == 1

    # ------------------------------------------------------------------ maintenance
    def expire_leases(self, max_attempts, now=None):
        now = time.time() if now is None else now
        out = []
        with self._tx() as db:
            rows = db.execute("SELECT id, worker, lease_until, attempts FROM jobs WHERE status = ?",
                              (IN_PROGRESS,)).fetchall()
            for r in rows:
                if not ((r["lease_until"] or 0) < now or worker_is_dead(r["worker"])):
                    continue
                if r["attempts"] >= max_attempts:
                    db.execute("UPDATE jobs SET status = ?, error = ?, completed_at = ?, worker = NULL, "
                               "lease_until = NULL WHERE id = ?", (FAILED, expired_reason(r["attempts"]), now, r["id"]))
                    out.append((r["id"], FAILED))
                else:
                    db.execute("UPDATE jobs SET status = ?, progress = 0, worker = NULL, lease_until = NULL "
                               "WHERE id = ?", (QUEUED, r["id"]))
                    out.append((r["id"], QUEUED))
        return out

    def purge_finished(self, before):
        with self._tx() as db:
            rows = db.execute("SELECT id FROM jobs WHERE status IN (?, ?, ?) AND completed_at < ?",
                              (*FINISHED, before)).fetchall()
            db.executemany("DELETE FROM jobs WHERE id = ?", [(r["id"],) for r in rows])
        return [r["id"] for r in rows]

    def ids(self):
        return {r["id"] for r in self._read("SELECT id FROM jobs")}

