"""``python -m runtime.serve``: the HTTP video service (FastAPI + uvicorn, one pipeline, one GPU worker)."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from runtime.options import add_pipeline_args, check_pipeline_args, pipeline_kwargs


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m runtime.serve",
                                description="Serve Wan2.2-S2V speech-to-video over HTTP (OpenAI-style /v1/videos).")
    add_pipeline_args(p)  # the same model options as runtime.generate (LoRAs, precision, attention, backend, ...)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for every interface)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--data_dir", required=True, help="where the job table, uploads and videos live (kept across restarts)")
    p.add_argument("--size", default=None, help="default --size of a job that names none (1280*720; 64*64 for tiny)")
    p.add_argument("--max_upload_mb", type=float, default=200, help="largest upload per request, all files (413 above)")
    p.add_argument("--max_audio_s", type=float, default=600, help="longest driving audio in seconds (413 above)")
    p.add_argument("--max_size", default="1280*720", help="largest output area a job may ask for, as H*W (413 above)")
    p.add_argument("--max_steps", type=int, default=100, help="largest sample_steps a job may ask for")
    p.add_argument("--log_level", default="info")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="[%(asctime)s] %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    try:
        import uvicorn

        from .app import create_app
    except ImportError as exc:
        print(f"error: the server needs FastAPI and uvicorn ({exc.name} is missing); pip install -e '.[serve]'",
              file=sys.stderr)
        return 2
    from runtime.errors import InputError, S2VError
    from runtime.pipeline import DEFAULT_SIZE, TINY, TINY_SIZE
    from runtime.preprocess import parse_size

    from .store import JobStore
    from .uploads import Limits
    from .worker import Worker

    try:
        default_size = args.size or (TINY_SIZE if args.ckpt_dir == TINY else DEFAULT_SIZE)
        max_area = parse_size(args.max_size)
        if parse_size(default_size) > max_area:
            raise InputError(f"--size {default_size} is over --max_size {args.max_size}; raise --max_size")
        if args.ckpt_dir != TINY and not Path(args.ckpt_dir).is_dir():
            raise InputError(f"{args.ckpt_dir}: checkpoint folder not found; pass --ckpt_dir pointing at "
                             "Wan2.2-S2V-14B (or 'tiny')")
        check_pipeline_args(args)  # device, backend, FP8, attention, LoRA files: before the worker loads anything
    except S2VError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    limits = Limits(max_upload_bytes=int(args.max_upload_mb * (1 << 20)), max_audio_s=args.max_audio_s,
                    max_area=max_area, max_steps=args.max_steps)

    from runtime.hostmem import release_large_frees

    release_large_frees()  # a long-lived process: freed clip buffers must not pile up in the heap
    store = JobStore(args.data_dir)
    requeued = store.recover()
    if requeued:
        logging.info("requeued %d job(s) that were running when the server stopped: %s", len(requeued),
                     ", ".join(requeued))

    def load():
        from runtime.pipeline import S2VPipeline

        return S2VPipeline.from_pretrained(args.ckpt_dir, **pipeline_kwargs(args))

    worker = Worker(store, load)
    worker.start()  # loads the pipeline while the API already accepts and queues jobs
    app = create_app(store, worker, limits, default_size, model=args.ckpt_dir)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level.lower())
    finally:
        worker.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
