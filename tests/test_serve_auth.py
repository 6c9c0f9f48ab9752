"""API keys and job ownership with a real server process (tiny model, CPU, 127.0.0.1): keys from --api_key,
--api_keys_file (re-read on SIGHUP) and S2V_API_KEYS; 401 in OpenAI's shape; another key's job is 404;
/health open; the per-key queue limit."""
from __future__ import annotations

import json
import signal
import time

import pytest

pytest.importorskip("fastapi", reason="the server needs the 'serve' extra: pip install -e '.[serve]'")
pytest.importorskip("uvicorn", reason="the server needs the 'serve' extra: pip install -e '.[serve]'")

from tests.test_serve import Server  # noqa: E402

ALICE, BOB, CAROL, DAVE = "alice-key-0123456789abcdef", "bob-key-0123456789abcdef", "carol-key-0123456789abcdef", \
    "dave-key-0123456789abcdef"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("auth")
    keys = tmp / "keys.txt"
    keys.write_text(f"# team keys\nbob:{BOB}\n\n")
    srv = Server(tmp / "data", "--api_key", ALICE, "--api_keys_file", str(keys), "--max_queued_per_key", "1",
                 env={"S2V_API_KEYS": f"carol:{CAROL}"}, key=ALICE).start()
    srv.keys_file = keys
    yield srv
    srv.stop()


def as_key(server, key):
    return {"Authorization": f"Bearer {key}"}


def test_missing_or_wrong_key_is_401_in_openai_shape(server):
    for headers in ({"Authorization": ""}, {"Authorization": "Bearer wrong-key-0123456789abcdef"},
                    {"Authorization": f"Basic {ALICE}"}, {"Authorization": f"Bearer {ALICE}x"}):
        for method, path in (("GET", "/v1/videos"), ("POST", "/v1/videos"), ("GET", "/v1/videos/video_x"),
                             ("DELETE", "/v1/videos/video_x"), ("GET", "/v1/videos/video_x/content")):
            status, head, raw = server.request(method, path, headers=headers)
            err = json.loads(raw)["error"]
            assert status == 401 and err["type"] == "invalid_request_error" and err["code"] == "invalid_api_key", raw
            assert head["www-authenticate"] == "Bearer"
    status, health = server.json("GET", "/health")
    assert status == 200 and health["status"] == "ok"                          # open
    assert server.request("GET", "/", headers={"Authorization": ""})[0] == 200  # the page asks for the key itself


def test_each_key_sees_only_its_own_jobs(server):
    status, job = server.submit()
    assert status == 202
    done = server.wait(job["id"])
    assert done["status"] == "completed" and "owner" not in done and ALICE not in json.dumps(done)
    for key in (BOB, CAROL):     # from the keys file and from S2V_API_KEYS: valid keys, other owners
        h = as_key(server, key)
        assert server.json("GET", "/v1/videos", headers=h) == (200, {"object": "list", "data": []})
        for method, path in (("GET", f"/v1/videos/{job['id']}"), ("GET", f"/v1/videos/{job['id']}/content"),
                             ("DELETE", f"/v1/videos/{job['id']}")):
            status, body = server.json(method, path, headers=h)
            assert status == 404 and body["error"]["param"] == "id", (key, method, path, body)
    assert server.request("GET", f"/v1/videos/{job['id']}/content")[0] == 200   # still there for its owner
    db = (server.data_dir / "jobs.sqlite3").read_bytes()
    assert ALICE.encode() not in db                                              # a hash, never the key


def test_per_key_queue_limit(server):
    _, running = server.submit({"sample_steps": "100"})
    server.wait(running["id"], until=("in_progress",))
    status, queued = server.submit()
    assert status == 202
    status, body = server.submit()
    assert status == 429 and body["error"]["code"] == "queue_full" and "your API key" in body["error"]["message"]
    bob = Server.__new__(Server)
    bob.__dict__.update(server.__dict__, key=BOB)
    assert bob.submit()[0] == 202                                                # another key still has room
    for srv, job in ((server, running), (server, queued)):
        assert srv.json("DELETE", f"/v1/videos/{job['id']}")[0] == 200


