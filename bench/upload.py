"""Upload and list benchmark of the control plane, against the real service.

What is measured:

* upload throughput (images/s) and per-request latency (p50/p95/p99) of
  ``POST /recognition/v2/training-image`` with a JSON ``base64`` body, at several
  client concurrency levels. Latency runs from sending the request to having the
  201 answer (by then the server has stored the original and its thumbnail and
  committed the row). Every level uploads its own fresh images, so no upload is
  a duplicate; every answer that is not 201 counts as an error;
* latency of attaching a label (``POST .../{id}/add-label``) to a part of the images;
* list latency (p50/p95) of ``GET /recognition/v2/training-image/`` with pages of
  20 and 100 (first, middle and last page), unfiltered and filtered by the label;
* the server process's peak RSS (``VmHWM``), its CPU time per upload, and the
  size of its data directory.

The service is started as a subprocess (``taskvision serve`` from the same
virtual environment, on a free 127.0.0.1 port, with a fresh temporary data
directory that is deleted afterwards). Client and server share the machine, so
the figures are those of one box running both. The test images are JPEGs of
about 512x384 px made in memory from a seeded RNG; making them is not timed.

Run it by hand (not collected by pytest)::

    .venv/bin/python bench/upload.py [--images 1000] [--concurrency 1,4,8] [--size 512]

``--images`` is the number of images uploaded *per concurrency level*. The
results are printed as Markdown tables on stdout and written as JSON to
``--out`` (default ``bench/results/upload.json``); progress goes to stderr.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import json
import logging
import math
import random
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import requests
from _common import (
    API,
    REPO_ROOT,
    Client,
    Service,
    expect,
    init_script,
    latency_summary,
    machine_info,
    proc_cpu_seconds,
    proc_status,
    random_boxes,
    running_service,
    server_env,
    server_log_summary,
    smooth_field,
    write_report,
)
from PIL import ImageDraw

logger = logging.getLogger("bench.upload")

DEFAULT_OUT = REPO_ROOT / "bench" / "results" / "upload.json"
WARMUP_IMAGES = 10


# ---- test images ------------------------------------------------------------


@dataclass(frozen=True)
class BenchImage:
    """One generated image, ready to send: its request body and the hash of its bytes."""

    body: bytes
    sha256: str
    jpeg_bytes: int


def make_jpeg(rng: random.Random, *, width: int, height: int) -> bytes:
    """A photo-like JPEG: a smooth random colour field with random shapes on top."""
    img = smooth_field(rng, width, height)
    draw = ImageDraw.Draw(img)
    for box, colour in random_boxes(rng, width, height):
        shape = rng.choice(("rectangle", "ellipse", "line"))
        if shape == "rectangle":
            draw.rectangle(box, fill=colour)
        elif shape == "ellipse":
            draw.ellipse(box, fill=colour)
        else:
            draw.line(box, fill=colour, width=rng.randint(1, 12))
    out = io.BytesIO()
    img.save(out, format="JPEG", quality=rng.randint(80, 92))
    return out.getvalue()


def make_images(count: int, *, seed: int, width: int, height: int, tag: str) -> list[BenchImage]:
    """``count`` distinct images as pre-serialized upload bodies (so the client sends, not encodes)."""
    rng = random.Random(seed)
    images: list[BenchImage] = []
    seen: set[str] = set()
    while len(images) < count:
        data = make_jpeg(rng, width=width, height=height)
        digest = hashlib.sha256(data).hexdigest()
        if digest in seen:  # practically impossible, but a duplicate would not be a fresh upload
            continue
        seen.add(digest)
        body = {
            "base64": base64.b64encode(data).decode("ascii"),
            "noresize": False,
            "test_image": False,
            "meta_data": {"bench": tag, "index": len(images)},
        }
        images.append(BenchImage(body=json.dumps(body).encode(), sha256=digest, jpeg_bytes=len(data)))
    return images


# ---- the server under test ----------------------------------------------------


@contextmanager
def running_server(*, log_level: str) -> Iterator[Service]:
    """Start the service on a fresh data dir; always stop it and delete the dir."""
    workdir = Path(tempfile.mkdtemp(prefix="taskvision-bench-"))
    try:
        with running_service(
            data_dir=workdir / "data", log_path=workdir / "server.log", env=server_env(), log_level=log_level
        ) as server:
            yield server
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def dir_size(root: Path) -> dict[str, int]:
    """Apparent bytes of the database files, original images and thumbnails, and the file count."""
    sizes = {"database_bytes": 0, "images_bytes": 0, "thumbs_bytes": 0, "other_bytes": 0, "files": 0}
    for path in root.rglob("*"):
        if not path.is_file():
            continue
        size = path.stat().st_size
        sizes["files"] += 1
        relative = path.relative_to(root).parts
        if path.name.startswith("taskvision.db"):
            sizes["database_bytes"] += size
        elif relative[:2] == ("blobs", "images"):
            sizes["images_bytes"] += size
        elif relative[:2] == ("blobs", "thumbs"):
            sizes["thumbs_bytes"] += size
        else:
            sizes["other_bytes"] += size
    sizes["total_bytes"] = sum(v for k, v in sizes.items() if k.endswith("_bytes"))
    return sizes


# ---- timed requests -------------------------------------------------------------


@dataclass
class TimedCall:
    seconds: float
    status: int  # 0 when the request itself failed (connection error, timeout)
    image_id: str | None = None
    error: str | None = None


def _timed(call: Callable[[], requests.Response], expected: int) -> TimedCall:
    start = time.perf_counter()
    try:
        response = call()
    except requests.RequestException as exc:
        return TimedCall(time.perf_counter() - start, 0, error=repr(exc))
    elapsed = time.perf_counter() - start
    if response.status_code != expected:
        return TimedCall(elapsed, response.status_code, error=response.text[:300])
    image_id = response.json().get("id") if response.status_code == 201 else None
    return TimedCall(elapsed, response.status_code, image_id=image_id)


def run_concurrently(
    calls: Sequence[Callable[[], TimedCall]], concurrency: int
) -> tuple[list[TimedCall], float]:
    """Run ``calls`` on ``concurrency`` threads; the results in order, and the wall time."""
    pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="bench")
    try:
        start = time.perf_counter()
        results = list(pool.map(lambda call: call(), calls))
        wall = time.perf_counter() - start
    except BaseException:
        # On Ctrl-C, drop the queued requests instead of sending them all before stopping.
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()
    return results, wall


# ---- phases -----------------------------------------------------------------


@dataclass
class UploadResult:
    concurrency: int
    images: int
    ok: int
    errors: int
    status_counts: dict[str, int]
    wall_s: float
    images_per_s: float
    latency_ms: dict[str, float]
    server_cpu_ms_per_image: float
    first_errors: list[str] = field(default_factory=list)


def upload_images(
    client: Client, images: Sequence[BenchImage], *, concurrency: int, pid: int
) -> tuple[UploadResult, list[str]]:
    """Upload ``images`` with ``concurrency`` client threads; the result and the new image ids."""
    path = f"{API}/training-image/"
    calls = [partial(_timed, partial(client.post_raw, path, image.body), 201) for image in images]
    cpu_before = proc_cpu_seconds(pid)
    results, wall = run_concurrently(calls, concurrency)
    cpu_used = proc_cpu_seconds(pid) - cpu_before
    ok = [r for r in results if r.status == 201]
    failed = [r for r in results if r.status != 201]
    result = UploadResult(
        concurrency=concurrency,
        images=len(images),
        ok=len(ok),
        errors=len(failed),
        status_counts={str(k): v for k, v in sorted(Counter(r.status for r in results).items())},
        wall_s=round(wall, 3),
        images_per_s=round(len(ok) / wall, 2) if wall else math.nan,
        latency_ms=latency_summary([r.seconds for r in results]),
        server_cpu_ms_per_image=round(cpu_used * 1000 / len(images), 2) if images else math.nan,
        first_errors=[f"{r.status}: {r.error}" for r in failed[:5]],
    )
    return result, [r.image_id for r in ok if r.image_id]


def create_label(client: Client) -> str:
    """A categorization task with one label; the label's id."""
    task_body = {"name": "bench task", "type": "multi_class"}
    task = expect(client.post(f"{API}/task/", task_body), 201, "create task")
    label_body = {"name": "bench label", "type": "category"}
    label = expect(client.post(f"{API}/label/", label_body), 201, "create label")
    link = client.post(f"{API}/task/{task['id']}/add-label", {"label_id": label["id"]})
    expect(link, 200, "add the label to the task")
    label_id: str = label["id"]
    return label_id


