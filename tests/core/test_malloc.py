"""The malloc arena cap the servers apply at start (taskvision/malloc.py)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import textwrap

import pytest

# A child process: (maybe) cap the arenas, let 8 threads allocate at once, and
# count the heaps glibc's malloc_info reports (one <heap> per arena).
CHILD = textwrap.dedent(
    """
    import ctypes, ctypes.util, os, re, sys, tempfile, threading
    from taskvision.malloc import limit_arenas

    applied = limit_arenas(2) if sys.argv[1] == "cap" else False
    barrier = threading.Barrier(8)
    def work():
        barrier.wait()  # all eight allocate at the same time
        keep = [bytearray(4096) for _ in range(2000)]
        barrier.wait()
        del keep
    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads: t.start()
    for t in threads: t.join()
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.fopen.restype = ctypes.c_void_p
    libc.fopen.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
    libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
    libc.fclose.argtypes = [ctypes.c_void_p]
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "malloc.xml")
        stream = libc.fopen(path.encode(), b"w")
        libc.malloc_info(0, stream)
        libc.fclose(stream)
        print(applied, len(re.findall(r"<heap nr=", open(path).read())))
    """
)

glibc_only = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's mallopt"
)


def _arenas(mode: str, **env: str) -> tuple[str, int]:
    environment = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"} | env
    out = subprocess.run(
        [sys.executable, "-c", CHILD, mode], capture_output=True, text=True, check=True, env=environment
    ).stdout.split()
    return out[0], int(out[1])


@glibc_only
def test_capping_keeps_eight_busy_threads_on_two_arenas() -> None:
    applied, capped = _arenas("cap")
    assert applied == "True"
    assert capped <= 2
    _, uncapped = _arenas("none")
    assert uncapped > 2  # without the cap the threads get arenas of their own


@glibc_only
def test_an_operators_malloc_arena_max_is_left_alone() -> None:
    applied, arenas = _arenas("cap", MALLOC_ARENA_MAX="4")
    assert applied == "False"
    assert arenas <= 4


def test_a_cap_below_one_is_refused() -> None:
    from taskvision.malloc import limit_arenas

    with pytest.raises(ValueError):
        limit_arenas(0)
