"""INT8 backbones: ONNX Runtime static quantization, calibrated on the service's own images, checked.

:func:`prepare_int8` quantizes a backbone's FP32 ONNX export
(:func:`quantize_onnx`: QDQ format, per-channel signed 8-bit weights,
unsigned 8-bit activations, min-max ranges calibrated on the given images)
and checks it against FP32 on held-out images of the same kind:

1. **the backbone**: the INT8 embedding of each check image must point where
   the FP32 one does (cosine similarity: mean >= ``MIN_MEAN_COSINE``, worst
   1 % >= ``MIN_P1_COSINE``). A backbone that fails is not used at all;
2. **each head** (:func:`answers_within_tolerance`, applied by the server to
   every head it loads): on the check images, the head's INT8 answers must
   match its FP32 answers: the same answer wherever FP32's is clear, on at
   least ``MIN_AGREEMENT`` of them, and probabilities that move by at most
   ``MAX_MEAN_PROB_DIFF`` on average (regression: values within
   ``MAX_VALUE_DIFF_STD`` target standard deviations on average). A head that
   fails is served in FP32.

Two parts of EfficientNet-Lite stay in float (:data:`FLOAT_PREFIXES`,
:data:`FLOAT_TAIL_OPS`), chosen by measurement on the shared photo sets (an
ONNX Runtime per-tensor error analysis showed where the error enters):

* the pooling and concatenation that end the multi-scale embedding:
  quantizing them took the mean cosine similarity from 0.995 down to 0.956;
* the stem and the first three stages (112, 56 and 28 px wide maps, where
  8-bit activations lose the most): keeping the stem and two stages float
  took the mean cosine from 0.992 to 0.999 and the flowers answers that change
  from 7.7 % to 3.0 %; with the third stage float too, 3.7 % -> 3.2 % of
  the flowers answers change (0.99885 -> 0.99905 mean cosine; accuracy change
  -0.62 -> -0.12 points in 4 x 5-fold cross-validation, calibrated on 200
  flowers photos) for the same backbone time within the noise (7.3-8.4 ->
  7.8 ms a 512 px image, one thread; FP32 11.4-12.5 ms). Keeping the fourth
  stage float as well cost 1.5 ms for no further gain; quantizing convolutions
  only flipped more answers (5.8 %). Calibration method (min-max, moving
  average, entropy, percentile) and 64 or 200 calibration images changed the
  cosine by less than 0.002.

:data:`RECIPE` names these choices; a cached quantization made with another
recipe is not reused.

Quantized models are cached in a folder, keyed by the FP32 export, the
recipe and the calibration images, with the check embeddings and a JSON report.
Metrics in a bundle are always computed in FP32 (the evaluate step records
``"backbone_precision": "fp32"``); ``bench/classify.py --int8`` reports the accuracy
change on the shared data sets.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from taskvision.bundle import BundleMeta, outputs_from_logits
from taskvision.task_types import TaskType

logger = logging.getLogger(__name__)

Array = npt.NDArray[np.float32]

# Tolerances (see the module docstring; measured margins are in the README).
MIN_MEAN_COSINE = 0.99
MIN_P1_COSINE = 0.97
CLEAR_MARGIN = 0.2  # an FP32 answer is clear when its best label leads the next by this much
MIN_AGREEMENT = 0.99
MAX_MEAN_PROB_DIFF = 0.05
MAX_VALUE_DIFF_STD = 0.1
CHECK_FRACTION = 1 / 3  # of the images given to prepare_int8: held out from calibration, for the checks
CALIBRATION_BATCH = 8
# Operators at the end of the embedding that stay in float (pooling, concatenation).
FLOAT_TAIL_OPS = ("GlobalAveragePool", "ReduceMean", "ReduceMax", "Concat", "Flatten")
# Nodes of timm's EfficientNet(-Lite) export that stay in float: the stem and stages 0-2.
FLOAT_PREFIXES = ("/conv_stem", "/bn1", "/blocks.0/", "/blocks.1/", "/blocks.2/")
# What a quantization was made with: part of its cache key and its report (older reports lack it).
RECIPE = "qdq-s8-weights-per-channel-u8-activations-minmax-float-" + ",".join(
    p.strip("/") for p in FLOAT_PREFIXES + FLOAT_TAIL_OPS
)


@dataclass(frozen=True)
class Int8Report:
    backbone_id: str
    fp32_sha256: str  # the FP32 export it was made from
    recipe: str  # RECIPE when it was made
    calibration_images: int
    check_images: int
    mean_cosine: float
    p1_cosine: float
    accepted: bool
    reason: str
    quantize_s: float


@dataclass(frozen=True)
class Int8Backbone:
    """A quantized backbone and the FP32/INT8 embeddings of its check images (for the head checks)."""

    backbone_id: str
    path: Path
    report: Int8Report
    check_fp32: Array
    check_int8: Array


@dataclass(frozen=True)
class Verdict:
    ok: bool
    reason: str


def quantize_onnx(fp32_path: Path, calibration: Array, out_path: Path) -> None:
    """Statically quantize ``fp32_path`` to ``out_path``, calibrated on preprocessed images (N, 3, H, W)."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    model = onnx.load(str(fp32_path))
    input_name = model.graph.input[0].name
    del model

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            # Equal batches: the calibrator stacks each tensor's batches into one array.
            whole = len(calibration) - len(calibration) % CALIBRATION_BATCH or len(calibration)
            step = CALIBRATION_BATCH if whole >= CALIBRATION_BATCH else whole
            self._batches: Iterator[Array] = (calibration[i : i + step] for i in range(0, whole, step))

        def get_next(self) -> dict[str, Array] | None:
            batch = next(self._batches, None)
            return None if batch is None else {input_name: batch}

    out_path.parent.mkdir(parents=True, exist_ok=True)
    pre = out_path.with_suffix(f".pre{os.getpid()}.onnx")
    tmp = out_path.with_suffix(f".tmp{os.getpid()}.onnx")
    try:
        quant_pre_process(str(fp32_path), str(pre), skip_symbolic_shape=True)
        prepared = onnx.load(str(pre))
        keep_float = [
            node.name
            for node in prepared.graph.node
            if node.op_type in FLOAT_TAIL_OPS or node.name.startswith(FLOAT_PREFIXES)
        ]
        del prepared
        quantize_static(
            str(pre),
            str(tmp),
            Reader(),
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            per_channel=True,
            calibrate_method=CalibrationMethod.MinMax,
            nodes_to_exclude=keep_float,
        )
        os.replace(tmp, out_path)  # atomic: a concurrent reader never sees half a model
    finally:
        for leftover in (pre, tmp, pre.with_suffix(".onnx.data")):
            leftover.unlink(missing_ok=True)


