"""A worker (the thread that a worker process of ``supervisor`` runs): loads the pipeline once, then claims its
model's jobs from the store in FIFO order and runs them one at a time.

Each clip is encoded into the job's MP4 as soon as it is decoded (``S2VPipeline.generate_mp4``), so a long song
never sits in memory, and the file appears (temp file + rename) only when complete. While a job runs, the worker
renews its lease (a heartbeat thread, so a long step or VAE decode does not lose it) and writes progress after
steps; a heartbeat that finds the job no longer its own (cancelled, or re-queued after the lease ran out) stops
the job before the next step.

The store may fail at any moment (a full disk, a locked database, a database server that is restarting or
unreachable): every store call is guarded and the loop keeps going with backoff. A running job goes on while
its lease is live as far as the worker knows (its last renewal is less than a lease ago); past that it stops
after its current step and retries the renewal with backoff, since another node may by then have taken the
job. A finished job's result (completed or failed) is retried with backoff until the store records it (or
says the job is no longer this worker's); only a recorded job counts as finished, and a server stopping
meanwhile leaves it to lease expiry (it then runs again or, past the attempts limit, fails). ``alive`` is what
``/health`` reports.
"""
from __future__ import annotations

import errno
import itertools
import logging
import threading
import time
import traceback
import warnings
from typing import Any, Callable

from runtime.errors import S2VError

from .store import CANCELLED, COMPLETED, FAILED, Job, JobFiles, JobStore, StoreError, worker_name
from .uploads import Limits, RequestError, check_pose, scrub

log = logging.getLogger(__name__)

PROGRESS_INTERVAL_S = 0.25  # at most this often a progress write (and cancellation check) per job
BACKOFF_S = (0.5, 30.0)     # store failures: first and longest wait before the next try


class Cancelled(BaseException):
    """Raised from the progress callback to stop a job between steps (BaseException: nothing catches it)."""


class Interrupted(BaseException):
    """Raised from the progress callback when the server stops: the job goes back to the queue."""


