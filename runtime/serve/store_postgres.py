"""The job store in a PostgreSQL database (``--store postgresql://USER@HOST/DB``): one queue that the service
nodes of many machines share. Same schema and semantics as ``store_sqlite`` (and the same tests).

A claim is one statement in one transaction: the oldest queued row is locked with ``FOR UPDATE SKIP LOCKED``
(a row another claimer holds is skipped, not waited for) and updated to in progress, so each job is claimed
by one worker. Times come from the database's clock, so leases do not depend on the nodes' clocks agreeing.
Tables go in the first schema of the connection's ``search_path`` (``?options=-csearch_path%3Ds2v`` puts them
in schema ``s2v``); their version is recorded in ``s2v_schema`` and a database of a newer version is refused.

One connection per process behind one lock (every statement is short), in explicit transactions. A connection
found dead at the start of a transaction is replaced at once (nothing was sent); one lost mid-transaction is a
:class:`StoreError` for that call. A failed connect is retried at most once a second, so a database that is
down costs callers one quick error each instead of a connect timeout each.
"""
from __future__ import annotations

import json
import secrets
import threading
import time
from contextlib import contextmanager

import psycopg
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import dict_row

from .store import (ANYONE, CANCELLED, COMPLETED, FAILED, FINISHED, IN_PROGRESS, POSITION, QUEUED, Job, JobStore,
                    QueueFull, SchemaError, StoreError, expired_reason, job_from_row, node_of, redact, this_node,
                    worker_is_dead)

SCHEMA_VERSION = 4  # the SQLite store's version number for the same columns
RECONNECT_S = 1.0   # after a failed connect, calls fail at once for this long
# Defaults for settings the URL leaves out: a dead network fails a call in seconds, not at the kernel's TCP timeout.
_CONNECT_DEFAULTS = {"connect_timeout": "5", "keepalives": "1", "keepalives_idle": "10", "keepalives_interval": "5",
                     "keepalives_count": "3", "tcp_user_timeout": "30000", "application_name": "wan-s2v-trt"}
