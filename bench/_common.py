"""What the hand-run benchmarks in ``bench/`` share (not a benchmark itself).

* statistics: ``percentile`` and ``latency_summary``;
* generated photo-like test images: ``smooth_field`` and ``random_boxes``;
* the service under test: ``running_service`` starts ``taskvision serve`` from
  this virtual environment (a new user, a free 127.0.0.1 port, the caller's
  data directory and environment, its output in a log file), waits for
  ``/healthz`` and always stops it; ``server_log_summary`` counts the problems
  it logged;
* ``/proc`` readers: a process's memory and CPU time, and ``OtherCpu``, the
  share of the machine's CPU other processes used during a measurement;
* the HTTP client (one ``requests.Session`` per thread), ``expect`` and
  ``upload_training_image``;
* the report: ``machine_info`` and its pieces, ``write_report`` (JSON to a
  file, Markdown to stdout) and ``init_script`` (logging to stderr, SIGTERM
  unwinds like Ctrl-C).

The scripts run as ``.venv/bin/python bench/<name>.py``, so ``bench/`` is first
on ``sys.path`` and they ``import _common``.
"""

from __future__ import annotations

import base64
import json
import logging
import math
import os
import platform
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import requests

if TYPE_CHECKING:
    from PIL import Image

logger = logging.getLogger(__name__)

API = "/recognition/v2"
REPO_ROOT = Path(__file__).resolve().parent.parent
# The shared photo sets sit next to the main checkout; a git worktree elsewhere names them here
# (TASKVISION_BENCH_DATASETS; BENCH_DATASETS, its older name, is read too).
DATASETS_ROOT = Path(
    os.environ.get("TASKVISION_BENCH_DATASETS")
    or os.environ.get("BENCH_DATASETS")
    or REPO_ROOT.parent / "shared" / "datasets"
)
STARTUP_TIMEOUT_S = 60.0
REQUEST_TIMEOUT_S = 120.0


# ---- statistics -------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) with linear interpolation, as numpy's default."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def latency_summary(seconds: Sequence[float]) -> dict[str, float]:
    """p50/p95/p99/mean/max of latencies given in seconds, in milliseconds."""
    ms = [s * 1000 for s in seconds]
    return {
        "p50": round(percentile(ms, 50), 2),
        "p95": round(percentile(ms, 95), 2),
        "p99": round(percentile(ms, 99), 2),
        "mean": round(sum(ms) / len(ms), 2) if ms else math.nan,
        "max": round(max(ms), 2) if ms else math.nan,
    }


# ---- generated images -------------------------------------------------------------


