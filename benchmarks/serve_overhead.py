"""``python -m benchmarks.serve_overhead``: the video service's per-job wall time next to the same request through
the CLI (issue 29: service overhead ≤ 2 %).

Two model variants on random weights at the real configuration, read from a checkpoint folder in the official
layout that this script writes to local disk: ``exact`` (no LoRA, CFG 4.5, shift 3; ``--exact-steps`` steps, 4
by default: the official 40 would take ~20 min per job on one H200) and ``fast`` (a random rank-32 LoRA in the
lightx2v key family merged at load, 4 steps, CFG 1, shift 8: the ``--model`` recipe of issue 29). One request:
a 1024×704 image and 5.5 s of speech from ``runtime.demo`` at ``--size 704*1024``, 80 frames per clip: a first
and a later clip.

What is compared (like for like, both after the model load): the first job of a freshly started worker process
against ``python -m runtime.generate`` with the same flags in a fresh process, both with inductor's on-disk cache
already warm (a priming process, not timed, compiled every graph of both variants first). Both then pay the same
per-process costs of a shape's first meeting (graph tracing and cache lookups, the CUDA-graph capture, cuDNN's
algorithm timing in the VAE). The service's second job of the same request (a warm worker) is reported beside
them: what a long-lived worker saves. Service time is the job record's created → completed (the upload is
parsed and checked before the record exists), and also what the client saw (POST sent → completed seen, polled
every 0.1 s); CLI time is the ``generated … in X s`` of its log (after its load; the process time is beside it).

Layouts: ``sequential`` (the default) starts one server per variant (``--gpus 0``), one after the other;
``shared`` starts one server with both variants, one worker each (``--gpus 0,0``: two worker processes on one
GPU, or ``0,1``). Jobs are submitted one at a time in both, so no two jobs ever overlap. Two full-size workers do
not fit one H200 (~43 GiB of weights each, plus each worker's captured graphs and VAE working set), hence the
default. The UMT5 tokenizer cannot be downloaded here: the folder gets the smallest tokenizer the loader
accepts, a word-level ``tokenizer.json`` (one token per word or CJK character, ids < 259, EOS appended) whose
prompt lengths are close to UMT5's; both paths read the same one.

    python -m benchmarks.serve_overhead --out DIR [--layout shared] [--exact-steps 2] [--workdir /tmp/so]
    python -m benchmarks.serve_overhead --tiny --out /tmp/so   # CPU dry run on the built-in tiny model

``--tiny`` runs the same steps on the CPU in about a minute: the built-in tiny model (``--ckpt_dir tiny``; the
runtime's folder loader always builds the 11 GB UMT5-XXL, so a tiny folder cannot be served), a tiny random LoRA,
a 64×64 request of two 12-frame clips, ``--gpus cpu``, no priming (nothing compiles on the CPU). Results (JSON +
Markdown) are written after every row.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COLUMNS = ["variant", "path", "run", "precision", "scenario", "gpus", "steps", "guide_scale", "job_s", "run_s",
           "queue_s", "worker_s", "client_s", "load_s", "process_s", "cli_s", "overhead_pct", "overhead_client_pct",
           "steady_pct", "met"]
GOAL_PCT = 2.0
API_KEY = "serve-overhead-" + uuid.uuid4().hex
PROMPT = "a person talking to the camera in a bright room"
SEED = 0
LORA_RANK = 32
LORA_NAME = "lora_rank32_lightx2v.safetensors"
FULL_CKPT_GIB = 44   # DiT bf16 ~31 GiB, UMT5-XXL bf16 ~10.6, wav2vec2 fp32 ~1.2, VAE fp32 ~0.5, the LoRA ~0.3
POLL_S = 0.1
DONE = ("completed", "failed", "cancelled")


@dataclass(frozen=True)
class Shape:
    """The request: image height × width (the output's orientation follows it), frames per clip, audio length."""

    height: int
    width: int
    infer_frames: int
    audio_s: float

    @property
    def size(self) -> str:
        return f"{self.height}*{self.width}"

    @property
    def scenario(self) -> str:
        return f"{self.height}x{self.width}-{self.infer_frames}f"


FULL = Shape(704, 1024, 80, 5.5)    # 88 frames of audio: a first and a later clip of 80
TINY = Shape(64, 64, 12, 1.0)       # 16 frames: two clips of 12


@dataclass(frozen=True)
class Variant:
    """A ``--model`` of the server and the CLI flags of the same request."""

    name: str
    steps: int
    guide: float
    shift: float
    lora: Path | None = None
    job_steps: bool = False         # the job sets sample_steps (the exact model's default is 40)

    def model_flag(self) -> str:
        if self.lora is None:
            return self.name
        return f"{self.name}=lora:{self.lora}:1.0,steps:{self.steps},guide:{self.guide:g},shift:{self.shift:g}"

    def shown(self) -> str:
        """The ``--model`` text with the LoRA's folder left out (result files name no local paths)."""
        return self.model_flag().replace(str(self.lora), self.lora.name) if self.lora else self.model_flag()

    def job_fields(self, shape: Shape) -> dict[str, str]:
        out = {"model": self.name, "prompt": PROMPT, "seed": str(SEED), "size": shape.size,
               "infer_frames": str(shape.infer_frames)}
        if self.job_steps:
            out["sample_steps"] = str(self.steps)
        return out

    def cli_flags(self) -> list[str]:
        out = ["--sample_steps", str(self.steps), "--sample_guide_scale", f"{self.guide:g}",
               "--sample_shift", f"{self.shift:g}"]
        return out + (["--lora", f"{self.lora}:1.0"] if self.lora else [])


def variants(exact_steps: int, lora: Path) -> list[Variant]:
    from runtime.config import RUN

    return [Variant("exact", exact_steps, RUN.guide_scale, RUN.sample_shift, job_steps=True),
            Variant("fast", 4, 1.0, 8.0, lora=lora)]


# ------------------------------------------------------------------------------------------ the checkpoint folder
def tokenizer_texts() -> list[str]:
    """What the runs tokenize: the prompt and the default (S2V) negative prompt, cleaned as the encoder cleans."""
    from runtime.models.text import S2V_NEGATIVE_PROMPT, clean_prompt

    return [clean_prompt(PROMPT), clean_prompt(S2V_NEGATIVE_PROMPT)]


def write_tokenizer(folder: Path, texts: list[str]) -> Path:
    """A word-level tokenizer (``tokenizer.json`` + ``tokenizer_config.json``) that ``AutoTokenizer`` loads without
    sentencepiece: ids 0 pad, 1 EOS (appended), 2 unknown, then the words and CJK characters of ``texts``."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors

    pre = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"[\u2e80-\u9fff\uf900-\ufaff\uff00-\uffef]"), "isolated"),  # a CJK char each
        pre_tokenizers.Whitespace()])
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for text in texts:
        for word, _ in pre.pre_tokenize_str(text):
            vocab.setdefault(word, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "pad_token": "<pad>", "eos_token": "</s>",
         "unk_token": "<unk>", "model_max_length": 512}, indent=2))
    return folder


def _save_dit(model, folder: Path, shard_bytes: int) -> None:
    """config.json + safetensors shards of at most ``shard_bytes`` + the index: the official layout."""
    from safetensors.torch import save_file

    from runtime import checkpoint as ck

    (folder / ck.DIT_CONFIG).write_text(json.dumps({"_class_name": "WanModel_S2V", **model.cfg.to_official_dict()},
                                                   indent=2))
    state = model.state_dict()   # the official key names (the fused QKV is split by the model's state-dict hooks)
    groups, size = [[]], 0
    for name, t in state.items():
        n = t.numel() * t.element_size()
        if groups[-1] and size + n > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += n
    weight_map = {}
    for i, names in enumerate(groups):
        fname = f"diffusion_pytorch_model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file({k: state[k].detach().to("cpu", copy=True).contiguous() for k in names}, str(folder / fname))
        weight_map.update(dict.fromkeys(names, fname))
    (folder / ck.DIT_INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2))


def _save_t5(folder: Path, config, device) -> None:
    """Random UMT5 encoder weights (transformers' own init) in the Wan layout, bf16, as ``torch.save`` writes
    the official ``.pth``: a plain dict of tensors."""
    import torch
    from transformers import UMT5EncoderModel

    from runtime import checkpoint as ck
    from runtime.models.text import umt5_config_from_wan, wan_to_hf_keys

    hf = umt5_config_from_wan(config)
    with torch.device(device):
        model = UMT5EncoderModel(hf).to(torch.bfloat16)
    sd = model.state_dict()
    wan = {key: sd[hf_keys[0]].to("cpu", copy=True) for key, hf_keys in wan_to_hf_keys(hf.num_layers).items()}
    del model, sd
    torch.save(wan, folder / ck.T5_FILE)


def _save_wav2vec(folder: Path, tiny: bool) -> None:
    from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model

    from runtime.config import DiTConfig

    if tiny:
        dim = DiTConfig.tiny().audio_dim
        cfg = Wav2Vec2Config(hidden_size=dim, num_hidden_layers=DiTConfig.tiny().audio_layers - 1,
                             num_attention_heads=2, intermediate_size=2 * dim, conv_dim=(32,) * 7,
                             num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2, do_stable_layer_norm=True,
                             feat_extract_norm="layer", conv_bias=True, vocab_size=32)
    else:  # wav2vec2-large-xlsr-53 (as benchmarks.run.full_size_encoders)
        cfg = Wav2Vec2Config(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                             do_stable_layer_norm=True, feat_extract_norm="layer", conv_bias=True)
    Wav2Vec2Model(cfg).save_pretrained(str(folder))
    Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, padding_value=0.0, do_normalize=True,
                             return_attention_mask=True).save_pretrained(str(folder))


def write_checkpoint(folder: Path, tiny: bool = False, device: str = "cpu", t5_config=None,
                     shard_bytes: int = 5 << 30):
    """An official-layout ``Wan2.2-S2V-14B/`` folder with random weights at the real configuration (the tiny one
    with ``tiny``; ``t5_config`` then names the UMT5 size, the real UMT5-XXL by default): DiT shards + index,
    ``Wan2.1_VAE.pth``, the UMT5 ``.pth`` and its tokenizer folder, the wav2vec2 folder. Returns the DiT (on
    ``device``): the LoRA is written against its shapes."""
    import torch

    from runtime import checkpoint as ck
    from runtime.config import DiTConfig
    from runtime.models.dit import build_dit
    from runtime.models.text import UMT5_XXL
    from runtime.models.vae import VAEConfig, WanVAE

    folder.mkdir(parents=True, exist_ok=True)
    write_tokenizer(folder / ck.T5_TOKENIZER, tokenizer_texts())
    _save_t5(folder, t5_config or UMT5_XXL, device)
    _save_wav2vec(folder / ck.WAV2VEC_DIR, tiny)
    torch.manual_seed(0)
    vae = WanVAE(VAEConfig.tiny() if tiny else VAEConfig.wan21())
    torch.save({k: v.contiguous() for k, v in vae.state_dict().items()}, folder / ck.VAE_FILE)
    del vae
    cfg = DiTConfig.tiny() if tiny else DiTConfig.s2v_14b()
    dit = build_dit(cfg, dtype=torch.float32 if tiny else torch.bfloat16, device=device)
    _save_dit(dit, folder, shard_bytes)
    return dit


def check_disk(work: Path) -> None:
    """Refuse, before minutes of writing, a work folder whose disk cannot hold the full-size folder."""
    if (work / "ckpt" / ".complete").is_file():
        return
    free = shutil.disk_usage(work).free / 2**30
    if free < FULL_CKPT_GIB + 2:
        raise SystemExit(f"error: --workdir {work} has {free:.0f} GiB free; the full-size checkpoint folder needs "
                         f"about {FULL_CKPT_GIB} GiB (+2 for the videos and logs): pass a --workdir on a larger local "
                         "disk (or /dev/shm on a machine with the RAM)")


def _prepare(workdir: str, tiny: bool, lora_rank: int, prime: list[dict], shape: Shape, status: str) -> None:
    """The spawned child that owns the GPU before the servers start: writes the folder and the LoRA (unless a
    complete folder is there; with ``tiny`` the LoRA only, for the built-in model), primes inductor's on-disk cache by running each distinct request kind for one step
    on a pipeline loaded from the folder, and reports the device; its findings go to ``status`` (JSON)."""
    import torch

    from benchmarks.clip import random_lora
    from benchmarks.common import device_description

    torch.set_grad_enabled(False)
    work = Path(workdir)
    device = "cpu" if tiny else "cuda"
    out: dict = {"device": device_description(device)}
    ckpt, lora = work / "ckpt", work / LORA_NAME
    if not lora.is_file() or not (tiny or (ckpt / ".complete").is_file()):
        t0 = time.perf_counter()
        if tiny:
            from runtime import tiny as tiny_model

            dit = tiny_model.tiny_dit(torch.float32)
        else:
            shutil.rmtree(ckpt, ignore_errors=True)
            dit = write_checkpoint(ckpt, device=device)
            (ckpt / ".complete").write_text("written by benchmarks.serve_overhead\n")
        random_lora(dit, lora, lora_rank, device)
        del dit
        if device == "cuda":
            torch.cuda.empty_cache()
        out["write_s"] = round(time.perf_counter() - t0, 1)
    if prime:
        from runtime.pipeline import S2VPipeline

        t0 = time.perf_counter()
        pipe = S2VPipeline.from_pretrained("tiny" if tiny else str(ckpt), device=device)
        image, audio = inputs(shape)
        for kw in prime:
            pipe.generate(image, audio, prompt=PROMPT, seed=SEED, size=shape.size, infer_frames=shape.infer_frames,
                          sample_steps=1, progress=False, **kw)
        out["prime_s"] = round(time.perf_counter() - t0, 1)
    Path(status).write_text(json.dumps(out))


def prepare(work: Path, tiny: bool, lora_rank: int, prime: list[dict], shape: Shape) -> dict:
    """Run :func:`_prepare` in a spawned process (this one never holds the GPU while the servers run)."""
    import multiprocessing as mp

    status = work / "prepare.json"
    status.unlink(missing_ok=True)
    proc = mp.get_context("spawn").Process(target=_prepare, args=(str(work), tiny, lora_rank, prime, shape,
                                                                  str(status)))
    proc.start()
    proc.join()
    if proc.exitcode != 0 or not status.is_file():
        raise RuntimeError(f"writing the checkpoint / priming failed (exit code {proc.exitcode}); see the traceback "
                           "above")
    return json.loads(status.read_text())


# ------------------------------------------------------------------------------------------ inputs
def inputs(shape: Shape):
    """The request's image (width × height) and speech, made by ``runtime.demo``."""
    from PIL import Image

    from runtime.demo import demo_image, demo_speech

    image = demo_image(max(shape.height, shape.width)).resize((shape.width, shape.height), Image.BICUBIC)
    return image, demo_speech(shape.audio_s)


def write_inputs(folder: Path, shape: Shape) -> tuple[Path, Path]:
    from runtime.demo import save_wav

    image, (wav, rate) = inputs(shape)
    img_path, wav_path = folder / "face.png", folder / "speech.wav"
    image.save(img_path)
    save_wav(wav_path, wav, rate)
    return img_path, wav_path


# ------------------------------------------------------------------------------------------ the service
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def multipart(fields: dict[str, str], files: dict[str, Path]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
             for k, v in fields.items()]
    for name, path in files.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{path.name}"\r\n'
                     f'Content-Type: application/octet-stream\r\n\r\n'.encode() + path.read_bytes() + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def tail(path: Path, n: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


class Server:
    """``python -m runtime.serve`` in a process of its own (127.0.0.1, an API key, a fresh data folder)."""

    def __init__(self, ckpt: str, models: list[Variant], gpus: str, folder: Path, env: dict, cpu: bool):
        self.models, self.gpus, self.env = models, gpus, env
        self.data = folder / "data"
        self.log = folder / "server.log"
        self.port = _free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.cmd = [sys.executable, "-m", "runtime.serve", "--ckpt_dir", ckpt, "--host", "127.0.0.1", "--port",
                    str(self.port), "--data_dir", str(self.data), "--api_key", API_KEY, "--gpus", gpus,
                    *(["--device", "cpu"] if cpu else []), *[a for m in models for a in ("--model", m.model_flag())]]
        self.proc: subprocess.Popen | None = None

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
                timeout: float = 120):
        req = urllib.request.Request(self.base + path, data=body, method=method,
                                     headers={"Authorization": f"Bearer {API_KEY}", **(headers or {})})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def start(self, timeout: float) -> dict:
        """Start it and wait until every worker has loaded its model; each model's worker load time (s)."""
        self.data.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(self.cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                         env={**os.environ, **self.env})
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with code {self.proc.returncode}:\n{tail(self.log)}")
            try:
                _, body = self.request("GET", "/health", timeout=5)
                workers = json.loads(body).get("workers", [])
            except (OSError, ValueError):
                workers = []
            if any(w["state"] == "failed" for w in workers):
                raise RuntimeError(f"a worker failed to load its model:\n{tail(self.log)}")
            if workers and all(w["state"] == "ready" for w in workers):
                loads = dict(re.findall(r"\[(w\d+)\]: pipeline loaded in ([0-9.]+)s", tail(self.log, 10**6)))
                return {w["model"]: float(loads[w["name"]]) if w["name"] in loads else None for w in workers}
            time.sleep(0.5)
        raise RuntimeError(f"the server's workers were not ready after {timeout:.0f} s:\n{tail(self.log)}")

    def run_job(self, fields: dict[str, str], files: dict[str, Path], timeout: float) -> dict:
        """Submit one job, wait for it, return its timings (store record, client, worker log)."""
        body, ctype = multipart(fields, files)
        t0 = time.perf_counter()
        status, answer = self.request("POST", "/v1/videos", body, {"Content-Type": ctype})
        if status != 202:
            raise RuntimeError(f"POST /v1/videos answered {status}: {answer[:500]!r}")
        job_id = json.loads(answer)["id"]
        deadline = time.monotonic() + timeout
        while True:
            status, answer = self.request("GET", f"/v1/videos/{job_id}")
            job = json.loads(answer)
            if status != 200:
                raise RuntimeError(f"GET /v1/videos/{job_id} answered {status}: {answer[:500]!r}")
            if job["status"] in DONE:
                client_s = time.perf_counter() - t0
                break
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError(f"job {job_id} still {job['status']} after {timeout:.0f} s:\n{tail(self.log)}")
            time.sleep(POLL_S)
        if job["status"] != "completed":
            raise RuntimeError(f"job {job_id} {job['status']}: {job.get('error')}:\n{tail(self.log)}")
        record = self.record(job_id)
        worker = re.findall(rf"job {job_id}: completed in ([0-9.]+)s", tail(self.log, 10**6))
        return {"id": job_id, "job": job, "client_s": client_s,
                "job_s": record["completed_at"] - record["created_at"],
                "run_s": record["completed_at"] - record["started_at"],
                "queue_s": record["started_at"] - record["created_at"],
                "worker_s": float(worker[-1]) if worker else None}

    def record(self, job_id: str) -> dict:
        """The job's row as the store keeps it (the API rounds times to whole seconds)."""
        from runtime.serve.store import SQLITE_NAME

        db = sqlite3.connect(f"file:{self.data / SQLITE_NAME}?mode=ro", uri=True)
        try:
            db.row_factory = sqlite3.Row
            return dict(db.execute("SELECT created_at, started_at, completed_at FROM jobs WHERE id = ?",
                                   (job_id,)).fetchone())
        finally:
            db.close()

    def download(self, job_id: str, path: Path) -> Path:
        status, body = self.request("GET", f"/v1/videos/{job_id}/content", timeout=600)
        if status != 200:
            raise RuntimeError(f"GET /v1/videos/{job_id}/content answered {status}")
        path.write_bytes(body)
        return path

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# ------------------------------------------------------------------------------------------ the CLI
LOADED = re.compile(r"loaded .* in ([0-9.]+)s \(backend (\S+), offload")
GENERATED = re.compile(r"generated (\d+) frames \((\d+)x(\d+), (\d+) clips\) in ([0-9.]+)s")


def parse_cli_log(text: str) -> dict:
    """The load and generation times (and backend, frames, clips) ``runtime.generate`` logs."""
    loaded, generated = LOADED.search(text), GENERATED.search(text)
    if loaded is None or generated is None:
        raise RuntimeError(f"the CLI log lacks its 'loaded … in' / 'generated … in' lines:\n{text[-4000:]}")
    return {"load_s": float(loaded[1]), "backend": loaded[2], "frames": int(generated[1]),
            "clips": int(generated[4]), "job_s": float(generated[5])}


def run_cli(ckpt: str, v: Variant, shape: Shape, image: Path, audio: Path, out: Path, env: dict, cpu: bool,
            timeout: float) -> dict:
    cmd = [sys.executable, "-m", "runtime.generate", "--ckpt_dir", ckpt, "--image", str(image), "--audio", str(audio),
           "--size", shape.size, "--infer_frames", str(shape.infer_frames), *v.cli_flags(), "--base_seed", str(SEED),
           "--prompt", PROMPT, "--save_file", str(out), "--overwrite", *(["--device", "cpu"] if cpu else [])]
    log = out.with_suffix(".log")
    t0 = time.perf_counter()
    with open(log, "wb") as fh:
        proc = subprocess.run(cmd, check=False, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT,
                              env={**os.environ, **env}, timeout=timeout)
    process_s = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"the CLI exited with code {proc.returncode}:\n{tail(log)}")
    return {**parse_cli_log(log.read_text(errors="replace")), "process_s": process_s}


def video_max_diff(a: Path, b: Path) -> int | None:
    """Largest per-pixel difference of two MP4s' decoded frames (None when their frame counts differ)."""
    import av
    import numpy as np

    def frames(p):
        with av.open(str(p)) as c:
            return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])

    x, y = frames(a), frames(b)
    return None if x.shape != y.shape else int(np.abs(x.astype(np.int16) - y.astype(np.int16)).max())


