"""Worker processes: one per ``--gpus`` entry (or, with ``--gpus_per_worker N``, a group of N processes joined by
``torch.distributed``: see ``group``), each with its own pipeline and its own store connection; the API process
holds no model and supervises them.

A worker process (:func:`worker_main`, started with the ``spawn`` method so that no CUDA state is inherited)
sees only its GPU (``CUDA_VISIBLE_DEVICES``), opens the store itself and runs a :class:`~.worker.Worker` that
claims only its model's jobs. Two pipes tie it to the API process: one carries its state (loading, ready,
failed; the job it runs; the last store error) to the supervisor, the other carries "a job was queued" wake-ups
to it. A pipe rather than a shared queue: a process killed mid-write cannot leave a lock held that stops the
others. The wake-up pipe doubles as the parent's heartbeat: when it closes (the server was killed) the worker
exits at once; its job goes back to the queue when the next server's janitor finds its process gone.

The :class:`Supervisor` thread restarts a worker that dies (with backoff: 1 s, doubling while it keeps dying
within a minute of its start, at most a minute), logs it, and has the janitor put its job back in the queue at
once (the job's lease names a process of this host that no longer exists). A worker of several ranks lives and
dies as one: when any of its processes dies the others are killed and the group starts again (its job's lease
names rank 0). A worker whose pipeline cannot load exits with :data:`LOAD_FAILED` and is not restarted:
``/health`` reports the failure.
"""
from __future__ import annotations

import logging
import multiprocessing as mp
import multiprocessing.connection
import os
import signal
import threading
import time
from dataclasses import dataclass
from typing import Callable

from .group import OUT_OF_STEP, GroupPipeline, Seat, follower_main, free_port, join_group
from .models import Device
from .uploads import Limits

log = logging.getLogger(__name__)

LOAD_FAILED = 3                 # a worker process's exit code when its pipeline cannot load
RESTART_S = (1.0, 60.0)         # first and longest wait before a dead worker is started again
STABLE_S = 60.0                 # a worker that ran this long before dying starts again after the first wait
LOG_FORMAT = "[%(asctime)s] %(levelname)s %(name)s: %(message)s"
_LIVE = ("starting", "loading", "ready", "restarting")   # states in which a worker will (again) take jobs


@dataclass(frozen=True)
class WorkerConfig:
    """What a worker process needs (picklable: it crosses to the spawned process)."""

    device: Device
    model: str
    ckpt_dir: str
    load_kwargs: dict           # S2VPipeline.from_pretrained keyword arguments but the device
    job_defaults: dict          # generate() arguments for every job of the model (the step cache)
    store_url: str | None
    data_dir: str
    limits: Limits
    lease_s: float
    log_level: str = "info"


def start_process(cfg: WorkerConfig, tag: str) -> None:
    """The start of every process of a worker (rank 0 and its followers): its GPUs, before anything imports torch;
    a process group of its own; log lines tagged ``tag``; glibc told to return large frees."""
    if cfg.device.visible is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = cfg.device.visible
    # A process group of its own: ^C at the terminal (or a signal to the server's group) reaches the server,
    # which stops its workers in order, instead of stopping the workers under a server that restarts them.
    os.setpgid(0, 0)
    logging.basicConfig(level=cfg.log_level.upper(), format=LOG_FORMAT.replace("%(name)s", f"%(name)s[{tag}]"))
    logging.getLogger("transformers").setLevel(logging.ERROR)
    from runtime.hostmem import release_large_frees

    release_large_frees()


