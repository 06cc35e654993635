"""Per-token request rates and per-workspace classify concurrency (429 with ``Retry-After``).

Both are kept in this process's memory: with several replicas behind a load
balancer each enforces its own share (SECURITY.md). They are thread-safe and
independent of any event loop, because sync routes run in a thread pool and
the test client starts a loop per request.

* :class:`TokenBuckets`: each API token may send ``burst`` requests at once
  and ``rate`` per second after that (a token bucket). The table of buckets is
  bounded (least recently used tokens are forgotten: a full bucket again).
* :class:`ConcurrencyLimit`: at most ``limit`` classify requests of one
  workspace are served at the same time; one more answers 429 at once instead
  of queueing behind them (a classify request holds CPU for tens of ms per image).
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager

from taskvision.errors import TooManyRequestsError


class TokenBuckets:
    def __init__(self, *, rate: float, burst: int, max_keys: int = 100_000) -> None:
        self.rate = rate
        self.burst = burst
        self.max_keys = max_keys
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # key -> (tokens, when)
        self._lock = threading.Lock()

    def take(self, key: str, *, now: float | None = None) -> None:
        """Spend one request of ``key``'s allowance, or raise :class:`TooManyRequestsError`."""
        if self.rate <= 0:
            return
        now = time.monotonic() if now is None else now
        with self._lock:
            tokens, when = self._buckets.pop(key, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - when) * self.rate)
            allowed = tokens >= 1.0
            if allowed:
                tokens -= 1.0
            self._buckets[key] = (tokens, now)
            while len(self._buckets) > self.max_keys:
                self._buckets.popitem(last=False)
        if not allowed:
            wait = math.ceil((1.0 - tokens) / self.rate)
            raise TooManyRequestsError(
                f"Too many requests with this API token: at most {self.rate:g} per second "
                f"(bursts of {self.burst}); retry in {wait} s.",
                retry_after=wait,
            )


class ConcurrencyLimit:
    def __init__(self, *, limit: int, what: str) -> None:
        self.limit = limit
        self.what = what
        self._active: dict[str, int] = {}
        self._lock = threading.Lock()

    @contextmanager
    def hold(self, key: str) -> Iterator[None]:
        """One slot of ``key`` for the duration of the block, or :class:`TooManyRequestsError` now."""
        with self._lock:
            active = self._active.get(key, 0)
            if active >= self.limit:
                raise TooManyRequestsError(
                    f"This workspace already has {active} {self.what} in progress (the limit); "
                    "retry when one has finished.",
                    retry_after=1,
                    code="too_many_concurrent",
                )
            self._active[key] = active + 1
        try:
            yield
        finally:
            with self._lock:
                left = self._active[key] - 1
                if left:
                    self._active[key] = left
                else:
                    del self._active[key]

    def active(self, key: str) -> int:
        with self._lock:
            return self._active.get(key, 0)
