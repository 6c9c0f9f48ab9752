"""Service nodes on one PostgreSQL job store (``--store postgresql://...``) and one shared ``--data_dir``: real
server processes (tiny model, CPU, 127.0.0.1) standing in for nodes on several machines, the session's
throw-away cluster (``tests/postgres_cluster.py``) restarted under them; start-up refusals; and the worker's
conduct when the store stops answering (a fake pipeline, a store that fails on demand)."""
from __future__ import annotations

import json
import logging
import socket
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the server needs the 'serve' extra: pip install -e '.[serve]'")
pytest.importorskip("uvicorn", reason="the server needs the 'serve' extra: pip install -e '.[serve]'")
pytest.importorskip("psycopg", reason="the PostgreSQL store needs the 'serve' extra: pip install -e '.[serve]'")

from runtime.serve.store import COMPLETED, IN_PROGRESS, JobFiles, StoreError  # noqa: E402
from runtime.serve.store_sqlite import SQLiteStore  # noqa: E402
from runtime.serve.uploads import Limits  # noqa: E402
from runtime.serve.worker import Worker  # noqa: E402
from tests import postgres_cluster  # noqa: E402
from tests.conftest import free_port  # noqa: E402
from tests.postgres_cluster import postgres  # noqa: E402,F401 -- the session's cluster
from tests.test_serve import FAST, Server  # noqa: E402
from tests.test_serve_ops import kill_the_runner_and_see_the_other_finish  # noqa: E402


ONE_THREAD = {"OMP_NUM_THREADS": "1"}   # two nodes on one small machine: no oversubscribed cores


def _node(shared: Path, db: str, log: Path, lease_s: str) -> Server:
    return Server(shared, "--store", db, "--lease_s", lease_s, env=ONE_THREAD, log=log)


def _starts(servers, job_id: str) -> int:
    return sum(s.log.read_text().count(f"job {job_id}: started") for s in servers)


# ------------------------------------------------------------------------------------------ two nodes
@pytest.mark.slow
def test_two_nodes_share_one_queue_and_survive_a_database_restart(postgres, tmp_path):  # noqa: F811
    """40 jobs from one client, sent alternately to two nodes, run on both, each once; the database killed
    (as in a crash) and started again while jobs run: the API answers 503 JSON meanwhile and no job is lost."""
    import psycopg

    db = postgres_cluster.create_database("s2v_nodes")
    shared = tmp_path / "shared"
    a = _node(shared, db, tmp_path / "a.log", lease_s="5").start()
    b = _node(shared, db, tmp_path / "b.log", lease_s="5").start()
    nodes = (a, b)
    try:
        ids = [nodes[i % 2].submit(FAST)[1]["id"] for i in range(40)]
        done = [a.wait(i) for i in ids]
        assert all(j["status"] == "completed" and j["attempts"] == 1 for j in done), done
        assert all(_starts(nodes, i) == 1 for i in ids)
        ran = [sum(s.log.read_text().count(f"job {i}: completed") for i in ids) for s in nodes]
        assert sum(ran) == 40 and min(ran) >= 5, ran                       # both nodes took a share
        assert b.request("GET", f"/v1/videos/{ids[0]}/content")[0] == 200  # one node's video, from the other
        with psycopg.connect(db) as conn:
            assert {r[0] for r in conn.execute("SELECT node FROM jobs")} == {socket.gethostname()}

        # The database dies mid-run and comes back: nothing lost.
        more = [nodes[i % 2].submit({"sample_steps": "3", "infer_frames": "16"})[1]["id"] for i in range(6)]
        a.wait(more[0], until=("in_progress",))
        postgres.stop("immediate")
        try:
            status, _, raw = a.request("POST", "/v1/videos", body=b"x", headers={
                "Content-Type": "multipart/form-data; boundary=x"})
            body = json.loads(raw)
            assert status == 503 and body["error"]["type"] == "server_error", body
            assert "store is unavailable" in body["error"]["message"] and "postgresql" not in raw.decode()
            assert b.request("GET", f"/v1/videos/{more[0]}")[0] == 503
            assert a.json("GET", "/health")[0] == 503
            time.sleep(2)
        finally:
            postgres.start()
        for node in nodes:  # each node reconnects on its own (at most once a second): 503 until it has
            deadline = time.monotonic() + 120
            while node.json("GET", "/health")[0] != 200:
                assert time.monotonic() < deadline, "a node did not come back after the database restart"
                time.sleep(0.5)
        finished = [b.wait(i, timeout=300) for i in more]
        assert all(j["status"] == "completed" for j in finished), finished
        assert all(s.proc.poll() is None for s in nodes)
        assert a.json("GET", "/health")[0] == 200 and b.json("GET", "/health")[0] == 200
    finally:
        a.stop()
        b.stop()


