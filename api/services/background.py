"""The control plane's background jobs, run by one thread per process.

Each job is a callable with its own interval: the run watcher (every
``train_poll_interval_s``), the serving reconciler in cluster mode (every
pass), the collection of deleted images' blobs (every ``blob_gc_interval_s``).
:meth:`BackgroundJobs.wake` runs every due job now, so a train request or a
production switch is acted on at once rather than at the next poll. A job that
raises is logged and retried at its next turn; the others go on.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)


@dataclass
class Job:
    name: str
    run: Callable[[], object]
    interval_s: float  # 0: on every pass
    next_at: float = field(default=0.0)


class BackgroundJobs:
    def __init__(self, *, poll_interval_s: float, name: str = "background-jobs") -> None:
        self.poll_interval_s = poll_interval_s
        self.name = name
        self.jobs: list[Job] = []
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def add(self, name: str, run: Callable[[], object], *, interval_s: float = 0.0) -> None:
        self.jobs.append(Job(name, run, interval_s))

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def wake(self) -> None:
        self._wake.set()

    def run_due(self) -> None:
        """One pass over the jobs that are due (the loop's body; tests call it directly)."""
        now = time.monotonic()
        for job in self.jobs:
            if job.next_at > now:
                continue
            job.next_at = now + job.interval_s
            try:
                job.run()
            except Exception:
                logger.exception("background job %s failed; retrying at its next turn", job.name)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.run_due()
            self._wake.wait(self.poll_interval_s)
            self._wake.clear()
