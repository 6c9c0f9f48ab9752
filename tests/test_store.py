"""The job store interface (``runtime.serve.store.JobStore``): claims, leases, heartbeats, expiry, attempts,
cancellation, ownership, ordering, queue limits, retention and the schema version.

Every test takes the ``make_store`` fixture, parametrised over the implementations in ``IMPLEMENTATIONS``:
SQLite, and PostgreSQL on the session's throw-away cluster (``tests/postgres_cluster.py``; a schema per test
folder; skipped with the reason where no server can start).
"""
from __future__ import annotations

import multiprocessing as mp
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from runtime.serve.store import (CANCELLED, COMPLETED, FAILED, IN_PROGRESS, QUEUED, JobFiles, QueueFull, StoreError,
                                 worker_is_dead, worker_name)
from runtime.serve.store_sqlite import DB_NAME, SCHEMA_VERSION, SQLiteStore
from tests import postgres_cluster
from tests.postgres_cluster import postgres  # noqa: F401 -- the session's cluster, removed at its end


def _sqlite(tmp: Path):
    return SQLiteStore(tmp)


def _sqlite_newer_schema(tmp: Path) -> None:
    """Make the store at ``tmp`` look written by a newer server."""
    with sqlite3.connect(tmp / DB_NAME) as db:
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")


def _postgres(tmp: Path):
    from runtime.serve.store_postgres import PostgresStore

    return PostgresStore(postgres_cluster.schema_url(tmp))


def _postgres_newer_schema(tmp: Path) -> None:
    import psycopg

    with psycopg.connect(postgres_cluster.schema_url(tmp), autocommit=True) as db:
        db.execute("UPDATE s2v_schema SET version = version + 1")


# name → (open a store on a folder, mark that folder's store as a newer schema)
IMPLEMENTATIONS = {"sqlite": (_sqlite, _sqlite_newer_schema), "postgres": (_postgres, _postgres_newer_schema)}
SERVERS = {"postgres": "postgres"}  # name → the session fixture of the server it needs (skips without one)


def _server_for(request, name: str) -> None:
    if name in SERVERS:
        request.getfixturevalue(SERVERS[name])


@pytest.fixture(params=sorted(IMPLEMENTATIONS))
def impl(request):
    _server_for(request, request.param)
    return IMPLEMENTATIONS[request.param]


@pytest.fixture
def make_store(impl, tmp_path):
    opened = []

    def make(folder: Path = tmp_path):
        s = impl[0](folder)
        opened.append(s)
        return s

    yield make
    for s in opened:
        s.close()


def add(store, n, owner="", **kw):
    return [store.add(f"video_{owner}{i:03d}", owner, {"seed": i}, **kw).id for i in range(n)]


def test_fifo_claims_and_finish(make_store):
    s = make_store()
    ids = add(s, 3)
    assert [j.id for j in s.list()] == ids[::-1]  # newest first
    a = s.claim("w1", 30)
    b = s.claim("w2", 30)
    assert (a.id, b.id) == (ids[0], ids[1]) and a.status == IN_PROGRESS and a.attempts == 1 and a.worker == "w1"
    assert s.count(QUEUED) == 1 and s.count(IN_PROGRESS) == 2
    assert not s.finish(a.id, "w2", COMPLETED)           # only the lease holder finishes
    assert s.finish(a.id, "w1", COMPLETED, warnings=["pose is short"])
    done = s.get(a.id)
    assert done.status == COMPLETED and done.progress == 1 and done.warnings == ("pose is short",) and done.worker is None
    assert s.claim("w1", 30).id == ids[2] and s.claim("w1", 30) is None


def test_heartbeat_renews_and_expiry_requeues_at_the_head(make_store):
    s = make_store()
    ids = add(s, 3)
    job = s.claim("w1", 30)
    assert s.heartbeat(job.id, "w1", 30, progress=0.5) and s.get(job.id).progress == 0.5
    assert not s.heartbeat(job.id, "w2", 30)
    assert s.expire_leases(max_attempts=3, now=time.time() + 10) == []        # lease still live
    assert s.expire_leases(max_attempts=3, now=time.time() + 31) == [(job.id, QUEUED)]
    assert not s.heartbeat(job.id, "w1", 30)                                   # no longer w1's: it stops
    again = s.claim("w2", 30)
    assert again.id == ids[0] and again.attempts == 2 and again.progress == 0  # the head of the queue


def test_attempts_limit_fails_the_job(make_store):
    s = make_store()
    job_id, nxt = add(s, 2)
    for attempt in (1, 2):
        assert s.claim("w", 1).id == job_id
        assert s.expire_leases(max_attempts=2, now=time.time() + 5) == [(job_id, QUEUED if attempt == 1 else FAILED)]
    failed = s.get(job_id)
    assert failed.status == FAILED and "2 times" in failed.error and failed.attempts == 2
    assert s.claim("w", 1).id == nxt                                          # the queue behind it moves on


