"""Embedded serving: the control plane hosts the KServe predictors of production versions itself.

Versions load lazily into a :class:`serving.repository.BundleRepository`
(one load per version however many requests ask, none blocking the others)
and stay loaded within ``TASKVISION_SERVING_MEMORY_MB`` (least recently used
first out). Frozen-backbone heads share one head bank and one backbone per
feature extractor (INT8 with ``TASKVISION_SERVING_INT8``, calibrated on the
stored training images in the background). A model is named
``<task id>.v<version>``, so switching the production version takes effect on
the next request (it simply asks for another name). Bundles in a local blob
directory are read in place; from S3 they are copied once to a local cache.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from serving.extractors import Extractors
from serving.int8 import start_int8
from serving.model import BundlePredictor
from serving.repository import BundleRepository
from taskvision.bundle import BundleMeta
from taskvision.errors import ServiceUnavailableError
from taskvision.storage import BlobStore, LocalBlobStore

logger = logging.getLogger(__name__)


def model_name(task_id: str, version: int) -> str:
    return f"{task_id}.v{version}"


class EmbeddedServing:
    def __init__(
        self,
        blobs: BlobStore,
        cache_dir: Path,
        *,
        memory_mb: float,
        max_image_pixels: int,
        int8: bool = False,
        batch_window_ms: float = 0.0,
    ) -> None:
        self.blobs = blobs
        self.cache_dir = cache_dir
        self._prefixes: dict[str, str] = {}
        self._lock = threading.Lock()
        self.extractors = Extractors(batch_window_ms=batch_window_ms)
        self.repository = BundleRepository(
            cache_dir,
            locate=self._locate,
            memory_mb=memory_mb,
            max_image_pixels=max_image_pixels,
            extractors=self.extractors,
        )
        if int8:
            start_int8(self.extractors, blobs, cache_dir / "int8", max_pixels=max_image_pixels)

    def predictor(self, task_id: str, version: int, bundle_prefix: str) -> BundlePredictor:
        """The loaded predictor of a task version (loading it on first use)."""
        name = model_name(task_id, version)
        with self._lock:
            self._prefixes[name] = bundle_prefix
        try:
            return self.repository.get_or_load(name)
        except Exception as exc:
            logger.exception("cannot load %s", name)
            raise ServiceUnavailableError(
                f"Version {version} of task {task_id} cannot be loaded right now; retry later."
            ) from exc

    def unload_task(self, task_id: str) -> None:
        for name in list(self.repository.get_models()):
            if name.startswith(f"{task_id}.v"):
                self.repository.unload(name)

    def _locate(self, name: str) -> Path:
        prefix = self._prefixes[name]
        if isinstance(self.blobs, LocalBlobStore):
            return self.blobs.root / prefix
        local = self.cache_dir / prefix
        if not (local / "bundle.json").is_file():
            meta = BundleMeta.from_json(self.blobs.get(f"{prefix}/bundle.json"))
            local.mkdir(parents=True, exist_ok=True)
            (local / meta.weights_file).write_bytes(self.blobs.get(f"{prefix}/{meta.weights_file}"))
            (local / "bundle.json").write_text(meta.to_json())  # last: marks the copy complete
        return local