def cosine(a: Array, b: Array) -> Array:
    """Row-wise cosine similarity."""
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return np.asarray((a * b).sum(axis=1) / np.maximum(norms, 1e-12), dtype=np.float32)


def backbone_verdict(check_fp32: Array, check_int8: Array) -> tuple[Verdict, float, float]:
    """Whether the INT8 embeddings stay close enough to FP32 (with the mean and 1st-percentile cosine)."""
    similarity = cosine(check_fp32, check_int8)
    mean, p1 = float(similarity.mean()), float(np.percentile(similarity, 1))
    if mean < MIN_MEAN_COSINE or p1 < MIN_P1_COSINE:
        return (
            Verdict(
                False, f"cosine mean {mean:.4f} (>= {MIN_MEAN_COSINE}), 1% {p1:.4f} (>= {MIN_P1_COSINE})"
            ),
            mean,
            p1,
        )
    return Verdict(True, f"cosine mean {mean:.4f}, 1% {p1:.4f}"), mean, p1


def answers_within_tolerance(meta: BundleMeta, logits_fp32: Array, logits_int8: Array) -> Verdict:
    """Whether a head's INT8 answers match its FP32 answers on the check images.

    Classification: where the FP32 answer is clear (multi_class: the best label leads by
    ``CLEAR_MARGIN`` or more; multi_label: every tag is that far from its threshold), INT8
    must give the same answer on ``MIN_AGREEMENT`` of the images; and the largest change
    of a probability must be at most ``MAX_MEAN_PROB_DIFF`` on average. Regression: the
    values must move by at most ``MAX_VALUE_DIFF_STD`` target standard deviations on average.
    """
    fp32, int8 = outputs_from_logits(meta, logits_fp32), outputs_from_logits(meta, logits_int8)
    if meta.task_type is TaskType.REGRESSION:
        scale = np.asarray(meta.target_std or [1.0] * fp32.shape[1], dtype=np.float32)
        diff = float((np.abs(fp32 - int8) / np.maximum(scale, 1e-6)).mean())
        ok = diff <= MAX_VALUE_DIFF_STD
        return Verdict(ok, f"mean |value change| {diff:.3f} std (<= {MAX_VALUE_DIFF_STD})")
    prob_diff = float(np.abs(fp32 - int8).max(axis=1).mean())
    if meta.task_type is TaskType.MULTI_CLASS:
        top2 = np.sort(fp32, axis=1)[:, -2:]
        clear = top2[:, 1] - top2[:, 0] >= CLEAR_MARGIN
        same = fp32.argmax(axis=1) == int8.argmax(axis=1)
    else:
        thresholds = np.asarray(meta.thresholds or [0.5] * fp32.shape[1], dtype=np.float32)
        clear = (np.abs(fp32 - thresholds) >= CLEAR_MARGIN / 2).all(axis=1)
        same = ((fp32 >= thresholds) == (int8 >= thresholds)).all(axis=1)
    agreement = float(same[clear].mean()) if clear.any() else 1.0
    ok = agreement >= MIN_AGREEMENT and prob_diff <= MAX_MEAN_PROB_DIFF
    return Verdict(
        ok,
        f"same clear answers {agreement:.3f} (>= {MIN_AGREEMENT}) on {int(clear.sum())} images, "
        f"mean largest |prob change| {prob_diff:.4f} (<= {MAX_MEAN_PROB_DIFF})",
    )