def attach_label(
    client: Client, image_ids: Sequence[str], label_id: str, *, concurrency: int
) -> dict[str, Any]:
    """Attach ``label_id`` to every image of ``image_ids``; latency and errors."""
    payload = {"label_id": label_id}
    calls = [
        partial(_timed, partial(client.post, f"{API}/training-image/{image_id}/add-label", payload), 200)
        for image_id in image_ids
    ]
    results, wall = run_concurrently(calls, concurrency)
    errors = [r for r in results if r.status != 200]
    return {
        "images": len(image_ids),
        "concurrency": concurrency,
        "errors": len(errors),
        "first_errors": [f"{r.status}: {r.error}" for r in errors[:5]],
        "wall_s": round(wall, 3),
        "requests_per_s": round(len(results) / wall, 2) if wall else math.nan,
        "latency_ms": latency_summary([r.seconds for r in results]),
    }


def measure_lists(
    client: Client, *, label_id: str, expected_total: int, expected_labelled: int, repeats: int
) -> list[dict[str, Any]]:
    """Latency of the first, a middle and the last page, for two page sizes, with and without a filter."""
    path = f"{API}/training-image/"
    rows: list[dict[str, Any]] = []
    for filter_name, extra, expected in (
        ("none", {}, expected_total),
        ("label", {"labels": label_id}, expected_labelled),
    ):
        for page_size in (20, 100):
            pages = max(1, math.ceil(expected / page_size))
            for position, page in (("first", 1), ("middle", max(1, (pages + 1) // 2)), ("last", pages)):
                params = {"page": page, "page_size": page_size, **extra}
                first = expect(client.get(path, params), 200, f"list {params}")  # warm-up, and a check
                if first["count"] != expected:
                    raise RuntimeError(f"list {params}: count {first['count']}, expected {expected}")
                want = min(page_size, expected - (page - 1) * page_size)
                if len(first["results"]) != want:
                    raise RuntimeError(f"list {params}: {len(first['results'])} results, expected {want}")
                timings: list[float] = []
                errors = 0
                for _ in range(repeats):
                    call = _timed(partial(client.get, path, params), 200)
                    timings.append(call.seconds)
                    errors += call.status != 200
                summary = latency_summary(timings)
                rows.append(
                    {
                        "filter": filter_name,
                        "page_size": page_size,
                        "position": position,
                        "page": page,
                        "count": expected,
                        "repeats": repeats,
                        "errors": errors,
                        "latency_ms": {"p50": summary["p50"], "p95": summary["p95"], "max": summary["max"]},
                    }
                )
                logger.info(
                    "list filter=%s page_size=%d page=%d: p50 %.1f ms, p95 %.1f ms",
                    filter_name,
                    page_size,
                    page,
                    summary["p50"],
                    summary["p95"],
                )
    return rows


# ---- report -----------------------------------------------------------------


def markdown(report: dict[str, Any]) -> str:
    """The report as Markdown tables."""
    cfg, machine = report["config"], report["machine"]
    commit = f"{machine['git_commit']}{' (dirty)' if machine['git_dirty'] else ''}"
    load = ", ".join(f"{x:.2f}" for x in machine["load_average_at_start"])
    out = [
        f"## Upload benchmark ({report['date']})",
        "",
        f"{machine['nproc']} CPUs ({machine['cpu_model']}), load average at start {load}, "
        f"Python {machine['python']}, commit {commit}; "
        f"{cfg['images_per_level']} images of {cfg['width']}x{cfg['height']} "
        f"(mean JPEG {cfg['mean_jpeg_kib']} KiB) per level; client and server on the same machine.",
        "",
        "| concurrency | images | errors | images/s | p50 ms | p95 ms | p99 ms | server CPU ms/image |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in report["upload"]:
        lat = row["latency_ms"]
        out.append(
            f"| {row['concurrency']} | {row['images']} | {row['errors']} | {row['images_per_s']} | "
            f"{lat['p50']} | {lat['p95']} | {lat['p99']} | {row['server_cpu_ms_per_image']} |"
        )
    attach = report["label_attach"]
    out += [
        "",
        f"add-label on {attach['images']} images (concurrency {attach['concurrency']}): "
        f"{attach['requests_per_s']} req/s, p50 {attach['latency_ms']['p50']} ms, "
        f"p95 {attach['latency_ms']['p95']} ms, {attach['errors']} errors.",
        "",
        "| list filter | page size | page | of count | p50 ms | p95 ms | errors |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in report["list"]:
        out.append(
            f"| {row['filter']} | {row['page_size']} | {row['page']} ({row['position']}) | {row['count']} | "
            f"{row['latency_ms']['p50']} | {row['latency_ms']['p95']} | {row['errors']} |"
        )
    srv, disk = report["server"], report["data_dir"]
    mib = 1024 * 1024
    out += [
        "",
        "| server resource | value |",
        "|---|---:|",
        f"| peak RSS after uploads (VmHWM) | {srv['peak_rss_after_uploads_mib']} MiB |",
        f"| peak RSS at the end (VmHWM) | {srv['peak_rss_mib']} MiB |",
        f"| RSS at the end (VmRSS) | {srv['rss_at_end_mib']} MiB |",
        f"| images stored | {report['images_stored']} |",
        f"| data dir total | {disk['total_bytes'] / mib:.1f} MiB ({disk['files']} files) |",
        f"| of which database | {disk['database_bytes'] / mib:.1f} MiB |",
        f"| of which originals | {disk['images_bytes'] / mib:.1f} MiB |",
        f"| of which thumbnails | {disk['thumbs_bytes'] / mib:.1f} MiB |",
        f"| server log: errors / tracebacks / 5xx | {report['server_log']['error_lines']} / "
        f"{report['server_log']['tracebacks']} / {report['server_log']['http_5xx']} |",
    ]
    return "\n".join(out)


# ---- main -------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=1000, help="images uploaded per concurrency level")
    parser.add_argument("--concurrency", default="1,4,8", help="comma-separated client thread counts")
    parser.add_argument("--size", type=int, default=512, help="image width in px (height is 3/4 of it)")
    parser.add_argument("--label-every", type=int, default=4, help="label one image in this many")
    parser.add_argument("--list-repeats", type=int, default=50, help="timed requests per list query")
    parser.add_argument("--seed", type=int, default=20240601)
    parser.add_argument("--server-log-level", default="info", choices=["debug", "info", "warning", "error"])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where to write the JSON results")
    args = parser.parse_args(argv)
    try:
        args.levels = [int(part) for part in args.concurrency.split(",") if part.strip()]
    except ValueError:
        parser.error(f"--concurrency must be comma-separated integers, not {args.concurrency!r}")
    if not args.levels or min(args.levels) < 1:
        parser.error("--concurrency needs at least one level, each 1 or more")
    if args.images < 1 or args.size < 16 or args.label_every < 1 or args.list_repeats < 1:
        parser.error("--images, --label-every and --list-repeats must be 1 or more, --size 16 or more")
    return args


def run(args: argparse.Namespace) -> dict[str, Any]:
    width, height = args.size, args.size * 3 // 4
    report: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "config": {
            "images_per_level": args.images,
            "concurrency": args.levels,
            "width": width,
            "height": height,
            "label_every": args.label_every,
            "list_repeats": args.list_repeats,
            "seed": args.seed,
            "server_log_level": args.server_log_level,
            "warmup_images": WARMUP_IMAGES,
        },
    }
    with running_server(log_level=args.server_log_level) as server:
        client = Client(server)
        pid = server.process.pid
        # Warm-up: first-request costs (imports, connection setup, SQLite caches) are not what we measure.
        warmup = make_images(WARMUP_IMAGES, seed=args.seed - 1, width=width, height=height, tag="warmup")
        warm_result, all_ids = upload_images(client, warmup, concurrency=1, pid=pid)
        if warm_result.errors:
            raise RuntimeError(f"warm-up uploads failed: {warm_result.first_errors}")
        uploads: list[UploadResult] = []
        jpeg_sizes: list[int] = []
        for index, level in enumerate(args.levels):
            logger.info("generating %d images of %dx%d for concurrency %d", args.images, width, height, level)
            images = make_images(
                args.images, seed=args.seed + index, width=width, height=height, tag=f"c{level}"
            )
            jpeg_sizes += [image.jpeg_bytes for image in images]
            logger.info("uploading %d images with %d client threads", len(images), level)
            result, ids = upload_images(client, images, concurrency=level, pid=pid)
            uploads.append(result)
            all_ids += ids
            logger.info(
                "concurrency %d: %.1f images/s, p50 %.1f ms, p99 %.1f ms, %d errors",
                level,
                result.images_per_s,
                result.latency_ms["p50"],
                result.latency_ms["p99"],
                result.errors,
            )
            del images
        report["config"]["mean_jpeg_kib"] = round(sum(jpeg_sizes) / len(jpeg_sizes) / 1024, 1)
        report["upload"] = [asdict(u) for u in uploads]
        peak_after_uploads = proc_status(pid)["VmHWM"]

        label_id = create_label(client)
        labelled = all_ids[:: args.label_every]
        logger.info("attaching a label to %d of %d images", len(labelled), len(all_ids))
        report["label_attach"] = attach_label(client, labelled, label_id, concurrency=4)

        logger.info("timing list pages (%d requests per query)", args.list_repeats)
        report["images_stored"] = len(all_ids)
        report["list"] = measure_lists(
            client,
            label_id=label_id,
            expected_total=len(all_ids),
            expected_labelled=len(labelled) - report["label_attach"]["errors"],
            repeats=args.list_repeats,
        )
        memory = proc_status(pid)
        report["server"] = {
            "pid": pid,
            "peak_rss_after_uploads_mib": round(peak_after_uploads / 1024, 1),
            "peak_rss_mib": round(memory["VmHWM"] / 1024, 1),
            "rss_at_end_mib": round(memory["VmRSS"] / 1024, 1),
        }
        report["data_dir"] = dir_size(server.data_dir)
        report["server_log"] = server_log_summary(server.log_path, mid_line_errors=False, count_warnings=True)
    return report


def main(argv: Sequence[str] | None = None) -> int:
    init_script()
    args = parse_args(argv)
    report = run(args)
    write_report(report, args.out, markdown)
    errors = sum(u["errors"] for u in report["upload"]) + report["label_attach"]["errors"]
    errors += sum(row["errors"] for row in report["list"])
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
