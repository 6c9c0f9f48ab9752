"""benchmarks.serve_overhead: the checkpoint folder it writes loads through the runtime's own loaders, its
tokenizer is one ``AutoTokenizer`` accepts, the ``--model`` spec it gives the server is the CLI's recipe, the run's
order (per variant, fast first) and its refusals (a retried job, a worker restarting, a small GPU or disk, missing
packages), and the whole script runs on the CPU (``--tiny``: real server and CLI processes, the same request both
ways)."""
from __future__ import annotations

import http.server
import itertools
import json
import math
import threading
import time
from collections import namedtuple

import pytest
import torch

from benchmarks import serve_overhead as so
from runtime import checkpoint as ck


def test_the_tokenizer_loads_and_gives_a_token_per_word(tmp_path):
    from runtime.models.text import load_tokenizer, resolve_negative_prompt, tokenize

    folder = so.write_tokenizer(tmp_path / ck.T5_TOKENIZER, so.tokenizer_texts())
    tok = load_tokenizer(folder)   # the runtime's loader: local files only, no remote code
    ids, mask = tokenize(tok, [so.PROMPT, "unheard words"], text_len=64)
    words = len(so.PROMPT.split())
    assert mask[0].sum() == words + 1 and ids[0, words] == 1 and ids[0, words + 1] == 0   # EOS, then padding
    assert ids[1, :3].tolist() == [2, 2, 1]                                                  # unknown words: <unk>
    assert int(ids.max()) < 259          # fits any UMT5 vocabulary, the tiny test encoder's too
    _, neg = tokenize(tok, [resolve_negative_prompt("")], text_len=512)   # the S2V default: a token per CJK character
    assert 60 < neg.sum() < 512 and tok.unk_token_id not in ids[0]