def test_claims_by_model_and_queue_positions(make_store):
    """A worker claims only its model's jobs, in FIFO order; a queued job's position counts its model's queue."""
    s = make_store()
    jobs = [s.add(f"video_{i}", "", {"seed": i}, model="ab"[i % 3 == 2]) for i in range(6)]  # a a b a a b
    assert [j.queue_position for j in jobs] == [1, 2, 1, 3, 4, 2] and [j.model for j in jobs] == list("aabaab")
    assert [j.queue_position for j in s.list()] == [2, 4, 3, 1, 2, 1]          # newest first
    assert s.queued_by_model() == {"a": 4, "b": 2}
    assert s.claim("wb", 30, model="b").id == "video_2"
    assert s.claim("wb", 30, model="c") is None
    assert s.queued_by_model() == {"a": 4, "b": 1}
    assert [s.get(f"video_{i}").queue_position for i in (0, 1, 5)] == [1, 2, 1]
    assert s.claim("wa", 30, model="a").id == "video_0"
    running = s.get("video_0")
    assert running.queue_position is None and running.public()["worker"] == {"name": "wa", "device": None}
    assert [s.get(f"video_{i}").queue_position for i in (1, 3, 4)] == [1, 2, 3]
    assert "queue_position" not in running.public() and s.get("video_1").public()["queue_position"] == 1
    assert s.claim("any", 30).id == "video_1"                                   # no model: the oldest of all
    s.claim("host/1/w3@cuda:3", 30, model="a")
    assert s.get("video_3").public()["worker"] == {"name": "w3", "device": "cuda:3"}


def test_release_does_not_count_an_attempt(make_store):
    s = make_store()
    (job_id,) = add(s, 1)
    s.claim("w", 30)
    assert s.release(job_id, "w") and not s.release(job_id, "w")
    job = s.get(job_id)
    assert job.status == QUEUED and job.attempts == 0 and job.worker is None


def test_cancel_through_the_store(make_store):
    s = make_store()
    running, queued = add(s, 2)
    s.claim("w", 30)
    assert s.cancel(queued) and s.cancel(running)
    assert not s.heartbeat(running, "w", 30)          # the worker learns it at its next heartbeat
    assert not s.finish(running, "w", COMPLETED)
    assert s.get(running).status == CANCELLED and s.get(queued).status == CANCELLED
    assert not s.cancel(running)                      # already finished
    assert s.claim("w", 30) is None


def test_ownership(make_store):
    s = make_store()
    (a,) = add(s, 1, owner="alice")
    (b,) = add(s, 1, owner="bob")
    assert s.get(a, "alice").id == a and s.get(a, "bob") is None and s.get(a).id == a
    assert [j.id for j in s.list("bob")] == [b] and {j.id for j in s.list()} == {a, b}
    assert not s.cancel(a, "bob") and s.cancel(a, "alice")
    assert not s.delete(a, "bob") and s.delete(a, "alice") and s.get(a) is None
    assert not s.delete(b, "bob")                     # not finished
    assert s.count(QUEUED, "bob") == 1 and s.count(QUEUED, "alice") == 0


def test_queue_limits(make_store):
    s = make_store()
    add(s, 2, owner="a", max_queued=3, max_queued_per_owner=2)
    with pytest.raises(QueueFull) as e:
        s.add("video_a9", "a", {}, max_queued=3, max_queued_per_owner=2)
    assert e.value.per_owner and e.value.limit == 2
    s.add("video_b0", "b", {}, max_queued=3, max_queued_per_owner=2)
    with pytest.raises(QueueFull) as e:
        s.add("video_b1", "b", {}, max_queued=3, max_queued_per_owner=2)
    assert not e.value.per_owner and e.value.limit == 3
    assert s.count(QUEUED) == 3 and s.get("video_a9") is None


def test_purge_finished(make_store):
    s = make_store()
    old, running = add(s, 2)
    s.claim("w", 30)
    s.finish(old, "w", FAILED, "x")
    s.claim("w", 30)
    assert s.purge_finished(time.time() - 60) == []
    assert s.purge_finished(time.time() + 1) == [old] and s.get(old) is None and s.get(running) is not None


def test_dead_local_worker_expires_at_once(make_store):
    s = make_store()
    (job_id,) = add(s, 1)
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    dead = worker_name("w0").replace(f"/{os.getpid()}/", f"/{child.pid}/")
    assert worker_is_dead(dead) and not worker_is_dead(worker_name()) and not worker_is_dead("otherhost/1/w0")
    s.claim(dead, 3600)
    assert s.expire_leases(max_attempts=3) == [(job_id, QUEUED)]   # a live lease of a process that is gone
    s.claim(worker_name(), 3600)
    assert s.expire_leases(max_attempts=3) == []                    # this process: alive


def test_newer_schema_is_refused(impl, tmp_path):
    impl[0](tmp_path).close()
    impl[1](tmp_path)
    with pytest.raises(StoreError, match="newer than this server"):
        impl[0](tmp_path)