def test_keys_file_is_reread_on_sighup(server):
    h = as_key(server, DAVE)
    assert server.request("GET", "/v1/videos", headers=h)[0] == 401
    server.keys_file.write_text(f"dave:{DAVE}\n")
    server.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 20
    while server.request("GET", "/v1/videos", headers=h)[0] != 200:
        assert time.monotonic() < deadline, "SIGHUP did not reload the keys file"
        time.sleep(0.2)
    assert server.request("GET", "/v1/videos", headers=as_key(server, BOB))[0] == 401   # removed from the file
    assert server.request("GET", "/v1/videos")[0] == 200                                # --api_key stays
    server.keys_file.write_text("x\n")            # a bad file: the keys stay as they were
    server.proc.send_signal(signal.SIGHUP)
    time.sleep(1)
    assert server.request("GET", "/v1/videos", headers=h)[0] == 200 and server.proc.poll() is None


@pytest.mark.slow
def test_web_page_with_a_key_runs_lists_and_cancels(server, tmp_path):
    """The page asks for the key once (kept in sessionStorage), then: seed field, the caller's job list, Cancel,
    and the finished video played from a blob fetched with the key."""
    from tests.test_serve import AUDIO, IMAGE, DevTools

    (tmp_path / "face.png").write_bytes(IMAGE)
    (tmp_path / "speech.wav").write_bytes(AUDIO)
    page = DevTools(server.base + "/", tmp_path / "profile")
    try:
        deadline = time.monotonic() + 30
        while page.js("document.getElementById('keybox').hidden"):   # the list call got 401: the page asks
            assert time.monotonic() < deadline, "the page did not ask for a key"
            time.sleep(0.2)
        page.js(f"document.getElementById('apikey').value = '{ALICE}'; document.getElementById('usekey').click()")
        assert page.js("sessionStorage.getItem('s2v_api_key')") == ALICE
        state = ("(() => [document.getElementById('status').textContent, document.getElementById('player').src, "
                 "document.getElementById('jobs').textContent, document.getElementById('job-id').textContent])()")

        def submit(steps: str, until: tuple[str, ...]):
            page.choose_file("image", tmp_path / "face.png")
            page.choose_file("audio", tmp_path / "speech.wav")
            page.js(f"document.getElementById('sample_steps').value = '{steps}';"
                    "document.getElementById('seed').value = '7'; document.getElementById('submit').click()")
            deadline = time.monotonic() + 300
            while (s := page.js(state))[0] not in until:
                assert time.monotonic() < deadline, s
                time.sleep(0.3)
            return s

        status, _, _, job_id = submit("100", ("in progress",))
        page.js("document.getElementById('cancel').click()")
        deadline = time.monotonic() + 60
        while page.js(state)[0] != "cancelled":
            assert time.monotonic() < deadline, page.js(state)
            time.sleep(0.3)
        assert server.json("GET", f"/v1/videos/{job_id}")[1]["status"] == "cancelled"
        status, src, jobs, job_id = submit("1", ("completed", "failed", "refused"))
        assert status == "completed", status
        deadline = time.monotonic() + 30
        while not page.js(state)[1].startswith("blob:"):          # fetched with the key, played from a blob
            assert time.monotonic() < deadline, page.js(state)
            time.sleep(0.2)
        job = server.json("GET", f"/v1/videos/{job_id}")[1]
        assert job["seed"] == 7 and job["sample_steps"] == 1
        deadline = time.monotonic() + 30
        while not page.js("document.getElementById('player').readyState >= 2"):
            assert time.monotonic() < deadline, "the player did not load the video"
            time.sleep(0.2)
        assert job_id in page.js(state)[2]                      # the caller's job list
    finally:
        page.close()