def _embed(path: Path, arrays: Array) -> Array:
    from taskvision.backbone import onnx_session

    session = onnx_session(path)
    name = session.get_inputs()[0].name
    return np.concatenate(
        [np.asarray(session.run(None, {name: arrays[i : i + 16]})[0]) for i in range(0, len(arrays), 16)]
    ).astype(np.float32)


def prepare_int8(backbone_id: str, fp32_path: Path, images: Array, directory: Path) -> Int8Backbone:
    """Quantize ``fp32_path`` on most of ``images`` (preprocessed), check it on the rest, cache the result.

    The result's ``report.accepted`` says whether the backbone passed the check; the caller uses
    it only then. Reuses a cached quantization of the same export and images. Blocks for about
    half a minute (2 cores, 200 calibration images).
    """
    if len(images) < 12:
        raise ValueError(f"INT8 calibration needs at least 12 images; got {len(images)}.")
    n_check = max(4, round(len(images) * CHECK_FRACTION))
    calibration, check = images[:-n_check], images[-n_check:]
    fp32_digest = _file_sha256(fp32_path)
    digest = hashlib.sha256(f"{backbone_id}-{fp32_digest}-{RECIPE}".encode())
    digest.update(np.ascontiguousarray(images).tobytes())
    folder = directory / f"{backbone_id}-int8-{digest.hexdigest()[:16]}"
    if (found := _read(folder)) is not None:
        return found
    model_path, report_path, check_path = folder / "model.onnx", folder / "report.json", folder / "check.npz"
    started = time.perf_counter()
    logger.info("quantizing %s to INT8 on %d images (%d held out)", backbone_id, len(calibration), n_check)
    quantize_onnx(fp32_path, calibration, model_path)
    seconds = time.perf_counter() - started
    check_fp32, check_int8 = _embed(fp32_path, check), _embed(model_path, check)
    verdict, mean, p1 = backbone_verdict(check_fp32, check_int8)
    report = Int8Report(
        backbone_id=backbone_id,
        fp32_sha256=fp32_digest,
        recipe=RECIPE,
        calibration_images=len(calibration),
        check_images=n_check,
        mean_cosine=round(mean, 5),
        p1_cosine=round(p1, 5),
        accepted=verdict.ok,
        reason=verdict.reason,
        quantize_s=round(seconds, 1),
    )
    np.savez(check_path, fp32=check_fp32, int8=check_int8)
    report_path.write_text(json.dumps(asdict(report), indent=2))  # last: marks the folder complete
    logger.info("INT8 %s: %s (%s)", backbone_id, "accepted" if report.accepted else "REFUSED", report.reason)
    return Int8Backbone(backbone_id, model_path, report, check_fp32, check_int8)


def find_prepared(backbone_id: str, fp32_path: Path, directory: Path) -> Int8Backbone | None:
    """An accepted quantization of this very FP32 export, by this :data:`RECIPE`, in ``directory``
    (the newest), if any.

    A server reuses it on restart instead of calibrating again on a different sample of images.
    """
    fp32_digest = _file_sha256(fp32_path)
    folders = sorted(directory.glob(f"{backbone_id}-int8-*"), key=lambda f: f.stat().st_mtime, reverse=True)
    for folder in folders:
        found = _read(folder)
        if (
            found is not None
            and found.report.accepted
            and found.report.fp32_sha256 == fp32_digest
            and found.report.recipe == RECIPE
        ):
            return found
    return None


def read_prepared(folder: Path) -> Int8Backbone | None:
    """The quantization :func:`prepare_int8` left in ``folder`` (None when it is not complete)."""
    return _read(folder)


def _read(folder: Path) -> Int8Backbone | None:
    model_path, report_path, check_path = folder / "model.onnx", folder / "report.json", folder / "check.npz"
    if not (model_path.is_file() and report_path.is_file() and check_path.is_file()):
        return None
    try:
        report = Int8Report(**json.loads(report_path.read_text()))
    except (TypeError, ValueError):
        return None  # another version's report
    with np.load(check_path) as data:
        return Int8Backbone(report.backbone_id, model_path, report, data["fp32"], data["int8"])


def _file_sha256(path: Path) -> str:
    with path.open("rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def report_dict(int8: Int8Backbone) -> dict[str, Any]:
    return {**asdict(int8.report), "path": str(int8.path)}