@pytest.mark.slow
def test_kill_9_of_a_node_mid_job_its_job_completes_on_the_other(postgres, tmp_path):  # noqa: F811
    db = postgres_cluster.create_database("s2v_kill")
    shared = tmp_path / "shared"
    a = _node(shared, db, tmp_path / "a.log", lease_s="3").start()
    b = _node(shared, db, tmp_path / "b.log", lease_s="3").start()
    try:
        kill_the_runner_and_see_the_other_finish(a, b)
    finally:
        a.stop()
        b.stop()


# ------------------------------------------------------------------------------------------ start-up
@pytest.mark.parametrize("case,want", [
    ("bad_scheme", "is not a job store; use postgresql://"),
    ("unreachable", "cannot connect"),
    ("password_hidden", "cannot connect"),
    ("newer", "newer than this server's"),
    ("foreign_table", "has a table 'jobs' that is not this server's"),
    ("sqlite_folder", "holds the jobs of its SQLite job file"),
    ("other_database", "holds the jobs of another PostgreSQL database"),
    ("no_store_on_a_shared_folder", "holds the jobs of a PostgreSQL job store"),
])
def test_startup_refusals_with_a_store_url(tmp_path, capsys, case, want):
    """One error line and exit 2, the password never shown; a data folder is tied to one store (a node started
    without --store on the shared folder would otherwise sweep the database's job folders as orphans)."""
    from runtime.serve.__main__ import main

    data = tmp_path / "d"
    if case == "sqlite_folder":
        data.mkdir()
        SQLiteStore(data).close()                       # a folder a SQLite server used
    elif case in ("other_database", "no_store_on_a_shared_folder"):
        JobFiles(data).create()
        JobFiles(data).bind("postgresql:0123456789abcdef")  # a folder the nodes of some database share
    if case == "bad_scheme":
        url = "mysql://s2v@db/jobs"
    elif case in ("unreachable", "password_hidden"):   # a socket folder with no server in it
        url = f"postgresql://s2v{':hunter2' if case == 'password_hidden' else ''}@{str(tmp_path).replace('/', '%2F')}/x"
    elif case == "no_store_on_a_shared_folder":
        url = None
    else:
        import psycopg

        url = postgres_cluster.create_database(f"s2v_{case}")
        with psycopg.connect(url, autocommit=True) as conn:
            if case == "newer":
                conn.execute("CREATE TABLE s2v_schema (version INTEGER NOT NULL)")
                conn.execute("INSERT INTO s2v_schema VALUES (99)")
            elif case == "foreign_table":
                conn.execute("CREATE TABLE jobs (id TEXT)")
    argv = ["--ckpt_dir", "tiny", "--device", "cpu", "--port", str(free_port()), "--data_dir", str(data),
            *(() if url is None else ("--store", url))]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and want in err[0], err
    assert "hunter2" not in err[0]


def test_a_data_folder_is_tied_to_one_store(tmp_path):
    files = JobFiles(tmp_path)
    assert files.bind("postgresql:aa") is None and files.bind("postgresql:aa") is None   # its nodes, again
    assert files.bind("sqlite") == "postgresql:aa" and files.bind("postgresql:bb") == "postgresql:aa"
    old = JobFiles(tmp_path / "old")
    old.create()
    SQLiteStore(old.root).close()                                                        # before markers existed
    assert old.bind("postgresql:aa") == "sqlite" and old.bind("sqlite") is None