def _claimer(args):
    impl_name, folder, worker = args
    s = IMPLEMENTATIONS[impl_name][0](Path(folder))
    got = []
    while (job := s.claim(worker, 30)) is not None:
        got.append(job.id)
        s.finish(job.id, worker, COMPLETED)
    s.close()
    return got


@pytest.mark.parametrize("name", sorted(IMPLEMENTATIONS))
def test_concurrent_claims_from_four_processes_take_each_job_once(name, tmp_path, request):
    _server_for(request, name)
    s = IMPLEMENTATIONS[name][0](tmp_path)
    ids = add(s, 60)
    with mp.get_context("spawn").Pool(4) as pool:
        got = pool.map(_claimer, [(name, str(tmp_path), f"w{i}") for i in range(4)])
    claimed = [j for g in got for j in g]
    assert sorted(claimed) == ids                       # every job once, none twice
    assert all(g == sorted(g) for g in got)             # each worker in FIFO order
    assert s.count(COMPLETED) == 60
    s.close()


def test_sqlite_v1_table_is_migrated(tmp_path):
    """A job table written before leases and owners: its rows survive and get the new columns."""
    with sqlite3.connect(tmp_path / DB_NAME) as db:
        db.executescript("""CREATE TABLE jobs (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE,
            status TEXT NOT NULL, params TEXT NOT NULL, progress REAL NOT NULL DEFAULT 0, error TEXT,
            attempts INTEGER NOT NULL DEFAULT 0, created_at REAL NOT NULL, started_at REAL, completed_at REAL);
            INSERT INTO jobs (id, status, params, created_at) VALUES ('video_old', 'queued', '{}', 1.0);""")
    s = SQLiteStore(tmp_path)
    job = s.claim("w", 30)
    assert job.id == "video_old" and job.owner == "" and job.warnings == () and job.worker == "w"
    s.close()


V3_COLUMNS = """seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE, status TEXT NOT NULL,
    params TEXT NOT NULL, progress REAL NOT NULL DEFAULT 0, error TEXT, attempts INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL, started_at REAL, completed_at REAL, owner TEXT NOT NULL DEFAULT '', worker TEXT,
    lease_until REAL, warnings TEXT NOT NULL DEFAULT '[]', node TEXT"""


def test_sqlite_v3_table_gets_the_default_model(tmp_path):
    """A version-3 job table (before named models): its jobs are the default model's and run on its workers."""
    with sqlite3.connect(tmp_path / DB_NAME) as db:
        db.executescript(f"""CREATE TABLE jobs ({V3_COLUMNS}); PRAGMA user_version = 3;
            INSERT INTO jobs (id, status, params, created_at) VALUES ('video_old', 'queued', '{{}}', 1.0);""")
    s = SQLiteStore(tmp_path, default_model="wan-a")
    assert s.get("video_old").model == "wan-a" and s.claim("w", 30, model="wan-b") is None
    assert s.claim("w", 30, model="wan-a").id == "video_old"
    s.close()
    with sqlite3.connect(tmp_path / DB_NAME) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 4


def test_postgres_v3_table_gets_the_default_model(postgres, tmp_path):  # noqa: F811
    import psycopg

    from runtime.serve.store_postgres import PostgresStore

    url = postgres_cluster.schema_url(tmp_path)
    PostgresStore(url).close()                      # the schema exists; make its jobs table a version-3 one
    columns = V3_COLUMNS.replace("INTEGER PRIMARY KEY AUTOINCREMENT", "BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY")
    with psycopg.connect(url, autocommit=True) as db:
        db.execute("DROP TABLE jobs")
        db.execute(f"CREATE TABLE jobs ({columns.replace('REAL', 'DOUBLE PRECISION')})")
        db.execute("UPDATE s2v_schema SET version = 3")
        db.execute("INSERT INTO jobs (id, status, params, created_at) VALUES ('video_old', 'queued', '{}', 1.0)")
    s = PostgresStore(url, default_model="wan-a")
    try:
        assert s.get("video_old").model == "wan-a" and s.claim("w", 30, model="wan-a").id == "video_old"
    finally:
        s.close()
    with psycopg.connect(url, autocommit=True) as db:
        assert db.execute("SELECT version FROM s2v_schema").fetchone()[0] == 4


def test_job_files_sweep_keeps_live_uploads(tmp_path):
    files = JobFiles(tmp_path)
    files.create()
    mine = files.new_upload_dir("video_live")                      # this process: alive
    dead = files.jobs_dir / ".video_dead.somehost.999999999.upload"  # another host: kept until old
    dead.mkdir()
    orphan = files.jobs_dir / "video_orphan"
    orphan.mkdir()
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    killed = Path(str(mine).replace(f".{os.getpid()}.", f".{child.pid}."))  # an upload of a process that is gone
    killed.mkdir()
    assert files.sweep(set()) == [killed.name]                     # nothing else old enough or provably dead
    assert files.sweep(set(), now=time.time() + 2 * 86_400) and mine.exists() is False
    assert not orphan.exists() and not dead.exists()
