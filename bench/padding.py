"""Static padding: the backbone exported with its padding folded into the convolutions, against before.

Each backbone (``--backbones``, default Lite0, the one served) is exported
twice in this run, into a temporary folder:

* **before**: :func:`taskvision.backbone.export_onnx` with ``fold_padding=False``,
  the way it exported until now: TensorFlow-style padding worked out from the
  input's shape at run time, a ``Pad`` before each stride-2 convolution;
* **now**: :func:`taskvision.backbone.export_onnx` as it exports by default,
  the padding made static and folded into the convolutions
  (:mod:`taskvision.static_padding`).

Both are quantized to INT8 the way the server does it
(:func:`taskvision.quantize.quantize_onnx`, calibrated on the same
``--calibration`` flowers photos). Then, on ``--check`` other flowers photos
(preprocessed as serving does): the largest difference between the two
exports' embeddings (FP32 and INT8), and the time of one image and of a batch
of 8 through each model with the server's two sessions (all cores; one
thread), the models taken in turn call by call so that the machine's drift
hits all of them alike. Reported: medians in ms, and before/now ratios.

Run by hand::

    .venv/bin/python bench/padding.py [--rounds 300] [--out bench/results/padding.json]
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from _common import DATASETS_ROOT, REPO_ROOT, OtherCpu, init_script, machine_info, write_report

sys.path.insert(0, str(REPO_ROOT))

logger = logging.getLogger("bench.padding")

DEFAULT_OUT = REPO_ROOT / "bench" / "results" / "padding.json"


def photos(backbone_id: str, count: int, skip: int = 0) -> np.ndarray:
    from taskvision import backbone
    from taskvision.preprocess import preprocess_bytes

    config = backbone.backbone_spec(backbone_id).preprocess
    files = sorted((DATASETS_ROOT / "flowers" / "images").glob("*.jpg"))[skip : skip + count]
    if len(files) < count:
        raise SystemExit(f"needs {skip + count} flowers photos in {DATASETS_ROOT / 'flowers' / 'images'}")
    return np.stack([preprocess_bytes(f.read_bytes(), max_pixels=10**8, config=config)[0] for f in files])


def measure(backbone_id: str, workdir: Path, args: argparse.Namespace) -> dict[str, Any]:
    import onnx

    from taskvision import backbone, quantize

    paths = {"fp32 before": workdir / "before.onnx", "fp32 now": workdir / "now.onnx"}
    size = backbone.backbone_spec(backbone_id).preprocess.input_size
    for name, fold in (("fp32 before", False), ("fp32 now", True)):
        backbone.export_onnx(
            backbone.build_embedding_model(backbone_id), paths[name], input_size=size, fold_padding=fold
        )
    calibration = photos(backbone_id, args.calibration)
    check = photos(backbone_id, args.check, skip=args.calibration)
    for side in ("before", "now"):
        paths[f"int8 {side}"] = workdir / f"int8-{side}.onnx"
        quantize.quantize_onnx(paths[f"fp32 {side}"], calibration, paths[f"int8 {side}"])
    out: dict[str, Any] = {
        "pad_nodes": {
            name: sum(node.op_type == "Pad" for node in onnx.load(str(path)).graph.node)
            for name, path in paths.items()
        }
    }
    sessions = {
        (name, mode): backbone.onnx_session(path, threads=1 if mode == "one thread" else None, spinning=False)
        for name, path in paths.items()
        for mode in ("all cores", "one thread")
    }
    embeddings = {name: sessions[(name, "all cores")].run(None, {"input": check})[0] for name in paths}
    out["max_abs_diff"] = {
        precision: float(np.abs(embeddings[f"{precision} before"] - embeddings[f"{precision} now"]).max())
        for precision in ("fp32", "int8")
    }
    out["embedding_scale"] = float(np.abs(embeddings["fp32 now"]).max())
    timings: dict[str, dict[str, Any]] = {}
    with OtherCpu([os.getpid()]) as other:
        for batch in (1, 8):
            for mode in ("all cores", "one thread"):
                times: dict[str, list[float]] = {name: [] for name in paths}
                rounds = args.rounds if batch == 1 else max(args.rounds // 6, 20)
                for r in range(rounds + 5):
                    x = check[(r * batch) % (len(check) - batch) :][:batch]
                    for name in paths if r % 2 else reversed(list(paths)):
                        session = sessions[(name, mode)]
                        started = time.perf_counter()
                        session.run(None, {"input": x})
                        if r >= 5:  # warm-up
                            times[name].append(time.perf_counter() - started)
                medians = {name: round(statistics.median(t) * 1000, 2) for name, t in times.items()}
                timings[f"batch {batch}, {mode}"] = {
                    "median_ms": medians,
                    "speedup_fp32": round(medians["fp32 before"] / medians["fp32 now"], 2),
                    "speedup_int8": round(medians["int8 before"] / medians["int8 now"], 2),
                    "calls": rounds,
                }
                logger.info("%s batch %d, %s: %s", backbone_id, batch, mode, medians)
    out["timings"] = timings
    out["other_cpu_pct"] = other.pct
    return out


def markdown(report: dict[str, Any]) -> str:
    lines = [f"# Static padding ({report['date']})", ""]
    for backbone_id, result in report["backbones"].items():
        diff = result["max_abs_diff"]
        lines += [
            f"## {backbone_id}",
            "",
            f"Pad nodes: {result['pad_nodes']}. Largest embedding difference before/now: "
            f"FP32 {diff['fp32']:.3g}, INT8 {diff['int8']:.3g} (embeddings up to "
            f"{result['embedding_scale']:.3g}). Other CPU {result['other_cpu_pct']} %.",
            "",
            "| run | FP32 before | FP32 now | ratio | INT8 before | INT8 now | ratio |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for name, t in result["timings"].items():
            m = t["median_ms"]
            lines.append(
                f"| {name} | {m['fp32 before']} ms | **{m['fp32 now']} ms** | {t['speedup_fp32']}x "
                f"| {m['int8 before']} ms | **{m['int8 now']} ms** | {t['speedup_int8']}x |"
            )
        lines.append("")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backbones", default="tf_efficientnet_lite0.in1k", help="comma-separated")
    parser.add_argument("--calibration", type=int, default=64, help="flowers photos INT8 is calibrated on")
    parser.add_argument("--check", type=int, default=64, help="other flowers photos compared and timed")
    parser.add_argument("--rounds", type=int, default=300, help="timed calls of one image per model")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    init_script()
    args = parse_args(argv)
    report: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": machine_info(),
    }
    report["backbones"] = {}
    for backbone_id in args.backbones.split(","):
        with tempfile.TemporaryDirectory(prefix="padding-bench-") as workdir:
            report["backbones"][backbone_id] = measure(backbone_id, Path(workdir), args)
    write_report(report, args.out, markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
