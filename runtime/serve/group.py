"""A worker of several ranks (``--gpus_per_worker N``): N spawned processes joined by ``torch.distributed`` that
run each job together, through ``runtime.parallel`` (CFG parallel for a CFG job when N is even, Ulysses over
the rest; Ulysses over all N for a CFG-off job).

Rank 0 is the worker the server knows: it alone talks to the store and the supervisor, and writes the MP4. The
other ranks (followers, :func:`follower_main`) hear from it over one pipe each, never through the store:

- ``("job", request)``: the claimed job's inputs and ``generate()`` arguments, and the layout it runs in;
- ``("step", stop)`` after every progress point (each denoising step, VAE decode, motion encode): whether the
  job stops there (cancelled, lease lost, server stopping), so every rank leaves the generation at the same point
  and no collective is left half done;
- ``("end", in_step)`` once every rank has said ``("done", outcome)``: whether the group may take the next job.

Pipes rather than collectives for this, because a follower waits for jobs for as long as the queue is empty,
longer than any collective's timeout, and because a pipe ends when the process at its other end dies: a follower
exits when rank 0 is gone, and rank 0 learns at once that a follower died. The ranks stay in step only while
each collective is entered by all of them; when that can no longer be known (a rank gone or stuck, or ranks that
ended a job in different ways) rank 0 leaves and the supervisor restarts the whole group: a job whose rank died
under it goes back to the queue through its lease (rank 0 exits without recording it), one that failed on rank 0
alone is recorded as failed first.
"""
from __future__ import annotations

import logging
import os
import random
import signal
import socket
import threading
import time
from dataclasses import dataclass

log = logging.getLogger(__name__)

END_S = 60.0            # how long a finished rank waits for the others to finish the same job
OUT_OF_STEP = 4         # exit code of a rank that leaves for the group to be restarted (a rank lost, out of step)
TORCH_BACKENDS = ("auto", "torch", "torch-compile", "torch-graph")   # the backends that switch layouts


@dataclass(frozen=True)
class Seat:
    """A process's place in its worker's group (picklable when the process is spawned: the pipes travel with it)."""

    rank: int
    world: int
    port: int               # the TCP rendezvous on 127.0.0.1 that the supervisor picked for this start
    links: tuple            # rank 0: one pipe per follower, in rank order; a follower: its pipe to rank 0


class RankLoadError(RuntimeError):
    """A follower could not load the pipeline: rank 0 fails to load with it (``public``: what /health says)."""

    def __init__(self, rank: int, kind: str):
        super().__init__(f"rank {rank} could not load the pipeline ({kind}); see its log lines")
        self.public = f"{kind} on rank {rank}"


class _Stop(BaseException):
    """Rank 0 stopped the job at this progress point (BaseException: nothing in the pipeline catches it)."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (a taken one fails the start, which is retried)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def layout_of(guide_scale: float, world: int) -> tuple[int, bool]:
    """(ulysses, cfg_parallel) of a job: the CFG branches split over two halves of the group when CFG is on and
    the group has an even size, each branch's sequence split (Ulysses) over the rest."""
    if guide_scale > 1 and world % 2 == 0:
        return world // 2, True
    return world, False


def describe_layout(ulysses: int, cfg_parallel: bool) -> str:
    if not cfg_parallel:
        return f"Ulysses over {ulysses} ranks"
    return "CFG parallel" + (f", each branch Ulysses over {ulysses} ranks" if ulysses > 1 else "")


def check_heads(world: int, heads: int) -> None:
    """Every layout of a group of ``world`` ranks splits the attention heads evenly (Ulysses), or one line."""
    from runtime.errors import InputError

    if heads % world:
        ok = ", ".join(str(n) for n in range(1, heads + 1) if heads % n == 0)
        raise InputError(f"--gpus_per_worker {world}: a CFG-off job splits the model's {heads} attention heads over "
                         f"the {world} ranks of a worker, and {world} does not divide {heads}; use one of {ok}")


def join_group(seat: Seat, device):
    """Join the worker's process group (NCCL on GPUs, gloo on the CPU); this rank's torch device."""
    import torch
    import torch.distributed as dist

    if device.on_cpu:
        dev = torch.device("cpu")
    else:
        dev = torch.device("cuda", seat.rank)   # the process sees the group's GPUs, in --gpus order
        torch.cuda.set_device(dev)
    dist.init_process_group("gloo" if device.on_cpu else "nccl", init_method=f"tcp://127.0.0.1:{seat.port}",
                            rank=seat.rank, world_size=seat.world, device_id=None if device.on_cpu else dev)
    return dev


