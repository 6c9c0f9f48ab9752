"""The service under operational trouble, with real server processes (tiny model, CPU, 127.0.0.1): start-up
misconfigurations, a model that fails to load, a job that keeps killing its server, a full disk, two servers on
one --data_dir, retention and the queue limit."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the server needs the 'serve' extra: pip install -e '.[serve]'")
pytest.importorskip("uvicorn", reason="the server needs the 'serve' extra: pip install -e '.[serve]'")

from tests.test_serve import ROOT, Server  # noqa: E402

FAST = {"sample_steps": "1", "infer_frames": "16"}


def run_serve(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "runtime.serve", "--ckpt_dir", "tiny", "--device", "cpu", *argv],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout)


# ------------------------------------------------------------------------------------------ start-up
def test_port_in_use_is_one_error_line_and_exit_2(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        res = run_serve("--port", str(port), "--data_dir", str(tmp_path / "d"))
    err = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(err) == 1 and err[0].startswith("error: --port") and "in use" in err[0], res
    assert "terminate called" not in res.stderr and not (tmp_path / "d").exists()   # refused before anything


@pytest.mark.parametrize("case,want", [
    ("port_range", "--port 99999 is out of range"),
    ("data_dir_file", "is a file, not a folder"),
    ("data_dir_under_file", "is under a file"),
    ("garbage_db", "job database cannot be opened"),
    ("newer_db", "newer than this server"),
    ("open_bind", "reachable from other machines and no API key"),
    ("short_key", "16+ printable ASCII"),
    ("missing_keys_file", "cannot read it"),
])
def test_startup_misconfigurations(tmp_path, capsys, case, want):
    from runtime.serve.__main__ import main

    data = tmp_path / "d"
    argv = ["--ckpt_dir", "tiny", "--device", "cpu", "--port", str(_free_port()), "--data_dir", str(data)]
    if case == "port_range":
        argv[argv.index("--port") + 1] = "99999"
    elif case == "data_dir_file":
        data.write_text("x")
    elif case == "data_dir_under_file":
        data.write_text("x")
        argv[-1] = str(data / "sub")
    elif case == "garbage_db":
        data.mkdir()
        (data / "jobs.sqlite3").write_bytes(b"this is not a database" * 100)
    elif case == "newer_db":
        data.mkdir()
        with sqlite3.connect(data / "jobs.sqlite3") as db:
            db.execute("PRAGMA user_version = 99")
    elif case == "open_bind":
        argv[argv.index("--device")] = "--host"
        argv[argv.index("--host") + 1] = "0.0.0.0"
    elif case == "short_key":
        argv += ["--api_key", "short"]
    elif case == "missing_keys_file":
        argv += ["--api_keys_file", str(tmp_path / "nope.txt")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and want in err[0], err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_model_load_failure_refuses_jobs_and_hides_paths(tmp_path):
    """An empty checkpoint folder: /health is 503 naming the model (not its path, not the exception text) and a
    POST is 503 JSON instead of a job that would wait forever."""
    ckpt = tmp_path / "secret-location" / "Wan2.2-S2V-14B"
    ckpt.mkdir(parents=True)
    srv = Server(tmp_path / "data", ckpt_dir=str(ckpt)).start(until="failed")
    try:
        status, _, raw = srv.request("GET", "/health")
        health = json.loads(raw)
        assert status == 503 and health["model"] == "Wan2.2-S2V-14B" and "failed to load" in health["error"]
        assert b"secret-location" not in raw and str(tmp_path).encode() not in raw
        status, body = srv.submit()
        assert status == 503 and "failed to load" in body["error"]["message"], body
        assert srv.json("GET", "/v1/videos")[1]["data"] == []
        assert "secret-location" in srv.log.read_text()   # the operator's log has the details
    finally:
        srv.stop()


# ------------------------------------------------------------------------------------------ crashes
@pytest.mark.slow
def test_a_job_that_kept_killing_its_server_is_failed_not_retried(tmp_path):
    """A job whose server was killed under it on its last allowed attempt (kill -9, the attempt count set to the
    limit) is failed with the reason at the restart, not run again; the job queued behind it runs."""
    data = tmp_path / "data"
    first = Server(data, "--max_attempts", "2").start()
    try:
        _, crasher = first.submit({"sample_steps": "100"})
        _, behind = first.submit()
        first.wait(crasher["id"], until=("in_progress",))
        first.proc.send_signal(signal.SIGKILL)   # dies under the job
        first.proc.wait()
    finally:
        first.stop()
    with sqlite3.connect(data / "jobs.sqlite3") as db:   # ... and say it was already its second run
        assert db.execute("UPDATE jobs SET attempts = 2 WHERE id = ? AND status = 'in_progress'",
                          (crasher["id"],)).rowcount == 1
    srv = Server(data, "--max_attempts", "2").start()
    try:
        job = srv.json("GET", f"/v1/videos/{crasher['id']}")[1]
        assert job["status"] == "failed" and "2 times" in job["error"]["message"] and job["attempts"] == 2, job
        assert srv.wait(behind["id"])["status"] == "completed"
    finally:
        srv.stop()


# ------------------------------------------------------------------------------------------ full disk
def _can_mount_tmpfs(tmp_path: Path) -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = tmp_path / "probe"
    probe.mkdir()
    res = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs {probe}"],
                         capture_output=True)
    return res.returncode == 0


@pytest.mark.slow
def test_full_disk_keeps_the_worker_alive_and_health_honest(tmp_path):
    """--data_dir on a 1.2 MB tmpfs (mounted in the server's own mount namespace: unshare -rm) that is filled up
    while a job runs, then freed. Where mounting is impossible the test is skipped (the store's error paths
    are also covered by tests/test_store.py's and the worker's StoreError handling)."""
    if not _can_mount_tmpfs(tmp_path):
        pytest.skip("cannot mount a tmpfs in a private mount namespace here (unshare -rm)")
    mnt = tmp_path / "disk"
    mnt.mkdir()
    prefix = ("unshare", "-rm", "sh", "-c", 'mount -t tmpfs -o size=1200k tmpfs "$0" && exec "$@"', str(mnt))
    srv = Server(mnt / "data", "--lease_s", "3", prefix=prefix, log=tmp_path / "server.log")
    srv.start()
    try:
        inside = Path(f"/proc/{srv.proc.pid}/root") / str(mnt).lstrip("/")   # the tmpfs as the server sees it
        _, running = srv.submit({"sample_steps": "100"})
        srv.wait(running["id"], until=("in_progress",))
        filler = inside / "filler"
        with open(filler, "wb") as fh:   # fill the disk
            try:
                while True:
                    fh.write(b"\0" * 65536)
                    fh.flush()
            except OSError:
                pass
        status, body = srv.submit()
        assert status in (503, 507) and body["error"]["type"] == "server_error", body
        deadline = time.monotonic() + 60
        while srv.request("GET", "/health")[0] != 503:   # the worker's writes fail: not healthy
            assert time.monotonic() < deadline, "health stayed 200 on a full disk"
            time.sleep(0.3)
        health = srv.json("GET", "/health")[1]
        assert health["workers"][0]["state"] == "ready", health           # alive, not dead
        filler.unlink()                                                    # free the space
        deadline = time.monotonic() + 60
        while srv.request("GET", "/health")[0] != 200:
            assert time.monotonic() < deadline, f"health did not recover: {srv.json('GET', '/health')[1]}"
            time.sleep(0.3)
        assert srv.wait(running["id"], timeout=120)["status"] in ("completed", "failed")  # not stuck in progress
        status, job = srv.submit()
        assert status == 202, job
        assert srv.wait(job["id"])["status"] == "completed"
    finally:
        srv.stop()


# ------------------------------------------------------------------------------------------ two servers
@pytest.mark.slow
def test_two_servers_on_one_data_dir_run_each_job_once(tmp_path):
    """Two server processes share one --data_dir: jobs sent to either run once each; kill -9 of one while it
    runs a job: the other re-runs that job after the lease expires (restart-time recovery never takes a job
    whose lease is live)."""
    data = tmp_path / "data"
    a = Server(data, "--lease_s", "3", log=tmp_path / "a.log").start()
    b = Server(data, "--lease_s", "3", log=tmp_path / "b.log").start()
    try:
        ids = [(a if i % 2 else b).submit(FAST)[1]["id"] for i in range(6)]
        done = [a.wait(i) for i in ids]
        assert all(j["status"] == "completed" and j["attempts"] == 1 for j in done), done
        logs = a.log.read_text() + b.log.read_text()
        assert all(logs.count(f"job {i}: started") == 1 for i in ids)
        kill_the_runner_and_see_the_other_finish(a, b)
    finally:
        a.stop()
        b.stop()


def kill_the_runner_and_see_the_other_finish(a, b) -> None:
    """Two servers on one store: kill -9 the one that runs a long job; the other re-runs it as attempt 2."""
    _, long = a.submit({"sample_steps": "100", "infer_frames": "16"})
    a.wait(long["id"], until=("in_progress",))
    runner, other = (a, b) if f"job {long['id']}: started" in a.log.read_text() else (b, a)
    runner.proc.send_signal(signal.SIGKILL)
    runner.proc.wait()
    redone = other.wait(long["id"], timeout=300)
    assert redone["status"] == "completed" and redone["attempts"] == 2, redone
    assert f"job {long['id']}: started (attempt 2)" in other.log.read_text()


# ------------------------------------------------------------------------------------------ limits
@pytest.mark.slow
def test_retention_and_queue_limit(tmp_path):
    """--keep_days removes a finished job and its files; --max_queued answers 429 JSON beyond it."""
    srv = Server(tmp_path / "data", "--keep_days", "0.00003", "--max_queued", "2").start()   # kept ~2.6 s
    try:
        _, done = srv.submit()
        assert srv.wait(done["id"])["status"] == "completed"
        deadline = time.monotonic() + 30
        while srv.request("GET", f"/v1/videos/{done['id']}")[0] != 404:
            assert time.monotonic() < deadline, "the finished job was not removed after --keep_days"
            time.sleep(0.3)
        assert not (srv.data_dir / "jobs" / done["id"]).exists()

        _, running = srv.submit({"sample_steps": "100"})
        srv.wait(running["id"], until=("in_progress",))
        queued = [srv.submit()[1] for _ in range(2)]
        status, body = srv.submit()
        assert status == 429 and body["error"]["type"] == "rate_limit_error" and body["error"]["code"] == "queue_full"
        assert "2 jobs queued" in body["error"]["message"], body
        for job in (running, *queued):
            assert srv.json("DELETE", f"/v1/videos/{job['id']}")[0] == 200
    finally:
        srv.stop()