# ------------------------------------------------------------------------------------------ the run
@dataclass
class Results:
    path: Path
    meta: dict
    rows: list[dict] = field(default_factory=list)

    def add(self, row: dict) -> None:
        self.rows.append(row)
        print({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}, flush=True)
        self.write()

    def table(self) -> str:
        from benchmarks.common import markdown_table

        return markdown_table(self.rows, COLUMNS)

    def write(self) -> None:
        from benchmarks.common import write_results

        write_results(self.path, self.rows, self.meta, self.table())


def overhead_row(base: dict, service_first: dict, service_second: dict, cli: dict, diff) -> dict:
    cli_s = cli["job_s"]
    pct = 100 * (service_first["job_s"] - cli_s) / cli_s
    return {**base, "path": "overhead", "run": "first", "job_s": service_first["job_s"],
            "client_s": service_first["client_s"], "cli_s": cli_s, "overhead_pct": pct,
            "overhead_client_pct": 100 * (service_first["client_s"] - cli_s) / cli_s,
            "steady_pct": 100 * (service_second["job_s"] - cli_s) / cli_s, "met": pct <= GOAL_PCT,
            "video_max_diff": diff}


def check_recipe(job: dict, v: Variant) -> None:
    """The service ran the request the CLI runs: the job record's recipe equals the CLI flags."""
    got = (job["sample_steps"], float(job["guide_scale"]), float(job["sample_shift"]), job["seed"])
    if got != (v.steps, v.guide, v.shift, SEED):
        raise RuntimeError(f"model {v.name}: the job ran steps/guide/shift/seed {got}, the CLI "
                           f"{(v.steps, v.guide, v.shift, SEED)}: not the same request")


