"""Batching across requests, A/B: the same server with and without a batching window, alternated.

One data directory with ``--tasks`` imported tasks (as ``bench/serving_scale.py``
makes them); ``taskvision serve`` is started once per round and window
(``TASKVISION_SERVING_BATCH_WINDOW_MS``: 0 and each ``--windows`` value, in
turn, ``--rounds`` times, so that a change in the machine's load hits every
setting alike). Each start measures:

* one client, one 512 px image a request on a random task: latency p50/p95
  (what a lone request pays for the window);
* ``--clients`` clients for ``--duration`` s: images/s and p50.

Medians over the rounds decide: batching is worth turning on only if it
raises throughput without raising the lone request's latency.

Run by hand: ``.venv/bin/python bench/batching.py [--windows 2 5 10] [--rounds 3]``.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import shutil
import statistics
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from _common import REPO_ROOT, Client, OtherCpu, init_script, latency_summary, machine_info, write_report
from serving_scale import Images, classify, image_pool, make_tasks, serving

logger = logging.getLogger("bench.batching")
DEFAULT_OUT = REPO_ROOT / "bench" / "results" / "batching.json"


def one_start(server: Any, ids: list[str], images: Images, args: argparse.Namespace) -> dict[str, Any]:
    client = Client(server)
    rng = random.Random(args.seed)
    for _ in range(10):
        classify(client, rng.choice(ids), images.take())
    with OtherCpu([server.process.pid]) as lone_other:
        lone = [classify(client, rng.choice(ids), images.take()) for _ in range(args.requests)]
    deadline = time.perf_counter() + args.duration

    def worker(seed: int) -> list[Any]:
        own = random.Random(seed)
        done = []
        while time.perf_counter() < deadline:
            done.append(classify(client, own.choice(ids), images.take()))
        return done

    started = time.perf_counter()
    with OtherCpu([server.process.pid]) as load_other, ThreadPoolExecutor(args.clients) as pool:
        calls = [c for f in [pool.submit(worker, i) for i in range(args.clients)] for c in f.result()]
    wall = time.perf_counter() - started
    return {
        "lone_ms": latency_summary([c.seconds for c in lone if c.ok]),
        "lone_errors": sum(not c.ok for c in lone),
        "images_per_s": round(sum(c.ok for c in calls) / wall, 1),
        "loaded_ms": latency_summary([c.seconds for c in calls if c.ok]),
        "errors": sum(not c.ok for c in calls),
        "other_cpu_pct": [lone_other.pct, load_other.pct],
        "load_average": list(os.getloadavg()),
    }


def markdown(report: dict[str, Any]) -> str:
    out = [
        f"## Batching across requests ({report['date']})",
        "",
        f"{report['config']['clients']} clients for {report['config']['duration_s']:.0f} s and "
        f"{report['config']['requests']} lone requests per start, {report['config']['rounds']} rounds; "
        f"medians over the rounds.",
        "",
        "| window ms | lone p50 ms | lone p95 ms | images/s | p50 ms under load | other CPU % |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for window, row in report["summary"].items():
        out.append(
            f"| {window} | {row['lone_p50']} | {row['lone_p95']} | {row['images_per_s']} | "
            f"{row['loaded_p50']} | {row['other_cpu_pct']} |"
        )
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    init_script()
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--windows", type=float, nargs="+", default=[2.0, 5.0, 10.0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tasks", type=int, default=50)
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--duration", type=float, default=20.0)
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    report: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine_info(),
    }
    report["config"] = {k: v for k, v in vars(args).items() if k != "out"} | {"duration_s": args.duration}
    workdir = Path(tempfile.mkdtemp(prefix="taskvision-batching-bench-"))
    windows = [0.0, *args.windows]
    runs: dict[str, list[dict[str, Any]]] = {str(w): [] for w in windows}
    try:
        images = Images(image_pool(600, args.seed))
        tasks = make_tasks(workdir / "data", args.tasks, seed=args.seed)
        for round_ in range(args.rounds):
            for window in windows:
                env = {"TASKVISION_SERVING_BATCH_WINDOW_MS": str(window)}
                with serving(
                    "new", REPO_ROOT, workdir / "data", tasks.token, workdir / "server.log", **env
                ) as server:
                    row = one_start(server, tasks.ids, images, args)
                runs[str(window)].append(row)
                logger.info("round %d, window %s ms: %s", round_ + 1, window, row)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    report["runs"] = runs
    report["summary"] = {
        window: {
            "lone_p50": statistics.median(r["lone_ms"]["p50"] for r in rows),
            "lone_p95": statistics.median(r["lone_ms"]["p95"] for r in rows),
            "images_per_s": statistics.median(r["images_per_s"] for r in rows),
            "loaded_p50": statistics.median(r["loaded_ms"]["p50"] for r in rows),
            "errors": sum(r["errors"] + r["lone_errors"] for r in rows),
            "other_cpu_pct": statistics.median(max(r["other_cpu_pct"]) for r in rows),
        }
        for window, rows in runs.items()
    }
    write_report(report, args.out, markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