# pg_advisory_xact_lock keys: start-up migration, and the queue-limit check with its insert.
_LOCK_MIGRATE, _LOCK_ADD = 0x5325_7601, 0x5325_7602
_NOW = "extract(epoch from now())::float8"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq          BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,   -- FIFO order
    id           TEXT NOT NULL UNIQUE,
    status       TEXT NOT NULL,
    params       TEXT NOT NULL,                    -- JSON text, as SQLite keeps it (key order kept)
    progress     DOUBLE PRECISION NOT NULL DEFAULT 0,
    error        TEXT,
    attempts     INTEGER NOT NULL DEFAULT 0,
    created_at   DOUBLE PRECISION NOT NULL,
    started_at   DOUBLE PRECISION,
    completed_at DOUBLE PRECISION,
    owner        TEXT NOT NULL DEFAULT '',         -- hash of the API key that made the job
    worker       TEXT,                             -- the lease holder while in progress
    lease_until  DOUBLE PRECISION,
    warnings     TEXT NOT NULL DEFAULT '[]',       -- JSON list of input warnings
    node         TEXT,                             -- the host that wrote the job's files (upload, then video)
    model        TEXT NOT NULL DEFAULT ''          -- the --model that runs it
);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs (status, seq);
CREATE INDEX IF NOT EXISTS jobs_owner ON jobs (owner, seq);
CREATE INDEX IF NOT EXISTS jobs_model ON jobs (model, status, seq)
"""
# The statements that bring the tables of the version before each version up to it: {version: (statements)}
# (``%(default_model)s``: the server's default model). Version 3 is the first of this store.
_MIGRATIONS: dict[int, tuple[str, ...]] = {
    4: ("ALTER TABLE jobs ADD COLUMN model TEXT NOT NULL DEFAULT ''",
        "UPDATE jobs SET model = %(default_model)s"),   # jobs from before named models: the default model's
}


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


class PostgresStore(JobStore):
    def __init__(self, url: str, default_model: str = ""):
        self.where = redact(url)
        self._default_model = default_model
        try:
            params = conninfo_to_dict(url)  # a malformed URL fails here, before any connect
        except psycopg.Error as exc:
            raise StoreError(f"{self.where} is not a usable PostgreSQL URL ({_one_line(exc)}); "
                             "use postgresql://USER@HOST/DB") from None
        self._conninfo = {**_CONNECT_DEFAULTS, **params}
        self._lock = threading.Lock()
        self._conn: psycopg.Connection | None = None
        self._retry_at = 0.0
        try:
            with self._tx() as cur:
                self._migrate(cur)
        except StoreError:
            self.close()
            raise

    # ------------------------------------------------------------------ connection
    def _connection(self) -> tuple[psycopg.Connection, bool]:
        """The open connection, or a new one; and whether it is new."""
        if self._conn is not None and not self._conn.closed and not self._conn.broken:
            return self._conn, False
        self._drop()
        if time.monotonic() < self._retry_at:
            raise StoreError(f"job store {self.where}: not reachable (a connect failed under {RECONNECT_S:g} s ago)")
        try:
            self._conn = psycopg.connect(autocommit=True, row_factory=dict_row, **self._conninfo)
        except psycopg.Error as exc:
            self._retry_at = time.monotonic() + RECONNECT_S
            raise StoreError(f"job store {self.where}: cannot connect ({_one_line(exc)})") from None
        return self._conn, True

    def _begin(self) -> psycopg.Connection:
        """A connection in a new transaction. A connection that died while idle (the database restarted) is
        only found out by using it: its BEGIN fails, nothing was done, and a new connection takes over."""
        while True:
            conn, new = self._connection()
            try:
                conn.execute("BEGIN")
                return conn
            except psycopg.Error as exc:
                self._drop()
                if new:
                    self._retry_at = time.monotonic() + RECONNECT_S
                    raise StoreError(f"job store {self.where}: {_one_line(exc)}") from None

    def _drop(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except psycopg.Error:
                pass
            self._conn = None

    @contextmanager
    def _tx(self):
        """A cursor in one transaction under the lock (committed at the end, rolled back on any exception);
        psycopg errors become StoreError, and a connection they broke is dropped."""
        with self._lock:
            conn = self._begin()
            try:
                with conn.cursor() as cur:
                    yield cur
                conn.execute("COMMIT")
            except BaseException as exc:
                if not (conn.closed or conn.broken):
                    try:
                        conn.execute("ROLLBACK")
                    except psycopg.Error:
                        pass
                if conn.closed or conn.broken:
                    self._drop()
                if isinstance(exc, psycopg.Error):
                    raise StoreError(f"job store {self.where}: {_one_line(exc)}") from None
                raise

    def _read(self, sql: str, args: tuple = ()) -> list[dict]:
        with self._tx() as cur:
            return cur.execute(sql, args).fetchall()

    def close(self) -> None:
        with self._lock:
            self._drop()

    def _migrate(self, cur) -> None:
        cur.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_MIGRATE,))  # two nodes starting at once
        # store_id: names this database in the marker of the shared --data_dir (JobFiles.bind).
        cur.execute("CREATE TABLE IF NOT EXISTS s2v_schema (version INTEGER NOT NULL, store_id TEXT)")
        version = cur.execute("SELECT max(version) AS v FROM s2v_schema").fetchone()["v"] or 0
        if version > SCHEMA_VERSION:
            raise SchemaError(f"the job database {self.where} has schema version {version}, newer than this "
                             f"server's {SCHEMA_VERSION}; run the newer server or another database")
        if not version and cur.execute("SELECT 1 FROM pg_tables WHERE schemaname = current_schema() AND "
                                       "tablename = 'jobs'").fetchone():
            raise SchemaError(f"the database {self.where} has a table 'jobs' that is not this server's; use another "
                             "database, or a schema of its own (?options=-csearch_path%3Ds2v)")
        if version:
            for v in range(version + 1, SCHEMA_VERSION + 1):
                for stmt in _MIGRATIONS.get(v, ()):
                    cur.execute(stmt, {"default_model": self._default_model} if "%(" in stmt else None)
        for stmt in _SCHEMA.split(";"):
            if stmt.strip():
                cur.execute(stmt)
        if not version:
            cur.execute("INSERT INTO s2v_schema (version, store_id) VALUES (%s, %s)",
                        (SCHEMA_VERSION, secrets.token_hex(8)))
        elif version != SCHEMA_VERSION:
            cur.execute("UPDATE s2v_schema SET version = %s", (SCHEMA_VERSION,))
        self.identity = "postgresql:" + cur.execute("SELECT store_id FROM s2v_schema").fetchone()["store_id"]

    @staticmethod
    def _owned(owner: str | None) -> tuple[str, tuple]:
        return ("", ()) if owner is ANYONE else (" AND owner = %s", (owner,))

    # ------------------------------------------------------------------ the API's side
    def add(self, job_id, owner, params, *, model="", max_queued=None, max_queued_per_owner=None) -> Job:
        with self._tx() as cur:
            if max_queued is not None or max_queued_per_owner is not None:
                # Two nodes adding at once must not both see room for one more job.
                cur.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_ADD,))
            if max_queued is not None:
                n = cur.execute("SELECT count(*) AS n FROM jobs WHERE status = %s", (QUEUED,)).fetchone()["n"]
                if n >= max_queued:
                    raise QueueFull(max_queued, per_owner=False)
            if max_queued_per_owner is not None:
                n = cur.execute("SELECT count(*) AS n FROM jobs WHERE status = %s AND owner = %s",
                                (QUEUED, owner)).fetchone()["n"]
                if n >= max_queued_per_owner:
                    raise QueueFull(max_queued_per_owner, per_owner=True)
            cur.execute(f"INSERT INTO jobs (id, status, params, created_at, owner, node, model) "
                        f"VALUES (%s, %s, %s, {_NOW}, %s, %s, %s)",
                        (job_id, QUEUED, json.dumps(params), owner, this_node(), model))
            row = cur.execute(f"SELECT *, {POSITION} FROM jobs WHERE id = %s", (job_id,)).fetchone()
        return job_from_row(row)

    def get(self, job_id, owner=ANYONE):
        where, args = self._owned(owner)
        rows = self._read(f"SELECT *, {POSITION} FROM jobs WHERE id = %s{where}", (job_id, *args))
        return job_from_row(rows[0]) if rows else None

    def list(self, owner=ANYONE, limit=100):
        where, args = self._owned(owner)
        rows = self._read(f"SELECT *, {POSITION} FROM jobs WHERE TRUE{where} ORDER BY seq DESC LIMIT %s",
                          (*args, limit))
        return [job_from_row(r) for r in rows]

    def cancel(self, job_id, owner=ANYONE) -> bool:
        where, args = self._owned(owner)
        with self._tx() as cur:
            cur.execute(f"UPDATE jobs SET status = %s, completed_at = {_NOW}, worker = NULL, lease_until = NULL "
                        f"WHERE id = %s AND status IN (%s, %s){where}",
                        (CANCELLED, job_id, QUEUED, IN_PROGRESS, *args))
            return cur.rowcount == 1

    def delete(self, job_id, owner=ANYONE) -> bool:
        where, args = self._owned(owner)
        with self._tx() as cur:
            cur.execute(f"DELETE FROM jobs WHERE id = %s AND status = ANY(%s){where}", (job_id, list(FINISHED), *args))
            return cur.rowcount == 1

    def count(self, status, owner=ANYONE) -> int:
        where, args = self._owned(owner)
        return self._read(f"SELECT count(*) AS n FROM jobs WHERE status = %s{where}", (status, *args))[0]["n"]

    def queued_by_model(self) -> dict[str, int]:
        rows = self._read("SELECT model, count(*) AS n FROM jobs WHERE status = %s GROUP BY model", (QUEUED,))
        return {r["model"]: r["n"] for r in rows}

    # ------------------------------------------------------------------ the workers' side
    def claim(self, worker, lease_s, model=None):
        of_model, args = ("", ()) if model is None else (" AND model = %s", (model,))
        with self._tx() as cur:
            row = cur.execute(
                f"UPDATE jobs SET status = %s, progress = 0, started_at = {_NOW}, attempts = attempts + 1, "
                f"worker = %s, lease_until = {_NOW} + %s, error = NULL "
                f"WHERE seq = (SELECT seq FROM jobs WHERE status = %s{of_model} ORDER BY seq LIMIT 1 "
                f"FOR UPDATE SKIP LOCKED) RETURNING *", (IN_PROGRESS, worker, float(lease_s), QUEUED, *args)).fetchone()
        return None if row is None else job_from_row(row)

    def heartbeat(self, job_id, worker, lease_s, progress=None) -> bool:
        with self._tx() as cur:
            cur.execute(f"UPDATE jobs SET lease_until = {_NOW} + %s, progress = COALESCE(%s::float8, progress) "
                        f"WHERE id = %s AND status = %s AND worker = %s",
                        (float(lease_s), progress, job_id, IN_PROGRESS, worker))
            return cur.rowcount == 1

    def finish(self, job_id, worker, status, error=None, warnings=()) -> bool:
        done = status == COMPLETED  # the video is this worker's node's file now
        with self._tx() as cur:
            cur.execute(f"UPDATE jobs SET status = %s, error = %s, completed_at = {_NOW}, warnings = %s, "
                        f"worker = NULL, lease_until = NULL, progress = CASE WHEN %s THEN 1 ELSE progress END, "
                        f"node = CASE WHEN %s THEN %s ELSE node END WHERE id = %s AND status = %s AND worker = %s",
                        (status, error, json.dumps(list(warnings)), done, done, node_of(worker), job_id,
                         IN_PROGRESS, worker))
            return cur.rowcount == 1

    def release(self, job_id, worker) -> bool:
        with self._tx() as cur:
            cur.execute("UPDATE jobs SET status = %s, progress = 0, worker = NULL, lease_until = NULL, "
                        "attempts = GREATEST(attempts - 1, 0) WHERE id = %s AND status = %s AND worker = %s",
                        (QUEUED, job_id, IN_PROGRESS, worker))
            return cur.rowcount == 1

    # ------------------------------------------------------------------ maintenance
    def expire_leases(self, max_attempts, now=None):
        out = []
        with self._tx() as cur:
            if now is None:
                now = cur.execute(f"SELECT {_NOW} AS now").fetchone()["now"]
            # Rows another node's janitor (or a heartbeat) holds are skipped: they are looked at next round.
            rows = cur.execute("SELECT id, worker, lease_until, attempts FROM jobs WHERE status = %s "
                               "ORDER BY seq FOR UPDATE SKIP LOCKED", (IN_PROGRESS,)).fetchall()
            for r in rows:
                if not ((r["lease_until"] or 0) < now or worker_is_dead(r["worker"])):
                    continue
                if r["attempts"] >= max_attempts:
                    cur.execute("UPDATE jobs SET status = %s, error = %s, completed_at = %s, worker = NULL, "
                                "lease_until = NULL WHERE id = %s",
                                (FAILED, expired_reason(r["attempts"]), now, r["id"]))
                    out.append((r["id"], FAILED))
                else:
                    cur.execute("UPDATE jobs SET status = %s, progress = 0, worker = NULL, lease_until = NULL "
                                "WHERE id = %s", (QUEUED, r["id"]))
                    out.append((r["id"], QUEUED))
        return out

    def purge_finished(self, before):
        with self._tx() as cur:
            rows = cur.execute("DELETE FROM jobs WHERE status = ANY(%s) AND completed_at < %s RETURNING id",
                               (list(FINISHED), before)).fetchall()
        return [r["id"] for r in rows]

    def ids(self):
        return {r["id"] for r in self._read("SELECT id FROM jobs")}
