"""Turning INT8 on for a server: calibrate on the service's stored training images, check, switch.

:func:`start_int8` runs in a background thread at start-up (the server
answers in FP32 meanwhile): it takes up to ``count`` stored training images
(``images/`` in the blob store, spread evenly over the content-addressed
keys), preprocesses them as serving does, and hands them to
:func:`taskvision.quantize.prepare_int8` for each backbone. An accepted
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

from serving.extractors import DEFAULT_FEATURES, Extractors, feature_source
from taskvision.errors import TaskVisionError
from taskvision.preprocess import preprocess_bytes
from taskvision.quantize import Int8Backbone, prepare_int8
from taskvision.storage import BlobStore

logger = logging.getLogger(__name__)

IMAGES_PREFIX = "images/"  # where the control plane keeps uploaded training images
DEFAULT_CALIBRATION_IMAGES = 300
MIN_CALIBRATION_IMAGES = 12
RETRY_S = 600.0  # how often a server with too few stored images looks again


def calibration_keys(blobs: BlobStore, count: int) -> list[str]:
    """Up to ``count`` stored image keys, evenly spread (keys end in the image's sha256)."""
    keys = sorted(blobs.list_keys(IMAGES_PREFIX), key=lambda key: key.rsplit("/", 1)[-1])
    step = max(1, len(keys) // count) if count else 1
    return keys[::step][:count]


def calibration_arrays(
    blobs: BlobStore, feature_id: str, *, count: int, max_pixels: int
) -> npt.NDArray[np.float32]:
    """Stored training images preprocessed for ``feature_id`` (undecodable ones skipped)."""
    config = feature_source(feature_id).preprocess
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
    feature_ids: Sequence[str] = DEFAULT_FEATURES,
    count: int = DEFAULT_CALIBRATION_IMAGES,
    max_pixels: int = 80_000_000,
) -> list[Int8Backbone]:
    """Prepare and check each backbone's INT8 version; switch on the accepted ones. Returns all."""
    prepared = []
    for feature_id in feature_ids:
        arrays = calibration_arrays(blobs, feature_id, count=count, max_pixels=max_pixels)
        if len(arrays) < 12:
            logger.warning(
                "INT8 stays off for %s: %d stored training images (12 or more needed)",
                feature_id,
                len(arrays),
            )
            continue
        int8 = prepare_int8(feature_id, feature_source(feature_id).onnx_path(), arrays, cache_dir)
        prepared.append(int8)
        if int8.report.accepted:
            extractors.use_int8(int8)
        else:
            logger.warning("INT8 refused for %s: %s; serving FP32", feature_id, int8.report.reason)
    return prepared


def start_int8(
    extractors: Extractors,
    blobs: BlobStore,
    cache_dir: Path,
    *,
    count: int = DEFAULT_CALIBRATION_IMAGES,
    max_pixels: int = 80_000_000,
) -> threading.Thread:
    """:func:`enable_int8` in a daemon thread (FP32 serves until it is done).

    While the store has too few training images it tries again every ``RETRY_S`` seconds.
    """

    def run() -> None:
        while True:
            try:
                if enable_int8(extractors, blobs, cache_dir, count=count, max_pixels=max_pixels):
                    return
            except Exception:
                logger.exception("INT8 preparation failed; serving FP32")
                return
            time.sleep(RETRY_S)

    thread = threading.Thread(target=run, name="int8-prepare", daemon=True)
    thread.start()
    return thread
