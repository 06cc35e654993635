"""Turning INT8 on for a server: calibrate on the service's stored training images, check, switch.

:func:`start_int8` runs in a background thread at start-up (the server
answers in FP32 meanwhile): it takes up to ``count`` stored training images
(``images/`` in the blob store, spread evenly over the content-addressed
keys), preprocesses them as serving does, and hands them to
:func:`taskvision.quantize.prepare_int8` for each backbone asked for (by
default Lite0, the backbone of the ``fast`` and ``balanced`` presets' linear
heads; Lite1 and Lite2, which ``balanced`` and ``best`` may choose, when asked:
each is calibrated on its own preprocessing of the images and checked on its
own; a head over several backbones' features stays FP32 unless all of them are
quantized and accepted). An accepted
backbone is switched on in :class:`serving.extractors.Extractors`; each head
then checks its own answers before using it (:meth:`serving.model.BundlePredictor.precision`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt

from serving.extractors import Extractors
from taskvision import backbone
from taskvision.errors import TaskVisionError
from taskvision.preprocess import preprocess_bytes
from taskvision.quantize import Int8Backbone, find_prepared, prepare_int8, read_prepared
from taskvision.storage import BlobStore

logger = logging.getLogger(__name__)

IMAGES_PREFIX = "images/"  # where the control plane keeps uploaded training images
DEFAULT_CALIBRATION_IMAGES = 300
DEFAULT_BACKBONES: tuple[str, ...] = (backbone.BACKBONE_ID,)
MIN_CALIBRATION_IMAGES = 12
RETRY_S = 600.0  # how often a server with too few stored images looks again


def calibration_keys(blobs: BlobStore, count: int) -> list[str]:
    """Up to ``count`` stored image keys, evenly spread (keys end in the image's sha256)."""
    keys = sorted(blobs.list_keys(IMAGES_PREFIX), key=lambda key: key.rsplit("/", 1)[-1])
    step = max(1, len(keys) // count) if count else 1
    return keys[::step][:count]


def calibration_arrays(
    blobs: BlobStore, backbone_id: str, *, count: int, max_pixels: int
) -> npt.NDArray[np.float32]:
    """Stored training images preprocessed for ``backbone_id`` (undecodable ones skipped)."""
    config = backbone.backbone_spec(backbone_id).preprocess
    arrays = []
    for key in calibration_keys(blobs, count):
        try:
            arrays.append(preprocess_bytes(blobs.get(key), max_pixels=max_pixels, config=config)[0])
        except TaskVisionError:
            logger.debug("skipping %s for calibration: not decodable", key)
    if not arrays:
        return np.zeros((0, 3, config.input_size, config.input_size), dtype=np.float32)
    return np.stack(arrays)


def enable_int8(
    extractors: Extractors,
    blobs: BlobStore,
    cache_dir: Path,
    *,
    backbone_ids: Sequence[str] = DEFAULT_BACKBONES,
    count: int = DEFAULT_CALIBRATION_IMAGES,
    max_pixels: int = 80_000_000,
) -> list[Int8Backbone]:
    """Prepare and check each backbone's INT8 version; switch on the accepted ones. Returns all.

    An accepted quantization of the same FP32 export in ``cache_dir`` is reused (a restart does not
    calibrate again). A backbone with fewer than ``MIN_CALIBRATION_IMAGES`` stored images to
    calibrate on is left out (not in the result).
    """
    prepared = []
    for backbone_id in backbone_ids:
        fp32_path = backbone.backbone_onnx_path(backbone_id)
        int8 = find_prepared(backbone_id, fp32_path, cache_dir)
        if int8 is None:
            arrays = calibration_arrays(blobs, backbone_id, count=count, max_pixels=max_pixels)
            if len(arrays) < MIN_CALIBRATION_IMAGES:
                logger.warning(
                    "INT8 not ready for %s: %d stored training images (%d or more needed)",
                    backbone_id,
                    len(arrays),
                    MIN_CALIBRATION_IMAGES,
                )
                continue
            int8 = _prepare_in_child(backbone_id, fp32_path, arrays, cache_dir)
            del arrays
        prepared.append(int8)
        if int8.report.accepted:
            extractors.use_int8(int8)
        else:
            logger.warning("INT8 refused for %s: %s; serving FP32", backbone_id, int8.report.reason)
    return prepared


def _prepare_in_child(
    backbone_id: str, fp32_path: Path, arrays: npt.NDArray[np.float32], cache_dir: Path
) -> Int8Backbone:
    """:func:`prepare_int8` in a child process.

    Calibration keeps every activation of every image in memory; in the server's own process
    that left about 180 MB of RSS behind for good (freed, not returned by the allocator).
    """
    import multiprocessing
    import tempfile

    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir) as scratch:
        images = Path(scratch) / "calibration.npy"
        np.save(images, arrays)
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            folder = pool.apply(_prepare, (backbone_id, str(fp32_path), str(images), str(cache_dir)))
    found = read_prepared(Path(folder))
    if found is None:
        raise RuntimeError(f"INT8 preparation left no result in {folder}")
    return found


def _prepare(backbone_id: str, fp32_path: str, images: str, cache_dir: str) -> str:
    """In the child: quantize and check; the result's folder."""
    arrays = np.load(images, mmap_mode="r")
    return str(prepare_int8(backbone_id, Path(fp32_path), np.asarray(arrays), Path(cache_dir)).path.parent)


def start_int8(
    extractors: Extractors,
    blobs: BlobStore,
    cache_dir: Path,
    *,
    backbone_ids: Sequence[str] = DEFAULT_BACKBONES,
    count: int = DEFAULT_CALIBRATION_IMAGES,
    max_pixels: int = 80_000_000,
) -> threading.Thread:
    """:func:`enable_int8` in a daemon thread (FP32 serves until it is done).

    While the store has too few training images it tries again every ``RETRY_S`` seconds.
    """

    def run() -> None:
        while True:
            try:
                ready = enable_int8(
                    extractors,
                    blobs,
                    cache_dir,
                    backbone_ids=backbone_ids,
                    count=count,
                    max_pixels=max_pixels,
                )
                if ready:
                    return
            except Exception:
                logger.exception("INT8 preparation failed; serving FP32")
                return
            time.sleep(RETRY_S)

    thread = threading.Thread(target=run, name="int8-prepare", daemon=True)
    thread.start()
    return thread