def test_the_store_url_may_come_from_the_environment(tmp_path, capsys, monkeypatch):
    from runtime.serve.__main__ import main

    monkeypatch.setenv("S2V_STORE", "postgresql://s2v@%2Fnonexistent%2Fsocket/x")
    assert main(["--ckpt_dir", "tiny", "--device", "cpu", "--port", str(free_port()), "--data_dir",
                 str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--store" in err[0] and "cannot connect" in err[0], err


def test_a_store_fails_fast_while_the_database_is_down_and_reconnects(postgres, tmp_path):  # noqa: F811
    from runtime.serve.store_postgres import RECONNECT_S, PostgresStore

    s = PostgresStore(postgres_cluster.schema_url(tmp_path))
    try:
        s.add("video_1", "", {})
        postgres.stop("fast")
        try:
            t0 = time.monotonic()
            for _ in range(3):
                with pytest.raises(StoreError, match="job store"):
                    s.get("video_1")
            assert time.monotonic() - t0 < 2            # unreachable answers at once, not after a timeout
        finally:
            postgres.start()
        time.sleep(RECONNECT_S)
        assert s.get("video_1").status == "queued" and s.claim("w", 30).id == "video_1"
        postgres.stop("immediate")      # a restart while the store is idle: its first call finds out and reconnects
        postgres.start()
        assert s.heartbeat("video_1", "w", 30, progress=0.5) and s.get("video_1").progress == 0.5
    finally:
        s.close()


# ------------------------------------------------------------------------------------------ the worker
class FlakyStore:
    """A real store that raises StoreError on every call while ``down`` is set."""

    def __init__(self, store):
        self.store, self.down = store, threading.Event()
        self.failed: list[str] = []

    def __getattr__(self, name):
        fn = getattr(self.store, name)

        def call(*args, **kw):
            if self.down.is_set():
                self.failed.append(name)
                raise StoreError("job store: unreachable (test)")
            return fn(*args, **kw)

        return call


class StepPipeline:
    """Stands in for S2VPipeline.generate_mp4: ``steps`` steps of ``step_s`` seconds, each reported."""

    def __init__(self, steps: int, step_s: float, on_step=None):
        self.steps, self.step_s, self.on_step = steps, step_s, on_step
        self.step_times: list[float] = []

    def generate_mp4(self, out, image, audio, *, overwrite, pose_video, progress, **params):
        for i in range(self.steps):
            progress(0, 1, i, self.steps)
            self.step_times.append(time.monotonic())
            if self.on_step:
                self.on_step(i)
            time.sleep(self.step_s)
        Path(out).write_bytes(b"mp4")


def _worker(tmp_path: Path, pipe, lease_s: float):
    files = JobFiles(tmp_path)
    files.create()
    store = FlakyStore(SQLiteStore(tmp_path))
    folder = files.new_upload_dir("video_w")
    (folder / "image.png").write_bytes(b"i")
    files.publish(folder, "video_w")
    store.add("video_w", "", {"files": {"image": "image.png", "audio": "audio.wav"}, "audio_s": 1.0})
    return Worker(store, files, lambda: pipe, Limits(), lease_s=lease_s), store, files


def test_worker_pauses_past_its_lease_and_records_the_finish_once_the_store_answers(tmp_path, caplog):
    """The store stops answering mid-job for longer than the lease: the worker finishes its step, runs on while
    its lease may still be live, then pauses before the next step and retries; the store answers again: the
    job goes on in the same attempt and its completion is recorded (and only then are its inputs removed)."""
    lease_s, outage_s, step_s = 1.0, 2.5, 0.1
    outage: list[float] = []
    box = {}

    def on_step(i):
        if i == 2:
            box["store"].down.set()
            outage.append(time.monotonic())
            threading.Timer(outage_s, box["store"].down.clear).start()

    pipe = StepPipeline(steps=35, step_s=step_s, on_step=on_step)
    worker, store, files = _worker(tmp_path, pipe, lease_s)
    box["store"] = store
    caplog.set_level(logging.INFO, logger="runtime.serve.worker")
    worker.start()
    try:
        deadline = time.monotonic() + 30
        while store.store.get("video_w").status != COMPLETED:
            assert time.monotonic() < deadline, store.store.get("video_w")
            time.sleep(0.05)
    finally:
        worker.stop()
        worker.join(10)
    job = store.store.get("video_w")
    assert job.attempts == 1 and job.progress == 1 and files.video_path("video_w").read_bytes() == b"mp4"
    ran_in_outage = [t for t in pipe.step_times if outage[0] < t < outage[0] + outage_s - 0.2]
    # On while the lease may live, then paused (without the pause: about outage_s / step_s steps).
    assert 0 < len(ran_in_outage) <= lease_s / step_s + 2, len(ran_in_outage)
    assert any("paused until it answers" in r.message for r in caplog.records)
    assert not (files.job_dir("video_w") / "image.png").exists()


def test_worker_never_reports_a_finish_it_cannot_record(tmp_path, caplog):
    """The store goes away after the last step: the worker keeps retrying the finish while the server runs; the
    server stops: the job is not completed in the store (it stays in progress, left to lease expiry), its inputs
    stay for the next run, and nothing says completed."""
    box = {}
    pipe = StepPipeline(steps=2, step_s=0.05, on_step=lambda i: i == 1 and box["store"].down.set())
    worker, store, files = _worker(tmp_path, pipe, lease_s=30)
    box["store"] = store
    caplog.set_level(logging.INFO, logger="runtime.serve.worker")
    worker.start()
    deadline = time.monotonic() + 20
    while store.failed.count("finish") < 3:
        assert time.monotonic() < deadline, store.failed
        time.sleep(0.05)
    time.sleep(0.3)
    assert worker.current == "video_w"    # still retrying the finish while the server runs, not moved on
    worker.stop()
    worker.join(20)
    assert not worker.is_alive()
    job = store.store.get("video_w")
    assert job.status == IN_PROGRESS and job.completed_at is None, job
    assert (files.job_dir("video_w") / "image.png").exists()
    messages = [r.message for r in caplog.records]
    assert not any("completed in" in m for m in messages)
    assert any("could not record it" in m for m in messages), messages