def comparison(prime: bool) -> str:
    """What the rows compare, for the meta."""
    cache = ", inductor's on-disk cache warm for both (primed first)" if prime else ""
    return (f"service: the first job of a freshly started worker (job record created -> completed; client_s: POST "
            f"sent -> completed seen, polled every {POLL_S:g} s); CLI: python -m runtime.generate with the same flags "
            "in a fresh process, the 'generated ... in X s' of its log (after its load; process_s is the whole "
            "process). Both pay the same first-meeting costs of a process (tracing, cache lookups, CUDA-graph "
            f"capture, cuDNN algorithm timing){cache}. 'second' is the same worker's next job of the same request "
            "(warm). overhead_pct = (service first - CLI) / CLI; steady_pct = (service second - CLI) / CLI")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.serve_overhead", description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="folder for the result JSON and Markdown")
    ap.add_argument("--tiny", action="store_true", help="CPU dry run on the built-in tiny model")
    ap.add_argument("--layout", choices=["sequential", "shared"], default="sequential",
                    help="one server per variant, one after the other (default), or one server with both variants")
    ap.add_argument("--gpus", default=None, help="the servers' --gpus: per server for sequential (default 0), "
                                                 "both workers' for shared (default 0,0; cpu / cpu,cpu with --tiny)")
    ap.add_argument("--exact-steps", type=int, default=None, help="steps of the exact variant's job (default 4; 2 "
                                                                  "with --tiny); its CFG and shift stay official")
    ap.add_argument("--prime", action=argparse.BooleanOptionalAction, default=None,
                    help="fill inductor's on-disk cache before anything is timed (default: on a GPU)")
    ap.add_argument("--workdir", type=Path, default=None,
                    help="where the checkpoint folder, LoRA, inputs and logs go (a complete folder there is reused; "
                         "default: a temporary folder removed at the end)")
    ap.add_argument("--timeout", type=float, default=None, help="seconds per server start / job / CLI run "
                                                                "(default 1800; 300 with --tiny)")
    args = ap.parse_args(argv)
    tiny = args.tiny
    layout = args.layout
    gpus = args.gpus or {("shared", True): "cpu,cpu", ("sequential", True): "cpu",
                         ("shared", False): "0,0", ("sequential", False): "0"}[(layout, tiny)]
    exact_steps = args.exact_steps or (2 if tiny else 4)
    prime = (not tiny) if args.prime is None else args.prime
    timeout = args.timeout or (300 if tiny else 1800)
    shape = TINY if tiny else FULL
    temp = args.workdir is None
    work = Path(tempfile.mkdtemp(prefix="serve_overhead-")) if temp else args.workdir
    work.mkdir(parents=True, exist_ok=True)
    try:
        return _run(args, argv, tiny, layout, gpus, exact_steps, prime, timeout, shape, work)
    finally:
        if temp:
            shutil.rmtree(work, ignore_errors=True)