def smooth_field(rng: random.Random, width: int, height: int) -> Image.Image:
    """A smooth random colour field: a coarse random image, upscaled (it compresses like a photo)."""
    from PIL import Image

    coarse_w, coarse_h = max(2, width // 16), max(2, height // 16)
    field_img = Image.frombytes("RGB", (coarse_w, coarse_h), rng.randbytes(coarse_w * coarse_h * 3))
    return field_img.resize((width, height), Image.Resampling.BILINEAR)


def random_boxes(
    rng: random.Random, width: int, height: int
) -> Iterator[tuple[tuple[int, int, int, int], tuple[int, int, int]]]:
    """8 to 24 random ``(box, colour)`` for shapes drawn on a ``width`` x ``height`` image.

    It draws from ``rng`` lazily, so the caller's own draws for each shape come in between.
    """
    for _ in range(rng.randint(8, 24)):
        x0, y0 = rng.randrange(width), rng.randrange(height)
        x1, y1 = x0 + rng.randint(10, width // 2), y0 + rng.randint(10, height // 2)
        yield (x0, y0, x1, y1), (rng.randrange(256), rng.randrange(256), rng.randrange(256))


# ---- the server under test ----------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass(kw_only=True)
class Server:
    """A running server under test and what the benchmark needs to talk to it."""

    name: str  # in messages: "server", "service", "naive baseline"
    process: subprocess.Popen[bytes]
    base_url: str
    token: str
    log_path: Path
    health: dict[str, Any] = field(default_factory=dict)  # what /healthz answered


@dataclass(kw_only=True)
class Service(Server):
    """A running ``taskvision serve``: also its data directory and environment."""

    data_dir: Path
    env: dict[str, str]


def server_env(omp_wait_policy: str | None = "PASSIVE", **extra: str) -> dict[str, str]:
    """This process's environment for a server, with ``extra`` on top.

    ``omp_wait_policy`` None leaves OMP_WAIT_POLICY unset (OpenMP's default); PASSIVE means no
    busy-waiting OpenMP threads eating the CPU of the client and of the other processes.
    """
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if omp_wait_policy:
        env["OMP_WAIT_POLICY"] = omp_wait_policy
    env.update(extra)
    return env


@contextmanager
def running_service(
    *,
    data_dir: Path,
    log_path: Path,
    env: dict[str, str],
    log_level: str,
    name: str = "server",
    startup_timeout_s: float = STARTUP_TIMEOUT_S,
    token: str | None = None,
    executable: Path | None = None,
    cwd: Path | None = None,
) -> Iterator[Service]:
    """``taskvision serve`` on ``data_dir`` (fresh) with a user ``bench``; always stopped afterwards.

    With ``token`` the data dir is not fresh: the user that token belongs to is used again.
    ``executable`` is another ``taskvision`` entry point (default: this venv's). The server's
    stdout and stderr go to ``log_path``; the caller deletes both when it is done.
    ``cwd``: its working directory (``python -m`` children put it first on their import path,
    so a server running another checkout's code needs that checkout as its working directory).
    """
    executable = executable or Path(sys.executable).with_name("taskvision")
    if not executable.exists():
        raise SystemExit(f"{executable} not found: install the project into this venv (make venv).")
    process: subprocess.Popen[bytes] | None = None
    try:
        if token is None:
            created = subprocess.run(
                [str(executable), "users", "create", "bench", "--data-dir", str(data_dir)],
                env=env,
                capture_output=True,
                text=True,
                timeout=startup_timeout_s,
                check=False,
                cwd=cwd,
            )
            if created.returncode != 0:
                raise RuntimeError(f"'taskvision users create' failed: {created.stderr.strip()}")
            token = created.stdout.strip()
        port = free_port()
        command = [str(executable), "--log-level", log_level, "serve", "--host", "127.0.0.1"]
        command += ["--port", str(port), "--data-dir", str(data_dir)]
        with log_path.open("wb") as log_file:  # a file, not a pipe: a full pipe would stall the server
            process = subprocess.Popen(command, env=env, stdout=log_file, stderr=subprocess.STDOUT, cwd=cwd)
        server = Service(
            name=name,
            process=process,
            base_url=f"http://127.0.0.1:{port}",
            token=token,
            log_path=log_path,
            data_dir=data_dir,
            env=env,
        )
        wait_healthy(server, timeout_s=startup_timeout_s)
        logger.info("%s pid %d listening on %s (data dir %s)", name, process.pid, server.base_url, data_dir)
        yield server
    finally:
        if process is not None:
            stop_process(process, name)


def wait_healthy(server: Server, *, timeout_s: float) -> None:
    """Wait until ``/healthz`` answers 200 (keeping its JSON in ``server.health``)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            tail = server.log_path.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"{server.name} exited with {server.process.returncode}:\n{tail}")
        try:
            response = requests.get(f"{server.base_url}/healthz", timeout=2)
            if response.status_code == 200:
                server.health = response.json()
                return
        except (requests.RequestException, ValueError):
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{server.name} did not answer /healthz within {timeout_s:.0f}s")


INT8_READY_TIMEOUT_S = 900.0


def wait_for_int8(service: Service, *, timeout_s: float = INT8_READY_TIMEOUT_S) -> dict[str, Any]:
    """Wait until ``service`` serves its INT8 backbone (Lite0's); that backbone's quantization report.

    Ready when the server's log says so (it logs the switch at level info) or, with a quieter
    log, when an accepted quantization is in its serving cache (the server switches it on
    right after writing it). A refusal or a failed preparation in the log ends the wait at once.
    """
    from taskvision.backbone import BACKBONE_ID, backbone_onnx_path
    from taskvision.quantize import find_prepared, report_dict

    cache = service.data_dir.resolve() / "serving-cache" / "int8"
    deadline = time.monotonic() + timeout_s
    while True:
        text = service.log_path.read_text(errors="replace")
        if "INT8 refused" in text or "INT8 preparation failed" in text or time.monotonic() > deadline:
            raise RuntimeError(f"{service.name} did not switch INT8 on:\n{text[-3000:]}")
        found = find_prepared(BACKBONE_ID, backbone_onnx_path(), cache)
        if found is not None:
            if "INT8 backbone in use" not in text:
                time.sleep(2.0)  # a quiet log: give the server the moment it takes to switch
            return report_dict(found)
        time.sleep(1.0)


def stop_process(process: subprocess.Popen[Any], what: str = "server") -> None:
    """SIGTERM, then SIGKILL after 15 s; ``what`` names the process in the warning."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        logger.warning("%s pid %d ignored SIGTERM; killing it", what, process.pid)
        process.kill()
        process.wait(timeout=15)


def server_log_summary(
    log_path: Path, *, mid_line_errors: bool = True, count_warnings: bool = False
) -> dict[str, Any]:
    """Count problems the server logged (tracebacks, ERROR lines, 5xx answers).

    ``mid_line_errors`` also counts lines with `` ERROR `` after a prefix (a timestamp);
    ``count_warnings`` adds ``warning_lines`` (lines that start with WARNING).
    """
    text = log_path.read_text(errors="replace") if log_path.exists() else ""
    lines = text.splitlines()
    summary: dict[str, Any] = {
        "lines": len(lines),
        "error_lines": sum(
            (mid_line_errors and " ERROR " in line) or line.startswith(("ERROR", "CRITICAL"))
            for line in lines
        ),
    }
    if count_warnings:
        summary["warning_lines"] = sum(line.startswith("WARNING") for line in lines)
    summary["tracebacks"] = text.count("Traceback (most recent call last)")
    summary["http_5xx"] = sum(1 for line in lines if '" 5' in line and "HTTP/1.1" in line)
    return summary


# ---- /proc readers ------------------------------------------------------------


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) in kB, and Threads, from /proc/<pid>/status.

    The figures are the process's own: its threads included, its children not.
    """
    figures: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmHWM", "VmRSS", "Threads"):
            figures[key] = int(rest.split()[0])
    return figures


def _stat_cpu_ticks(pid: int) -> int:
    """utime + stime of a process (its threads, not its children), in clock ticks."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()  # the command name may contain spaces
    return int(fields[11]) + int(fields[12])


def proc_cpu_seconds(pid: int) -> float:
    """User + system CPU time the process has used so far (its threads, not its children)."""
    return _stat_cpu_ticks(pid) / os.sysconf("SC_CLK_TCK")


def proc_ticks(pid: int) -> int:
    """CPU ticks the process has used so far; 0 when it is gone."""
    try:
        return _stat_cpu_ticks(pid)
    except OSError:
        return 0


def busy_ticks() -> int:
    """CPU ticks the whole machine has spent busy (all CPUs, /proc/stat), idle and iowait excluded."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq = fields[:7]
    steal = fields[7] if len(fields) > 7 else 0
    return user + nice + system + irq + softirq + steal


class OtherCpu:
    """The share of the machine's CPU that other processes used meanwhile (0-100 %, of all CPUs).

    Anything but this benchmark and ``pids`` (the server under test) counts: a high figure means
    the measurement shared the machine and its numbers are distorted.
    """

    def __init__(self, pids: Sequence[int]) -> None:
        self.pids = [os.getpid(), *pids]
        self.pct = math.nan

    def __enter__(self) -> OtherCpu:
        self._start = time.monotonic()
        self._busy = busy_ticks()
        self._own = sum(proc_ticks(pid) for pid in self.pids)
        return self

    def __exit__(self, *exc: object) -> None:
        elapsed = time.monotonic() - self._start
        other = (busy_ticks() - self._busy) - (sum(proc_ticks(pid) for pid in self.pids) - self._own)
        capacity = elapsed * os.sysconf("SC_CLK_TCK") * (os.cpu_count() or 1)
        self.pct = round(max(0.0, 100 * other / capacity), 1) if capacity > 0 else math.nan


# ---- HTTP client --------------------------------------------------------------


class Client:
    """One ``requests.Session`` per thread, all with the benchmark user's token."""

    def __init__(self, server: Server) -> None:
        self.base_url = server.base_url
        self._headers = {"Authorization": f"Token {server.token}"}
        self._local = threading.local()

    @property
    def session(self) -> requests.Session:
        session: requests.Session | None = getattr(self._local, "session", None)
        if session is None:
            session = requests.Session()
            session.trust_env = False  # never route 127.0.0.1 through a proxy from the environment
            session.headers.update(self._headers)
            self._local.session = session
        return session

    def post(self, path: str, payload: dict[str, Any] | None = None) -> requests.Response:
        return _backing_off(
            lambda: self.session.post(f"{self.base_url}{path}", json=payload, timeout=REQUEST_TIMEOUT_S)
        )

    def post_raw(self, path: str, body: bytes) -> requests.Response:
        """POST a JSON body serialized beforehand."""
        return self.session.post(
            f"{self.base_url}{path}",
            data=body,
            headers={"Content-Type": "application/json"},
            timeout=REQUEST_TIMEOUT_S,
        )

    def get(self, path: str, params: dict[str, Any] | None = None) -> requests.Response:
        return _backing_off(
            lambda: self.session.get(f"{self.base_url}{path}", params=params, timeout=REQUEST_TIMEOUT_S)
        )


RATE_LIMIT_RETRIES = 30


def _backing_off(send: Callable[[], requests.Response]) -> requests.Response:
    """``send()``, again after the ``Retry-After`` a 429 asks for (the service limits requests per
    token; a benchmark's set-up, e.g. labelling 1,500 images from 4 threads, can go faster).
    Timed requests do not come through here: they go straight to ``session``."""
    for _ in range(RATE_LIMIT_RETRIES):
        response = send()
        if response.status_code != 429:
            return response
        time.sleep(float(response.headers.get("Retry-After", "1")))
    return response


def expect(response: requests.Response, status: int, what: str) -> dict[str, Any]:
    """The answer's JSON; RuntimeError when its status is not ``status``."""
    if response.status_code != status:
        raise RuntimeError(f"{what}: HTTP {response.status_code}: {response.text[:500]}")
    data: dict[str, Any] = response.json()
    return data


_DUPLICATE_ID = re.compile(r"image ID: ([0-9a-fA-F-]{8,})")


def upload_training_image(client: Client, data: bytes) -> tuple[str, bool]:
    """Upload one image; its id, and True when the service already had it.

    The service answers a duplicate with 400 and the existing image's id in the message: that
    image is used instead (what ximilar-client does).
    """
    response = client.post(f"{API}/training-image/", {"base64": base64.b64encode(data).decode("ascii")})
    if response.status_code == 201:
        image_id: str = response.json()["id"]
        return image_id, False
    match = _DUPLICATE_ID.search(response.text) if response.status_code == 400 else None
    if match is None:
        raise RuntimeError(f"upload: HTTP {response.status_code}: {response.text[:300]}")
    return match.group(1), True


# ---- the report -----------------------------------------------------------------


def nproc() -> int | None:
    """The CPUs this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def cpuinfo_value(key: str) -> str:
    """The value of the first /proc/cpuinfo line that starts with ``key`` ('' when there is none)."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith(key):
                return line.split(":", 1)[1].strip()
    return ""


def memory_gib() -> float:
    """The machine's memory (MemTotal), GiB with one decimal."""
    mem_kb = 0
    meminfo = Path("/proc/meminfo")
    if meminfo.exists():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kb = int(line.split()[1])
    return round(mem_kb / 1024 / 1024, 1)


def git_state() -> tuple[str | None, bool]:
    """The repository's short commit (None outside git) and whether tracked files have changes."""
    git = ["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"]
    commit = subprocess.run(git, capture_output=True, text=True, check=False).stdout.strip()
    changes = ["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--untracked-files=no"]
    dirty = bool(subprocess.run(changes, capture_output=True, text=True, check=False).stdout.strip())
    return commit or None, dirty


def machine_info() -> dict[str, Any]:
    """The machine, Python and commit a run measured, for the report."""
    commit, dirty = git_state()
    return {
        "nproc": nproc(),
        "cpu_model": cpuinfo_value("model name"),
        "memory_gib": memory_gib(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "git_commit": commit,
        "git_dirty": dirty,  # uncommitted changes to tracked files: the commit alone does not say what ran
        "load_average_at_start": list(os.getloadavg()),
    }


def targets_lines(targets: list[dict[str, Any]]) -> list[str]:
    """A report's targets as Markdown lines: a heading, then ``- PASS: target: value`` each."""
    return ["", "Targets:", ""] + [
        f"- {'PASS' if t['pass'] else 'FAIL'}: {t['target']}: {t['value']}" for t in targets
    ]


def write_report(report: dict[str, Any], out: Path, markdown: Callable[[dict[str, Any]], str]) -> None:
    """The report as JSON to ``out``, then as Markdown (``markdown(report)``) to stdout."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(markdown(report))
    logger.info("results written to %s", out)


# ---- the entry point ------------------------------------------------------------


def exit_on_sigterm(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds like Ctrl-C: servers are stopped, temporary dirs deleted


def init_script() -> None:
    """Log INFO to stderr (progress; the results go to stdout) and unwind on SIGTERM."""
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(message)s")
    signal.signal(signal.SIGTERM, exit_on_sigterm)
