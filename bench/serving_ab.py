"""Two checkouts' servers side by side on one many-task data directory, requests alternated in rounds.

``bench/serving_scale.py`` measures one server at a time, and this machine's
speed drifts by more than a change is worth between two runs minutes apart.
Here both servers (``taskvision serve`` with ``PYTHONPATH=<checkout>``, INT8
on unless ``--fp32``) run at once on one data directory made like
``serving_scale``'s (``--tasks`` imported heads of 2 to 20 labels, and the
stored photos INT8 is calibrated on), so the drift reaches both alike:

1. warm-up: each server answers ``--warm`` random tasks once (one 512 px photo
   each, from a pool larger than the embedding cache), so both hold about as
   many heads as their memory budget allows;
2. ``--rounds`` rounds of ``--requests`` sequential requests to random tasks of
   all ``--tasks``, one server then the other (the order swapped every round).

Reported per side: each round's client p50 and server processing p50, and
their medians over the rounds after the first (whose images may still be in
a server's embedding cache from the warm-up); and the ratio.

Run by hand::

    git worktree add /tmp/serving-before d7286c2
    .venv/bin/python bench/serving_ab.py --before /tmp/serving-before [--after .]
        [--tasks 10000] [--out bench/results/serving_ab.json]
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import statistics
import sys
import tempfile
from contextlib import ExitStack
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from _common import REPO_ROOT, Client, init_script, machine_info, wait_for_int8, write_report
from serving_scale import POOL, Images, classify, image_pool, make_tasks, serving, summary

logger = logging.getLogger("bench.serving_ab")

DEFAULT_OUT = REPO_ROOT / "bench" / "results" / "serving_ab.json"


def run(args: argparse.Namespace) -> dict[str, Any]:
    sides = {"before": args.before.resolve(), "after": args.after.resolve()}
    report: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "config": {
            **{k: v for k, v in vars(args).items() if k not in ("before", "after", "out")},
            "sides": {side: str(src) for side, src in sides.items()},
        },
    }
    env = {"TASKVISION_SERVING_MEMORY_MB": str(args.memory_mb)}
    if not args.fp32:
        env["TASKVISION_SERVING_INT8"] = "true"
    with tempfile.TemporaryDirectory(prefix="taskvision-serving-ab-") as workdir:
        images = Images(image_pool(POOL, args.seed))
        data = Path(workdir) / "data"
        tasks = make_tasks(data, args.tasks, seed=args.seed, training_images=0 if args.fp32 else 300)
        rng = random.Random(args.seed)
        with ExitStack() as stack:
            servers = {
                side: stack.enter_context(
                    serving(side, src, data, tasks.token, Path(workdir) / f"{side}.log", **env)
                )
                for side, src in sides.items()
            }
            clients = {side: Client(server) for side, server in servers.items()}
            for side, server in servers.items():
                if not args.fp32:
                    report.setdefault("int8", {})[side] = wait_for_int8(server)
                logger.info("%s: warming up on %d random tasks", side, args.warm)
                for task in rng.sample(tasks.ids, min(args.warm, len(tasks.ids))):
                    classify(clients[side], task, images.take())
            rounds: dict[str, list[dict[str, float]]] = {side: [] for side in sides}
            for r in range(args.rounds):
                for side in list(sides) if r % 2 == 0 else list(reversed(sides)):
                    calls = [
                        classify(clients[side], rng.choice(tasks.ids), images.take())
                        for _ in range(args.requests)
                    ]
                    figures = summary(calls)
                    rounds[side].append(
                        {
                            "p50_ms": figures["latency_ms"]["p50"],
                            "server_p50_ms": figures["server_processing_ms_p50"],
                            "errors": figures["errors"],
                        }
                    )
                    logger.info("round %d, %s: %s", r, side, rounds[side][-1])
    report["rounds"] = rounds
    report["summary"] = {
        side: {
            "p50_ms": round(statistics.median(r["p50_ms"] for r in done[1:]), 2),
            "server_p50_ms": round(statistics.median(r["server_p50_ms"] for r in done[1:]), 2),
            "errors": sum(r["errors"] for r in done),
        }
        for side, done in rounds.items()
    }
    before, after = report["summary"]["before"], report["summary"]["after"]
    report["ratio"] = round(before["p50_ms"] / after["p50_ms"], 2)
    report["load_average_at_end"] = list(os.getloadavg())
    return report


def markdown(report: dict[str, Any]) -> str:
    config = report["config"]
    lines = [
        f"## Serving A/B ({report['date']})",
        "",
        f"{config['tasks']} tasks, {config['rounds']} rounds of {config['requests']} requests to random "
        f"tasks, alternated; {'FP32' if config['fp32'] else 'INT8'}; "
        f"commit {report['machine']['git_commit']}.",
        "",
        "| round | " + " | ".join(f"{side} p50 (server)" for side in report["rounds"]) + " |",
        "|---|" + "---:|" * len(report["rounds"]),
    ]
    sides = list(report["rounds"])
    for i in range(len(report["rounds"][sides[0]])):
        cells = [
            f"{report['rounds'][s][i]['p50_ms']} ms ({report['rounds'][s][i]['server_p50_ms']})"
            for s in sides
        ]
        lines.append(f"| {i} | " + " | ".join(cells) + " |")
    summary = report["summary"]
    cells = [f"**{summary[s]['p50_ms']} ms** ({summary[s]['server_p50_ms']})" for s in sides]
    lines += [
        "| median of rounds 1- | " + " | ".join(cells) + " |",
        "",
        f"before / after: {report['ratio']}x",
    ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--before", type=Path, required=True, help="a checkout of the code before")
    parser.add_argument("--after", type=Path, default=REPO_ROOT, help="a checkout of the code after")
    parser.add_argument("--tasks", type=int, default=10_000)
    parser.add_argument("--warm", type=int, default=3000, help="random tasks each server answers first")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--requests", type=int, default=300, help="sequential requests per round and side")
    parser.add_argument("--memory-mb", type=float, default=256.0, help="TASKVISION_SERVING_MEMORY_MB")
    parser.add_argument("--fp32", action="store_true", help="serve with the FP32 backbone (default INT8)")
    parser.add_argument("--seed", type=int, default=15)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    init_script()
    args = parse_args(argv)
    write_report(run(args), args.out, markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