@pytest.fixture
def one_thread():
    """One intra-op thread: the tiny model's small ops only contend on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    from runtime.models.text import WanT5Config

    folder = tmp_path_factory.mktemp("ckpt")
    t5 = WanT5Config(vocab=259, dim=48, dim_attn=48, dim_ffn=96, num_heads=4, num_layers=2)   # the tiny DiT's text_dim
    dit = so.write_checkpoint(folder, tiny=True, t5_config=t5)
    return folder, dit, t5


def test_the_checkpoint_folder_loads_through_the_pipeline(tiny_folder, tmp_path, monkeypatch, one_thread):
    from benchmarks.clip import random_lora
    from runtime.models.text import TextEncoder
    from runtime.pipeline import S2VPipeline

    folder, dit, t5 = tiny_folder
    assert (folder / ck.DIT_INDEX).is_file() and len(list(folder.glob("diffusion_pytorch_model-*"))) == 1
    ck.check_folder(folder)
    # The folder loader always builds UMT5-XXL; the tiny folder's encoder is smaller (the only difference).
    load = TextEncoder.from_checkpoint.__func__
    monkeypatch.setattr(TextEncoder, "from_checkpoint",
                        classmethod(lambda cls, d, device=None, dtype=torch.bfloat16: load(cls, d, device, dtype,
                                                                                           config=t5)))
    lora = random_lora(dit, tmp_path / "lora.safetensors", 4, "cpu")
    pipe = S2VPipeline.from_pretrained(str(folder), device="cpu")
    written = dit.state_dict()
    loaded = pipe.dit.state_dict()
    assert written.keys() == loaded.keys() and all(torch.equal(written[k], loaded[k]) for k in written)
    assert pipe.vae.encoder.conv1.weight.shape[0] == 16 and pipe.audio_encoder.model.config.hidden_size == 32
    image, audio = so.inputs(so.TINY)
    res = pipe.generate(image, audio, prompt=so.PROMPT, size=so.TINY.size, infer_frames=so.TINY.infer_frames,
                        sample_steps=1, progress=False)
    assert res.info["clips"] == 2 and res.frames.shape[0] == 16
    merged = S2VPipeline.from_pretrained(str(folder), device="cpu", loras=[(lora, 1.0)])  # the LoRA fits the DiT
    assert not torch.equal(merged.dit.blocks[0].ffn[0].weight, pipe.dit.blocks[0].ffn[0].weight)


def test_the_fast_models_spec_is_the_clis_recipe(tmp_path):
    from benchmarks.clip import random_lora
    from runtime import tiny
    from runtime.serve.models import ModelSpec, parse_model

    lora = random_lora(tiny.tiny_dit(), tmp_path / so.LORA_NAME, 4, "cpu")
    fast, exact = so.variants(3, lora)   # the order they run in
    spec = parse_model(fast.model_flag(), ModelSpec("base"), max_steps=100)
    assert (spec.name, spec.sample_steps, spec.guide_scale, spec.sample_shift) == ("fast", 4, 1.0, 8.0)
    assert [(s.path, s.strength) for s in spec.loras] == [(lora, 1.0)]
    assert fast.cli_flags() == ["--sample_steps", "4", "--sample_guide_scale", "1", "--sample_shift", "8",
                                "--lora", f"{lora}:1.0"]
    assert str(tmp_path) not in fast.shown() and exact.job_fields(so.TINY)["sample_steps"] == "3"
    assert "sample_steps" not in fast.job_fields(so.TINY)   # the fast job takes its model's recipe
    job = {"id": "j", "attempts": 1, "sample_steps": 4, "guide_scale": 1, "sample_shift": 8, "seed": so.SEED}
    so.check_recipe(job, fast)
    with pytest.raises(RuntimeError, match="not the same request"):
        so.check_recipe({**job, "sample_shift": 5}, fast)


def test_a_job_that_ran_more_than_once_fails_the_run(tmp_path):
    fast = so.variants(3, tmp_path / so.LORA_NAME)[0]
    job = {"id": "j", "attempts": 1, "sample_steps": 4, "guide_scale": 1, "sample_shift": 8, "seed": so.SEED}
    so.check_recipe(job, fast)
    for attempts in (2, 0, None):   # re-queued after a worker died; a record without the field
        with pytest.raises(RuntimeError, match=f"ran {attempts} times, not once"):
            so.check_recipe({**job, "attempts": attempts}, fast)


def test_a_worker_that_dies_while_loading_fails_the_start_at_once(tmp_path, monkeypatch):
    ready = {"name": "w0", "model": "fast", "state": "ready", "restarts": 0}
    so.check_workers([ready, {**ready, "state": "loading"}], tmp_path / "log")   # still loading: wait
    for bad, why in (({"state": "restarting"}, "died while loading"), ({"restarts": 1}, "died while loading"),
                     ({"state": "failed"}, "failed to load")):
        with pytest.raises(RuntimeError, match=why):
            so.check_workers([{**ready, **bad}], tmp_path / "log")

    class Running:   # a server process that stays up
        returncode = None

        def poll(self):
            return None

    monkeypatch.setattr(so.subprocess, "Popen", lambda *a, **k: Running())
    srv = so.Server("tiny", so.variants(2, tmp_path / so.LORA_NAME)[:1], "cpu", tmp_path / "server0", {}, True)
    health = {"workers": [{**ready, "state": "restarting", "restarts": 1}]}
    monkeypatch.setattr(srv, "request", lambda *a, **k: (200, json.dumps(health).encode()))
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="w0 died while loading"):
        srv.start(timeout=1800)
    assert time.monotonic() - t0 < 5      # not the whole start-up timeout


def test_local_requests_ignore_a_proxy_in_the_environment(tmp_path, monkeypatch):
    class Answer(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b'{"ok": true}')

        def log_message(self, *args):
            pass

    httpd = http.server.HTTPServer(("127.0.0.1", 0), Answer)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        for name in ("http_proxy", "HTTP_PROXY"):
            monkeypatch.setenv(name, "http://127.0.0.1:9")   # nothing listens there: a proxied call would fail
        monkeypatch.delenv("no_proxy", raising=False)
        monkeypatch.delenv("NO_PROXY", raising=False)
        srv = so.Server("tiny", [], "cpu", tmp_path, {}, True)
        srv.base = f"http://127.0.0.1:{httpd.server_address[1]}"
        assert srv.request("GET", "/health", timeout=5) == (200, b'{"ok": true}')
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_preflight_refuses_a_gpu_smaller_than_an_h200():
    so.check_gpu_memory([139.8], "0")
    with pytest.raises(SystemExit, match=r"GPU 0 has 79\.2 GiB in all; the full-size run needs an H200 \(141 GB\)"):
        so.check_gpu_memory([79.2], "0")
    with pytest.raises(SystemExit, match=r"no CUDA GPU is visible; the full-size run needs an H200"):
        so.check_gpu_memory([], "0")
    with pytest.raises(SystemExit, match=r"'1' is not one of the 1 visible GPU"):
        so.check_gpu_memory([139.8], "1")
    with pytest.raises(SystemExit, match=r"'cpu' is not one of"):
        so.check_gpu_memory([139.8], "cpu")


def test_preflight_refuses_a_small_disk_and_counts_a_half_written_folder(tmp_path, monkeypatch):
    with pytest.raises(SystemExit, match=r"has 20 GiB free for the checkpoint folder; it needs about 44 GiB"):
        so.check_disk(tmp_path, room_gib=20)
    so.check_disk(tmp_path, room_gib=so.FULL_CKPT_GIB + 2)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(so.shutil, "disk_usage", lambda p: usage(100 * 2**30, 90 * 2**30, 10 * 2**30))
    work = tmp_path / "not" / "yet"          # the work folder need not exist yet
    assert so.checkpoint_room_gib(work) == 10
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "shard.safetensors").write_bytes(b"\1" * (4 << 20))   # a half-written folder: removed first
    room = so.checkpoint_room_gib(tmp_path)
    assert 10 + 4 / 1024 <= room < 10 + 5 / 1024
    with pytest.raises(SystemExit, match="has 10 GiB free"):
        so.check_disk(tmp_path)
    (tmp_path / "ckpt" / ".complete").write_text("")
    so.check_disk(tmp_path)                   # a complete folder is reused: nothing to write


def test_preflight_names_the_packages_that_do_not_import():
    so.check_modules(("json", "no_such_module_abc|json"))   # "a|b": either one
    with pytest.raises(SystemExit, match=r"do not all import: no_such_module_abc \(ModuleNotFoundError"):
        so.check_modules(("json", "no_such_module_abc"))


def test_full_size_refuses_the_shared_layout_before_anything(tmp_path, monkeypatch):
    monkeypatch.setattr(so, "preflight", lambda *a: pytest.fail("the layout is refused first"))
    with pytest.raises(SystemExit, match="--layout shared .* fit no one GPU"):
        so.main(["--out", str(tmp_path / "out"), "--layout", "shared", "--workdir", str(tmp_path / "w")])
    assert not (tmp_path / "w").exists()


def test_the_primer_drops_each_kinds_graphs():
    class Graphs:
        def __init__(self):
            self.graphs = {("step", 1): object()}

    class Dropping(Graphs):
        dropped = 0

        def drop_graphs(self):
            self.dropped += 1

    plain, own = Graphs(), Dropping()
    so.drop_graphs(plain)
    so.drop_graphs(own)
    so.drop_graphs(object())               # a backend without graphs (eager, the CPU)
    assert plain.graphs == {} and own.dropped == 1 and own.graphs     # its own method, which frees the pool too


def test_a_primer_that_does_not_end_is_killed(tmp_path):
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="did not end within 0 s; killed it"):
        so.prepare(tmp_path, True, 4, [], so.TINY, timeout=0.2)   # the spawned child is still importing
    assert time.monotonic() - t0 < 30


class FakeServer:
    """Stands in for ``Server``: records what happens, in order; ``fail`` names a variant whose start fails."""

    events: list = []
    fail: str | None = None

    def __init__(self, ckpt, models, gpus, folder, env, cpu):
        self.models = {v.name: v for v in models}
        self.ids = itertools.count()

    def start(self, timeout):
        FakeServer.events.append(("start", *self.models))
        if FakeServer.fail in self.models:
            raise RuntimeError("the server exited")
        return dict.fromkeys(self.models, 1.0)

    def run_job(self, fields, files, timeout):
        v = self.models[fields["model"]]
        FakeServer.events.append(("job", v.name))
        job = {"id": f"j{next(self.ids)}", "attempts": 1, "sample_steps": v.steps, "guide_scale": v.guide,
               "sample_shift": v.shift, "seed": so.SEED}
        return {"id": job["id"], "job": job, "client_s": 10.3, "job_s": 10.1, "run_s": 10.0, "queue_s": 0.05,
                "worker_s": 9.9}

    def download(self, job_id, path):
        path.write_bytes(b"")

    def stop(self):
        FakeServer.events.append(("stop",))


@pytest.fixture
def fake_run(tmp_path, monkeypatch):
    FakeServer.events, FakeServer.fail = [], None

    def cli(ckpt, v, shape, image, audio, out, env, cpu, timeout):
        FakeServer.events.append(("cli", v.name))
        return {"job_s": 10.0, "load_s": 1.0, "process_s": 12.0, "backend": "torch", "clips": 2, "frames": 16}

    monkeypatch.setattr(so, "Server", FakeServer)
    monkeypatch.setattr(so, "run_cli", cli)
    monkeypatch.setattr(so, "prepare", lambda *a: {"device": "fake", "attention": "sdpa", "backend": "torch"})
    monkeypatch.setattr(so, "write_inputs", lambda work, shape: (work / "face.png", work / "speech.wav"))
    monkeypatch.setattr(so, "video_max_diff", lambda a, b: 0)
    out = tmp_path / "out"
    return out, lambda *extra: so.main(["--tiny", "--out", str(out), "--workdir", str(tmp_path / "w"), *extra])


def test_each_variant_is_compared_before_the_next_starts_fast_first(fake_run):
    out, run = fake_run
    assert run() == 0
    assert FakeServer.events == [("start", "fast"), ("job", "fast"), ("job", "fast"), ("stop",), ("cli", "fast"),
                                 ("start", "exact"), ("job", "exact"), ("job", "exact"), ("stop",), ("cli", "exact")]
    data = json.loads((out / f"serve_overhead_{so.TINY.scenario}.json").read_text())
    assert [(r["variant"], r["path"], r["run"]) for r in data["rows"]] == [
        (v, path, run) for v in ("fast", "exact")
        for path, run in (("service", "first"), ("service", "second"), ("cli", "first"), ("overhead", "first"))]
    o = data["rows"][3]
    assert o["overhead_pct"] == pytest.approx(1.0) and o["met"] is True and o["queue_s"] == 0.05
    assert o["service_only_s"] == pytest.approx(0.2) and o["warm_vs_cli_pct"] == pytest.approx(1.0)
    assert "steady_pct" not in o and "warm_vs_cli_pct" in so.COLUMNS
    meta = data["meta"]
    assert meta["order"] == ["fast", "exact"] and (meta["attention"], meta["backend"]) == ("sdpa", "torch")
    assert "one sample" in meta["met_note"] and "non-zero on a GPU" in meta["video_max_diff_note"]


def test_no_second_and_a_cut_off_run_keep_complete_comparisons(fake_run):
    out, run = fake_run
    FakeServer.fail = "exact"
    with pytest.raises(RuntimeError, match="the server exited"):
        run("--no-second")
    data = json.loads((out / f"serve_overhead_{so.TINY.scenario}.json").read_text())   # written after every row
    assert [(r["variant"], r["path"]) for r in data["rows"]] == [("fast", "service"), ("fast", "cli"),
                                                                  ("fast", "overhead")]
    assert data["rows"][-1]["warm_vs_cli_pct"] is None and data["meta"]["second"] is False
    assert FakeServer.events[-2:] == [("start", "exact"), ("stop",)]   # the failed server is stopped too


def test_prepare_writes_the_lora_once_and_primes(tmp_path, one_thread):
    status = tmp_path / "prepare.json"
    with torch.enable_grad():   # _prepare turns autograd off for its (normally spawned) process: keep ours as it was
        so._prepare(str(tmp_path), True, 4, [{"guide_scale": 4.5, "sample_shift": 3.0}], so.TINY, str(status))
        first = json.loads(status.read_text())
        lora = (tmp_path / so.LORA_NAME).read_bytes()
        so._prepare(str(tmp_path), True, 4, [], so.TINY, str(status))
        again = json.loads(status.read_text())
    assert first["device"].startswith("CPU") and first["write_s"] >= 0 and first["prime_s"] > 0
    assert (first["attention"], first["backend"]) == ("sdpa", "torch")   # what the primed pipeline ran
    assert "write_s" not in again and "prime_s" not in again            # reused, and nothing to prime
    assert (tmp_path / so.LORA_NAME).read_bytes() == lora


@pytest.mark.slow
def test_tiny_dry_run_times_both_paths_on_the_same_request(tmp_path):
    out = tmp_path / "out"
    assert so.main(["--tiny", "--out", str(out), "--workdir", str(tmp_path / "work")]) == 0
    data = json.loads((out / f"serve_overhead_{so.TINY.scenario}.json").read_text())
    meta, rows = data["meta"], data["rows"]
    assert (out / f"serve_overhead_{so.TINY.scenario}.md").is_file()
    for key in ("device", "date", "command", "shapes", "steps", "layout", "comparison", "tokenizer"):
        assert meta[key], key
    assert "git" in meta  # empty outside a git checkout (an archive of the tree)
    assert meta["steps"] == {"exact": 2, "fast": 4} and meta["layout"] == "sequential"
    by = {(r["variant"], r["path"], r["run"]): r for r in rows}
    assert list(by) == [(v, path, run) for v in ("fast", "exact")   # per variant, fast first: server, CLI, overhead
                        for path, run in (("service", "first"), ("service", "second"), ("cli", "first"),
                                          ("overhead", "first"))]
    for v in ("exact", "fast"):
        for run in ("first", "second"):
            r = by[(v, "service", run)]
            assert 0 <= r["queue_s"] < r["job_s"] and r["run_s"] <= r["job_s"] <= r["client_s"]
            assert r["worker_s"] > 0 and r["load_s"] > 0
        cli = by[(v, "cli", "first")]
        assert cli["clips"] == 2 and cli["frames"] == 16 and 0 < cli["job_s"] < cli["process_s"]
        o = by[(v, "overhead", "first")]
        assert o["cli_s"] == cli["job_s"] and o["job_s"] == by[(v, "service", "first")]["job_s"]
        assert math.isfinite(o["overhead_pct"]) and math.isfinite(o["warm_vs_cli_pct"]) and isinstance(o["met"], bool)
        assert o["service_only_s"] > -0.06 and o["queue_s"] >= 0   # the worker logs its time to 0.1 s
        assert o["video_max_diff"] == 0   # the service and the CLI made the same video: the same request
