"""The one GPU worker: loads the pipeline once, then drains the job queue in FIFO order, one job at a time.

Each clip is encoded into the job's MP4 as soon as it is decoded (``S2VPipeline.generate_mp4``), so a long
song never sits in memory, and the file appears (temp file + rename) only when complete. Cancellation is
checked after every denoising step.
"""
from __future__ import annotations

import logging
import threading
import time
import traceback
from typing import Any, Callable

from runtime.errors import S2VError

from .store import CANCELLED, COMPLETED, FAILED, Job, JobStore

log = logging.getLogger(__name__)

PROGRESS_INTERVAL_S = 0.25  # at most this often a progress write to the job table


class Cancelled(BaseException):
    """Raised from the progress callback to stop a job between steps (BaseException: nothing catches it)."""


class Worker(threading.Thread):
    def __init__(self, store: JobStore, load_pipeline: Callable[[], Any]):
        super().__init__(name="s2v-worker", daemon=True)
        self.store = store
        self._load = load_pipeline
        self.pipe = None
        self.state = "loading"          # loading → ready, or failed (load_error says why)
        self.load_error: str | None = None
        self.current: str | None = None
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._cancel: set[str] = set()
        self._cancel_lock = threading.Lock()

    # ------------------------------------------------------------------ called from the API
    def notify(self) -> None:
        self._wake.set()

    def cancel(self, job_id: str) -> None:
        with self._cancel_lock:
            self._cancel.add(job_id)

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    # ------------------------------------------------------------------ the loop
    def run(self) -> None:
        try:
            t0 = time.perf_counter()
            self.pipe = self._load()
            log.info("pipeline loaded in %.1fs", time.perf_counter() - t0)
            self.state = "ready"
        except BaseException as exc:  # noqa: BLE001 -- reported by /health; the API keeps answering
            self.state, self.load_error = "failed", f"{type(exc).__name__}: {exc}"
            log.error("pipeline failed to load: %s", self.load_error)
            return
        while not self._stop.is_set():
            job = self.store.claim_next()
            if job is None:
                self._wake.wait(timeout=1.0)
                self._wake.clear()
                continue
            self._run(job)

    def _run(self, job: Job) -> None:
        self.current = job.id
        log.info("job %s: started (attempt %d)", job.id, job.attempts)
        t0 = time.perf_counter()
        try:
            p = dict(job.params)
            folder = self.store.job_dir(job.id)
            files = p.pop("files")
            pose = files.get("pose_video")
            self.pipe.generate_mp4(self.store.video_path(job.id), folder / files["image"], folder / files["audio"],
                                   overwrite=True, pose_video=None if pose is None else folder / pose,
                                   progress=self._progress(job.id), **p)
        except Cancelled:
            self.store.finish(job.id, CANCELLED)   # already reads cancelled when the API set it
            self.store.remove_inputs(job.id)
            log.info("job %s: cancelled", job.id)
        except S2VError as exc:
            self._failed(job.id, str(exc))
        except Exception as exc:  # noqa: BLE001 -- one bad job must not stop the worker
            log.error("job %s: %s", job.id, traceback.format_exc())
            self._failed(job.id, f"internal error ({type(exc).__name__}: {exc})")
        else:
            if self.store.finish(job.id, COMPLETED):
                self.store.remove_inputs(job.id)
                log.info("job %s: completed in %.1fs", job.id, time.perf_counter() - t0)
            else:  # cancelled after its last step: honour the cancel
                self.store.video_path(job.id).unlink(missing_ok=True)
                self.store.remove_inputs(job.id)
        finally:
            self.current = None
            with self._cancel_lock:
                self._cancel.discard(job.id)
            try:
                import torch

                if torch.cuda.is_available():
                    torch.cuda.empty_cache()  # the next job may have another size
            except Exception:  # noqa: BLE001
                pass

    def _failed(self, job_id: str, message: str) -> None:
        log.warning("job %s: failed: %s", job_id, message)
        self.store.finish(job_id, FAILED, message)
        self.store.remove_inputs(job_id)

    def _progress(self, job_id: str):
        last = [0.0]

        def cb(clip: int, clips: int, step: int, steps: int) -> None:
            with self._cancel_lock:
                if job_id in self._cancel:
                    raise Cancelled()
            now = time.monotonic()
            done = (clip * steps + step) / (clips * steps)
            if now - last[0] >= PROGRESS_INTERVAL_S or done >= 1:
                last[0] = now
                # The last step of the last clip still has a VAE decode and the mux ahead: stay below 1.
                self.store.set_progress(job_id, min(done, 0.99))

        return cb
