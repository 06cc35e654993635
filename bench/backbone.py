"""Backbone benchmark: EfficientNet-Lite0 embedding on CPU with eager torch, TorchScript and ONNX Runtime.

What is measured, for a 224x224 input at batch 1 and batch 8:

* **eager torch (NCHW)**: ``taskvision.backbone.build_embedding_model()``
  called under ``torch.inference_mode()``, the layout the tutorials use;
* **eager torch, channels_last**: the same model and input converted to
  ``torch.channels_last``;
* **TorchScript**: ``torch.jit.trace`` of the eager model, then ``torch.jit.freeze``;
* **ONNX Runtime**: the project's own path, :class:`taskvision.backbone.Embedder`
  (no embedding cache) on the cached ONNX export ``backbone_onnx_path()``,
  with the session options serving uses.

torch runs on 2 threads (``torch.set_num_threads(2)``) with
``OMP_WAIT_POLICY=PASSIVE`` (set before torch is imported). Every variant is
warmed up first (TorchScript's profiling executor optimises the graph during
its first runs), then timed call by call for a fixed duration (and at least a
minimum number of calls). A call takes a float32 NCHW numpy batch and returns
numpy embeddings, so conversions (layout, torch <-> numpy) are part of the
time. Reported: median and p90 milliseconds per call and per image, and
images/s over the timed calls.

Accuracy: the max abs difference (and min cosine similarity) of each variant's
embedding (the serving network, ``build_embedding_model()``: the pooled
1280-d features plus pooled mid-level features) against eager torch NCHW, on
the same inputs: a seeded random batch (uniform in [-1, 1], the normalised range) and real photos
(``../shared/datasets/flowers/images``, preprocessed with
``taskvision.preprocess.preprocess_bytes``; skipped when absent).

OpenMP's wait policy matters a lot to eager torch on a small CPU (with
PASSIVE its worker threads sleep between the many small ops of a batch-1
forward and are woken for every one), so the whole measurement is repeated
in a child process with ``OMP_WAIT_POLICY`` unset (the OpenMP default: spin
a while, then sleep) and shown as a second table (``--no-omp-default`` skips
it). ONNX Runtime does not use OpenMP (its own thread pool), so its rows
are a control.

Also timed, for context (the serving path decodes before it embeds):
``preprocess_bytes`` on a 512x512 JPEG (PIL decode + bicubic resize + crop +
normalise, one image at a time).

Run it by hand (not collected by pytest)::

    .venv/bin/python bench/backbone.py [--duration 8] [--warmup 2] [--batches 1,8]

The results are printed as a Markdown table on stdout and written as JSON to
``--out`` (default ``bench/results/backbone.json``); progress goes to stderr.
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from _common import (
    DATASETS_ROOT,
    REPO_ROOT,
    OtherCpu,
    cpuinfo_value,
    git_state,
    init_script,
    nproc,
    percentile,
    write_report,
)

sys.path.insert(0, str(REPO_ROOT))  # run as a script from anywhere: the project's packages

logger = logging.getLogger("bench.backbone")

DEFAULT_OUT = REPO_ROOT / "bench" / "results" / "backbone.json"
FLOWERS = DATASETS_ROOT / "flowers" / "images"
INPUT_SIZE = 224
TORCH_THREADS = 2
REAL_IMAGES = 8

Array = npt.NDArray[np.float32]


# ---- timing -------------------------------------------------------------------


@dataclass
class Timing:
    variant: str
    batch: int
    calls: int
    warmup_calls: int
    median_ms_per_call: float
    p90_ms_per_call: float
    median_ms_per_image: float
    images_per_s: float
    other_cpu_pct: float  # the machine's CPU other processes used meanwhile (> 5: distorted)


def time_calls(
    fn: Callable[[Array], Array],
    batch: Array,
    *,
    variant: str,
    warmup_s: float,
    duration_s: float,
    min_calls: int,
) -> Timing:
    """Warm ``fn`` up, then time it call by call for ``duration_s`` (and at least ``min_calls`` calls)."""
    warmup_calls = 0
    start = time.perf_counter()
    while warmup_calls < 3 or time.perf_counter() - start < warmup_s:
        fn(batch)
        warmup_calls += 1
    times: list[float] = []
    with OtherCpu([]) as other:
        start = time.perf_counter()
        while len(times) < min_calls or time.perf_counter() - start < duration_s:
            t0 = time.perf_counter()
            fn(batch)
            times.append(time.perf_counter() - t0)
    n = len(batch)
    median = percentile(times, 50)
    return Timing(
        variant=variant,
        batch=n,
        calls=len(times),
        warmup_calls=warmup_calls,
        median_ms_per_call=round(median * 1000, 2),
        p90_ms_per_call=round(percentile(times, 90) * 1000, 2),
        median_ms_per_image=round(median * 1000 / n, 2),
        images_per_s=round(n * len(times) / sum(times), 1),
        other_cpu_pct=other.pct,
    )


# ---- inputs -------------------------------------------------------------------


def random_batch(n: int, seed: int) -> Array:
    rng = np.random.default_rng(seed)
    return rng.uniform(-1.0, 1.0, size=(n, 3, INPUT_SIZE, INPUT_SIZE)).astype(np.float32)


def real_batch(n: int) -> tuple[Array | None, list[str]]:
    """``n`` flower photos preprocessed as serving does, or None when the data set is absent."""
    from taskvision.preprocess import preprocess_bytes

    if not FLOWERS.is_dir():
        return None, []
    paths = sorted(FLOWERS.glob("*.jpg"))[:: max(1, len(list(FLOWERS.glob("*.jpg"))) // n)][:n]
    if not paths:
        return None, []
    arrays = [preprocess_bytes(p.read_bytes(), max_pixels=80_000_000)[0] for p in paths]
    return np.stack(arrays).astype(np.float32), [p.name for p in paths]


def jpeg_512(seed: int) -> bytes:
    """A 512x512 photo-like JPEG: an upscaled flower when available, else a smooth random field."""
    from PIL import Image

    paths = sorted(FLOWERS.glob("*.jpg")) if FLOWERS.is_dir() else []
    if paths:
        image = Image.open(paths[seed % len(paths)]).convert("RGB")
    else:
        rng = np.random.default_rng(seed)
        image = Image.fromarray(rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8))
    image = image.resize((512, 512), Image.Resampling.BICUBIC)
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=90)
    return out.getvalue()


# ---- the variants ----------------------------------------------------------------


def build_variants() -> tuple[dict[str, Callable[[Array], Array]], dict[str, Any]]:
    """name -> callable(NCHW float32 batch) -> (N, D) embeddings; and notes on how each was built."""
    import torch

    from taskvision.backbone import Embedder, backbone_onnx_path, build_embedding_model, onnx_session

    notes: dict[str, Any] = {}
    model = build_embedding_model().eval()

    def eager(batch: Array) -> Array:
        with torch.inference_mode():
            return model(torch.from_numpy(batch)).numpy()

    model_cl = copy.deepcopy(model).to(memory_format=torch.channels_last).eval()

    def eager_cl(batch: Array) -> Array:
        with torch.inference_mode():
            x = torch.from_numpy(batch).contiguous(memory_format=torch.channels_last)
            return model_cl(x).numpy()

    start = time.perf_counter()
    with torch.inference_mode():
        example = torch.from_numpy(random_batch(1, seed=1))
        traced = torch.jit.trace(copy.deepcopy(model).eval(), example, check_trace=False)
        frozen = torch.jit.freeze(traced.eval())
    notes["torchscript_build_s"] = round(time.perf_counter() - start, 2)

    def scripted(batch: Array) -> Array:
        with torch.inference_mode():
            result: Array = frozen(torch.from_numpy(batch)).numpy()
            return result

    start = time.perf_counter()
    onnx_path = backbone_onnx_path()  # exported once (cached on disk); the export is not timed below
    embedder = Embedder(session=onnx_session(onnx_path), cache_size=0)
    notes["onnx_path"] = str(onnx_path)
    notes["onnx_session_load_s"] = round(time.perf_counter() - start, 2)
    options = embedder.session.get_session_options()
    notes["onnx_intra_op_threads"] = options.intra_op_num_threads  # 0: ORT's default, one per physical core
    notes["onnx_providers"] = embedder.session.get_providers()

    def onnx(batch: Array) -> Array:
        return embedder.embed_arrays(batch, batch_size=len(batch))

    return {
        "eager torch (NCHW)": eager,
        "eager torch channels_last": eager_cl,
        "TorchScript (trace + freeze)": scripted,
        "ONNX Runtime (Embedder)": onnx,
    }, notes


def compare(reference: Array, other: Array) -> dict[str, float]:
    diff = np.abs(reference.astype(np.float64) - other.astype(np.float64))
    ref_n = np.linalg.norm(reference, axis=1)
    oth_n = np.linalg.norm(other, axis=1)
    cosine = np.sum(reference * other, axis=1) / np.maximum(ref_n * oth_n, 1e-12)
    return {
        "max_abs_diff": float(f"{diff.max():.3g}"),
        "mean_abs_diff": float(f"{diff.mean():.3g}"),
        "max_abs_reference": round(float(np.abs(reference).max()), 4),
        "min_cosine": round(float(cosine.min()), 7),
    }


# ---- report -----------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    import onnxruntime
    import timm
    import torch

    flags = set(cpuinfo_value("flags").split())
    commit, dirty = git_state()
    return {
        "nproc": nproc(),
        "cpu_model": cpuinfo_value("model name"),
        "simd": sorted(
            f for f in flags if f in {"avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile"}
        ),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "onnxruntime": onnxruntime.__version__,
        "timm": timm.__version__,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "git_commit": commit,
        "git_dirty": dirty,
        "load_average_at_start": list(os.getloadavg()),
    }


def markdown(report: dict[str, Any]) -> str:
    machine, cfg = report["machine"], report["config"]
    commit = f"{machine['git_commit']}{' (dirty)' if machine['git_dirty'] else ''}"
    load = ", ".join(f"{x:.2f}" for x in machine["load_average_at_start"])
    out = [
        f"## Backbone benchmark ({report['date']})",
        "",
        f"EfficientNet-Lite0 (tf_efficientnet_lite0; the serving embedding network, "
        f"{cfg['embedding_dim']}-d), {INPUT_SIZE}x{INPUT_SIZE} input; "
        f"{machine['nproc']} CPUs ({machine['cpu_model']}; {', '.join(machine['simd']) or 'no AVX2'}), "
        f"load average at start {load}; torch {machine['torch']} on {machine['torch_threads']} threads, "
        f"onnxruntime {machine['onnxruntime']}; OMP_WAIT_POLICY={machine['omp_wait_policy']}; "
        f"commit {commit}. Each row: {cfg['warmup_s']} s warm-up, then >= {cfg['duration_s']} s "
        f"(>= {cfg['min_calls']} calls) timed.",
        "",
        "| variant | batch | calls | median ms/call | p90 ms/call | median ms/image | images/s "
        "| max abs diff vs eager (random) | max abs diff vs eager (real) | min cosine (real) | other CPU % |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in report["timings"]:
        acc = report["accuracy"][row["variant"]]
        real = acc.get("real")
        real_diff = f"{real['max_abs_diff']:.3g}" if real else "n/a"
        real_cos = f"{real['min_cosine']}" if real else "n/a"
        out.append(
            f"| {row['variant']} | {row['batch']} | {row['calls']} | {row['median_ms_per_call']} | "
            f"{row['p90_ms_per_call']} | {row['median_ms_per_image']} | {row['images_per_s']} | "
            f"{acc['random']['max_abs_diff']:.3g} | {real_diff} | {real_cos} | {row['other_cpu_pct']} |"
        )
    speed = report["speedup_vs_eager"]
    out += ["", "Speed-up of the median ms/image over eager torch (NCHW):", ""]
    out += [
        f"- batch {batch}: " + ", ".join(f"{k} x{v}" for k, v in rows.items())
        for batch, rows in speed.items()
    ]
    other = report.get("omp_default_policy")
    if other:
        passive = {(t["variant"], t["batch"]): t for t in report["timings"]}
        out += [
            "",
            f"The same with OMP_WAIT_POLICY unset (OpenMP's default; child run, {other['date']}):",
            "",
            "| variant | batch | median ms/image | images/s | vs PASSIVE | max abs diff vs eager "
            "| other CPU % |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for row in other["timings"]:
            before = passive.get((row["variant"], row["batch"]))
            ratio = (
                f"x{before['median_ms_per_image'] / row['median_ms_per_image']:.2f} faster" if before else ""
            )
            diff = other["accuracy"][row["variant"]]["random"]["max_abs_diff"]
            out.append(
                f"| {row['variant']} | {row['batch']} | {row['median_ms_per_image']} | "
                f"{row['images_per_s']} | {ratio} | {diff:.3g} | {row['other_cpu_pct']} |"
            )
    disturbed = [
        f"{row['variant']} batch {row['batch']}"
        for row in [*report["timings"], *(other["timings"] if other else [])]
        if row["other_cpu_pct"] > 5
    ]
    if disturbed:
        out += ["", f"**Warning: other processes shared the machine during {', '.join(disturbed)}.**"]
    pre = report["preprocess"]
    out += [
        "",
        f"For context: `preprocess_bytes` of a 512x512 JPEG (decode + resize + crop + normalise): "
        f"median {pre['median_ms']} ms, p90 {pre['p90_ms']} ms ({pre['calls']} calls). "
        f"Real inputs: {report['config']['real_images'] or 'none (flowers absent)'} images; "
        f"reference max |embedding| {report['reference_max_abs']}.",
    ]
    return "\n".join(out)


# ---- main -------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=float, default=8.0, help="timed seconds per variant and batch")
    parser.add_argument("--warmup", type=float, default=2.0, help="warm-up seconds per variant and batch")
    parser.add_argument("--min-calls", type=int, default=10, help="timed calls at least")
    parser.add_argument("--batches", default="1,8", help="comma-separated batch sizes")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where to write the JSON results")
    parser.add_argument(
        "--no-omp-default", action="store_true", help="skip the second run with OpenMP's default wait policy"
    )
    parser.add_argument("--omp-default-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        args.batch_sizes = [int(b) for b in args.batches.split(",") if b.strip()]
    except ValueError:
        parser.error(f"--batches must be comma-separated integers, not {args.batches!r}")
    if not args.batch_sizes or min(args.batch_sizes) < 1 or args.duration <= 0 or args.min_calls < 1:
        parser.error("--batches must be 1 or more, --duration positive, --min-calls 1 or more")
    return args


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    torch.set_num_threads(TORCH_THREADS)
    report: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine_info(),
    }
    logger.info("building the variants (eager, channels_last, TorchScript, ONNX Runtime)")
    variants, notes = build_variants()
    real, real_names = real_batch(REAL_IMAGES)
    report["config"] = {
        "input_size": INPUT_SIZE,
        "batches": args.batch_sizes,
        "duration_s": args.duration,
        "warmup_s": args.warmup,
        "min_calls": args.min_calls,
        "torch_threads": TORCH_THREADS,
        "real_images": len(real_names),
        "real_image_names": real_names,
        **notes,
    }

    # Accuracy first (a wrong variant's speed means nothing): every variant against eager NCHW.
    inputs = {"random": random_batch(8, seed=0)}
    if real is not None:
        inputs["real"] = real
    reference = {name: variants["eager torch (NCHW)"](batch) for name, batch in inputs.items()}
    report["reference_max_abs"] = round(max(float(np.abs(r).max()) for r in reference.values()), 4)
    report["config"]["embedding_dim"] = int(reference["random"].shape[1])
    accuracy: dict[str, dict[str, Any]] = {}
    for variant, fn in variants.items():
        accuracy[variant] = {name: compare(reference[name], fn(batch)) for name, batch in inputs.items()}
        # Batch 1 must give what batch 8 gives (per-sample independence, no batch-shape surprises).
        single = np.concatenate([fn(inputs["random"][i : i + 1]) for i in range(2)])
        accuracy[variant]["batch1_vs_batch8_max_abs_diff"] = float(
            f"{np.abs(single - fn(inputs['random'])[:2]).max():.3g}"
        )
        diffs = {k: v["max_abs_diff"] for k, v in accuracy[variant].items() if isinstance(v, dict)}
        logger.info("%s: max abs diff vs eager %s", variant, diffs)
    report["accuracy"] = accuracy

    timings: list[Timing] = []
    for batch_size in args.batch_sizes:
        batch = random_batch(batch_size, seed=batch_size)
        for variant, fn in variants.items():
            timing = time_calls(
                fn,
                batch,
                variant=variant,
                warmup_s=args.warmup,
                duration_s=args.duration,
                min_calls=args.min_calls,
            )
            timings.append(timing)
            logger.info(
                "%s batch %d: %.2f ms/image median, %.1f images/s (%d calls)",
                variant,
                batch_size,
                timing.median_ms_per_image,
                timing.images_per_s,
                timing.calls,
            )
    report["timings"] = [asdict(t) for t in timings]
    speedup: dict[str, dict[str, float]] = {}
    for batch_size in args.batch_sizes:
        rows = {t.variant: t for t in timings if t.batch == batch_size}
        base = rows["eager torch (NCHW)"].median_ms_per_image
        speedup[str(batch_size)] = {
            name: round(base / t.median_ms_per_image, 2)
            for name, t in rows.items()
            if name != "eager torch (NCHW)"
        }
    report["speedup_vs_eager"] = speedup

    from taskvision.preprocess import preprocess_bytes

    jpegs = [jpeg_512(seed) for seed in range(16)]
    pre_times: list[float] = []
    for i in range(max(args.min_calls, 50)):
        t0 = time.perf_counter()
        preprocess_bytes(jpegs[i % len(jpegs)], max_pixels=80_000_000)
        pre_times.append(time.perf_counter() - t0)
    report["preprocess"] = {
        "image": "512x512 JPEG q90",
        "calls": len(pre_times),
        "median_ms": round(percentile(pre_times, 50) * 1000, 2),
        "p90_ms": round(percentile(pre_times, 90) * 1000, 2),
        "mean_jpeg_kib": round(sum(len(j) for j in jpegs) / len(jpegs) / 1024, 1),
    }
    report["load_average_at_end"] = list(os.getloadavg())
    return report


def omp_default_run(args: argparse.Namespace) -> dict[str, Any]:
    """The same measurement in a child process with OMP_WAIT_POLICY unset; its report."""
    with tempfile.TemporaryDirectory(prefix="backbone-bench-") as tmp:
        out = Path(tmp) / "omp-default.json"
        command = [sys.executable, str(Path(__file__).resolve()), "--omp-default-child", "--no-omp-default"]
        command += ["--duration", str(args.duration), "--warmup", str(args.warmup)]
        command += ["--min-calls", str(args.min_calls), "--batches", args.batches, "--out", str(out)]
        env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
        child = subprocess.run(command, env=env, stdout=subprocess.DEVNULL, check=False)
        if child.returncode != 0:
            raise RuntimeError(f"the OpenMP-default child run failed with {child.returncode}")
        result: dict[str, Any] = json.loads(out.read_text())
        return result


def main(argv: Sequence[str] | None = None) -> int:
    init_script()
    args = parse_args(argv)
    # Before torch (and its OpenMP runtime) is first imported, in run(): no busy-waiting worker
    # threads, except in the child run that measures OpenMP's default policy.
    if args.omp_default_child:
        os.environ.pop("OMP_WAIT_POLICY", None)
    else:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    report = run(args)
    if not args.no_omp_default:
        logger.info("the same again in a child process with OMP_WAIT_POLICY unset")
        child = omp_default_run(args)
        report["omp_default_policy"] = {
            key: child[key] for key in ("date", "timings", "accuracy", "speedup_vs_eager")
        }
        report["omp_default_policy"]["omp_wait_policy"] = child["machine"]["omp_wait_policy"]
    write_report(report, args.out, markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