def worker_main(cfg: WorkerConfig, status, wake, seat=None) -> None:
    """The worker process (rank 0 of its group, given a ``seat``): its GPU, its store, its pipeline; reports its
    state until it stops."""
    start_process(cfg, cfg.device.name)
    from .store import JobFiles, StoreError, open_store
    from .worker import Worker

    try:
        store = open_store(cfg.store_url, cfg.data_dir)
    except StoreError as exc:
        log.error("worker %s: the job store cannot be opened (%s); exiting to be restarted", cfg.device.name, exc)
        raise SystemExit(1) from None
    device = "cpu" if cfg.device.on_cpu else "cuda"
    exit_code = [0]

    def out_of_step():
        exit_code[0] = OUT_OF_STEP
        worker.stop()

    def load():
        from runtime.pipeline import S2VPipeline

        if seat is not None and not cfg.device.on_cpu:
            import torch

            # this runs in the worker's thread: CUDA's current device is per thread, and streams, graph captures and
            # collectives made without a device use it
            torch.cuda.set_device(device)
        pipe = S2VPipeline.from_pretrained(cfg.ckpt_dir, device=device, **cfg.load_kwargs)
        if seat is None:
            return pipe
        group = GroupPipeline(pipe, seat, device, out_of_step)
        group.wait_for_followers()
        return group

    worker = Worker(store, JobFiles(cfg.data_dir), load, cfg.limits, lease_s=cfg.lease_s,
                    tag=f"{cfg.device.name}@{cfg.device.label}", label=cfg.device.label, model=cfg.model,
                    job_defaults=cfg.job_defaults)
    for sig in (signal.SIGTERM, signal.SIGINT):  # the server stopping
        signal.signal(sig, lambda *_: worker.stop())
    threading.Thread(target=_wake_ups, args=(wake, worker), daemon=True, name="s2v-wake").start()
    if seat is not None:  # the rendezvous: after the wake-up thread, so a server dying meanwhile ends this process
        try:
            device = join_group(seat, cfg.device)
        except Exception as exc:  # noqa: BLE001 -- the rendezvous failed (a taken port, a rank gone): restarted
            log.error("worker %s: cannot start its process group (%s); exiting to be restarted", cfg.device.name, exc)
            store.close()
            raise SystemExit(1) from None
    worker.start()
    last = None
    while worker.is_alive():
        worker.join(0.1)
        if worker.stopping and worker.state == "loading":
            break  # stopping while the model loads: nothing to put back
        now = (worker.state, worker.current, worker.load_error, worker.store_error)
        if now != last:
            status.send(now)
            last = now
    status.send((worker.state, None, worker.load_error, worker.store_error))
    store.close()
    logging.shutdown()
    os._exit(LOAD_FAILED if worker.state == "failed" else exit_code[0])  # a loading thread is not waited for


def _wake_ups(wake, worker) -> None:
    """A byte from the server: a job was queued. The pipe closing: the server is gone, so is this worker."""
    while True:
        try:
            wake.recv_bytes()
        except (EOFError, OSError):
            os._exit(1)
        worker.notify()


