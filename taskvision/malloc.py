"""glibc malloc settings for the long-running servers (control plane and model server).

Why: a server answers requests on many threads (uvicorn's thread pool, ONNX
Runtime's), and glibc gives each thread its own malloc arena, up to 8 per core.
Every arena keeps its own freed memory, so a request's large short-lived
buffers (a decoded photo, float arrays of 0.6 MB) leave holes in many arenas:
the classify benchmark's RSS grew 20 MiB over 17,000 requests before it
levelled off (``bench/results/classify_soak.json``). With two arenas it grew
2.7 MiB over 5,000 requests in an exploratory run, about 50 MiB lower; with the
rest of the serving path's changes, not at all (``bench/results/classify.json``;
README, Benchmarks: Classify).

The settings are applied with ``mallopt`` when the server starts, before its
threads exist, so every way of starting it (``make run``, the container, the
benchmark) gets them. A ``MALLOC_ARENA_MAX`` in the environment wins: glibc
has applied it already. Elsewhere (musl, macOS) this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

logger = logging.getLogger(__name__)

M_ARENA_MAX = -8  # from glibc's malloc.h

DEFAULT_ARENA_MAX = 2


def limit_arenas(arena_max: int = DEFAULT_ARENA_MAX) -> bool:
    """Cap glibc's malloc arenas at ``arena_max``; True when it was applied here."""
    if arena_max < 1:
        raise ValueError("arena_max must be 1 or more")
    if os.environ.get("MALLOC_ARENA_MAX"):
        return False  # glibc read it at start; the operator's choice stands
    mallopt = _mallopt()
    if mallopt is None:
        return False
    applied = bool(mallopt(M_ARENA_MAX, arena_max))
    if applied:
        logger.debug("malloc arenas capped at %d", arena_max)
    return applied


def _mallopt() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else ctypes.CDLL(None)
    except OSError:
        return None
    function = getattr(libc, "mallopt", None)
    if function is None:
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int]
    function.restype = ctypes.c_int
    return function
