"""The backbones a server runs for frozen-backbone heads: one shared embedder per backbone and precision.

A frozen-backbone bundle names the feature vectors its head takes
(``features`` in bundle.json, in order; see :mod:`taskvision.features`, the
one place that says what a feature id means). :class:`Extractors` keeps one
embedder per backbone and precision for the whole process, so an image is run
through each backbone once (twice for ``+hflip`` features: the mirror image
too) however many tasks ask about it, optionally batching concurrent requests
(:mod:`serving.batching`) and, for the backbones whose INT8 version was
accepted (:mod:`taskvision.quantize`), in INT8. The head's input is then
assembled by :func:`taskvision.features.assemble`, as training assembled it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping, Sequence
from enum import StrEnum

import numpy as np
import numpy.typing as npt

from serving.batching import BatchingEmbedder, Embeds
from taskvision import backbone, features
from taskvision.backbone import Embedder, onnx_session
from taskvision.preprocess import PreprocessConfig
from taskvision.quantize import Int8Backbone

logger = logging.getLogger(__name__)

Array = npt.NDArray[np.float32]
DEFAULT_FEATURES: tuple[str, ...] = features.LEGACY_FEATURES
EMBEDDING_CACHE = 256  # per embedder: the same image asked about for several tasks in a short while


class Precision(StrEnum):
    FP32 = "fp32"
    INT8 = "int8"


MIRRORED_KEY = b"+hflip"  # appended to an image's cache key for its mirror image


def input_configs(feature_ids: Sequence[str]) -> tuple[PreprocessConfig, ...]:
    """The preprocessings (one per backbone) a head over ``feature_ids`` needs its images in."""
    return tuple(dict.fromkeys(features.input_configs(feature_ids)))


class Extractors:
    """One embedder per (backbone id, precision) for the whole server (thread-safe)."""

    def __init__(self, *, batch_window_ms: float = 0.0, max_batch: int = 16) -> None:
        self.batch_window_ms = batch_window_ms
        self.max_batch = max_batch
        self._embedders: dict[tuple[str, Precision], Embeds] = {}
        self._int8: dict[str, Int8Backbone] = {}  # accepted ones, by backbone id
        self.int8_generation = 0  # changes whenever the INT8 backbones in use change
        # The INT8 check images' head inputs by feature ids, for the current generation (see int8_checks).
        self._checks: dict[tuple[str, ...], Array | None] = {}
        self._lock = threading.Lock()

    # ---- INT8 ------------------------------------------------------------------------

    def use_int8(self, int8: Int8Backbone) -> None:
        """Serve ``int8`` (an accepted quantized backbone) for its backbone id."""
        with self._lock:
            self._int8[int8.backbone_id] = int8
            self._embedders.pop((int8.backbone_id, Precision.INT8), None)
            self.int8_generation += 1
            self._checks.clear()
        logger.info("INT8 backbone in use for %s (%s)", int8.backbone_id, int8.path)

    def int8(self, backbone_id: str) -> Int8Backbone | None:
        """The accepted INT8 backbone of ``backbone_id``, if any."""
        return self._int8.get(backbone_id)

    def int8_checks(self, feature_ids: Sequence[str]) -> Array | None:
        """The head input of the INT8 check images over ``feature_ids``: (2N, D), FP32's N rows, then INT8's.

        One array, so that a head checks both with one matrix product. None unless
        every backbone the ids need has an INT8 backbone in use. A ``+hflip`` part
        is checked on the image itself for both views (how INT8's error goes
        through a head is what is checked). Cached per feature ids until the INT8
        backbones change: every head loaded (again, after an eviction) is checked on
        these, and assembling them cost more than the check itself.
        """
        key = tuple(feature_ids)
        with self._lock:
            if key in self._checks:
                return self._checks[key]
            found = {b: self._int8.get(b) for b in features.backbones_needed(key)}
        checks = {b: c for b, c in found.items() if c is not None}
        inputs: Array | None = None
        if checks and len(checks) == len(found):
            views = [(b, m) for b in checks for m in (False, True)]
            fp32 = features.assemble({(b, m): checks[b].check_fp32 for b, m in views}, key)
            int8 = features.assemble({(b, m): checks[b].check_int8 for b, m in views}, key)
            inputs = np.concatenate([fp32, int8])
        with self._lock:
            if all(self._int8.get(b) is c for b, c in found.items()):  # not changed meanwhile
                self._checks[key] = inputs
        return inputs

    # ---- embedding -------------------------------------------------------------------

    def embedder(self, backbone_id: str, precision: Precision = Precision.FP32) -> Embeds:
        key = (backbone_id, precision)
        with self._lock:
            found = self._embedders.get(key)
            if found is None:
                found = self._embedders[key] = self._make(backbone_id, precision)
            return found

    def _make(self, backbone_id: str, precision: Precision) -> Embeds:
        inner: Embeds
        if precision is Precision.FP32:
            inner = backbone.shared_embedder(backbone_id)
        else:
            int8 = self._int8.get(backbone_id)
            if int8 is None:
                raise RuntimeError(f"No INT8 backbone is in use for {backbone_id}.")
            inner = Embedder(
                session=onnx_session(int8.path, spinning=False),
                backbone_id=backbone_id,
                cache_size=EMBEDDING_CACHE,
                concurrent_session=onnx_session(int8.path, threads=1, spinning=False),
            )
        if self.batch_window_ms > 0:
            return BatchingEmbedder(inner, window_ms=self.batch_window_ms, max_batch=self.max_batch)
        return inner

    def embed(
        self,
        feature_ids: Sequence[str],
        inputs: Mapping[PreprocessConfig, Array],
        precision: Precision = Precision.FP32,
        *,
        keys: Sequence[bytes] | None = None,
    ) -> Array:
        """The head input (N, D): the ids' vectors concatenated, from images preprocessed per backbone.

        ``inputs`` holds the images preprocessed for each backbone the ids need
        (:func:`input_configs`); ``keys`` name the images' content for the
        embedding caches (a hash of the encoded image).
        """
        vectors: dict[tuple[str, bool], Array] = {}
        for backbone_id, mirrored in features.views_needed(feature_ids):
            arrays = inputs[backbone.BACKBONES[backbone_id].preprocess]
            view_keys = keys
            if mirrored:  # the mirror image's input is the input reversed along its width
                arrays = np.ascontiguousarray(arrays[:, :, :, ::-1])
                view_keys = None if keys is None else [key + MIRRORED_KEY for key in keys]
            vectors[(backbone_id, mirrored)] = self.embedder(backbone_id, precision).embed_arrays(
                arrays, keys=view_keys
            )
        return features.assemble(vectors, feature_ids)
