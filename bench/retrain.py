"""Retrain benchmark: how long a retrain takes, request -> production, after adding 0, 10 or 100 images.

A user improves a model in a loop (fix a label, add a few images, retrain), so
what matters is the retrain of a task that has trained before, not the first
training. For each pipeline runner (``warm``: the embedded warm worker, the
default; ``kfp-local``: the real KFP pipeline with each step in a subprocess),
in the same run and on the same photos:

1. a fresh service (its own data directory and ONNX export cache), the
   ``flowers`` set (600 photos, 5 labels) uploaded and trained once (not timed:
   the first training embeds every photo);
2. retrains, each timed from the train request until the new version is the
   task's production version: with nothing new, then after adding 10 new
   images, then 100 more (new images: mirrored, cropped copies of the set's
   photos, so each needs embedding), each ``--repeats`` times for the
   nothing-new case.

Run: ``.venv/bin/python bench/retrain.py [--dataset flowers] [--quality fast] [--runners warm,kfp-local]
[--code PATH] [--out bench/results/retrain.json]``. ``--code`` runs the services on another checkout
(a ``git worktree`` of an older commit: the same-run baseline). A regression set (``ages``) gets
its new images' values, and each retrain's test MAE is recorded.
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import statistics
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from _common import REPO_ROOT, Client, init_script, machine_info, write_report
from PIL import Image
from train import (
    Dataset,
    TrainOutcome,
    load_dataset,
    loadavg,
    running_server,
    train_and_wait,
    upload_all,
    upload_dataset,
)

logger = logging.getLogger("bench.retrain")

RUNNERS = ("warm", "kfp-local")
TARGET_S = 3.0  # issue 13: a retrain with <= 10 new images


def new_images(
    dataset: Dataset, count: int, offset: int
) -> list[tuple[bytes, tuple[str, ...], float | None]]:
    """``count`` images the service has not seen: mirrored, centre-cropped copies of the set's photos
    (with the photo's value, for a regression set)."""
    jobs = []
    for k in range(count):
        item = dataset.items[(offset + k * 7) % len(dataset.items)]
        with Image.open(item.path) as source:
            image = source.convert("RGB").transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        w, h = image.size
        dx, dy = int(w * 0.05) + (offset + k) % 3, int(h * 0.05)
        out = io.BytesIO()
        image.crop((dx, dy, w - dx, h - dy)).save(out, format="JPEG", quality=90)
        jobs.append((out.getvalue(), item.labels, item.value))
    return jobs


def bench_runner(runner: str, dataset: Dataset, workdir: Path, args: argparse.Namespace) -> dict[str, Any]:
    os.environ["TASKVISION_PIPELINE_RUNNER"] = runner  # server_env copies this process's environment
    params = {"quality": args.quality}
    with running_server(workdir, runner, code=args.code, log_level="warning") as server:
        client = Client(server)
        built = upload_dataset(client, dataset, runner)
        first = train_and_wait(client, server, built.task_id, params=params)
        logger.info("%s: first training %.1f s, chose %s", runner, first.seconds, _chosen(first))
        retrains: list[dict[str, Any]] = []
        added = 0
        for new in [0] * args.repeats + [10, 100]:
            if new:
                upload_all(client, built, new_images(dataset, new, offset=added))
                added += new
            load = loadavg()
            outcome = train_and_wait(client, server, built.task_id, params=params)
            retrains.append(
                {
                    "new_images": new,
                    "images": len(dataset.items) + added,
                    "request_to_production_s": outcome.seconds,
                    "accuracy": outcome.metrics.get("accuracy"),
                    "mae": outcome.metrics.get("mae"),  # regression
                    "chosen": _chosen(outcome),
                    # Refitted the previous version's choice (no new model selection), or chose anew.
                    "refitted_choice": bool(outcome.bundle_selection.get("reused")),
                    "steps": outcome.steps,
                    "load_average_before": load,
                }
            )
            logger.info("%s: retrain with %d new images: %.2f s", runner, new, outcome.seconds)
    return {
        "runner": runner,
        "first_training_s": first.seconds,
        "first_training_chose": _chosen(first),
        "first_training_metrics": {
            k: first.metrics.get(k) for k in ("accuracy", "mae") if k in first.metrics
        },
        "retrains": retrains,
    }


def _commit(code: Path) -> str:
    """The short commit the checkout at ``code`` is at ('+dirty' with uncommitted changes)."""
    import subprocess

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(code), *args], capture_output=True, text=True).stdout.strip()

    return git("rev-parse", "--short", "HEAD") + ("+dirty" if git("status", "--porcelain") else "")


