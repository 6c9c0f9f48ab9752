"""The API process's housekeeping thread: expired leases back to the queue (or failed past the attempts limit),
finished jobs older than ``--keep_days`` removed with their files. Store failures are logged and retried on
the next round."""
from __future__ import annotations

import logging
import threading
import time

from .store import FINISHED, JobFiles, JobStore, StoreError

log = logging.getLogger(__name__)


class Janitor(threading.Thread):
    def __init__(self, store: JobStore, files: JobFiles, *, lease_s: float, max_attempts: int,
                 keep_days: float | None, on_requeue=None):
        super().__init__(name="s2v-janitor", daemon=True)
        self.store, self.files = store, files
        self.max_attempts, self.keep_s = max_attempts, None if keep_days is None else keep_days * 86_400
        self.on_requeue = on_requeue
        # Often enough that an expired lease is noticed within a fraction of the lease, a retention within minutes.
        self.interval_s = min(lease_s / 3, 60.0, *(() if self.keep_s is None else (max(self.keep_s / 4, 0.5),)))
        self._stop_event = threading.Event()

    def stop(self) -> None:
        self._stop_event.set()

    def run(self) -> None:
        while not self._stop_event.wait(self.interval_s):
            self.round()

    def round(self) -> None:
        try:
            changed = self.store.expire_leases(self.max_attempts)
        except StoreError as exc:
            log.error("janitor: %s", exc)
            return
        for job_id, status in changed:
            if status in FINISHED:
                log.warning("job %s: its worker stopped too many times; failed", job_id)
                self.files.remove_inputs(job_id)
            else:
                log.warning("job %s: its worker stopped (lease expired); back at the head of the queue", job_id)
        if changed and self.on_requeue is not None:
            self.on_requeue()
        if self.keep_s is not None:
            try:
                purged = self.store.purge_finished(time.time() - self.keep_s)
            except StoreError as exc:
                log.error("janitor: %s", exc)
                return
            for job_id in purged:
                self.files.remove(job_id)
            if purged:
                log.info("removed %d finished job(s) older than --keep_days: %s", len(purged), ", ".join(purged))