class Layouts:
    """Puts a pipeline loaded for one device into the layout of each job (``runtime.parallel``), through
    ``S2VPipeline.use_layout``."""

    def __init__(self, pipe, device):
        from runtime.errors import ConfigError

        if pipe.backend_name not in TORCH_BACKENDS:
            raise ConfigError(f"backend {pipe.backend_name} runs whole steps in an engine and cannot be split over "
                              "ranks; use backend torch, torch-compile or torch-graph with --gpus_per_worker")
        self.pipe, self.device = pipe, device

    def use(self, ulysses: int, cfg_parallel: bool) -> None:
        """Every rank calls this with the same layouts in the same order (the groups are built collectively)."""
        from runtime import parallel

        self.pipe.use_layout(parallel.configure(ulysses, cfg_parallel, self.device))


def _outcome(exc: BaseException | None) -> str:
    return "ok" if exc is None else f"error {type(exc).__name__}: {exc}"


# ------------------------------------------------------------------------------------------ rank 0
class GroupPipeline:
    """What rank 0's :class:`~.worker.Worker` runs its jobs through: ``generate_mp4`` as the pipeline's, with the
    followers told the job, each step's stop decision and, at the end, whether the group is still in step."""

    def __init__(self, pipe, seat: Seat, device, on_out_of_step):
        self.pipe, self.seat = pipe, seat
        self.layouts = Layouts(pipe, device)
        self.on_out_of_step = on_out_of_step   # the group must restart once this job is recorded
        self._stopped = False

    def wait_for_followers(self) -> None:
        """After rank 0's own load: each follower's ("ready") or ("load_failed", kind)."""
        for rank, link in enumerate(self.seat.links, 1):
            try:
                kind, detail = link.recv()
            except (EOFError, OSError):
                self._lost(rank, "while loading")
            if kind != "ready":
                raise RankLoadError(rank, detail)

    def generate_mp4(self, path, image, audio, *, overwrite: bool = False, progress=None, **kwargs):
        from runtime.config import RUN

        if kwargs.get("seed") == -1:  # every rank must draw the same noise
            kwargs["seed"] = random.randint(0, 2**31 - 1)
        shape = layout_of(kwargs.get("guide_scale", RUN.guide_scale), self.seat.world)
        self._send(("job", {"image": image, "audio": audio, "layout": shape, "kwargs": kwargs}))
        log.info("the job runs on %d ranks: %s", self.seat.world, describe_layout(*shape))
        self._stopped, error = False, None
        try:
            self.layouts.use(*shape)
            return self.pipe.generate_mp4(path, image, audio, overwrite=overwrite, progress=self._lead(progress),
                                          **kwargs)
        except BaseException as exc:
            error = exc
            raise
        finally:
            self._settle("stopped" if self._stopped else _outcome(error))

    def _lead(self, progress):
        def cb(*args):
            try:
                if progress is not None:
                    progress(*args)
            except BaseException:
                self._stopped = True
                self._send(("step", True))
                raise
            self._send(("step", False))

        return cb

    def _send(self, message) -> None:
        for rank, link in enumerate(self.seat.links, 1):
            try:
                link.send(message)
            except OSError:
                self._lost(rank, "mid-job")

    def _settle(self, mine: str) -> None:
        """Every follower's outcome of the job (up to ``END_S``); the group goes on only when all ended it the same
        way (completed, stopped at the same step, or failed with the same error before any collective)."""
        deadline = time.monotonic() + END_S
        outcomes = []
        for rank, link in enumerate(self.seat.links, 1):
            try:
                if not link.poll(max(0.0, deadline - time.monotonic())):
                    outcomes.append(None)
                    continue
                outcomes.append(link.recv()[1])
            except (EOFError, OSError):
                self._lost(rank, "mid-job")
        in_step = all(o == mine for o in outcomes)
        for link in self.seat.links:
            try:
                link.send(("end", in_step))
            except OSError:
                pass
        if not in_step:
            said = ", ".join(f"rank {r}: {o or 'no answer'}" for r, o in enumerate(outcomes, 1))
            log.error("the ranks ended the job in different ways (rank 0: %s; %s); the group restarts after it",
                      mine, said)
            self.on_out_of_step()

    @staticmethod
    def _lost(rank: int, when: str):
        """A follower died: leave at once, recording nothing (a job goes back to the queue through its lease)."""
        log.error("rank %d of this worker is gone (%s); the group restarts", rank, when)
        logging.shutdown()
        os._exit(OUT_OF_STEP)