def _chosen(outcome: TrainOutcome) -> str:
    return str(outcome.bundle_selection.get("chosen", ""))


def summary(result: dict[str, Any]) -> dict[str, float]:
    by_new: dict[int, list[float]] = {}
    for row in result["retrains"]:
        by_new.setdefault(row["new_images"], []).append(row["request_to_production_s"])
    return {f"new_{n}_median_s": round(statistics.median(v), 2) for n, v in sorted(by_new.items())}


def markdown(report: dict[str, Any]) -> str:
    results = {r["runner"]: r for r in report["runners"]}
    medians = {runner: summary(result) for runner, result in results.items()}
    runners = list(medians)
    lines = [
        f"Retrain of a {report['images']}-image task ({report['dataset']}, quality `{report['quality']}`, "
        f"code {report['code_commit']}), request -> production, median seconds:",
        "",
        "| new images | " + " | ".join(runners) + (" | ratio |" if len(runners) == 2 else " |"),
        "|---:|" + "---:|" * (len(runners) + (len(runners) == 2)),
    ]
    for key in medians[runners[0]]:
        cells = [f"{medians[runner][key]:.2f}" for runner in runners]
        if len(runners) == 2:
            cells.append(f"{medians[runners[1]][key] / medians[runners[0]][key]:.1f}x")
        lines.append(f"| {key.split('_')[1]} | " + " | ".join(cells) + " |")
    lines.append("")
    lines += [
        f"First training (every photo embedded), {runner}: {result['first_training_s']:.1f} s "
        f"(chose {result['first_training_chose']})."
        for runner, result in results.items()
    ]
    first = medians[runners[0]]
    lines.append(
        f"Target: <= {TARGET_S:.0f} s with <= 10 new images ({runners[0]}): "
        + ("met" if max(first["new_0_median_s"], first["new_10_median_s"]) <= TARGET_S else "NOT met")
        + "."
    )
    return "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dataset", default="flowers")
    parser.add_argument("--quality", default="fast", choices=("fast", "balanced", "best"))
    parser.add_argument("--repeats", type=int, default=3, help="retrains with nothing new, per runner")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "results" / "retrain.json")
    parser.add_argument(
        "--runners", default=",".join(RUNNERS), help=f"comma-separated, of {', '.join(RUNNERS)}"
    )
    parser.add_argument(
        "--code",
        type=Path,
        default=REPO_ROOT,
        help="the checkout whose code the services run (e.g. a git worktree of an older commit)",
    )
    args = parser.parse_args(argv)
    args.runners = [r for r in args.runners.split(",") if r]
    if not args.runners or any(r not in RUNNERS for r in args.runners):
        parser.error(f"--runners: choose from {', '.join(RUNNERS)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    init_script()
    args = parse_args(argv)
    dataset = load_dataset(args.dataset)
    report: dict[str, Any] = {
        "machine": machine_info(),
        "dataset": args.dataset,
        "images": len(dataset.items),
        "quality": args.quality,
        "code": str(args.code),
        "code_commit": _commit(args.code),
        "runners": [],
    }
    with tempfile.TemporaryDirectory(prefix="bench-retrain-") as tmp:
        for runner in args.runners:
            report["runners"].append(bench_runner(runner, dataset, Path(tmp), args))
    report["machine"]["load_average_at_end"] = loadavg()
    write_report(report, args.out, markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
