"""Run a model bundle: the one prediction path shared by the evaluate step and serving.

A frozen-backbone bundle is a head over shared backbone features
(:mod:`taskvision.features`), so a caller that already has the feature vectors
(evaluation, or a server answering several tasks for one image) passes them
straight to :meth:`BundleModel.logits_from_embeddings`. Otherwise an image is
decoded once (:meth:`BundleModel.decode`), turned into the bundle's model input
(:meth:`BundleModel.prepare`: the preprocessed arrays of every backbone its
features need, or of its own network), and batches of those go to
:meth:`BundleModel.logits_from_prepared`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt
from PIL import Image

from taskvision import features
from taskvision.backbone import Embedder, onnx_session, shared_embedder
from taskvision.bundle import BundleMeta, outputs_from_logits
from taskvision.preprocess import PreprocessConfig, decode_image, draft_side, resize_and_crop, to_array

if TYPE_CHECKING:
    import onnxruntime

Array = npt.NDArray[np.float32]


def preprocess_config(meta: BundleMeta) -> PreprocessConfig:
    """The preprocessing a whole-network bundle was trained with (from bundle.json)."""
    pre = meta.preprocess
    return PreprocessConfig(
        input_size=meta.input_size,
        crop_pct=float(pre.get("crop_pct", meta.input_size / pre.get("resize_to", meta.input_size / 0.875))),
        mean=tuple(pre.get("mean", (0.5, 0.5, 0.5))),
        std=tuple(pre.get("std", (0.5, 0.5, 0.5))),
        interpolation=str(pre.get("interpolation", "bicubic")),
    )


class BundleModel:
    """A loaded bundle: metadata plus an ONNX Runtime session for its weights."""

    def __init__(self, meta: BundleMeta, session: onnxruntime.InferenceSession) -> None:
        self.meta = meta
        self.session = session
        self.input_name = session.get_inputs()[0].name
        self.config = preprocess_config(meta)

    @classmethod
    def load(cls, directory: Path, *, threads: int | None = None) -> BundleModel:
        meta = BundleMeta.from_json((directory / "bundle.json").read_text())
        if meta.frozen_backbone:
            for feature_id in meta.features:
                features.feature_spec(feature_id)  # an unknown feature fails at load, not per request
        return cls(meta, onnx_session(directory / meta.weights_file, threads=threads))

    # ---- images -> model inputs ------------------------------------------------------

    @property
    def min_decode_side(self) -> int:
        """A JPEG may be decoded at reduced scale down to this side."""
        if self.meta.frozen_backbone:
            return features.draft_side(self.meta.features, self.meta.draft_factor)
        return draft_side(self.config.resize_to, self.meta.draft_factor)

    def decode(self, data: bytes, *, max_pixels: int) -> tuple[Image.Image, tuple[int, int]]:
        """Image bytes -> (upright RGB picture, original (width, height)); raises TaskVisionError."""
        return decode_image(data, max_pixels=max_pixels, min_side=self.min_decode_side)

    def prepare(self, image: Image.Image) -> Array:
        """A decoded picture -> this bundle's model input, a flat float32 array (stack them for a batch)."""
        if self.meta.frozen_backbone:
            return features.prepare(image, self.meta.features)
        return to_array(resize_and_crop(image, self.config), self.config).ravel()

    # ---- model inputs -> logits ----------------------------------------------------------

    def logits_from_embeddings(self, embeddings: Array) -> Array:
        """Logits of a frozen-backbone head from its feature vectors (N, D)."""
        if not self.meta.frozen_backbone:
            raise ValueError("A fine-tuned bundle takes images, not backbone embeddings.")
        return np.asarray(self.session.run(None, {self.input_name: embeddings.astype(np.float32)})[0])

    def logits_from_prepared(
        self, prepared: Array, *, embedder: Callable[[str], Embedder] = shared_embedder
    ) -> Array:
        """Logits for a batch of :meth:`prepare` outputs (N, L)."""
        prepared = np.asarray(prepared, dtype=np.float32).reshape(len(prepared), -1)
        if self.meta.frozen_backbone:
            return self.logits_from_embeddings(
                features.embed_prepared(prepared, self.meta.features, embedder=embedder)
            )
        size = self.config.input_size
        arrays = prepared.reshape(len(prepared), 3, size, size)
        return np.asarray(self.session.run(None, {self.input_name: arrays})[0])

    def logits_from_arrays(
        self, arrays: Array, *, embedder: Callable[[str], Embedder] = shared_embedder
    ) -> Array:
        """Logits for preprocessed images (N, 3, S, S) of a bundle with one input size."""
        return self.logits_from_prepared(arrays.reshape(len(arrays), -1), embedder=embedder)

    def outputs(self, logits: Array) -> Array:
        """Probabilities (classification) or values (regression, before clipping)."""
        return outputs_from_logits(self.meta, logits)