# ------------------------------------------------------------------------------------------ ranks 1..N-1
def follower_main(cfg, seat: Seat, watch) -> None:
    """A follower process: its GPU, its pipeline, and the jobs rank 0 sends it, until rank 0 is gone."""
    from .supervisor import LOAD_FAILED, start_process

    start_process(cfg, f"{cfg.device.name}.r{seat.rank}")
    # Rank 0 leads the stop (the job stops at the same step on every rank); a follower leaves when it is gone.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
    threading.Thread(target=_exit_when_closed, args=(watch,), daemon=True, name="s2v-watch").start()
    (link,) = seat.links
    try:
        device = join_group(seat, cfg.device)
    except Exception as exc:  # noqa: BLE001 -- the rendezvous failed (port taken, rank 0 gone): restarted
        log.error("rank %d: cannot join the worker's process group (%s)", seat.rank, exc)
        os._exit(1)
    try:
        from runtime.pipeline import S2VPipeline

        pipe = S2VPipeline.from_pretrained(cfg.ckpt_dir, device=device, **cfg.load_kwargs)
        layouts = Layouts(pipe, device)
    except BaseException as exc:  # noqa: BLE001 -- reported through rank 0, which fails to load with it
        log.error("rank %d: pipeline failed to load: %s: %s", seat.rank, type(exc).__name__, exc)
        _tell(link, ("load_failed", type(exc).__name__))
        _wait_for_close(link)
        os._exit(LOAD_FAILED)
    # Rank 0 logs the job; the pipeline's per-job lines would repeat it once per rank.
    logging.getLogger("runtime").setLevel(logging.WARNING)
    _tell(link, ("ready", None))
    while True:
        message = _hear(link, None)
        if message[0] == "job":
            _follow(link, pipe, layouts, message[1])


def _follow(link, pipe, layouts, job: dict) -> None:
    def cb(*_):
        said = _hear(link, None)
        if said == ("step", True):
            raise _Stop()
        if said[0] == "end":  # rank 0 left the job without this step (a failure of its own): out of step
            log.error("rank 0 ended the job while this rank was still in it; leaving for the server to restart "
                      "the group")
            os._exit(OUT_OF_STEP)

    error = None
    try:
        layouts.use(*job["layout"])
        pipe.generate(job["image"], job["audio"], on_clip=lambda frames: None, progress=cb, **job["kwargs"])
    except _Stop:
        error = _Stop()
    except BaseException as exc:  # noqa: BLE001 -- reported to rank 0, which decides whether the group goes on
        error = exc
        log.error("this rank's part of the job failed: %s: %s", type(exc).__name__, exc)
    finally:
        from .worker import release_gpu_cache

        release_gpu_cache()
    _tell(link, ("done", "stopped" if isinstance(error, _Stop) else _outcome(error)))
    # A rank that failed alone may have left rank 0 inside a collective: it leaves when no answer comes (rank 0
    # answers within END_S of its own end once it is out of the generation).
    verdict = _hear(link, 2 * END_S if error is not None and not isinstance(error, _Stop) else None)
    if verdict != ("end", True):
        log.error("the group is out of step after a job (%s); leaving for the server to restart it",
                  "no answer from rank 0" if verdict is None else "rank 0 says so")
        os._exit(OUT_OF_STEP)


def _hear(link, timeout: float | None):
    """The next message from rank 0 (None after ``timeout``); this process ends when rank 0 is gone."""
    try:
        if timeout is not None and not link.poll(timeout):
            return None
        return link.recv()
    except (EOFError, OSError):
        os._exit(0)


def _tell(link, message) -> None:
    try:
        link.send(message)
    except OSError:
        os._exit(0)  # rank 0 is gone


def _wait_for_close(link) -> None:
    try:
        while True:
            link.recv()
    except (EOFError, OSError):
        pass


def _exit_when_closed(watch) -> None:
    """The server's end of this pipe closes when the server dies: so does this process."""
    try:
        watch.recv_bytes()
    except (EOFError, OSError):
        pass
    os._exit(1)