class WorkerProcess:
    """The API process's handle on one worker process: what ``/health`` and the routes read (the state the
    process last reported), and its wake-up pipe."""

    def __init__(self, cfg: WorkerConfig):
        self.cfg = cfg
        self.name, self.label, self.model = cfg.device.name, cfg.device.label, cfg.model
        self.state = "starting"
        self.current: str | None = None
        self.load_error: str | None = None
        self.store_error: str | None = None
        self.pid: int | None = None   # rank 0's: the process the store's lease names
        self.restarts = 0
        self.procs: list = []           # rank order
        self.running = False          # a process of it was started and has not been seen to exit
        self.started_at = 0.0
        self.restart_at: float | None = None
        self.backoff = RESTART_S[0]
        self._status = None
        self._wake = None
        self._watch: list = []          # the followers' server-alive pipes (closed: the server is gone)
        self._wake_lock = threading.Lock()

    def start(self, ctx) -> None:
        status_r, status_w = ctx.Pipe(duplex=False)
        wake_r, wake_w = ctx.Pipe(duplex=False)
        seat, theirs = None, [status_w, wake_r]
        followers, watch = [], []
        if self.cfg.device.ranks > 1:
            port = free_port()
            links = [ctx.Pipe(duplex=True) for _ in range(self.cfg.device.ranks - 1)]
            seat = Seat(0, self.cfg.device.ranks, port, tuple(a for a, _ in links))
            for rank, (_, b) in enumerate(links, 1):
                watch_r, watch_w = ctx.Pipe(duplex=False)
                follower = Seat(rank, seat.world, port, (b,))
                followers.append(ctx.Process(target=follower_main, args=(self.cfg, follower, watch_r),
                                             name=f"s2v-worker-{self.name}.r{rank}"))
                watch.append(watch_w)
                theirs += [watch_r]
            theirs += [end for pair in links for end in pair]
        procs = [ctx.Process(target=worker_main, args=(self.cfg, status_w, wake_r, seat),
                             name=f"s2v-worker-{self.name}"), *followers]
        try:
            for proc in procs:
                proc.start()
        except BaseException:
            for proc in procs:
                if proc.pid is not None:
                    proc.kill()
                    proc.join()
            for conn in [*theirs, status_r, wake_w, *watch]:
                conn.close()
            raise
        for conn in theirs:  # the children's ends: a pipe must end when the process at its other end dies
            conn.close()
        os.set_blocking(wake_w.fileno(), False)  # a worker that does not read (loading, hung) never blocks the API
        with self._wake_lock:
            self._wake, self._watch = wake_w, watch
        self.procs, self._status, self.pid, self.running = procs, status_r, procs[0].pid, True
        self.state, self.current, self.load_error, self.store_error = "starting", None, None, None
        self.started_at, self.restart_at = time.monotonic(), None

    def update(self, message: tuple) -> None:
        self.state, self.current, self.load_error, self.store_error = message

    # ------------------------------------------------------------------ what the routes use
    def is_alive(self) -> bool:
        """Running, or coming back (the supervisor restarts it)."""
        return self.state in _LIVE

    @property
    def alive(self) -> bool:
        return self.state == "ready"

    def notify(self) -> None:
        with self._wake_lock:
            if self._wake is None:
                return
            try:
                self._wake.send_bytes(b"w")
            except (OSError, ValueError):  # full (it has wake-ups pending) or gone (being restarted)
                pass

    def cancel(self, job_id: str) -> None:
        """Nothing to do: the store says cancelled, and the worker reads that at its next progress write."""

    def describe(self) -> dict:
        group = {}
        if self.cfg.device.ranks > 1:  # a torch.distributed group: every rank's device and process
            group = {"devices": self.cfg.device.labels, "pids": [p.pid for p in self.procs] or None}
        return {"name": self.name, "device": self.label, "model": self.model, "state": self.state,
                "job": self.current, "pid": self.pid, "restarts": self.restarts, **group,
                **({"store_error": self.store_error} if self.store_error else {})}

    def close_pipes(self) -> None:
        with self._wake_lock:
            for conn in (self._wake, self._status, *self._watch):
                if conn is not None:
                    conn.close()
            self._wake = self._status = None
            self._watch = []


