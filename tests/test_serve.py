"""The HTTP video service as a real server process on 127.0.0.1 with the tiny model (python -m runtime.serve).

Jobs are kept tiny (64x64, 16-frame clips, under a second of audio, 1-2 steps) so each takes seconds.
"""
from __future__ import annotations

import fcntl
import io
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import av
import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the server needs the 'serve' extra: pip install -e '.[serve]'")
pytest.importorskip("uvicorn", reason="the server needs the 'serve' extra: pip install -e '.[serve]'")
pytest.importorskip("multipart", reason="the server needs the 'serve' extra: pip install -e '.[serve]'")

from runtime.demo import demo_image, demo_speech  # noqa: E402
from tests.conftest import free_port, png_bytes, pose_mp4, wav_bytes  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FAST = {"sample_steps": "1", "infer_frames": "16"}
START_TIMEOUT_S = 300
JOB_TIMEOUT_S = 600


# ------------------------------------------------------------------------------------------ helpers
def speech_wav(seconds: float) -> bytes:
    return wav_bytes(*demo_speech(seconds))


IMAGE, AUDIO = png_bytes(demo_image(128)), speech_wav(0.8)   # 0.8 s: 12 frames, one clip


def multipart(fields: dict[str, str], files: dict[str, tuple[str, bytes]]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    out = io.BytesIO()
    for name, value in fields.items():
        value = value if isinstance(value, bytes) else value.encode()
        out.write(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode() + value + b"\r\n")
    for name, (filename, data) in files.items():
        out.write(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
                  f'Content-Type: application/octet-stream\r\n\r\n'.encode() + data + b"\r\n")
    out.write(f"--{boundary}--\r\n".encode())
    return out.getvalue(), f"multipart/form-data; boundary={boundary}"


class Server:
    def __init__(self, data_dir: Path, *extra: str, prefix: tuple[str, ...] = (), env: dict | None = None,
                 key: str | None = None, ckpt_dir: str = "tiny", log: Path | None = None):
        self.data_dir, self.extra, self.prefix, self.env, self.key = data_dir, extra, prefix, env, key
        self.ckpt_dir = ckpt_dir
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.proc = None
        self.log = log or data_dir.parent / f"{data_dir.name}-server.log"

    def start(self, until: str = "ok") -> "Server":
        """Start the process and wait until /health says ``until`` (e.g. "failed" for a model that cannot load)."""
        cmd = [*self.prefix, sys.executable, "-m", "runtime.serve", "--ckpt_dir", self.ckpt_dir, "--host", "127.0.0.1",
               "--port", str(self.port), "--data_dir", str(self.data_dir), "--device", "cpu", *self.extra]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=open(self.log, "ab"), stderr=subprocess.STDOUT,
                                     env=None if self.env is None else {**os.environ, **self.env})
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"server exited early:\n{self.log.read_text()[-3000:]}"
            try:
                status, _, body = self.request("GET", "/health")
                if json.loads(body)["status"] == until:
                    return self
            except (OSError, ValueError, KeyError):
                pass
            time.sleep(0.3)
        raise AssertionError(f"server not ready in {START_TIMEOUT_S}s:\n{self.log.read_text()[-3000:]}")

    def stop(self, sig=signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
        headers = dict(headers or {})
        if self.key is not None and path != "/health":
            headers.setdefault("Authorization", f"Bearer {self.key}")
        req = urllib.request.Request(self.base + path, data=body, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, dict(r.headers), r.read()
        except urllib.error.HTTPError as e:
            return e.code, dict(e.headers), e.read()

    def json(self, method: str, path: str, **kw):
        status, _, body = self.request(method, path, **kw)
        return status, json.loads(body)

    def submit(self, fields=None, files=None):
        body, ctype = multipart({**FAST, **(fields or {})},
                                files if files is not None else {"image": ("face.png", IMAGE), "audio": ("a.wav", AUDIO)})
        return self.json("POST", "/v1/videos", body=body, headers={"Content-Type": ctype})

    def wait(self, job_id: str, until=("completed", "failed", "cancelled"), timeout=JOB_TIMEOUT_S, seen=None):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status, job = self.json("GET", f"/v1/videos/{job_id}")
            assert status == 200, job
            if seen is not None:
                seen.append(job)
            if job["status"] in until:
                return job
            time.sleep(0.2)
        raise AssertionError(f"job {job_id} still {job['status']} after {timeout}s")


def decode_mp4(data: bytes) -> tuple[int, float]:
    """(video frames, audio seconds) of an MP4 held in memory."""
    with av.open(io.BytesIO(data)) as c:
        frames = sum(1 for _ in c.decode(video=0))
    with av.open(io.BytesIO(data)) as c:
        a = c.streams.audio[0]
        seconds = float(a.duration * a.time_base)
    return frames, seconds


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    # Limits small enough to test cheaply: 2 MiB of uploads, 5 s of audio, 128*128 output.
    # Body timeout 2 s, prompts up to 2000 bytes, pose frames up to 128*128 px and 4 MiB of prepared pose.
    srv = Server(tmp_path_factory.mktemp("serve") / "data", "--max_upload_mb", "2", "--max_audio_s", "5",
                 "--max_size", "128*128", "--body_timeout_s", "2", "--max_prompt_bytes", "2000",
                 "--max_pose_size", "128*128", "--max_pose_mb", "4").start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def finished_job(server):
    status, job = server.submit({"prompt": "a person talking", "seed": "3"})
    assert status == 202, job
    seen = []
    done = server.wait(job["id"], seen=seen)
    return job, done, seen


# ------------------------------------------------------------------------------------------ tests
def test_submit_poll_download(server, finished_job):
    job, done, seen = finished_job
    assert job["status"] == "queued" and job["id"].startswith("video_") and job["object"] == "video"
    assert job["prompt"] == "a person talking" and job["seed"] == 3 and job["size"] == "64*64"
    assert done["status"] == "completed", done
    assert done["progress"] == 1 and done["url"] == f"/v1/videos/{job['id']}/content"
    progress = [j["progress"] for j in seen]
    assert progress == sorted(progress) and all(0 <= p <= 1 for p in progress)
    assert {j["status"] for j in seen} <= {"queued", "in_progress", "completed"}

    status, headers, data = server.request("GET", done["url"])
    assert status == 200 and headers["content-type"] == "video/mp4"
    frames, audio_s = decode_mp4(data)
    assert frames == 12 and abs(audio_s - 0.75) <= 1 / 16   # 0.8 s of audio: floor(0.8 * 16) = 12 frames
    status, headers, part = server.request("GET", done["url"], headers={"Range": "bytes=100-199"})
    assert status == 206 and part == data[100:200] and headers["content-range"] == f"bytes 100-199/{len(data)}"

    status, listing = server.json("GET", "/v1/videos")
    assert status == 200 and listing["object"] == "list" and job["id"] in [j["id"] for j in listing["data"]]
    status, health = server.json("GET", "/health")
    assert health["status"] == "ok" and health["model"] == "tiny"


@pytest.mark.parametrize("fields,files,status,param,message", [
    ({}, {"image": ("x.png", b"not a picture" * 20), "audio": ("a.wav", AUDIO)}, 400, "image", "not a readable image"),
    ({}, {"image": ("x.png", IMAGE), "audio": ("a.wav", b"RIFF garbage" * 50)}, 400, "audio", "not decodable audio"),
    ({}, {"image": ("x.png", IMAGE)}, 400, "audio", "missing file field"),
    ({}, {"image": ("x.png", IMAGE), "audio": ("a.wav", b"")}, 400, "audio", "empty"),
    ({"sample_steps": "zero"}, None, 400, "sample_steps", "not an integer"),
    ({"infer_frames": "10"}, None, 400, "infer_frames", "multiple of 4"),
    ({"guide_scale": "nan"}, None, 400, "guide_scale", "not a number"),
    ({"guide_scale": "1e9"}, None, 400, "guide_scale", "out of range"),
    ({"colour": "red"}, None, 400, "colour", "unknown field"),
    ({"size": "256*256"}, None, 413, "size", "over this server's limit"),
    ({}, {"image": ("x.png", IMAGE), "audio": ("a.wav", speech_wav(6.0))}, 413, "audio", "over this server's limit"),
    ({}, {"image": ("x.png", IMAGE), "audio": ("a.wav", AUDIO + b"\0" * (5 << 19))}, 413, "audio", "limit"),
    ({"seed": "\u0663"}, None, 400, "seed", "ASCII digits"),             # an Arabic-Indic three
    ({"seed": "1_000"}, None, 400, "seed", "ASCII digits"),
    ({"guide_scale": "inf"}, None, 400, "guide_scale", "not a number"),
    ({"cache": "sometimes"}, None, 400, "cache", "unknown method 'sometimes'"),
    ({"cache": "steps:1"}, None, 400, "cache", "step 1 has no residual"),
    ({"prompt": "x" * 2001}, None, 413, "prompt", "limit"),
    ({"negative_prompt": "\u00e9" * 1001}, None, 413, "negative_prompt", "limit"),  # 2002 bytes in UTF-8
    ({}, {"image": ("x.png", IMAGE), "audio": ("a.wav", AUDIO), "pose_video": ("p.mp4", b"\0garbage" * 99)}, 400,
     "pose_video", "not a readable video"),
    ({}, {"image": ("x.png", IMAGE), "audio": ("a.wav", AUDIO), "pose_video": ("p.mp4", pose_mp4(2, 256))}, 413,
     "pose_video", "per frame"),                                        # 256² frames over the 128*128 cap
    ({}, {"image": ("x.png", IMAGE), "audio": ("a.wav", AUDIO), "pose_video": ("p.mp4", pose_mp4(40, 128))}, 413,
     "pose_video", "MiB to prepare"),                                   # 32 frames read at 128²: over 4 MiB
])
def test_bad_uploads_are_refused_before_queueing(server, fields, files, status, param, message):
    before = server.json("GET", "/v1/videos")[1]["data"]
    got, body = server.submit(fields, files)
    assert got == status, body
    assert body["error"]["param"] == param and message in body["error"]["message"], body
    assert str(server.data_dir) not in body["error"]["message"] and "/jobs/" not in body["error"]["message"]
    assert str(server.data_dir.parent) not in body["error"]["message"]
    assert server.json("GET", "/v1/videos")[1]["data"] == before
    assert [p.name for p in (server.data_dir / "jobs").iterdir() if p.name.startswith(".")] == []


def test_upload_declared_too_large_is_refused_unread(server):
    body, ctype = multipart(FAST, {"image": ("face.png", IMAGE), "audio": ("a.wav", AUDIO)})
    status, _, raw = server.request("POST", "/v1/videos", body=body,
                                    headers={"Content-Type": ctype, "Content-Length": str(50 << 20)})
    assert status == 413 and "limit of 2 MiB" in json.loads(raw)["error"]["message"]


def test_upload_without_content_length_or_multipart(server):
    status, body = server.json("POST", "/v1/videos", body=b"{}", headers={"Content-Type": "application/json"})
    assert status == 400 and "multipart" in body["error"]["message"]
    status, body = server.json("GET", "/v1/videos/video_nope")
    assert status == 404 and body["error"]["param"] == "id"


@pytest.mark.slow
def test_three_concurrent_submissions_run_in_order(server):
    results = [None] * 3

    def go(i):
        results[i] = server.submit({"seed": str(i)})

    threads = [threading.Thread(target=go, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(status == 202 for status, _ in results), results
    ids = [job["id"] for _, job in results]
    done = [server.wait(i) for i in ids]
    assert all(j["status"] == "completed" for j in done), done
    data = server.json("GET", "/v1/videos")[1]["data"]   # newest first
    listing = {j["id"]: j for j in data}
    order = [j["id"] for j in reversed(data) if j["id"] in ids]  # the order the queue took them in
    starts = [listing[i]["started_at"] for i in order]
    ends = [listing[i]["completed_at"] for i in order]
    assert starts == sorted(starts) and all(e <= s for e, s in zip(ends, starts[1:]))  # one at a time, FIFO
    for i in ids:
        status, _, data = server.request("GET", f"/v1/videos/{i}/content")
        assert status == 200 and decode_mp4(data)[0] == 12


def test_cancel_queued_and_running_then_delete(server):
    _, running = server.submit({"sample_steps": "40"})
    _, queued = server.submit()
    server.wait(running["id"], until=("in_progress",))
    status, body = server.json("DELETE", f"/v1/videos/{queued['id']}")
    assert status == 200 and body["status"] == "cancelled"
    status, body = server.json("DELETE", f"/v1/videos/{running['id']}")
    assert status == 200 and body["status"] == "cancelled"
    deadline = time.monotonic() + 120
    while server.json("GET", "/health")[1]["running"] == running["id"]:  # the worker stops between steps
        assert time.monotonic() < deadline, "the worker did not stop the cancelled job"
        time.sleep(0.2)
    job = server.json("GET", f"/v1/videos/{running['id']}")[1]
    assert job["status"] == "cancelled" and job["progress"] < 1
    assert server.json("GET", f"/v1/videos/{queued['id']}")[1]["status"] == "cancelled"
    assert server.request("GET", f"/v1/videos/{running['id']}/content")[0] == 409
    assert not (server.data_dir / "jobs" / running["id"] / "video.mp4").exists()
    # Finished jobs: DELETE removes the record and the files.
    for job_id in (queued["id"], running["id"]):
        status, body = server.json("DELETE", f"/v1/videos/{job_id}")
        assert status == 200 and body == {"id": job_id, "object": "video", "deleted": True}
        assert server.json("GET", f"/v1/videos/{job_id}")[0] == 404
        assert not (server.data_dir / "jobs" / job_id).exists()


@pytest.mark.slow
def test_kill_9_mid_job_then_restart_completes_it(tmp_path):
    data = tmp_path / "data"
    srv = Server(data).start()
    try:
        _, first = srv.submit()
        assert srv.wait(first["id"])["status"] == "completed"
        _, running = srv.submit({"sample_steps": "30"})
        _, waiting = srv.submit()
        srv.wait(running["id"], until=("in_progress",))
        deadline = time.monotonic() + 120
        while srv.json("GET", f"/v1/videos/{running['id']}")[1]["progress"] == 0:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        srv.proc.send_signal(signal.SIGKILL)
        srv.proc.wait()
        with sqlite3.connect(data / "jobs.sqlite3") as db:  # what the crash left behind
            left = dict(db.execute("SELECT id, status FROM jobs").fetchall())
        assert left == {first["id"]: "completed", running["id"]: "in_progress", waiting["id"]: "queued"}

        srv = Server(data).start()
        # The finished result survived; the cut job runs again from the start, then the queued one.
        status, _, video = srv.request("GET", f"/v1/videos/{first['id']}/content")
        assert status == 200 and decode_mp4(video)[0] == 12
        redone = srv.wait(running["id"])
        assert redone["status"] == "completed" and redone["attempts"] == 2
        after = srv.wait(waiting["id"])
        assert after["status"] == "completed" and after["attempts"] == 1 and after["started_at"] >= redone["completed_at"]
        status, _, video = srv.request("GET", f"/v1/videos/{running['id']}/content")
        assert status == 200 and decode_mp4(video)[0] == 12
        assert not list((data / "jobs").glob("*/.video.mp4.*.part"))
    finally:
        srv.stop()


def raw_http(port: int, data: bytes, wait_s: float = 20) -> tuple[bytes, float]:
    """Send raw bytes, read until the server closes; (reply, seconds until closed)."""
    import socket

    t0 = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=wait_s) as sock:
        sock.sendall(data)
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    return reply, time.monotonic() - t0


def test_one_error_format(server):
    for method, path, status, param in (("GET", "/nope", 404, None), ("PUT", "/v1/videos", 405, None),
                                        ("GET", "/v1/videos?limit=abc", 400, "limit"),
                                        ("GET", "/v1/videos?limit=%D9%A3", 400, "limit"),
                                        ("GET", "/v1/videos?limit=0", 400, "limit"),
                                        ("GET", "/v1/videos/video_nope/content", 404, "id")):
        got, headers, body = server.request(method, path)
        assert got == status and headers["content-type"] == "application/json", (method, path, body)
        err = json.loads(body)["error"]
        assert set(err) == {"message", "type", "param"} and err["param"] == param and err["message"], err


def test_invalid_utf8_text_field_is_400(server):
    body, ctype = multipart({**FAST, "prompt": b"caf\xe9 (latin-1)"}, {"image": ("face.png", IMAGE),
                                                                     "audio": ("a.wav", AUDIO)})
    status, reply = server.json("POST", "/v1/videos", body=body, headers={"Content-Type": ctype})
    assert status == 400 and reply["error"]["param"] == "prompt" and "UTF-8" in reply["error"]["message"], reply


def test_prompts_stay_out_of_list_views(server):
    status, job = server.submit({"prompt": "p" * 1500, "negative_prompt": "blurry"})
    assert status == 202 and job["prompt"] == "p" * 1500
    listed = next(j for j in server.json("GET", "/v1/videos")[1]["data"] if j["id"] == job["id"])
    assert "prompt" not in listed and "negative_prompt" not in listed and listed["seed"] == job["seed"]
    assert server.json("GET", f"/v1/videos/{job['id']}")[1]["negative_prompt"] == "blurry"
    server.wait(job["id"])


def test_a_stalled_body_times_out(server):
    head = (f"POST /v1/videos HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\nContent-Length: 5000\r\n"
            "Content-Type: multipart/form-data; boundary=b\r\n\r\n--b\r\n").encode()
    reply, seconds = raw_http(server.port, head)
    assert reply.startswith(b"HTTP/1.1 408") and 1.5 < seconds < 15, (reply[:200], seconds)
    assert json.loads(reply.split(b"\r\n\r\n", 1)[1])["error"]["message"].startswith("the request body stopped")
    assert [p.name for p in (server.data_dir / "jobs").iterdir() if p.name.startswith(".")] == []


def test_host_and_origin_checks(server):
    """DNS rebinding (a foreign Host) and cross-site requests (a foreign Origin) are refused; the server's own
    page and non-browser clients are not."""
    for headers in ({"Host": "attacker.example"}, {"Host": f"attacker.example:{server.port}"},
                    {"Origin": "http://attacker.example"}, {"Origin": "null"},
                    {"Origin": f"http://localhost:{server.port + 1}"}):
        status, reply = server.json("GET", "/v1/videos", headers=headers)
        assert status == 403 and reply["error"]["param"] in ("Host", "Origin"), (headers, reply)
    body, ctype = multipart(FAST, {"image": ("face.png", IMAGE), "audio": ("a.wav", AUDIO)})
    status, reply = server.json("POST", "/v1/videos", body=body,
                                headers={"Content-Type": ctype, "Origin": "https://evil.example"})
    assert status == 403, reply
    for headers in ({"Host": f"localhost:{server.port}"}, {"Origin": server.base},
                    {"Host": f"localhost:{server.port}", "Origin": f"http://localhost:{server.port}"}):
        assert server.json("GET", "/v1/videos", headers=headers)[0] == 200, headers


@pytest.mark.slow
def test_pose_warnings_reach_the_job(server):
    """A still image as pose (one frame for 12 driven frames): the job completes and says so in ``warnings``."""
    status, job = server.submit(files={"image": ("face.png", IMAGE), "audio": ("a.wav", AUDIO),
                                       "pose_video": ("still.mp4", pose_mp4(1, 64))})
    assert status == 202, job
    done = server.wait(job["id"])
    assert done["status"] == "completed", done
    assert len(done["warnings"]) == 1 and "single frame" in done["warnings"][0], done["warnings"]
    assert str(server.data_dir) not in done["warnings"][0]


# ------------------------------------------------------------------------------------------ web page
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.skip("Debian's chromium is not installed (apt-get install chromium); .ci/run installs it")
    profile = tmp_path / f"profile-{uuid.uuid4().hex[:8]}"
    return subprocess.run([exe, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args], capture_output=True,
                          text=True, timeout=120)


@pytest.mark.slow
def test_web_page_shows_progress_and_player(server, finished_job, tmp_path):
    job_id = finished_job[1]["id"]
    url = f"{server.base}/?job={job_id}"
    dom = chromium(tmp_path, "--virtual-time-budget=5000", "--dump-dom", url).stdout
    assert '<form id="form">' in dom and 'type="file"' in dom
    assert f'<code id="job-id">{job_id}</code>' in dom
    assert '<span id="status" class="completed">completed</span>' in dom
    assert '<progress id="progress" max="1" value="1">' in dom
    assert f'src="/v1/videos/{job_id}/content"' in dom and "<video" in dom

    shot = tmp_path / "page.png"
    res = chromium(tmp_path, "--virtual-time-budget=5000", "--window-size=800,700", f"--screenshot={shot}", url)
    assert shot.is_file(), res.stderr[-2000:]
    from PIL import Image

    img = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert img.shape == (700, 800, 3)
    # The progress bar is full: a long run of the accent blue across the page.
    blue = (img[..., 2] > 150) & (img[..., 0] < 80) & (img[..., 1] < 160)
    assert blue.sum(axis=1).max() > 600, "no full progress bar in the screenshot"
    bar_row = int(blue.sum(axis=1).argmax())
    below = img[bar_row + 40:, 100:700]
    # The player is a dark box (black, grey while loading, or the picture) on the white page.
    assert (below.min(axis=2) < 200).mean() > 0.15, "no video player below the progress bar"
    assert (img[:bar_row].std() > 20), "the form above the bar is blank"


class DevTools:
    """Headless Chromium driven over --remote-debugging-pipe (JSON messages ending in NUL on fds 3 and 4), to use
    the page the way a person does: choose files, type, click."""

    def __init__(self, url: str, profile: Path):
        exe = shutil.which("chromium") or shutil.which("chromium-browser")
        if exe is None:
            pytest.skip("Debian's chromium is not installed (apt-get install chromium); .ci/run installs it")
        cmd_r, cmd_w = os.pipe()
        out_r, out_w = os.pipe()

        def fds():  # runs in the child before it closes every descriptor but 0-2 and pass_fds
            high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (cmd_r, out_w)]  # neither may already be 3 or 4
            os.dup2(high[0], 3)
            os.dup2(high[1], 4)

        self.proc = subprocess.Popen([exe, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--remote-debugging-pipe",
                                      "--window-size=800,700", url], pass_fds=(3, 4), preexec_fn=fds,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(cmd_r), os.close(out_w)
        self.w, self.r = os.fdopen(cmd_w, "wb", buffering=0), os.fdopen(out_r, "rb", buffering=0)
        self.buf, self.n, self.session = b"", 0, None
        page = next(t for t in self.call("Target.getTargets")["targetInfos"] if t["type"] == "page")
        self.session = self.call("Target.attachToTarget", targetId=page["targetId"], flatten=True)["sessionId"]
        deadline = time.monotonic() + 60
        while self.js("document.readyState + ' ' + location.href") != "complete " + url:
            assert time.monotonic() < deadline, "the page did not load"
            time.sleep(0.2)

    def call(self, method: str, **params):
        self.n += 1
        msg = {"id": self.n, "method": method, "params": params}
        if self.session:
            msg["sessionId"] = self.session
        self.w.write(json.dumps(msg).encode() + b"\0")
        while True:
            while b"\0" not in self.buf:
                chunk = self.r.read(1 << 16)
                assert chunk, "chromium closed the DevTools pipe"
                self.buf += chunk
            raw, self.buf = self.buf.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self.n:
                assert "error" not in reply, f"{method}: {reply['error']}"
                return reply["result"]

    def js(self, expression: str):
        return self.call("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

    def choose_file(self, element_id: str, path: Path) -> None:
        obj = self.call("Runtime.evaluate", expression=f"document.getElementById('{element_id}')")["result"]["objectId"]
        self.call("DOM.setFileInputFiles", files=[str(path)], objectId=obj)

    def screenshot(self) -> np.ndarray:
        import base64

        from PIL import Image

        png = base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"])
        return np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


@pytest.mark.slow
def test_web_page_upload_form_end_to_end(server, tmp_path):
    """Choose the files, type a prompt, click Generate: the page posts the job, the bar follows it to 100 % and the
    player shows the video."""
    (tmp_path / "face.png").write_bytes(IMAGE)
    (tmp_path / "speech.wav").write_bytes(AUDIO)
    page = DevTools(server.base + "/", tmp_path / "profile")
    try:
        page.choose_file("image", tmp_path / "face.png")
        page.choose_file("audio", tmp_path / "speech.wav")
        page.js("document.getElementById('prompt').value = 'a person talking';"
                "document.getElementById('sample_steps').value = '1'")
        page.js("document.getElementById('submit').click()")
        state = "[status.textContent, progress.value, player.hidden, player.getAttribute('src'), error.textContent]"
        seen, deadline = [], time.monotonic() + JOB_TIMEOUT_S
        while not seen or seen[-1][0] not in ("completed", "failed", "cancelled", "refused"):
            assert time.monotonic() < deadline, seen[-1:]
            time.sleep(0.3)
            seen.append(page.js(f"(() => {{ const [status, progress, player, error] = ['status', 'progress', 'player', "
                                f"'error'].map(i => document.getElementById(i)); return {state}; }})()"))
        status, progress, hidden, src, error = seen[-1]
        assert (status, progress, hidden, error) == ("completed", 1, False, ""), seen[-1]
        job_id = src.split("/")[3]
        job = server.json("GET", f"/v1/videos/{job_id}")[1]
        assert job["prompt"] == "a person talking" and job["sample_steps"] == 1 and job["status"] == "completed"
        assert [p for _, p, *_ in seen] == sorted(p for _, p, *_ in seen)   # the bar only moves forward
        deadline = time.monotonic() + 60
        while not page.js("document.getElementById('player').readyState >= 2"):   # a frame is decoded
            assert time.monotonic() < deadline, "the player did not load the video"
            time.sleep(0.2)
        img = page.screenshot()
    finally:
        page.close()
    blue = (img[..., 2] > 150) & (img[..., 0] < 80) & (img[..., 1] < 160)
    bar_row = int(blue.sum(axis=1).argmax())
    assert blue[bar_row].sum() > 600, "no full progress bar in the screenshot"
    video = img[bar_row + 40:, 40:760]
    assert (video.max(axis=2) > 40).mean() > 0.1, "the player shows no picture"



def test_a_job_may_ask_for_a_step_cache(server):
    status, job = server.submit({"sample_steps": "3", "cache": "steps:2"})
    assert status == 202 and job["cache"] == "steps:2", job
    assert server.wait(job["id"])["status"] == "completed"
    log = server.log.read_text()
    assert f"job {job['id']}: step cache steps:2 computed 2 of 3 steps per clip" in log, log[-2000:]
