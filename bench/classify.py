"""Classify benchmark: ``POST /recognition/v2/classify`` of the real service, against a naive baseline.

What is measured, with 512x512 JPEG images sent as ``_base64`` records:

* **latency** (client sends the request -> the JSON answer is parsed), p50/p95/p99
  over ``--requests`` sequential requests (one client, one connection), with 1
  and with 10 records per request. Every answer must be 200 with every record's
  ``_status.code`` 200 (else it counts as an error). These runs are **cold**:
  each request carries images the server has not seen (the service keeps an
  LRU cache of embeddings keyed on the preprocessed image, ``shared_embedder``'s
  ``cache_size``; the images are taken in turn from a pool larger than that
  cache, so a cyclic walk through it never hits). The **cached** case is measured separately: the same image
  (or the same 10 images) in every request;
* **throughput** (images/s): ``--clients`` threads, each with its own
  ``requests.Session``, sending single-record requests (fresh images, as above)
  for ``--duration`` seconds; errors, latency under load, and the CPU seconds
  the server and the client process used per image;
* **memory** (service only): ``--memory-requests`` single-record requests (the
  pool's images in turn) from ``--clients`` threads, the server's ``VmRSS``
  sampled before and after every ``--memory-every`` requests (the server
  process alone: training runs in its children, which are not counted). The
  slope is the least-squares fit of RSS against requests;
* a **naive baseline** in the same run: a minimal FastAPI app in a subprocess
  of this script (``--naive-server``) serving the same trained bundle the
  textbook way: PIL open + full decode, torchvision ``Resize`` (bicubic) +
  ``CenterCrop`` + ``ToTensor`` + ``Normalize`` at the bundle's sizes; for a
  head over backbone features, each eager torch backbone
  (``build_embedding_model(...)``, NCHW, ``torch.no_grad``, torch's default
  threads, OMP_WAIT_POLICY unset unless ``--naive-omp-wait-policy`` says
  otherwise: PASSIVE would halve its speed) and the bundle's head with ONNX
  Runtime; for a whole (fine-tuned) network, its ``model.onnx`` with ONNX
  Runtime (it exists only as ONNX); a numpy softmax; no caching. Same request
  and answer shape; the same latency and throughput runs. The best labels of
  both servers are compared on the 1-record images.

The task is trained with ``--quality`` (default ``balanced``, the service's default).
The service runs as ``taskvision serve`` (a subprocess, free 127.0.0.1 port,
fresh temporary data directory, ``OMP_WAIT_POLICY=PASSIVE``; the ONNX export
cache is the user's usual one). The benchmark creates a user, a multi_class
task on ``../shared/datasets/flowers`` (600 photos, 5 labels; generated images
when absent), uploads and labels the images through the API, trains through
the API and waits until the version is in production (none of that is timed).
The test images are photos from ``../shared/datasets`` (flowers 128 px,
scenes ~384x256, ages 200 px), resized to cover 512x512 (bicubic) and
JPEG-encoded at quality 90 beforehand (not timed); generated 512x512 images
when the data sets are absent. Before the timed runs, the pieces of one
request are timed in this process on the trained bundle (base64, decode,
resize, normalise, embed, head, answer) to show where the time goes.
The service is measured first and stopped before the baseline starts.
Client and server share the machine (2 CPUs here): the client's CPU counts.

Training runs in a first instance of the service; the measured instance is a
second one on the same data directory (what a restart does), started with the
options under test:

* ``--int8``: ``TASKVISION_SERVING_INT8=true``. The service calibrates its INT8
  backbone on its stored training images (the 600 flowers) at start; the
  benchmark waits until it is in use and the head has passed its tolerance
  check (the server's log says which), times the pieces with the INT8
  backbone, and (unless ``--skip-accuracy``) reports the accuracy change
  FP32 -> INT8 on the four shared photo sets: a head fitted on FP32 embeddings
  the way the train step fits it (4 x 5-fold cross-validation, every photo a
  test photo once in each repeat; the mean change over the repeats), answered
  from FP32 and from INT8 embeddings of the same photos;
* ``--accuracy-only``: that comparison alone, without the service: the
  backbone quantized in-process on 300 flowers photos (200 calibrate, 100
  check), as the service would on its stored images;
* ``--batch-window-ms MS``: ``TASKVISION_SERVING_BATCH_WINDOW_MS`` (batching
  across requests).

Targets (printed as PASS/FAIL): p50 <= 30 ms for one 512 px image (cold);
>= 60 images/s with 8 clients; no errors under load; memory flat over 5,000
requests (fitted growth <= 5 MiB over them, i.e. about 1 KiB per request; the
slope of the second half is reported too: growth that stops is not a leak).
With ``--int8``: p50 <= 15 ms, >= 120 images/s, and an accuracy (mAP) change of
at most 0.5 points on each classification set.

Run it by hand (not collected by pytest)::

    .venv/bin/python bench/classify.py [--requests 200] [--duration 30] [--clients 8]
        [--memory-requests 5000] [--memory-every 500] [--int8] [--batch-window-ms MS]
        [--out bench/results/classify.json]

``--requests 20 --duration 3 --memory-requests 200 --memory-every 50`` makes a
quick check. Results: Markdown on stdout, JSON in ``--out``; progress on
stderr. The exit status is 1 when a target was missed.
"""

from __future__ import annotations

import argparse
import base64
import csv
import dataclasses
import io
import itertools
import json
import logging
import math
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
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
    Server,
    Service,
    expect,
    free_port,
    init_script,
    latency_summary,
    machine_info,
    percentile,
    proc_cpu_seconds,
    proc_status,
    random_boxes,
    running_service,
    server_env,
    server_log_summary,
    smooth_field,
    stop_process,
    targets_lines,
    upload_training_image,
    wait_for_int8,
    wait_healthy,
    write_report,
)
from PIL import Image, ImageDraw

sys.path.insert(0, str(REPO_ROOT))  # the project's packages, however the script is started

logger = logging.getLogger("bench.classify")

DEFAULT_OUT = REPO_ROOT / "bench" / "results" / "classify.json"
STARTUP_TIMEOUT_S = 120.0
TRAIN_TIMEOUT_S = 1800.0
UPLOAD_CONCURRENCY = 4
IMAGE_SIZE = 512
JPEG_QUALITY = 90
POOL_OVER_CACHE = 2600  # default pool size: larger than any embedding cache the service has had (2048)
WARMUP_REQUESTS = 10
BREAKDOWN_IMAGES = 60
MIB = 1024  # kB per MiB

# Targets
TARGET_P50_MS = 30.0
TARGET_IMAGES_PER_S = 60.0
TARGET_INT8_P50_MS = 15.0
TARGET_INT8_IMAGES_PER_S = 120.0
TARGET_INT8_ACCURACY_CHANGE = 0.5  # points
TARGET_MEMORY_GROWTH_MIB = 5.0  # fitted growth over the memory run
OTHER_CPU_WARN_PCT = 5.0  # other processes' share of the CPU above which a run is flagged as disturbed


# ---- statistics -------------------------------------------------------------