class Supervisor(threading.Thread):
    """Starts the worker processes, reads their state, restarts the ones that die; ``on_death`` runs after each
    death (the janitor's round: the dead worker's job back in the queue)."""

    def __init__(self, workers: list[WorkerProcess], on_death: Callable[[], None] | None = None):
        super().__init__(name="s2v-supervisor", daemon=True)
        self.workers = workers
        self.on_death = on_death
        self._ctx = mp.get_context("spawn")
        self._stop_event = threading.Event()

    def run(self) -> None:
        for w in self.workers:
            self._start(w)
        while not self._stop_event.is_set():
            reading = {w._status: w for w in self.workers if w._status is not None}
            running = {p.sentinel: (w, p) for w in self.workers if w.running for p in w.procs}
            for ready in multiprocessing.connection.wait([*reading, *running], timeout=0.5):
                if ready in reading:
                    self._read(reading[ready])
                elif not self._stop_event.is_set() and running[ready][0].running:
                    self._died(*running[ready])
            now = time.monotonic()
            for w in self.workers:
                if w.restart_at is not None and now >= w.restart_at and not self._stop_event.is_set():
                    w.restarts += 1
                    self._start(w)

    def _start(self, w: WorkerProcess) -> None:
        try:
            w.start(self._ctx)
        except OSError as exc:  # no memory or processes left: try again later
            log.error("worker %s (%s): cannot start a process (%s); retrying in %.0fs", w.name, w.label, exc,
                      w.backoff)
            w.state, w.restart_at = "restarting", time.monotonic() + w.backoff
            w.backoff = min(w.backoff * 2, RESTART_S[1])
            return
        if len(w.procs) > 1:
            log.info("worker %s (%s, model %s): processes %s (ranks 0..%d) started", w.name, w.label, w.model,
                     ", ".join(str(p.pid) for p in w.procs), len(w.procs) - 1)
        else:
            log.info("worker %s (%s, model %s): process %d started", w.name, w.label, w.model, w.pid)

    @staticmethod
    def _read(w: WorkerProcess) -> None:
        try:
            while w._status is not None and w._status.poll():
                w.update(w._status.recv())
        except (EOFError, OSError):
            w._status.close()
            w._status = None

    def _died(self, w: WorkerProcess, proc) -> None:
        proc.join()
        for other in w.procs:  # a group lives and dies as one: its other ranks cannot go on without this one
            if other is not proc and other.exitcode is None:
                other.kill()
        for other in w.procs:
            other.join()       # reaped: the janitor can now see that the lease holder is gone
        w.running = False
        self._read(w)          # its last words (a load failure) before the pipe closed
        code, lived = proc.exitcode, time.monotonic() - w.started_at
        w.close_pipes()
        if w.procs[0].exitcode == LOAD_FAILED:
            w.state = "failed"
            log.error("worker %s (%s): the model %s failed to load (%s); not restarted", w.name, w.label, w.model,
                      w.load_error)
            return
        w.backoff = RESTART_S[0] if lived >= STABLE_S else w.backoff
        how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
        if code == OUT_OF_STEP and len(w.procs) > 1:
            how += " (its ranks out of step)"
        rank = w.procs.index(proc)
        which = f"rank {rank} " if len(w.procs) > 1 else ""
        rest = f" (its other {len(w.procs) - 1} process(es) stopped with it)" if len(w.procs) > 1 else ""
        log.warning("worker %s (%s): %sprocess %d %s %s%s; restarting it in %.0fs", w.name, w.label, which, proc.pid,
                    how, f"while running job {w.current}" if w.current else "while idle", rest, w.backoff)
        w.state, w.current, w.restart_at = "restarting", None, time.monotonic() + w.backoff
        w.backoff = min(w.backoff * 2, RESTART_S[1])
        if self.on_death is not None:
            self.on_death()

    def stop(self, grace_s: float) -> bool:
        """Stop supervising, ask every worker to stop (its job back in the queue at the next step) and wait up to
        ``grace_s`` for them; the ones still running then are killed. True when all stopped in time."""
        self._stop_event.set()
        if self.is_alive():
            self.join()
        # A group's followers ignore SIGTERM: its rank 0 stops the job at the next step on every rank, then leaves,
        # and they leave with it.
        procs = [p for w in self.workers for p in w.procs if p.exitcode is None]
        for p in procs:
            p.terminate()
        deadline = time.monotonic() + grace_s
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        late = [p for p in procs if p.exitcode is None]
        for p in late:
            log.warning("worker process %d did not stop within %.0fs; killed", p.pid, grace_s)
            p.kill()
            p.join()
        for w in self.workers:
            w.close_pipes()
            if w.state != "failed":
                w.state = "stopped"
        return not late
