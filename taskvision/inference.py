"""Run a model bundle: the one prediction path shared by the evaluate step and serving.

A frozen-backbone bundle is a head over the shared backbone embedding, so a
caller that already has embeddings (evaluation, or a server answering several
tasks for one image) passes them straight to :meth:`BundleModel.logits_from_embeddings`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from taskvision.bundle import BundleMeta, outputs_from_logits

if TYPE_CHECKING:
    import onnxruntime

from taskvision.backbone import Embedder, onnx_session, shared_embedder


class BundleModel:
    """A loaded bundle: metadata plus an ONNX Runtime session for its weights."""

    def __init__(self, meta: BundleMeta, session: onnxruntime.InferenceSession) -> None:
        self.meta = meta
        self.session = session
        self.input_name = session.get_inputs()[0].name

    @classmethod
    def load(cls, directory: Path, *, threads: int | None = None) -> BundleModel:
        meta = BundleMeta.from_json((directory / "bundle.json").read_text())
        return cls(meta, onnx_session(directory / meta.weights_file, threads=threads))

    def logits_from_embeddings(self, embeddings: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        if not self.meta.frozen_backbone:
            raise ValueError("A fine-tuned bundle takes images, not backbone embeddings.")
        return np.asarray(self.session.run(None, {self.input_name: embeddings.astype(np.float32)})[0])

    def logits_from_arrays(
        self, arrays: npt.NDArray[np.float32], *, embedder: Embedder | None = None
    ) -> npt.NDArray[np.float32]:
        """Logits for preprocessed images (N, 3, 224, 224)."""
        if self.meta.frozen_backbone:
            return self.logits_from_embeddings((embedder or shared_embedder()).embed_arrays(arrays))
        return np.asarray(self.session.run(None, {self.input_name: arrays.astype(np.float32)})[0])

    def outputs(self, logits: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """Probabilities (classification) or values (regression)."""
        return outputs_from_logits(self.meta, logits)