class Worker(threading.Thread):
    def __init__(self, store: JobStore, files: JobFiles, load_pipeline: Callable[[], Any], limits: Limits,
                 *, lease_s: float = 60.0, tag: str = "w0", label: str = "cpu", model: str | None = None,
                 job_defaults: dict | None = None):
        super().__init__(name=f"s2v-worker-{tag}", daemon=True)
        self.store, self.files, self.limits = store, files, limits
        self._load = load_pipeline
        self.lease_s = lease_s
        self.worker_id = worker_name(tag)
        self.label = label                 # what /health shows as the device
        self.model = model                 # the jobs it claims (None: any)
        self.job_defaults = dict(job_defaults or {})  # generate() arguments of its model (the step cache)
        self.pipe = None
        self.state = "loading"             # loading → ready, or failed (load_error says why); stopped
        self.load_error: str | None = None        # exception type only (public); the log has the rest
        self.store_error: str | None = None       # the last store failure, None once a store call succeeds
        self.current: str | None = None
        self._wake = threading.Event()
        self._stop_event = threading.Event()
        self._cancel: set[str] = set()
        self._cancel_lock = threading.Lock()
        self._lease_seen = 0.0             # monotonic time of the running job's last confirmed lease renewal

    # ------------------------------------------------------------------ called from the API
    @property
    def alive(self) -> bool:
        return self.is_alive() and self.state == "ready"

    def notify(self) -> None:
        self._wake.set()

    def cancel(self, job_id: str) -> None:
        """A hint that the store already says cancelled: stop at the next step without waiting for a heartbeat."""
        with self._cancel_lock:
            self._cancel.add(job_id)

    def stop(self) -> None:
        self._stop_event.set()
        self._wake.set()

    @property
    def stopping(self) -> bool:
        return self._stop_event.is_set()

    def describe(self) -> dict:
        return {"id": self.worker_id, "device": self.label, "state": self.state if self.is_alive() or
                self.state != "ready" else "dead", "job": self.current,
                **({"store_error": self.store_error} if self.store_error else {})}

    # ------------------------------------------------------------------ the loop
    def run(self) -> None:
        try:
            t0 = time.perf_counter()
            self.pipe = self._load()
            log.info("pipeline loaded in %.1fs", time.perf_counter() - t0)
            self.state = "ready"
        except BaseException as exc:  # noqa: BLE001 -- reported by /health and POST; the API keeps answering
            self.state, self.load_error = "failed", getattr(exc, "public", None) or type(exc).__name__
            log.error("pipeline failed to load: %s: %s", type(exc).__name__, exc)
            return
        backoff = BACKOFF_S[0]
        while not self._stop_event.is_set():
            try:
                job = self.store.claim(self.worker_id, self.lease_s, self.model)
            except StoreError as exc:
                self._store_failed("claim", exc)
                self._stop_event.wait(backoff)
                backoff = min(backoff * 2, BACKOFF_S[1])
                continue
            except Exception:  # noqa: BLE001 -- the loop must outlive anything
                log.error("worker: claim failed: %s", traceback.format_exc())
                self._stop_event.wait(backoff)
                backoff = min(backoff * 2, BACKOFF_S[1])
                continue
            self.store_error, backoff = None, BACKOFF_S[0]
            if job is None:
                self._wake.wait(timeout=1.0)
                self._wake.clear()
                continue
            try:
                self._run(job)
            except BaseException:  # noqa: BLE001 -- never here by design; keep the worker alive regardless
                log.error("job %s: worker error: %s", job.id, traceback.format_exc())
        self.state = "stopped"

    def _store_failed(self, what: str, exc: StoreError) -> None:
        if self.store_error != str(exc):
            log.error("worker: %s: %s (retrying with backoff)", what, exc)
        self.store_error = str(exc)

    def _run(self, job: Job) -> None:
        self.current = job.id
        self._lease_seen = time.monotonic()
        log.info("job %s: started (attempt %d) on %s", job.id, job.attempts, self.worker_id)
        t0 = time.perf_counter()
        lost = threading.Event()   # the store says the job is no longer ours
        beat_stop = threading.Event()
        beat = threading.Thread(target=self._heartbeat, args=(job.id, lost, beat_stop), daemon=True,
                                name=f"s2v-heartbeat-{job.id}")
        beat.start()
        folder = self.files.job_dir(job.id)
        p = {**self.job_defaults, **job.params}
        files = p.pop("files")
        audio_s = p.pop("audio_s", None) or p.get("max_audio_s") or self.limits.max_audio_s
        caught: list[warnings.WarningMessage] = []
        try:
            self.files.remove_partial_outputs(job.id)
            pose = files.get("pose_video")
            if pose is not None:
                check_pose(folder / pose, audio_s, p, self.limits)  # the upload's bounds, under today's limits
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                res = self.pipe.generate_mp4(self.files.video_path(job.id), folder / files["image"],
                                             folder / files["audio"], overwrite=True,
                                             pose_video=None if pose is None else folder / pose,
                                             progress=self._progress(job.id, lost), **p)
            cache = (getattr(res, "info", None) or {}).get("cache")
            if cache:  # a lossy setting: say what it skipped, as the CLI does
                log.info("job %s: step cache %s computed %s of %d steps per clip", job.id, cache["method"],
                         ", ".join(str(c["computed"]) for c in cache["clips"]), p["sample_steps"])
        except Interrupted:
            self._guard("release", self.store.release, job.id, self.worker_id)
            log.info("job %s: interrupted by the server stopping; back in the queue", job.id)
        except Cancelled:
            self._after_cancel(job.id)
        except RequestError as exc:
            self._fail(job.id, f"{exc.param}: {exc.message}", caught, files)
        except S2VError as exc:
            self._fail(job.id, scrub(str(exc), folder, files, self.files.root), caught, files)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                self._fail(job.id, "the server's disk is full; submit the job again later", caught, files)
            else:
                log.error("job %s: %s", job.id, traceback.format_exc())
                self._fail(job.id, f"internal error ({type(exc).__name__}); see the server log", caught, files)
        except Exception as exc:  # noqa: BLE001 -- one bad job must not stop the worker
            log.error("job %s: %s", job.id, traceback.format_exc())
            self._fail(job.id, f"internal error ({type(exc).__name__}); see the server log", caught, files)
        else:
            ok = self._guard("finish", self.store.finish, job.id, self.worker_id, COMPLETED, None,
                             _messages(caught, folder, files, self.files.root), persist=True)
            if ok:
                self.files.remove_inputs(job.id)
                log.info("job %s: completed in %.1fs", job.id, time.perf_counter() - t0)
            elif ok is False:  # cancelled (or taken back) after its last step: honour the store
                self._after_cancel(job.id)
            else:
                log.error("job %s: finished but the store could not record it; its lease will expire and it "
                          "runs again", job.id)
        finally:
            beat_stop.set()
            beat.join()
            self.current = None
            with self._cancel_lock:
                self._cancel.discard(job.id)
            release_gpu_cache()

    def _guard(self, what: str, fn, *args, tries: int = 3, persist: bool = False):
        """A store write retried with backoff; its result, or None when the store kept failing (``tries`` times,
        or with ``persist`` until the server stops and at least ``tries`` times)."""
        backoff = BACKOFF_S[0]
        for i in itertools.count(1):
            try:
                out = fn(*args)
                self.store_error = None
                return out
            except StoreError as exc:
                self._store_failed(what, exc)
                if i >= tries and (not persist or self._stop_event.is_set()):
                    return None
                if not self._stop_event.wait(backoff):  # a stopping server still makes its few tries
                    backoff = min(backoff * 2, BACKOFF_S[1])
                else:
                    time.sleep(backoff)
        raise AssertionError("unreachable")

    def _fail(self, job_id: str, message: str, caught, files: dict) -> None:
        log.warning("job %s: failed: %s", job_id, message)
        folder = self.files.job_dir(job_id)
        if self._guard("finish", self.store.finish, job_id, self.worker_id, FAILED, message,
                       _messages(caught, folder, files, self.files.root), persist=True):
            self.files.remove_inputs(job_id)
        else:
            log.error("job %s: could not be marked failed; left to lease expiry", job_id)

    def _after_cancel(self, job_id: str) -> None:
        try:
            job = self.store.get(job_id)
        except StoreError as exc:
            self._store_failed("get", exc)
            return
        if job is not None and job.status == CANCELLED:
            self.files.video_path(job_id).unlink(missing_ok=True)
            self.files.remove_inputs(job_id)
            log.info("job %s: cancelled", job_id)
        else:
            log.warning("job %s: no longer this worker's (%s); stopped", job_id, None if job is None else job.status)

    def _heartbeat(self, job_id: str, lost: threading.Event, done: threading.Event) -> None:
        while not done.wait(self.lease_s / 4):
            self._beat(job_id, lost)
            if lost.is_set():
                return

    def _beat(self, job_id: str, lost: threading.Event, progress: float | None = None) -> bool:
        """Renew the lease (and record progress); False when the store could not be reached."""
        t = time.monotonic()
        try:
            if not self.store.heartbeat(job_id, self.worker_id, self.lease_s, progress):
                lost.set()
            else:
                self._lease_seen = max(self._lease_seen, t)
            self.store_error = None
            return True
        except StoreError as exc:
            self._store_failed("heartbeat", exc)
            return False

    def _hold_lease(self, job_id: str, lost: threading.Event) -> None:
        """Between steps, once the lease may have run out unseen (the store unreachable for a lease): renew it
        with backoff before the next step; Cancelled when the job is no longer ours, Interrupted on stop."""
        backoff, paused = BACKOFF_S[0], False
        while time.monotonic() - self._lease_seen >= self.lease_s and not lost.is_set():
            if self._beat(job_id, lost):
                break
            if not paused:
                log.warning("job %s: the store has been unreachable for a lease; paused until it answers", job_id)
                paused = True
            if self._stop_event.wait(backoff):
                raise Interrupted()
            backoff = min(backoff * 2, BACKOFF_S[1], max(self.lease_s / 4, BACKOFF_S[0]))
        if lost.is_set():
            raise Cancelled()

    def _progress(self, job_id: str, lost: threading.Event):
        last = [0.0]

        def cb(clip: int, clips: int, step: int, steps: int, stage: str = "denoise") -> None:
            if self._stop_event.is_set():
                raise Interrupted()
            with self._cancel_lock:
                if job_id in self._cancel:
                    raise Cancelled()
            if lost.is_set():
                raise Cancelled()
            self._hold_lease(job_id, lost)
            now = time.monotonic()
            done = (clip * steps + step) / (clips * steps) if stage == "denoise" else None
            if now - last[0] >= PROGRESS_INTERVAL_S or (done is not None and done >= 1):
                last[0] = now
                # The last step of the last clip still has a VAE decode and the mux ahead: stay below 1.
                # A failed write: the job goes on while its lease is live (the heartbeat thread keeps trying).
                self._beat(job_id, lost, None if done is None else min(done, 0.99))
                if lost.is_set():
                    raise Cancelled()

        return cb


def _messages(caught, folder, files, root) -> list[str]:
    out: list[str] = []
    for w in caught or ():
        msg = scrub(str(w.message), folder, files, root)
        if msg not in out:
            out.append(msg)
    return out


def release_gpu_cache() -> None:
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # the next job may have another size
    except Exception:  # noqa: BLE001
        pass