def _run(args, argv, tiny, layout, gpus, exact_steps, prime, timeout, shape, work: Path) -> int:
    from benchmarks.common import code_revision

    started = time.perf_counter()
    lora = work / LORA_NAME
    models = variants(exact_steps, lora)
    ckpt = "tiny" if tiny else str(work / "ckpt")
    # one step of each distinct DiT batch (CFG on: batch 2; off: batch 1) fills the cache for both clip kinds
    kinds = {v.guide > 1: {"guide_scale": v.guide, "sample_shift": v.shift} for v in models}
    if not tiny:
        check_disk(work)
    prepared = prepare(work, tiny, LORA_RANK, list(kinds.values()) if prime else [], shape)
    image, audio = write_inputs(work, shape)
    env = {"PYTHONUNBUFFERED": "1", **({"OMP_NUM_THREADS": "1"} if tiny else {})}
    cli_env = dict(env)
    if not tiny:
        cli_env["CUDA_VISIBLE_DEVICES"] = gpus.split(",")[0]   # the GPU the (first) worker uses
    precision = "float32" if tiny else "bf16"
    command = "python -m benchmarks.serve_overhead " + " ".join(sys.argv[1:] if argv is None else argv)
    meta = {
        "device": prepared["device"], "date": time.strftime("%Y-%m-%d %H:%M"), "git": code_revision(),
        "command": command,
        "shapes": {"height": shape.height, "width": shape.width, "infer_frames": shape.infer_frames,
                   "audio_s": shape.audio_s, "size": shape.size, "clips": 2},
        "steps": {v.name: v.steps for v in models},
        "models": {v.name: v.shown() for v in models},
        "layout": layout, "gpus": gpus,
        "layout_note": (f"one server per variant (--gpus {gpus}), started one after the other"
                        if layout == "sequential" else
                        f"one server with both variants, one worker each (--gpus {gpus})")
        + "; jobs submitted one at a time (no two overlap)",
        "comparison": comparison(prime),
        "checkpoint": ("the built-in tiny model (--ckpt_dir tiny: the runtime's folder loader always builds the "
                       "full UMT5-XXL)" if tiny else
                       "an official-layout folder on local disk with random weights at the real configuration "
                       "(14B DiT bf16 shards, Wan2.1 VAE, UMT5-XXL bf16 .pth, wav2vec2-large)"),
        "tokenizer": "a word-level tokenizer.json written by this script (the UMT5 one cannot be downloaded "
                     "here): one token per word or CJK character, EOS appended; the same for both paths",
        "lora": f"random rank-{LORA_RANK} LoRA, lightx2v key family (diffusion_model.*.lora_down/lora_up/alpha), "
                "every block linear and audio-injector projection, strength 1.0, merged at load",
        "request": {"prompt": PROMPT, "seed": SEED, "negative_prompt": "(default)",
                    "image": f"runtime.demo.demo_image resized to {shape.width}x{shape.height}",
                    "audio": f"runtime.demo.demo_speech({shape.audio_s:g}) as 16-bit WAV"},
        "prepare": prepared, "goal_pct": GOAL_PCT,
    }
    results = Results(args.out / f"serve_overhead_{shape.scenario}.json", meta)

    def base(v: Variant) -> dict:
        return {"variant": v.name, "precision": precision, "scenario": shape.scenario, "gpus": 1, "steps": v.steps,
                "guide_scale": v.guide, "model": v.shown(), "layout": layout}

    groups = [[v] for v in models] if layout == "sequential" else [models]
    service: dict[str, dict] = {}
    for i, group in enumerate(groups):
        folder = work / f"server{i}"
        shutil.rmtree(folder, ignore_errors=True)
        srv = Server(ckpt, group, gpus, folder, env, tiny)
        try:
            loads = srv.start(timeout)
            files = {"image": image, "audio": audio}
            for run in ("first", "second"):
                for v in group:
                    r = srv.run_job(v.job_fields(shape), files, timeout)
                    check_recipe(r["job"], v)
                    if run == "first":
                        srv.download(r["id"], work / f"service_{v.name}.mp4")
                    service[f"{v.name}/{run}"] = r
                    results.add({**base(v), "path": "service", "run": run, "job_s": r["job_s"], "run_s": r["run_s"],
                                 "queue_s": r["queue_s"], "worker_s": r["worker_s"], "client_s": r["client_s"],
                                 "load_s": loads.get(v.name), "job_id": r["id"]})
        finally:
            srv.stop()
    for v in models:
        out = work / f"cli_{v.name}.mp4"
        cli = run_cli(ckpt, v, shape, image, audio, out, cli_env, tiny, timeout)
        results.add({**base(v), "path": "cli", "run": "first", "job_s": cli["job_s"], "load_s": cli["load_s"],
                     "process_s": cli["process_s"], "backend": cli["backend"], "clips": cli["clips"],
                     "frames": cli["frames"]})
        diff = video_max_diff(work / f"service_{v.name}.mp4", out)
        results.add(overhead_row(base(v), service[f"{v.name}/first"], service[f"{v.name}/second"], cli, diff))
    meta["total_s"] = round(time.perf_counter() - started, 1)
    results.write()
    print(results.table())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
