"""``python -m runtime.serve``: the HTTP video service (FastAPI + uvicorn; one worker process per ``--gpus`` entry,
or a ``torch.distributed`` group of ``--gpus_per_worker`` processes, each worker serving one ``--model``; the API
process holds no model).

Everything that can be wrong with the command line is checked before a worker starts loading: the model
options and ``--model`` specs, the workers and their split among the models, the limits, the API keys, the port
(bound here and handed to uvicorn, so "in use" cannot come later), the data folder (writable) and its job store
(openable). Each refusal is one ``error:`` line and exit 2. On SIGTERM/SIGINT the server stops accepting, each
worker puts its job back in the queue at the next step, and the workers are waited for before the server exits.
"""
from __future__ import annotations

import argparse
import errno
import logging
import os
import signal
import socket
import sys
import tempfile
from pathlib import Path

from runtime.errors import S2VError
from runtime.options import add_pipeline_args, check_pipeline_args, pipeline_kwargs

from .supervisor import LOG_FORMAT

log = logging.getLogger("runtime.serve")
STOP_GRACE_S = 30.0  # how long a stopping server waits for the workers' current steps
STORE_ENV = "S2V_STORE"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m runtime.serve",
                                description="Serve Wan2.2-S2V speech-to-video over HTTP (OpenAI-style /v1/videos).")
    add_pipeline_args(p)  # the same model options as runtime.generate (LoRAs, precision, attention, backend, ...)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for every interface: needs "
                                                       "an API key, or --no_auth)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--data_dir", required=True, help="where the uploads and videos live, and the SQLite job table "
                                                     "(kept across restarts); with --store postgresql://..., a "
                                                     "folder that every node mounts")
    p.add_argument("--store", default=None, metavar="URL",
                   help=f"the job store: postgresql://USER@HOST/DB for one queue shared by service nodes on several "
                        f"machines (password from ~/.pgpass or PGPASSWORD); default ${STORE_ENV}, else SQLite under "
                        "--data_dir")
    g = p.add_argument_group("access")
    g.add_argument("--api_key", action="append", default=[], metavar="KEY",
                   help="an accepted API key (repeatable; clients send Authorization: Bearer KEY); also S2V_API_KEYS")
    g.add_argument("--api_keys_file", default=None, metavar="FILE",
                   help="API keys, one per line as KEY or NAME:KEY (# comments); re-read on SIGHUP")
    g.add_argument("--no_auth", action="store_true", help="serve a non-loopback --host without API keys (anyone who "
                                                         "reaches the port can use and read every job)")
    g.add_argument("--allowed_host", action="append", default=[], metavar="NAME",
                   help="a Host name browsers may use for this server (default: the --host address, and localhost "
                        "names for a loopback one; any for 0.0.0.0)")
    g.add_argument("--allowed_origin", action="append", default=[], metavar="URL",
                   help="another site whose pages may call this API (e.g. https://tools.example.com)")
    g = p.add_argument_group("limits")
    g.add_argument("--size", default=None, help="default --size of a job that names none (1280*720; 64*64 for tiny)")
    g.add_argument("--max_upload_mb", type=float, default=200, help="largest upload per request, all files (413 above)")
    g.add_argument("--max_audio_s", type=float, default=600, help="longest driving audio in seconds (413 above)")
    g.add_argument("--max_size", default="1280*720", help="largest output area a job may ask for, as H*W (413 above)")
    g.add_argument("--max_steps", type=int, default=100, help="largest sample_steps a job may ask for")
    g.add_argument("--max_prompt_bytes", type=int, default=4096, help="longest prompt / negative_prompt (413 above)")
    g.add_argument("--max_pose_size", default="1920*1080", help="largest pose video frame, as H*W (413 above)")
    g.add_argument("--max_pose_mb", type=float, default=8192,
                   help="most memory a job's pose video may take once decoded and prepared (413 above)")
    g.add_argument("--max_queued", type=int, default=1000, help="queued jobs in all (429 above)")
    g.add_argument("--max_queued_per_key", type=int, default=100, help="queued jobs per API key (429 above)")
    g.add_argument("--body_timeout_s", type=float, default=30,
                   help="longest pause while a request body arrives (408 after it)")
    g = p.add_argument_group("jobs")
    g.add_argument("--keep_days", type=float, default=None,
                   help="remove finished jobs and their files this many days after they finished (default: keep)")
    g.add_argument("--max_attempts", type=int, default=3,
                   help="runs a job gets when its worker dies under it (kill, crash, OOM) before it is failed")
    g.add_argument("--lease_s", type=float, default=60,
                   help="a running job's lease: a job whose worker stopped renewing it for this long runs again")
    g = p.add_argument_group("workers and models")
    g.add_argument("--gpus", default=None, metavar="LIST",
                   help="one worker process per entry: CUDA GPU indices (0,1,2,3) or cpu (cpu,cpu: two CPU workers); "
                        "default: the --device given, else every visible CUDA GPU, else cpu")
    g.add_argument("--workers", type=int, default=None, metavar="N",
                   help="N workers on the default device(s), in turn (instead of --gpus)")
    g.add_argument("--gpus_per_worker", type=int, default=1, metavar="N",
                   help="group N consecutive --gpus entries into one worker: N processes joined by torch.distributed "
                        "(NCCL; gloo for cpu entries) that run each job together, CFG parallel for CFG jobs and "
                        "Ulysses for CFG-off jobs (default 1)")
    g.add_argument("--model", action="append", default=[], metavar="NAME[=SPEC]",
                   help="a model variant jobs can name (repeatable; the first is the default). SPEC: comma-separated "
                        "lora:PATH[:STRENGTH] (repeatable), steps:N, guide:G, shift:S (its jobs' default recipe), "
                        "precision:bf16|fp16|fp8, attention:X, cache:SPEC, gpus:I,J (its workers, by place among "
                        "the workers: w0, w1, ...; otherwise the workers are split evenly in order). Default: one "
                        "model named after --ckpt_dir")
    p.add_argument("--log_level", default="info")
    return p


