"""Batching across requests: concurrent callers share one backbone run.

:class:`BatchingEmbedder` wraps an :class:`taskvision.backbone.Embedder`. The
first caller to arrive opens a batch and waits at most ``window_ms`` (or until
``max_batch`` images have joined); callers arriving meanwhile add their images
to it; then the first caller runs the backbone once on all of them and each
caller gets its own rows back. A caller never waits longer than the window
plus one backbone run. A failed run fails every caller of that batch.

Whether it pays depends on the machine: a larger batch amortises per-run
overhead, but a lone request waits the window for nobody. See the README
("Benchmarks: Classify") for the measurement that decides the default.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import Protocol

import numpy as np
import numpy.typing as npt

Array = npt.NDArray[np.float32]


class Embeds(Protocol):
    def embed_arrays(
        self, arrays: Array, *, batch_size: int = 32, keys: Sequence[bytes] | None = None
    ) -> Array: ...


class _Batch:
    def __init__(self) -> None:
        self.parts: list[Array] = []
        self.keys: list[bytes] | None = []  # None once a caller came without keys
        self.size = 0
        self.closed = False
        self.done = threading.Event()
        self.result: Array | None = None
        self.error: BaseException | None = None

    def add(self, arrays: Array, keys: Sequence[bytes] | None) -> int:
        offset = self.size
        self.parts.append(arrays)
        self.keys = None if keys is None or self.keys is None else [*self.keys, *keys]
        self.size += len(arrays)
        return offset


class BatchingEmbedder:
    """An embedder whose concurrent callers share backbone runs (see the module docstring)."""

    def __init__(self, embedder: Embeds, *, window_ms: float, max_batch: int = 16) -> None:
        if window_ms <= 0 or max_batch < 1:
            raise ValueError("A batching window must be > 0 ms and max_batch >= 1.")
        self.embedder = embedder
        self.window_s = window_ms / 1000
        self.max_batch = max_batch
        self._cond = threading.Condition()
        self._open: _Batch | None = None
        self.runs = 0  # backbone runs made (for tests and benchmarks)
        self.images = 0  # images in them

    def embed_arrays(
        self, arrays: Array, *, batch_size: int = 32, keys: Sequence[bytes] | None = None
    ) -> Array:
        if len(arrays) >= self.max_batch:  # a full batch by itself: nothing to wait for
            return self._run([arrays], batch_size, keys)
        with self._cond:
            batch = self._open
            leader = batch is None or batch.closed or batch.size + len(arrays) > self.max_batch
            if leader:
                batch = self._open = _Batch()
            assert batch is not None
            offset = batch.add(arrays, keys)
            if batch.size >= self.max_batch:
                self._cond.notify_all()
        if leader:
            self._lead(batch, batch_size)
        else:
            batch.done.wait()
        if batch.error is not None:
            raise batch.error
        assert batch.result is not None
        return batch.result[offset : offset + len(arrays)]

    def _lead(self, batch: _Batch, batch_size: int) -> None:
        deadline = time.monotonic() + self.window_s
        with self._cond:
            while batch.size < self.max_batch:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            batch.closed = True
            if self._open is batch:
                self._open = None
        try:
            batch.result = self._run(batch.parts, batch_size, batch.keys)
        except BaseException as exc:  # every caller of the batch gets the error
            batch.error = exc
        finally:
            batch.done.set()

    def _run(self, parts: list[Array], batch_size: int, keys: Sequence[bytes] | None) -> Array:
        arrays = parts[0] if len(parts) == 1 else np.concatenate(parts)
        with self._cond:
            self.runs += 1
            self.images += len(arrays)
        return self.embedder.embed_arrays(arrays, batch_size=batch_size, keys=keys)