def linear_slope(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Least-squares slope of ys against xs (0 with fewer than two points)."""
    if len(xs) < 2:
        return 0.0
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx if sxx else 0.0


# ---- images -------------------------------------------------------------------


def _cover(image: Image.Image, size: int) -> Image.Image:
    """Resize (bicubic) to cover ``size`` x ``size`` and crop the centre square."""
    width, height = image.size
    scale = size / min(width, height)
    resized = image.resize(
        (max(size, round(width * scale)), max(size, round(height * scale))), Image.Resampling.BICUBIC
    )
    left, top = (resized.width - size) // 2, (resized.height - size) // 2
    return resized.crop((left, top, left + size, top + size))


def _encode(image: Image.Image) -> str:
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=JPEG_QUALITY)
    return base64.b64encode(out.getvalue()).decode("ascii")


def _generated(seed: int, size: int) -> Image.Image:
    """A photo-like picture: a smooth random colour field with random shapes on top."""
    rng = random.Random(seed)
    img = smooth_field(rng, size, size)
    draw = ImageDraw.Draw(img)
    for box, colour in random_boxes(rng, size, size):
        draw.ellipse(box, fill=colour) if rng.random() < 0.5 else draw.rectangle(box, fill=colour)
    return img


def photo_sources() -> list[Path]:
    """Photos of the shared data sets, interleaved (flowers, scenes, ages, flowers, ...)."""
    lists = []
    for name in ("flowers", "scenes", "ages"):
        folder = DATASETS_ROOT / name / "images"
        if folder.is_dir():
            lists.append(sorted(folder.glob("*.jpg")))
    return [p for group in itertools.zip_longest(*lists) for p in group if p is not None]


def make_pool(count: int, *, size: int, seed: int, start: int = 0) -> tuple[list[str], dict[str, Any]]:
    """``count`` distinct ``size`` px JPEGs as base64 text: photos (mirrored, cropped when they run out).

    Image ``i`` (from ``start``) is photo ``i % photos`` in variant ``i // photos``, so pools made
    from disjoint index ranges share no image.
    """
    sources = photo_sources()

    def one(index: int) -> str:
        if sources:
            path = sources[index % len(sources)]
            with Image.open(path) as opened:
                image = _cover(opened.convert("RGB"), size)
            variant = index // len(sources)
            if variant % 2:
                image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            if variant >= 2:  # beyond two passes: a different crop of the same photo
                image = _cover(image.crop((variant, variant, size - variant, size - variant)), size)
            return _encode(image)
        return _encode(_generated(seed + index, size))

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        images = list(pool.map(one, range(start, start + count)))
    jpeg_bytes = [len(b) * 3 / 4 for b in images]
    info = {
        "images": count,
        "distinct": len(set(images)),
        "source": "photos from ../shared/datasets resized to cover" if sources else "generated",
        "source_photos": len(sources),
        "size": f"{size}x{size}",
        "jpeg_quality": JPEG_QUALITY,
        "mean_jpeg_kib": round(sum(jpeg_bytes) / len(jpeg_bytes) / 1024, 1),
    }
    return images, info


class ImagePool:
    """Images handed out in turn (cycling), thread-safe; a cyclic walk longer than the LRU never hits it."""

    def __init__(self, images: Sequence[str]) -> None:
        self.images = images
        self._next = 0
        self._lock = threading.Lock()

    def take(self, n: int) -> list[tuple[int, str]]:
        with self._lock:
            start = self._next
            self._next += n
        return [
            ((start + i) % len(self.images), self.images[(start + i) % len(self.images)]) for i in range(n)
        ]


# ---- training data ------------------------------------------------------------


TASK_TYPES = {"flowers": "multi_class", "ages": "regression"}


def training_set(dataset: str = "flowers") -> tuple[str, list[tuple[Path | bytes, str, float | None]]]:
    """(description, [(file or bytes, label name, value)]): the flowers (or, with ``dataset``
    ``ages``, the faces' ages: a regression task), or generated discs and squares."""
    if dataset == "ages":
        with (DATASETS_ROOT / "ages" / "labels.csv").open(newline="") as fh:
            faces = list(csv.DictReader(fh))
        aged = [(DATASETS_ROOT / "ages" / row["path"], "age", float(row["age"])) for row in faces]
        return f"ages ({len(aged)} photos)", aged
    labels_csv = DATASETS_ROOT / "flowers" / "labels.csv"
    if labels_csv.is_file():
        with labels_csv.open(newline="") as fh:
            rows = list(csv.DictReader(fh))
        items: list[tuple[Path | bytes, str, float | None]] = [
            (DATASETS_ROOT / "flowers" / row["path"], row["label"].strip(), None) for row in rows
        ]
        return f"flowers ({len(items)} photos)", items
    rng = random.Random(7)
    generated: list[tuple[Path | bytes, str, float | None]] = []
    for shape in ("disc", "square"):
        for _ in range(30):
            img = Image.new("RGB", (128, 128), tuple(rng.randrange(256) for _ in range(3)))
            draw = ImageDraw.Draw(img)
            x, y, r = rng.randint(35, 93), rng.randint(35, 93), rng.randint(12, 32)
            colour = tuple(rng.randrange(256) for _ in range(3))
            box = (x - r, y - r, x + r, y + r)
            draw.ellipse(box, fill=colour) if shape == "disc" else draw.rectangle(box, fill=colour)
            out = io.BytesIO()
            img.save(out, format="PNG")
            generated.append((out.getvalue(), shape, None))
    return f"generated discs and squares ({len(generated)} images)", generated


# ---- processes ------------------------------------------------------------------


@contextmanager
def running_taskvision(
    workdir: Path, *, log_level: str, token: str | None = None, log_name: str = "service.log", **env: str
) -> Iterator[Service]:
    """``taskvision serve`` on the data dir under ``workdir`` (kept: the baseline reads the bundle).

    The first start makes the data dir and a user; later ones pass that user's ``token``.
    """
    with running_service(
        data_dir=workdir / "data",
        log_path=workdir / log_name,
        # PYTHONPATH: this checkout's code, whichever checkout the venv has installed.
        env=server_env(PYTHONPATH=str(REPO_ROOT), PYTHONUNBUFFERED="1", **env),
        log_level=log_level,
        name="service",
        startup_timeout_s=STARTUP_TIMEOUT_S,
        token=token,
        cwd=REPO_ROOT,
    ) as server:
        yield server


def head_precision(bundle_dir: Path, int8_model: Path) -> str:
    """What the served head runs on: the same tolerance check the service makes, in this process."""
    from serving.extractors import Extractors
    from serving.model import BundlePredictor
    from taskvision.quantize import read_prepared

    int8 = read_prepared(int8_model.parent)
    if int8 is None:
        raise RuntimeError(f"no INT8 report beside {int8_model}")
    extractors = Extractors()
    extractors.use_int8(int8)
    predictor = BundlePredictor("bench", bundle_dir, extractors=extractors)
    predictor.load()
    return str(predictor.precision())


@contextmanager
def running_naive(workdir: Path, bundle_dir: Path, *, omp_wait_policy: str | None) -> Iterator[Server]:
    """The naive baseline (this script with ``--naive-server``) serving ``bundle_dir``."""
    log_path = workdir / "naive.log"
    port = free_port()
    command = [sys.executable, str(Path(__file__).resolve()), "--naive-server", "--bundle", str(bundle_dir)]
    command += ["--port", str(port)]
    process: subprocess.Popen[bytes] | None = None
    try:
        with log_path.open("wb") as log_file:
            env = server_env(omp_wait_policy, PYTHONUNBUFFERED="1")
            process = subprocess.Popen(command, env=env, stdout=log_file, stderr=subprocess.STDOUT)
        server = Server(
            name="naive baseline",
            process=process,
            base_url=f"http://127.0.0.1:{port}",
            token="unused",
            log_path=log_path,
        )
        wait_healthy(server, timeout_s=STARTUP_TIMEOUT_S)
        logger.info("naive baseline pid %d listening on %s", process.pid, server.base_url)
        yield server
    finally:
        if process is not None:
            stop_process(process, "naive baseline")


def own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# ---- HTTP client --------------------------------------------------------------


@dataclass
class Call:
    """One classify request: its end-to-end time and what came back."""

    seconds: float
    records: int
    ok: bool
    error: str | None = None
    best: list[tuple[int, str, float]] = field(default_factory=list)  # (pool index, best label id, prob)
    processing_s: float | None = None  # the server's own "statistics.processing time"


def classify(
    client: Client, task_id: str, images: Sequence[tuple[int, str]], *, explain: bool = False
) -> Call:
    """Send one classify request (the body is serialized before the clock starts) and check the answer.

    With ``explain`` every record must come back with its ``_explanations`` (a heat map each).
    """
    records = ",".join('{"_base64": "%s"}' % b64 for _, b64 in images)  # noqa: UP031  # base64 needs no escaping
    extra = ', "explain": true' if explain else ""
    body = f'{{"task_id": {json.dumps(task_id)}, "records": [{records}]{extra}}}'.encode()
    session = client.session
    start = time.perf_counter()
    try:
        response = session.post(
            f"{client.base_url}{API}/classify",
            data=body,
            headers={"Content-Type": "application/json"},
            timeout=REQUEST_TIMEOUT_S,
        )
        data = response.json() if response.status_code == 200 else None
    except (requests.RequestException, ValueError) as exc:
        return Call(time.perf_counter() - start, len(images), False, error=repr(exc)[:300])
    seconds = time.perf_counter() - start
    if data is None:
        return Call(seconds, len(images), False, error=f"HTTP {response.status_code}: {response.text[:300]}")
    answers = data.get("records") or []
    if len(answers) != len(images):
        return Call(seconds, len(images), False, error=f"{len(answers)} records answered, {len(images)} sent")
    best: list[tuple[int, str, float]] = []
    for (index, _), answer in zip(images, answers, strict=True):
        status = (answer.get("_status") or {}).get("code")
        label = answer.get("best_label")
        if status != 200 or not isinstance(label, dict):
            return Call(seconds, len(images), False, error=f"record status {answer.get('_status')}")
        if explain and not answer.get("_explanations"):
            return Call(seconds, len(images), False, error="no _explanations in an explained record")
        best.append((index, str(label.get("id")), float(label.get("prob", math.nan))))
    processing = (data.get("statistics") or {}).get("processing time")
    return Call(seconds, len(images), True, best=best, processing_s=processing)


# ---- building and training the task -------------------------------------------------


def build_and_train(
    client: Client, server: Service, quality: str, dataset: str = "flowers"
) -> dict[str, Any]:
    """Create the task, upload and label its images, train with ``quality``, wait for production."""
    description, items = training_set(dataset)
    task_type = TASK_TYPES[dataset]
    names = sorted({label for _, label, _ in items})
    task = expect(client.post(f"{API}/task/", {"name": "classify bench", "type": task_type}), 201, "task")
    label_type = "value" if task_type == "regression" else "category"
    label_ids: dict[str, str] = {}
    for name in names:
        label = expect(client.post(f"{API}/label/", {"name": name, "type": label_type}), 201, "label")
        expect(client.post(f"{API}/task/{task['id']}/add-label", {"label_id": label["id"]}), 200, "attach")
        label_ids[name] = label["id"]

    def upload(item: tuple[Path | bytes, str, float | None]) -> None:
        source, label_name, value = item
        data = source.read_bytes() if isinstance(source, Path) else source
        image_id, _ = upload_training_image(client, data)
        payload: dict[str, Any] = {"label_id": label_ids[label_name]}
        if value is not None:
            payload["value"] = value
        expect(client.post(f"{API}/training-image/{image_id}/add-label", payload), 200, "add label")

    logger.info("uploading %s with %d client threads", description, UPLOAD_CONCURRENCY)
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=UPLOAD_CONCURRENCY) as pool:
        list(pool.map(upload, items))
    upload_s = time.perf_counter() - start

    logger.info("training (quality %s)", quality)
    start = time.perf_counter()
    run = expect(client.post(f"{API}/task/{task['id']}/train", {"quality": quality}), 202, "train")
    deadline = time.monotonic() + TRAIN_TIMEOUT_S
    while True:
        run = expect(client.get(f"{API}/training-run/{run['id']}"), 200, "poll run")
        if run["status"] in ("FAILED", "CANCELED"):
            raise RuntimeError(f"training {run['status']}: {run.get('error')}")
        if run["status"] == "SUCCEEDED":
            production = expect(client.get(f"{API}/task/{task['id']}"), 200, "task")["production_version"]
            if production is not None:
                break
        if time.monotonic() > deadline:
            raise RuntimeError(f"training not done after {TRAIN_TIMEOUT_S:.0f} s: {run}")
        time.sleep(0.5)
    train_s = time.perf_counter() - start
    bundles = sorted((server.data_dir / "blobs" / "models" / task["id"]).glob("*/bundle.json"))
    if not bundles:
        raise RuntimeError(f"no bundle.json under {server.data_dir / 'blobs' / 'models' / task['id']}")
    meta = json.loads(bundles[-1].read_text())
    logger.info("version %s in production after %.1f s; bundle %s", production, train_s, bundles[-1].parent)
    return {
        "task_id": task["id"],
        "task_type": task_type,
        "dataset": description,
        "labels": names,
        "upload_s": round(upload_s, 1),
        "train_s": round(train_s, 1),
        "version": production,
        "bundle_dir": str(bundles[-1].parent),
        "frozen_backbone": meta.get("frozen_backbone"),
        "features": meta.get("features"),
        "quality": quality,
        "chosen": (meta.get("selection") or {}).get("chosen"),
        "training_mode": (meta.get("training") or {}).get("mode"),
        "test_metrics": {k: v for k, v in (meta.get("metrics") or {}).items() if isinstance(v, int | float)},
    }


# ---- where the time goes (in this process) ----------------------------------------------


def breakdown(bundle_dir: Path, images: Sequence[str], *, int8_model: Path | None = None) -> dict[str, Any]:
    """Time the pieces of the service's classify path for single images, on the trained bundle."""
    import numpy as np

    from serving.model import DEFAULT_MAX_PIXELS, BundlePredictor
    from taskvision import features, imaging
    from taskvision.backbone import BACKBONE_ID, Embedder, onnx_session
    from taskvision.bundle import outputs_from_logits
    from taskvision.inference import BundleModel

    embedders: dict[str, Embedder] = {}

    def embedder(backbone_id: str) -> Embedder:  # no cache: every image goes through the backbone
        if backbone_id not in embedders:
            # The service's INT8 backbone is Lite0's (serving.int8); the others stay FP32.
            int8 = int8_model if backbone_id == BACKBONE_ID else None
            session = onnx_session(int8) if int8 is not None else None
            embedders[backbone_id] = Embedder(backbone_id=backbone_id, cache_size=0, session=session)
        return embedders[backbone_id]

    predictor = BundlePredictor("bench", bundle_dir)
    predictor.load()
    model = BundleModel.load(bundle_dir)  # decodes and prepares images as the predictor does
    frozen = model.meta.frozen_backbone
    head = predictor.head  # a frozen backbone's linear head: evaluated from the head bank
    precision = "INT8" if int8_model else "FP32"
    pieces: dict[str, list[float]] = {}

    @contextmanager
    def stopwatch(name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        yield
        pieces.setdefault(name, []).append(time.perf_counter() - t0)

    run_name = (
        f"embed ({', '.join(features.backbones_needed(model.meta.features))}; {precision}, "
        "ONNX Runtime, batch 1)"
        if frozen
        else f"whole network ({model.meta.backbone}, tuned; ONNX Runtime, batch 1)"
    )
    with OtherCpu([]) as other:
        for i, b64 in enumerate(images):
            body = f'{{"task_id": "x", "records": [{{"_base64": "{b64}"}}]}}'.encode()
            with stopwatch("json.loads of the request body"):
                parsed = json.loads(body)
            with stopwatch("base64 decode (imaging.decode_base64)"):
                data = imaging.decode_base64(parsed["records"][0]["_base64"])
            with stopwatch("probe + JPEG decode with draft (BundleModel.decode)"):
                image, _ = model.decode(data, max_pixels=DEFAULT_MAX_PIXELS)
            with stopwatch("resize + crop + normalise (BundleModel.prepare)"):
                prepared = model.prepare(image)[None]
            if frozen:
                with stopwatch(run_name):
                    vectors = features.embed_prepared(prepared, model.meta.features, embedder=embedder)
                if head is not None:
                    with stopwatch("head (head bank) + softmax"):
                        row = outputs_from_logits(model.meta, head.logits(vectors))
                else:
                    with stopwatch("head (its own session) + softmax"):
                        row = model.outputs(model.logits_from_embeddings(vectors))
            else:
                with stopwatch(run_name + " + softmax"):
                    row = model.outputs(model.logits_from_prepared(prepared))
            with stopwatch("describe (labels sorted)"):
                answer = predictor.describe(np.asarray(row)[0])
            with stopwatch("json.dumps of the answer"):
                json.dumps({"records": [answer]})
            if i == 0:  # the first image pays one-off costs (session warm-up): drop it
                for times in pieces.values():
                    times.clear()
        summary = {name: round(percentile(ts, 50) * 1000, 2) for name, ts in pieces.items()}
        summary["sum of the pieces"] = round(sum(summary.values()), 2)
    return {"images": len(images) - 1, "median_ms": summary, "other_cpu_pct": other.pct}


# ---- INT8 accuracy on the shared photo sets ------------------------------------------------------

ACCURACY_REPEATS = 4  # repeated cross-validation (see int8_accuracy)
ACCURACY_SETS = {  # name -> (task type, label columns: None = the "label" column)
    "flowers": ("multi_class", None),
    "satellite": ("multi_class", None),
    "scenes": ("multi_label", ["desert", "mountains", "sea", "sunset", "trees"]),
    "ages": ("regression", ["age"]),
}


def int8_accuracy(
    int8_model: Path, *, folds: int = 5, repeats: int = ACCURACY_REPEATS, seed: int = 0
) -> dict[str, Any]:
    """FP32 vs INT8 answers of heads fitted on FP32 embeddings, out of fold, on each shared photo set.

    ``repeats`` times ``folds``-fold cross-validation, each with its own random folds: INT8 flips
    a few percent of the low-margin flowers answers, and which of those are right depends on the
    folds (one 5-fold split alone gave changes from +0.17 to -1.0 points on the same model), so
    the change reported is the mean over the repeats, with each repeat's beside it.
    """
    import numpy as np

    from components.lib.heads import LOGISTIC, RIDGE, HeadSetting, fit_head
    from taskvision.backbone import Embedder, backbone_onnx_path, onnx_session
    from taskvision.metrics import average_precision
    from taskvision.preprocess import preprocess_bytes
    from taskvision.task_types import TaskType

    fp32 = Embedder(session=onnx_session(backbone_onnx_path()))
    int8 = Embedder(session=onnx_session(int8_model))
    results: dict[str, Any] = {}
    for name, (kind, columns) in ACCURACY_SETS.items():
        labels_csv = DATASETS_ROOT / name / "labels.csv"
        if not labels_csv.is_file():
            continue
        with labels_csv.open(newline="") as fh:
            rows = list(csv.DictReader(fh))
        started = time.perf_counter()
        arrays = [
            preprocess_bytes((DATASETS_ROOT / name / r["path"]).read_bytes(), max_pixels=10**8)[0]
            for r in rows
        ]
        x32 = np.concatenate(
            [fp32.embed_arrays(np.stack(arrays[i : i + 32])) for i in range(0, len(arrays), 32)]
        )
        x8 = np.concatenate(
            [int8.embed_arrays(np.stack(arrays[i : i + 32])) for i in range(0, len(arrays), 32)]
        )
        if kind == "multi_class":
            names = sorted({r["label"] for r in rows})
            y = np.asarray([names.index(r["label"]) for r in rows])
            task_type, n_out = TaskType.MULTI_CLASS, len(names)
        elif kind == "multi_label":
            assert columns is not None
            y = np.asarray([[float(r[c]) for c in columns] for r in rows], dtype=np.float32)
            task_type, n_out = TaskType.MULTI_LABEL, len(columns)
        else:
            assert columns is not None
            y = np.asarray([[float(r[c]) for c in columns] for r in rows], dtype=np.float32)
            task_type, n_out = TaskType.REGRESSION, len(columns)
        by_repeat: list[dict[str, float]] = []
        for repeat in range(repeats):
            fold_of = np.random.default_rng(seed + repeat).permutation(len(rows)) % folds
            out32 = np.zeros((len(rows), n_out), np.float32)
            out8 = np.zeros((len(rows), n_out), np.float32)
            for fold in range(folds):
                train, test = fold_of != fold, fold_of == fold
                if task_type is TaskType.REGRESSION:
                    mean, std = y[train].mean(axis=0), y[train].std(axis=0)
                    w, b = fit_head(
                        x32[train],
                        (y[train] - mean) / std,
                        task_type,
                        HeadSetting(RIDGE, 1.0),
                        n_outputs=n_out,
                    )
                    out32[test], out8[test] = (
                        (x32[test] @ w.T + b) * std + mean,
                        (x8[test] @ w.T + b) * std + mean,
                    )
                else:
                    w, b = fit_head(
                        x32[train], y[train], task_type, HeadSetting(LOGISTIC, 0.1), n_outputs=n_out
                    )
                    out32[test], out8[test] = x32[test] @ w.T + b, x8[test] @ w.T + b
            if task_type is TaskType.MULTI_CLASS:
                by_repeat.append(
                    {
                        "fp32": float((out32.argmax(1) == y).mean()),
                        "int8": float((out8.argmax(1) == y).mean()),
                        "same": float((out32.argmax(1) == out8.argmax(1)).mean()),
                    }
                )
            elif task_type is TaskType.MULTI_LABEL:
                by_repeat.append(
                    {
                        "fp32": float(
                            np.mean(
                                [
                                    average_precision(y[:, j].astype(np.int64), out32[:, j])
                                    for j in range(n_out)
                                ]
                            )
                        ),
                        "int8": float(
                            np.mean(
                                [
                                    average_precision(y[:, j].astype(np.int64), out8[:, j])
                                    for j in range(n_out)
                                ]
                            )
                        ),
                        "same": float(((out32 >= 0) == (out8 >= 0)).all(axis=1).mean()),
                    }
                )
            else:
                by_repeat.append(
                    {
                        "fp32": float(np.abs(out32 - y).mean()),
                        "int8": float(np.abs(out8 - y).mean()),
                        "same": float(np.abs(out32 - out8).mean()),
                    }
                )
        scale = 100 if kind != "regression" else 1
        row: dict[str, Any] = {
            "images": len(rows),
            "task_type": kind,
            "metric": {"multi_class": "accuracy", "multi_label": "mAP"}.get(kind, "MAE"),
            "cross_validation": f"{repeats} x {folds}-fold",
            "fp32": float(np.mean([r["fp32"] for r in by_repeat])),
            "int8": float(np.mean([r["int8"] for r in by_repeat])),
            "same_answer" if kind != "regression" else "mean_abs_change": float(
                np.mean([r["same"] for r in by_repeat])
            ),
        }
        changes = [round((r["int8"] - r["fp32"]) * scale, 3) for r in by_repeat]
        row["change_points" if kind != "regression" else "change"] = round(float(np.mean(changes)), 3)
        row["change_by_repeat"] = changes
        row["seconds"] = round(time.perf_counter() - started, 1)
        results[name] = row
        logger.info("  %s: %s", name, row)
    return results


def int8_accuracy_only(count: int) -> dict[str, Any]:
    """``--accuracy-only``: quantize the backbone as the service does, calibrated on ``count`` flowers
    photos (the photos the benchmark's task is trained on), and compare it with FP32 on the shared sets."""
    import numpy as np

    from taskvision import quantize
    from taskvision.backbone import BACKBONE_ID, backbone_onnx_path
    from taskvision.preprocess import preprocess_bytes

    with (DATASETS_ROOT / "flowers" / "labels.csv").open(newline="") as fh:
        paths = [DATASETS_ROOT / "flowers" / r["path"] for r in csv.DictReader(fh)]
    random.Random(0).shuffle(paths)
    images = np.stack([preprocess_bytes(p.read_bytes(), max_pixels=10**8)[0] for p in paths[:count]])
    with tempfile.TemporaryDirectory() as folder:
        int8 = quantize.prepare_int8(BACKBONE_ID, backbone_onnx_path(), images, Path(folder))
        logger.info("INT8: %s", int8.report.reason)
        return {
            "int8": {"calibration": "flowers", **dataclasses.asdict(int8.report)},
            "int8_accuracy": int8_accuracy(int8.path),
        }


# ---- measurements ----------------------------------------------------------------


def run_sequential(
    client: Client, task_id: str, take: Callable[[], list[tuple[int, str]]], n: int
) -> list[Call]:
    return [classify(client, task_id, take()) for _ in range(n)]


def summarize(calls: Sequence[Call], *, wall_s: float | None = None) -> dict[str, Any]:
    ok = [c for c in calls if c.ok]
    processing = [c.processing_s for c in ok if c.processing_s is not None]
    result: dict[str, Any] = {
        "requests": len(calls),
        "records_per_request": calls[0].records if calls else 0,
        "errors": len(calls) - len(ok),
        "first_errors": [c.error for c in calls if not c.ok][:5],
        "latency_ms": latency_summary([c.seconds for c in calls]),
        "server_processing_ms_p50": round(percentile(processing, 50) * 1000, 2) if processing else None,
    }
    if ok:
        result["ms_per_image_p50"] = round(result["latency_ms"]["p50"] / ok[0].records, 2)
    if wall_s:
        result["wall_s"] = round(wall_s, 2)
        result["images_per_s"] = round(sum(c.records for c in ok) / wall_s, 1)
    return result


def latency_runs(
    client: Client,
    task_id: str,
    pool: ImagePool,
    cached: Sequence[str],
    *,
    requests_n: int,
    with_cached: bool,
    pid: int,
) -> tuple[dict[str, Any], dict[int, tuple[str, float]], str | None]:
    """Sequential latency with 1 and 10 fresh records per request (and the cached case).

    The third value: why the model answered ``explain`` with an error (a model that cannot be
    explained, such as a regression network averaged with a distribution head), its runs skipped."""
    warm = run_sequential(client, task_id, lambda: pool.take(1), WARMUP_REQUESTS)
    warm += run_sequential(client, task_id, lambda: pool.take(10), 3)
    if not all(c.ok for c in warm):
        raise RuntimeError(f"warm-up requests failed: {[c.error for c in warm if not c.ok][:3]}")
    out: dict[str, Any] = {}
    with OtherCpu([pid]) as other:
        one = run_sequential(client, task_id, lambda: pool.take(1), requests_n)
    out["1 record, cold"] = {**summarize(one), "other_cpu_pct": other.pct}
    logger.info("  1 record, cold: %s", out["1 record, cold"]["latency_ms"])
    with OtherCpu([pid]) as other:
        ten = run_sequential(client, task_id, lambda: pool.take(10), requests_n)
    out["10 records, cold"] = {**summarize(ten), "other_cpu_pct": other.pct}
    logger.info("  10 records, cold: %s", out["10 records, cold"]["latency_ms"])
    unexplained = None
    if with_cached:  # the service: what "explain": true costs
        probe = classify(client, task_id, pool.take(1), explain=True)  # the maps backbone's session loads
        if not probe.ok and "explain_unavailable" in (probe.error or ""):
            unexplained = probe.error
            logger.info("  explain: this model cannot be explained (%s); its runs are skipped", probe.error)
    if with_cached and unexplained is None:
        with OtherCpu([pid]) as other:
            calls = [classify(client, task_id, pool.take(1), explain=True) for _ in range(requests_n)]
        out["1 record, cold, explain"] = {**summarize(calls), "other_cpu_pct": other.pct}
        logger.info("  1 record, cold, explain: %s", out["1 record, cold, explain"]["latency_ms"])
        with OtherCpu([pid]) as other:
            calls = [classify(client, task_id, pool.take(10), explain=True) for _ in range(requests_n // 4)]
        out["10 records, cold, explain"] = {**summarize(calls), "other_cpu_pct": other.pct}
        logger.info("  10 records, cold, explain: %s", out["10 records, cold, explain"]["latency_ms"])
    if with_cached:
        same_one = [(-1, cached[0])]
        same_ten = [(-1 - i, b64) for i, b64 in enumerate(cached[:10])]
        classify(client, task_id, same_one)  # the first one is cold
        with OtherCpu([pid]) as other:
            calls = run_sequential(client, task_id, lambda: same_one, requests_n)
        out["1 record, cached (same image)"] = {**summarize(calls), "other_cpu_pct": other.pct}
        logger.info("  1 record, cached: %s", out["1 record, cached (same image)"]["latency_ms"])
        classify(client, task_id, same_ten)
        with OtherCpu([pid]) as other:
            calls = run_sequential(client, task_id, lambda: same_ten, requests_n)
        out["10 records, cached (same 10 images)"] = {**summarize(calls), "other_cpu_pct": other.pct}
        logger.info("  10 records, cached: %s", out["10 records, cached (same 10 images)"]["latency_ms"])
    for name, row in out.items():
        if row["other_cpu_pct"] > OTHER_CPU_WARN_PCT:
            logger.warning(
                "  %s: other processes used %.0f%% of the CPU meanwhile", name, row["other_cpu_pct"]
            )
    answers = {index: (label, prob) for call in one if call.ok for index, label, prob in call.best}
    return out, answers, unexplained


def throughput_run(
    client: Client, task_id: str, pool: ImagePool, *, clients: int, duration_s: float, pid: int
) -> dict[str, Any]:
    """``clients`` threads sending single fresh records for ``duration_s``."""
    cpu_server, cpu_client = proc_cpu_seconds(pid), own_cpu_seconds()
    start = time.perf_counter()
    deadline = start + duration_s

    def worker() -> list[Call]:
        calls = []
        while time.perf_counter() < deadline:
            calls.append(classify(client, task_id, pool.take(1)))
        return calls

    with (
        OtherCpu([pid]) as other,
        ThreadPoolExecutor(max_workers=clients, thread_name_prefix="load") as executor,
    ):
        futures = [executor.submit(worker) for _ in range(clients)]
        calls = [call for future in futures for call in future.result()]
    wall = time.perf_counter() - start
    result = summarize(calls, wall_s=wall)
    result["other_cpu_pct"] = other.pct
    images = max(1, sum(c.records for c in calls if c.ok))
    result["clients"] = clients
    result["server_cpu_ms_per_image"] = round((proc_cpu_seconds(pid) - cpu_server) * 1000 / images, 2)
    result["client_cpu_ms_per_image"] = round((own_cpu_seconds() - cpu_client) * 1000 / images, 2)
    return result


def memory_run(
    client: Client, task_id: str, pool: ImagePool, *, total: int, every: int, clients: int, pid: int
) -> dict[str, Any]:
    """``total`` single-record requests; the server's VmRSS before and after every ``every`` of them."""
    first = proc_status(pid)
    samples = [(0, first["VmRSS"])]
    threads = [first["Threads"]]
    calls: list[Call] = []
    start = time.perf_counter()
    with (
        OtherCpu([pid]) as other,
        ThreadPoolExecutor(max_workers=clients, thread_name_prefix="memory") as executor,
    ):
        done = 0
        while done < total:
            chunk = min(every, total - done)
            calls += list(executor.map(lambda _: classify(client, task_id, pool.take(1)), range(chunk)))
            done += chunk
            figures = proc_status(pid)
            samples.append((done, figures["VmRSS"]))
            threads.append(figures["Threads"])
            logger.info(
                "  %d/%d requests, server RSS %.1f MiB, %d threads",
                done,
                total,
                samples[-1][1] / MIB,
                threads[-1],
            )
    wall = time.perf_counter() - start
    rss_mib = [kb / MIB for _, kb in samples]
    slope = linear_slope([n for n, _ in samples], rss_mib)  # MiB per request
    fitted_growth = slope * total
    half = len(samples) // 2  # the second half alone: growth that has stopped is not a leak
    late_slope = linear_slope([n for n, _ in samples[half:]], rss_mib[half:])
    return {
        "requests": total,
        "sample_every": every,
        "clients": clients,
        "errors": sum(not c.ok for c in calls),
        "first_errors": [c.error for c in calls if not c.ok][:5],
        "wall_s": round(wall, 1),
        "images_per_s": round(sum(c.ok for c in calls) / wall, 1),
        "latency_ms": latency_summary([c.seconds for c in calls]),
        "samples": [
            {"requests": n, "rss_mib": round(kb / MIB, 1), "threads": t}
            for (n, kb), t in zip(samples, threads, strict=True)
        ],
        "rss_start_mib": round(rss_mib[0], 1),
        "rss_end_mib": round(rss_mib[-1], 1),
        "rss_max_mib": round(max(rss_mib), 1),
        "slope_mib_per_1000_requests": round(slope * 1000, 3),
        "fitted_growth_mib": round(fitted_growth, 2),
        "second_half_slope_mib_per_1000_requests": round(late_slope * 1000, 3),
        "flat": fitted_growth <= TARGET_MEMORY_GROWTH_MIB,
        "vmhwm_mib": round(proc_status(pid)["VmHWM"] / MIB, 1),
        "other_cpu_pct": other.pct,
    }


def measure(
    server: Server,
    task_id: str,
    images: Sequence[str],
    cached: Sequence[str],
    args: argparse.Namespace,
    *,
    memory: bool,
) -> tuple[dict[str, Any], dict[int, tuple[str, float]]]:
    """All the runs against one server; a fresh walk through the pool (both servers see the same images)."""
    client = Client(server)
    pool = ImagePool(images)
    pid = server.process.pid
    out: dict[str, Any] = {"pid": pid}
    logger.info("%s: sequential latency (%d requests each)", server.name, args.requests)
    out["latency"], answers, unexplained = latency_runs(
        client, task_id, pool, cached, requests_n=args.requests, with_cached=memory, pid=pid
    )
    if unexplained is not None:
        out["explain_unavailable"] = unexplained
    logger.info("%s: throughput, %d clients for %.0f s", server.name, args.clients, args.duration)
    out["throughput"] = throughput_run(
        client, task_id, pool, clients=args.clients, duration_s=args.duration, pid=pid
    )
    tp = out["throughput"]
    logger.info(
        "  %.1f images/s, p50 %.1f ms, %d errors", tp["images_per_s"], tp["latency_ms"]["p50"], tp["errors"]
    )
    if memory:
        logger.info("%s: memory over %d requests", server.name, args.memory_requests)
        out["memory"] = memory_run(
            client,
            task_id,
            pool,
            total=args.memory_requests,
            every=args.memory_every,
            clients=args.clients,
            pid=pid,
        )
    rss = proc_status(pid)
    out["rss_at_end_mib"] = round(rss["VmRSS"] / MIB, 1)
    out["vmhwm_mib"] = round(rss["VmHWM"] / MIB, 1)
    out["requests_sent_from_pool"] = pool._next
    return out, answers


# ---- the naive baseline server (runs as a subprocess: --naive-server) ---------------------------


def naive_server_main(bundle_dir: Path, port: int) -> int:
    """A textbook server of the bundle: full PIL decode, torchvision transforms, eager torch, no cache."""
    import numpy as np
    import onnxruntime as ort
    import torch
    import uvicorn
    from fastapi import Body, FastAPI
    from torchvision import transforms

    from taskvision import features
    from taskvision.backbone import BACKBONES, build_embedding_model

    meta = json.loads((bundle_dir / "bundle.json").read_text())
    frozen = bool(meta.get("frozen_backbone"))
    feature_ids = list(meta.get("features") or features.LEGACY_FEATURES) if frozen else []

    def transform_for(input_size: int, crop_pct: float, mean: Any, std: Any) -> Any:
        return transforms.Compose(
            [
                transforms.Resize(
                    round(input_size / crop_pct), interpolation=transforms.InterpolationMode.BICUBIC
                ),
                transforms.CenterCrop(input_size),
                transforms.ToTensor(),
                transforms.Normalize(mean, std),
            ]
        )

    if frozen:  # a head over backbone features: each backbone in eager torch
        backbone_ids = features.backbones_needed(feature_ids)
        transforms_by_backbone = {
            b: transform_for(c.input_size, c.crop_pct, c.mean, c.std)
            for b, c in zip(backbone_ids, features.input_configs(feature_ids), strict=True)
        }
        models = {b: build_embedding_model(b).eval() for b in backbone_ids}
        weights = bundle_dir / "head.onnx"
    else:  # a whole (fine-tuned) network: only exported as ONNX, so ONNX Runtime runs it
        pre = meta.get("preprocess") or {}
        size = int(meta.get("input_size") or 224)
        transforms_by_backbone = {
            "network": transform_for(
                size,
                float(pre.get("crop_pct", 0.875)),
                pre.get("mean", (0.5,) * 3),
                pre.get("std", (0.5,) * 3),
            )
        }
        weights = bundle_dir / "model.onnx"
    assert set(BACKBONES) >= set(transforms_by_backbone) - {"network"}
    head = ort.InferenceSession(str(weights), providers=["CPUExecutionProvider"])
    head_input = head.get_inputs()[0].name
    labels = meta["labels"]
    app = FastAPI()

    @app.get("/healthz")
    def healthz() -> dict[str, Any]:
        return {
            "status": "ok",
            "torch_threads": torch.get_num_threads(),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "unset (OpenMP default)"),
        }

    @app.post("/recognition/v2/classify")
    def classify_naive(body: dict[str, Any] = Body(...)) -> dict[str, Any]:
        started = time.perf_counter()
        records = body.get("records") or []
        results: list[dict[str, Any]] = [{k: v for k, v in r.items() if k != "_base64"} for r in records]
        tensors = {}
        for i, record in enumerate(records):
            try:
                opened = Image.open(io.BytesIO(base64.b64decode(record["_base64"])))
                image = opened.convert("RGB")  # full-size decode
                results[i].update({"_width": image.width, "_height": image.height})
                tensors[i] = {b: t(image) for b, t in transforms_by_backbone.items()}
            except Exception as exc:  # a bad record fails alone
                results[i]["_status"] = {"code": 400, "text": str(exc)}
        good = sorted(tensors)
        if good:
            if frozen:
                vectors = {}
                with torch.no_grad():
                    for b, net in models.items():
                        batch = torch.stack([tensors[i][b] for i in good])
                        vectors[(b, False)] = net(batch).numpy()
                        if (b, True) in features.views_needed(feature_ids):
                            vectors[(b, True)] = net(torch.flip(batch, dims=[3])).numpy()
                inputs = features.assemble(vectors, feature_ids)
            else:
                inputs = np.stack([tensors[i]["network"].numpy() for i in good])
            logits = head.run(None, {head_input: inputs.astype(np.float32)})[0]
            z = np.exp(logits - logits.max(axis=1, keepdims=True))
            probs = z / z.sum(axis=1, keepdims=True)
            for i, row in zip(good, probs, strict=True):
                ranked = sorted(
                    (
                        {"id": lb["id"], "name": lb["name"], "prob": round(float(p), 5)}
                        for lb, p in zip(labels, row, strict=True)
                    ),
                    key=lambda item: -item["prob"],
                )
                results[i].update(
                    {"best_label": ranked[0], "labels": ranked, "_status": {"code": 200, "text": "OK"}}
                )
        return {
            "task_id": body.get("task_id"),
            "version": meta.get("version"),
            "records": results,
            "status": {"code": 200, "text": "OK"},
            "statistics": {"processing time": round(time.perf_counter() - started, 5)},
        }

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")
    return 0


# ---- report -----------------------------------------------------------------


def targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    int8 = report["config"]["int8"]
    p50_target = TARGET_INT8_P50_MS if int8 else TARGET_P50_MS
    rate_target = TARGET_INT8_IMAGES_PER_S if int8 else TARGET_IMAGES_PER_S
    service = report["service"]
    p50 = service["latency"]["1 record, cold"]["latency_ms"]["p50"]
    tput = service["throughput"]["images_per_s"]
    load_errors = service["throughput"]["errors"] + service["memory"]["errors"]
    all_errors = load_errors + sum(row["errors"] for row in service["latency"].values())
    memory = service["memory"]
    out = [
        {
            "target": f"p50 <= {p50_target:.0f} ms for a single {IMAGE_SIZE} px image (cold)",
            "value": f"{p50} ms",
            "pass": p50 <= p50_target,
        },
        {
            "target": f">= {rate_target:.0f} images/s with {service['throughput']['clients']} clients",
            "value": f"{tput} images/s",
            "pass": tput >= rate_target,
        },
        {
            "target": "no errors under load",
            "value": f"{load_errors} errors under load ({all_errors} in all runs)",
            "pass": all_errors == 0,
        },
        {
            "target": f"memory flat over {memory['requests']} requests "
            f"(fitted growth <= {TARGET_MEMORY_GROWTH_MIB:.0f} MiB)",
            "value": f"{memory['rss_start_mib']} -> {memory['rss_end_mib']} MiB "
            f"(max {memory['rss_max_mib']}), "
            f"slope {memory['slope_mib_per_1000_requests']} MiB/1000 requests",
            "pass": bool(memory["flat"]),
        },
    ]
    return out + accuracy_targets(report)


def accuracy_targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for name, row in report.get("int8_accuracy", {}).items():
        if row["task_type"] == "regression":
            continue
        out.append(
            {
                "target": f"INT8 {row['metric']} change on {name} <= {TARGET_INT8_ACCURACY_CHANGE} points "
                f"(mean of {row['cross_validation']} cross-validation)",
                "value": f"{row['fp32']:.4f} -> {row['int8']:.4f} ({row['change_points']:+.2f} points; "
                f"by repeat {row['change_by_repeat']})",
                "pass": abs(row["change_points"]) <= TARGET_INT8_ACCURACY_CHANGE,
            }
        )
    return out


def accuracy_table(rows: dict[str, Any]) -> list[str]:
    """FP32 against INT8 on each shared set (``int8_accuracy``'s rows), as a Markdown table."""
    out = [
        "| set | metric | FP32 | INT8 | change (mean) | change by repeat | same answer |",
        "|---|---|---:|---:|---:|---|---:|",
    ]
    for name, row in rows.items():
        change = row.get("change_points", row.get("change"))
        same = row.get("same_answer", row.get("mean_abs_change"))
        out.append(
            f"| {name} ({row['images']}) | {row['metric']} | {row['fp32']:.4f} | {row['int8']:.4f} | "
            f"{change:+.3f} | {row['change_by_repeat']} | {same:.4f} |"
        )
    return out


def accuracy_markdown(report: dict[str, Any]) -> str:
    """The report of ``--accuracy-only``."""
    machine, q = report["machine"], report["int8"]
    out = [
        f"## INT8 accuracy on the shared photo sets ({report['date']})",
        "",
        f"Commit {machine['git_commit']}{' (dirty)' if machine['git_dirty'] else ''}. The backbone "
        f"quantized on {q['calibration_images']} flowers photos, checked on {q['check_images']} others "
        f"({q['reason']}).",
        "",
    ]
    out += accuracy_table(report["int8_accuracy"])
    out += targets_lines(report["targets"])
    return "\n".join(out)


def _headline(metrics: dict[str, Any]) -> str:
    """The test split's accuracy (classification) or MAE (regression)."""
    return f"MAE {metrics['mae']}" if "mae" in metrics else f"accuracy {metrics.get('accuracy', 'n/a')}"


def markdown(report: dict[str, Any]) -> str:
    cfg, machine, training = report["config"], report["machine"], report["training"]
    commit = f"{machine['git_commit']}{' (dirty)' if machine['git_dirty'] else ''}"
    load = ", ".join(f"{x:.2f}" for x in machine["load_average_at_start"])
    images = cfg["images"]
    out = [
        f"## Classify benchmark ({report['date']}, {'INT8' if cfg['int8'] else 'FP32'} backbone, "
        f"batching window {cfg['batch_window_ms']} ms)",
        "",
        f"{machine['nproc']} CPUs ({machine['cpu_model']}), load average at start {load}, "
        f"Python {machine['python']}, commit {commit}. "
        f"Task: {training.get('task_type', 'multi_class')} on {training['dataset']}, "
        f"trained in {training['train_s']} s ({training['training_mode'] or 'default'} mode; "
        f"test {_headline(training['test_metrics'])}). "
        f"Images: {images['images']} distinct "
        f"{images['size']} JPEGs (q{images['jpeg_quality']}, mean {images['mean_jpeg_kib']} KiB; "
        f"{images['source']}). Client and server on the same machine. Cold = every image new to the "
        f"server; cached = the same image(s) in every request.",
        "",
        "| run | server | requests | errors | p50 ms | p95 ms | p99 ms | p50 ms/image "
        "| server p50 ms | images/s | other CPU % |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    servers = [server for server in ("service", "naive") if server in report]
    for name in report["service"]["latency"]:
        for server in servers:
            row = report[server]["latency"].get(name)
            if row is None:
                continue
            lat = row["latency_ms"]
            out.append(
                f"| {name}, sequential | {'TaskVision' if server == 'service' else 'naive baseline'} | "
                f"{row['requests']} | {row['errors']} | {lat['p50']} | {lat['p95']} | {lat['p99']} | "
                f"{row.get('ms_per_image_p50', '')} | {row['server_processing_ms_p50']} | | "
                f"{row['other_cpu_pct']} |"
            )
    for server in servers:
        row = report[server]["throughput"]
        lat = row["latency_ms"]
        out.append(
            f"| {row['clients']} clients x 1 record, {cfg['duration_s']:.0f} s, cold | "
            f"{'TaskVision' if server == 'service' else 'naive baseline'} | {row['requests']} | "
            f"{row['errors']} | {lat['p50']} | {lat['p95']} | {lat['p99']} | | "
            f"{row['server_processing_ms_p50']} | "
            f"**{row['images_per_s']}** | {row['other_cpu_pct']} |"
        )
    if "explain_unavailable" in report["service"]:
        out += [
            "",
            f"Explanations: not available for this model ({report['service']['explain_unavailable']}).",
        ]
    s_tp = report["service"]["throughput"]
    naive = report.get("naive") or {"throughput": {}}
    n_tp = naive["throughput"]
    out += [
        "",
        f"CPU per image under load: TaskVision server {s_tp['server_cpu_ms_per_image']} ms "
        f"(client {s_tp['client_cpu_ms_per_image']} ms); "
        f"naive server {n_tp.get('server_cpu_ms_per_image')} ms "
        f"(client {n_tp.get('client_cpu_ms_per_image')} ms). Server RSS at the end: TaskVision "
        f"{report['service']['rss_at_end_mib']} MiB (peak {report['service']['vmhwm_mib']}), naive "
        f"{naive.get('rss_at_end_mib')} MiB (peak {naive.get('vmhwm_mib')}). "
        f"Best labels agree on {report['agreement']['same_best_label']}/{report['agreement']['compared']} "
        f"images (max prob difference {report['agreement']['max_prob_diff']}). Naive baseline: torch on "
        f"{naive.get('torch_threads')} threads, OMP_WAIT_POLICY "
        f"{naive.get('omp_wait_policy')}; TaskVision: OMP_WAIT_POLICY=PASSIVE. "
        f"'other CPU %': the share of the machine's CPU that processes other than this benchmark "
        f"and the server under test used meanwhile (above {OTHER_CPU_WARN_PCT:.0f} % the figures "
        f"are distorted).",
        "",
    ]
    disturbed = report["disturbed_runs"]
    if disturbed:
        out += [f"**Warning: other processes shared the machine during {', '.join(disturbed)}.**", ""]
    memory = report["service"]["memory"]
    out += [
        f"Memory ({memory['requests']} single-record requests, {memory['clients']} clients, "
        f"{memory['images_per_s']} images/s, {memory['errors']} errors): server VmRSS "
        + ", ".join(f"{s['requests']}: {s['rss_mib']}" for s in memory["samples"])
        + f" MiB; slope {memory['slope_mib_per_1000_requests']} MiB per 1000 requests "
        f"(fitted growth {memory['fitted_growth_mib']} MiB; second half "
        f"{memory['second_half_slope_mib_per_1000_requests']} MiB per 1000 requests); server threads "
        f"{memory['samples'][0]['threads']} -> {memory['samples'][-1]['threads']}.",
        "",
        f"Where the time goes (one image, in-process on the trained bundle, median of "
        f"{report['breakdown']['images']}; other CPU {report['breakdown']['other_cpu_pct']} %):",
        "",
        "| piece | ms |",
        "|---|---:|",
    ]
    out += [f"| {name} | {ms} |" for name, ms in report["breakdown"]["median_ms"].items()]
    if "int8" in report:
        q = report["int8"]
        out += [
            "",
            f"INT8 backbone: calibrated on {q['calibration_images']} stored training images in "
            f"{q['quantize_s']} s, checked on {q['check_images']} others ({q['reason']}); the head runs on "
            f"{q.get('head_precision', '?')}.",
        ]
    if report.get("int8_accuracy"):
        out += ["", *accuracy_table(report["int8_accuracy"])]
    out += targets_lines(report["targets"])
    return "\n".join(out)


# ---- main -------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=200, help="sequential requests per latency run")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of the throughput run")
    parser.add_argument("--clients", type=int, default=8, help="client threads for throughput and memory")
    parser.add_argument("--memory-requests", type=int, default=5000)
    parser.add_argument("--memory-every", type=int, default=500, help="requests between RSS samples")
    parser.add_argument(
        "--pool", type=int, default=POOL_OVER_CACHE, help="distinct test images (> the embedding cache)"
    )
    parser.add_argument(
        "--naive-omp-wait-policy",
        default="default",
        choices=["default", "PASSIVE", "ACTIVE"],
        help="OMP_WAIT_POLICY of the naive baseline (default: unset, as a textbook server runs; "
        "PASSIVE makes eager torch about 2x slower at batch 1 on 2 cores)",
    )
    parser.add_argument(
        "--quality",
        default="balanced",
        choices=["fast", "balanced", "best"],
        help="the task's training quality (--int8 needs a frozen-backbone head over Lite0: fast)",
    )
    parser.add_argument("--int8", action="store_true", help="measure the service with its INT8 backbone")
    parser.add_argument(
        "--skip-accuracy", action="store_true", help="with --int8: skip the shared-set accuracy comparison"
    )
    parser.add_argument(
        "--batch-window-ms", type=float, default=0.0, help="the service's batching window (0: off)"
    )
    parser.add_argument(
        "--accuracy-only",
        action="store_true",
        help="only the INT8 accuracy comparison: quantize on flowers photos in-process, no service",
    )
    parser.add_argument("--skip-naive", action="store_true", help="do not run the naive baseline")
    parser.add_argument(
        "--dataset",
        default="flowers",
        choices=sorted(TASK_TYPES),
        help="the task trained: flowers (multi_class) or ages (regression; needs --skip-naive)",
    )
    parser.add_argument("--seed", type=int, default=20240601)
    parser.add_argument("--server-log-level", default="info", choices=["debug", "info", "warning", "error"])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where to write the JSON results")
    parser.add_argument("--naive-server", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--bundle", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.naive_server:
        if args.bundle is None or args.port is None:
            parser.error("--naive-server needs --bundle and --port")
        return args
    if min(args.requests, args.clients, args.memory_requests, args.memory_every) < 1 or args.duration <= 0:
        parser.error("--requests, --clients, --memory-requests and --memory-every must be 1 or more")
    if args.pool < 20:
        parser.error("--pool must be 20 or more")
    if args.dataset != "flowers" and not (args.skip_naive or args.accuracy_only):
        parser.error("the naive baseline answers classification only: --dataset ages needs --skip-naive")
    if args.dataset != "flowers" and args.int8:
        parser.error("--int8 is measured on the flowers task (its backbone is calibrated on its images)")
    return args


def embedding_cache_size() -> int:
    """The service's embedding cache (entries): ``shared_embedder``'s default."""
    import inspect

    from taskvision.backbone import shared_embedder

    return int(inspect.signature(shared_embedder).parameters["cache_size"].default)


def run(args: argparse.Namespace) -> dict[str, Any]:
    report: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine_info(),
    }
    cache_size = embedding_cache_size()
    if args.pool <= cache_size:
        logger.warning("--pool %d <= the embedding cache (%d): 'cold' runs may hit it", args.pool, cache_size)
    logger.info("making %d distinct %d px test images (not timed)", args.pool, IMAGE_SIZE)
    images, image_info = make_pool(args.pool, size=IMAGE_SIZE, seed=args.seed)
    cached, _ = make_pool(10, size=IMAGE_SIZE, seed=args.seed, start=args.pool)  # never in the pool
    if set(cached) & set(images):
        raise RuntimeError("the cached-case images are also in the pool")
    if image_info["distinct"] != len(images):  # identical photos in a data set: a few cache hits
        logger.warning("the pool has %d duplicate images", len(images) - image_info["distinct"])
    report["config"] = {
        "requests": args.requests,
        "duration_s": args.duration,
        "clients": args.clients,
        "memory_requests": args.memory_requests,
        "memory_every": args.memory_every,
        "warmup_requests": WARMUP_REQUESTS,
        "embedding_cache": cache_size,
        "server_log_level": args.server_log_level,
        "service_omp_wait_policy": "PASSIVE",
        "quality": args.quality,
        "dataset": args.dataset,
        "naive_omp_wait_policy": args.naive_omp_wait_policy,
        "images": image_info,
    }
    report["config"]["int8"] = args.int8
    report["config"]["batch_window_ms"] = args.batch_window_ms
    options = {"TASKVISION_SERVING_BATCH_WINDOW_MS": str(args.batch_window_ms)}
    if args.int8:
        options["TASKVISION_SERVING_INT8"] = "true"
    workdir = Path(tempfile.mkdtemp(prefix="taskvision-classify-bench-"))
    try:
        with running_taskvision(workdir, log_level=args.server_log_level, log_name="train.log") as trainer:
            report["training"] = build_and_train(Client(trainer), trainer, args.quality, args.dataset)
            token = trainer.token
        bundle_dir = Path(report["training"]["bundle_dir"])
        task_id = report["training"]["task_id"]
        with running_taskvision(workdir, log_level=args.server_log_level, token=token, **options) as service:
            int8_model = None
            if args.int8:
                logger.info("waiting for the service to calibrate and switch on its INT8 backbone")
                report["int8"] = wait_for_int8(service)
                int8_model = Path(report["int8"]["path"])
                logger.info("INT8 in use: %s", report["int8"]["reason"])
            logger.info("timing the pieces of one request in-process (%d images)", BREAKDOWN_IMAGES)
            report["breakdown"] = breakdown(bundle_dir, images[-BREAKDOWN_IMAGES:], int8_model=int8_model)
            logger.info("breakdown: %s", report["breakdown"]["median_ms"])
            report["service"], service_answers = measure(service, task_id, images, cached, args, memory=True)
            report["service"]["server_log"] = server_log_summary(service.log_path)
            if args.int8:
                assert int8_model is not None
                report["int8"]["head_precision"] = head_precision(bundle_dir, int8_model)
        if args.int8 and not args.skip_accuracy:
            assert int8_model is not None
            logger.info("accuracy FP32 -> INT8 on the shared photo sets (5-fold CV)")
            report["int8_accuracy"] = int8_accuracy(int8_model)
        naive_omp = None if args.naive_omp_wait_policy == "default" else args.naive_omp_wait_policy
        naive_answers: dict[int, tuple[str, float]] = {}
        if not args.skip_naive:
            with running_naive(workdir, bundle_dir, omp_wait_policy=naive_omp) as naive:
                report["naive"], naive_answers = measure(naive, task_id, images, cached, args, memory=False)
                report["naive"]["server_log"] = server_log_summary(naive.log_path)
                report["naive"]["torch_threads"] = naive.health.get("torch_threads")
                report["naive"]["omp_wait_policy"] = naive.health.get("omp_wait_policy")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    common = sorted(set(service_answers) & set(naive_answers))
    report["agreement"] = {
        "compared": len(common),
        "same_best_label": sum(service_answers[i][0] == naive_answers[i][0] for i in common),
        "max_prob_diff": round(
            max((abs(service_answers[i][1] - naive_answers[i][1]) for i in common), default=0), 4
        ),
    }
    report["disturbed_runs"] = [
        f"{server} {name}"
        for server in ("service", "naive")
        if server in report
        for name, row in [
            *report[server]["latency"].items(),
            ("throughput", report[server]["throughput"]),
            ("memory", report[server].get("memory", {})),
        ]
        if row.get("other_cpu_pct", 0) > OTHER_CPU_WARN_PCT
    ]
    if report["breakdown"]["other_cpu_pct"] > OTHER_CPU_WARN_PCT:
        report["disturbed_runs"].append("the in-process breakdown")
    report["targets"] = targets(report)
    report["load_average_at_end"] = list(os.getloadavg())
    return report


def main(argv: Sequence[str] | None = None) -> int:
    init_script()
    args = parse_args(argv)
    if args.naive_server:
        return naive_server_main(args.bundle, args.port)
    if args.accuracy_only:
        from serving.int8 import DEFAULT_CALIBRATION_IMAGES

        report = {
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "machine": machine_info(),
            **int8_accuracy_only(DEFAULT_CALIBRATION_IMAGES),
        }
        report["targets"] = accuracy_targets(report)
        write_report(report, args.out, accuracy_markdown)
        return 0 if all(t["pass"] for t in report["targets"]) else 1
    report = run(args)
    write_report(report, args.out, markdown)
    return 0 if all(t["pass"] for t in report["targets"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