def _check_numbers(args) -> None:
    from runtime.errors import InputError

    for name, lo in (("max_upload_mb", 0), ("max_audio_s", 0), ("max_steps", 0), ("max_prompt_bytes", 0),
                     ("max_pose_mb", 0), ("max_queued", 0), ("max_queued_per_key", 0), ("body_timeout_s", 0),
                     ("lease_s", 1), ("keep_days", 0), ("max_attempts", 0)):
        v = getattr(args, name)
        if v is not None and not v > lo:
            raise InputError(f"--{name} {v} must be above {lo}")


def _bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound now: a bad or busy port is a start-up error, not a late crash."""
    from runtime.errors import InputError

    if not 1 <= port <= 65535:
        raise InputError(f"--port {port} is out of range; use 1..65535")
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                          flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as exc:
        raise InputError(f"--host {host!r} is not an address of this machine ({exc.strerror}); use 127.0.0.1 or "
                         "0.0.0.0") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise InputError(f"--port {port} on {host} is in use (another server?); stop it or pick another --port") \
                from None
        if exc.errno in (errno.EACCES, errno.EPERM):
            raise InputError(f"--port {port} needs privileges to bind; use a port above 1023") from None
        raise InputError(f"cannot listen on {host}:{port} ({exc.strerror}); check --host and --port") from None
    sock.set_inheritable(True)
    return sock


def _open_data_dir(data_dir: str, store_url: str | None = None, default_model: str = ""):
    """The job folders and the store, after checking that the folder is a writable directory."""
    from runtime.errors import InputError

    from .store import JobFiles, SchemaError, StoreError, open_store, redact

    root = Path(data_dir)
    where = f"--data_dir {str(root)!r}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        JobFiles(root).create()
        with tempfile.NamedTemporaryFile(dir=root, prefix=".write-check-"):
            pass
    except FileExistsError:
        raise InputError(f"{where} is a file, not a folder; pass a folder") from None
    except OSError as exc:
        why = {errno.EROFS: "is on a read-only file system", errno.EACCES: "is not writable by this user",
               errno.ENOTDIR: "is under a file, not a folder", errno.ENOSPC: "is on a full disk"}.get(
            exc.errno, f"cannot be written ({exc.strerror})")
        raise InputError(f"{where} {why}; pass a writable folder") from None
    files = JobFiles(root)

    def bind(identity: str) -> None:
        # A node without --store on a shared folder must not sweep the PostgreSQL store's jobs as orphans.
        try:
            owner = files.bind(identity)
        except OSError as exc:
            raise InputError(f"{where} cannot be written ({exc.strerror}); pass a writable folder") from None
        if owner is None:
            return
        if owner == "sqlite":
            raise InputError(f"{where} holds the jobs of its SQLite job file, not of --store; start without --store, "
                             "or pass an empty folder (or the one the other nodes of that database share)")
        if identity == "sqlite":
            raise InputError(f"{where} holds the jobs of a PostgreSQL job store; start with the --store its nodes "
                             "use, or pass another --data_dir")
        raise InputError(f"{where} holds the jobs of another PostgreSQL database; pass the --store its nodes use, "
                         "or another --data_dir")

    if store_url in (None, "sqlite"):
        try:
            bind("sqlite")
            return files, open_store(None, root, default_model)
        except StoreError as exc:
            raise InputError(f"{where}: its job database cannot be opened ({exc}); move it aside or pass another "
                             "--data_dir") from None
    try:
        store = open_store(store_url, root, default_model)
    except ValueError as exc:
        raise InputError(str(exc)) from None
    except ImportError as exc:
        raise InputError(f"--store {redact(store_url)}: the PostgreSQL store needs psycopg ({exc.name} is missing); "
                         "pip install -e '.[serve]'") from None
    except SchemaError as exc:
        raise InputError(f"--store: {exc}") from None
    except StoreError as exc:
        raise InputError(f"--store: {exc}; check that PostgreSQL runs and this user may connect and create "
                         "tables") from None
    try:
        bind(store.identity)
    except BaseException:
        store.close()
        raise
    return files, store


def _allowed_hosts(args) -> set[str] | None:
    from .auth import is_loopback

    if args.allowed_host:
        return set(args.allowed_host)
    if args.host in ("0.0.0.0", "::", ""):
        return None
    names = {args.host}
    if is_loopback(args.host):
        names |= {"localhost", "127.0.0.1", "::1"}
    return names


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format=LOG_FORMAT, stream=sys.stderr)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    try:
        import uvicorn

        from .app import create_app
    except ImportError as exc:
        print(f"error: the server needs FastAPI and uvicorn ({exc.name} is missing); pip install -e '.[serve]'",
              file=sys.stderr)
        return 2
    from runtime.errors import InputError
    from runtime.pipeline import DEFAULT_SIZE, TINY, TINY_SIZE
    from runtime.preprocess import parse_size

    from .auth import ENV, KeyRing, is_loopback
    from .guards import Guard
    from .janitor import Janitor
    from .uploads import Limits

    sock = None
    try:
        default_size = args.size or (TINY_SIZE if args.ckpt_dir == TINY else DEFAULT_SIZE)
        max_area = parse_size(args.max_size)
        if parse_size(default_size) > max_area:
            raise InputError(f"--size {default_size} is over --max_size {args.max_size}; raise --max_size")
        if args.ckpt_dir != TINY and not Path(args.ckpt_dir).is_dir():
            raise InputError(f"{args.ckpt_dir}: checkpoint folder not found; pass --ckpt_dir pointing at "
                             "Wan2.2-S2V-14B (or 'tiny')")
        check_pipeline_args(args)  # device, backend, FP8, attention, LoRA files: before the worker loads anything
        _check_numbers(args)
        models, placement = _models(args)
        pose_area = _area(args.max_pose_size, "--max_pose_size")
        keys = KeyRing(args.api_key, args.api_keys_file, os.environ.get(ENV))
        if not keys.enabled and not is_loopback(args.host) and not args.no_auth:
            raise InputError(f"--host {args.host} is reachable from other machines and no API key is configured; "
                             "pass --api_key / --api_keys_file (or --no_auth to serve it open)")
        sock = _bind(args.host, args.port)
        store_url = args.store or os.environ.get(STORE_ENV) or None
        files, store = _open_data_dir(args.data_dir, store_url, default_model=models[0].name)
    except S2VError as exc:
        if sock is not None:
            sock.close()
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.no_auth and not keys.enabled and not is_loopback(args.host):
        log.warning("--no_auth: %s is served without API keys; anyone who reaches it can use and read every job",
                    args.host)
    limits = Limits(max_upload_bytes=int(args.max_upload_mb * (1 << 20)), max_audio_s=args.max_audio_s,
                    max_area=max_area, max_steps=args.max_steps, max_prompt_bytes=args.max_prompt_bytes,
                    max_pose_pixels=pose_area,
                    max_pose_bytes=int(args.max_pose_mb * (1 << 20)))

    from runtime.hostmem import release_large_frees

    from .supervisor import Supervisor, WorkerConfig, WorkerProcess

    release_large_frees()  # a long-lived process: freed request buffers must not pile up in the heap
    janitor = Janitor(store, files, lease_s=args.lease_s, max_attempts=args.max_attempts, keep_days=args.keep_days)
    janitor.round()  # jobs whose worker died with the last server (a live lease of another server is left alone)
    try:
        swept = files.sweep(store.ids())
        if swept:
            log.info("removed %d upload folder(s) left by stopped servers", len(swept))
    except Exception as exc:  # noqa: BLE001 -- tidying is not worth refusing to start
        log.warning("could not sweep %s: %s", files.jobs_dir, exc)

    _warn_unserved(store, {m.name for m in models})
    base = pipeline_kwargs(args)
    base.pop("device")
    workers = []
    for m in models:
        log.info("model %s: worker(s) %s", m.name, ", ".join(f"{d.name} ({d.label})" for d in placement[m.name]))
        load = {**base, "attention": m.attention, "precision": m.precision, "loras": m.loras}
        workers += [WorkerProcess(WorkerConfig(d, m.name, args.ckpt_dir, load, {"cache": m.cache} if m.cache else {},
                                               store_url, args.data_dir, limits, args.lease_s, args.log_level))
                    for d in placement[m.name]]
    workers.sort(key=lambda w: w.cfg.device.index)

    def wake_all():
        for w in workers:
            w.notify()

    janitor.on_requeue = wake_all
    supervisor = Supervisor(workers, on_death=janitor.round)
    app = create_app(store, files, workers, limits, default_size, models=models, keys=keys,
                     max_queued=args.max_queued, max_queued_per_key=args.max_queued_per_key)
    app = Guard(app, allowed_hosts=_allowed_hosts(args), allowed_origins=set(args.allowed_origin),
                body_timeout_s=args.body_timeout_s)
    if args.api_keys_file:
        signal.signal(signal.SIGHUP, lambda *_: keys.reload())
    stopping: list[int] = []
    for sig in (signal.SIGTERM, signal.SIGINT):  # uvicorn re-raises the signal after its shutdown: land here
        signal.signal(sig, lambda s, _f: stopping.append(s))
    supervisor.start()  # the workers load their pipelines while the API already accepts and queues jobs
    janitor.start()
    try:
        config = uvicorn.Config(app, log_level=args.log_level.lower(), lifespan="off")
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        janitor.stop()
        supervisor.stop(STOP_GRACE_S)
        store.close()
    return 0


def _models(args):
    """The ``--model`` variants and the workers of each (``--gpus`` split among them); logged at start-up."""
    import torch

    from runtime.errors import InputError
    from runtime.pipeline import check_runnable

    from .models import ModelSpec, assign, parse_gpus, parse_model

    count = torch.cuda.device_count()
    if args.device is not None and torch.device(args.device).type == "cpu":
        default = ["cpu"]
    elif args.device is not None and torch.device(args.device).index is not None:
        default = [str(torch.device(args.device).index)]
    else:
        default = [str(i) for i in range(count)] or ["cpu"]
    devices = parse_gpus(args.gpus, args.workers, count, default, args.gpus_per_worker)
    if args.gpus_per_worker > 1:
        _check_group(args)
    base = ModelSpec(_model_name(args.ckpt_dir), loras=list(args.loras), precision=args.precision,
                     attention=args.attention)
    models = [parse_model(text, base, args.max_steps) for text in args.model] or [base]
    placement = assign(models, devices)
    for m in models:  # FP8 and a named attention kernel on each of the model's devices
        for label in dict.fromkeys(label for d in placement[m.name] for label in d.labels):
            try:
                check_runnable(torch.device(label), m.precision, m.attention, cli=True)
            except S2VError as exc:
                raise InputError(f"--model {m.name} on {label}: {exc}") from None
    return models, placement


def _check_group(args) -> None:
    """What a worker of several ranks needs: a PyTorch backend, every rank holding the whole DiT, and attention
    heads that split evenly over its ranks."""
    from runtime import checkpoint as ck
    from runtime.config import DiTConfig
    from runtime.errors import InputError
    from runtime.pipeline import TINY

    from .group import TORCH_BACKENDS, check_heads

    n = args.gpus_per_worker
    if args.backend not in TORCH_BACKENDS:
        raise InputError(f"--backend {args.backend} runs whole steps in an engine, which --gpus_per_worker {n} "
                         "cannot split over ranks; use --backend torch-compile, torch-graph or torch")
    if args.offload not in (None, "none"):
        raise InputError(f"--offload streams the DiT from host memory on one GPU; each rank of a --gpus_per_worker "
                         f"{n} worker holds the whole DiT: drop --offload")
    if args.max_gpu_memory is not None:
        raise InputError(f"--max_gpu_memory plans the offloading of one GPU; each rank of a --gpus_per_worker {n} "
                         "worker holds the whole DiT: drop --max_gpu_memory")
    config = DiTConfig.tiny() if args.ckpt_dir == TINY else DiTConfig.from_json(Path(args.ckpt_dir) / ck.DIT_CONFIG)
    check_heads(n, config.num_heads)


def _warn_unserved(store, served: set[str]) -> None:
    """Queued jobs of a model this server does not serve (it ran with other --model names before) wait for a
    server that does: say so at start-up rather than let them sit unexplained."""
    from .store import StoreError

    try:
        waiting = {m: n for m, n in store.queued_by_model().items() if m not in served}
    except StoreError as exc:
        log.warning("could not count the queued jobs by model: %s", exc)
        return
    for model, n in sorted(waiting.items()):
        log.warning("%d queued job(s) name model %r, which this server does not serve (it serves %s); they wait for "
                    "a server on this store started with --model %s, or can be cancelled", n, model,
                    ", ".join(sorted(served)), model)


def _area(value: str, flag: str) -> int:
    import re

    from runtime.errors import InputError

    m = re.fullmatch(r"\s*([0-9]+)\s*[*x]\s*([0-9]+)\s*", value)
    if not m or not int(m[1]) * int(m[2]):
        raise InputError(f"{flag} {value!r} is not H*W (e.g. 1920*1080)")
    return int(m[1]) * int(m[2])


def _model_name(ckpt_dir: str) -> str:
    """What /health calls the model: the checkpoint folder's name, never its path."""
    return Path(ckpt_dir.rstrip("/")).name or "model"


if __name__ == "__main__":
    sys.exit(main())
