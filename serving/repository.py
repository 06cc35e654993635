"""A KServe model repository that loads TaskVision bundles on demand and keeps the recent ones.

Model names are folder names under ``models_dir`` for the standalone server
(``python -m serving --model-dir DIR`` serves ``DIR/<name>/bundle.json``), or
whatever the ``locate`` callable resolves (the control plane maps
``<task>.v<version>`` to the version's bundle). ``POST
/v2/repository/models/<name>/load`` and ``/unload`` work through KServe's
model repository extension. At most ``capacity`` models stay loaded; the least
recently used one is unloaded first.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

from kserve.model_repository import ModelRepository

from serving.model import DEFAULT_MAX_PIXELS, BundlePredictor

logger = logging.getLogger(__name__)


class BundleRepository(ModelRepository):
    def __init__(
        self,
        models_dir: str | Path = "/mnt/models",
        *,
        locate: Callable[[str], Path] | None = None,
        capacity: int = 16,
        max_image_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:
        super().__init__(str(models_dir))
        self.locate = locate or (lambda name: Path(self.models_dir) / name)
        self.capacity = capacity
        self.max_image_pixels = max_image_pixels
        self._order: OrderedDict[str, None] = OrderedDict()
        self._lock = threading.RLock()

    def load(self, name: str) -> bool:
        return self.load_model(name)

    def load_model(self, name: str) -> bool:
        path = self.locate(name)
        if not (path / "bundle.json").is_file():
            raise FileNotFoundError(f"No model bundle for {name!r} at {path}")
        predictor = BundlePredictor(name, path, max_image_pixels=self.max_image_pixels)
        predictor.load()
        with self._lock:
            self.update(predictor)
            self._touch(name)
        return predictor.ready

    def get_or_load(self, name: str) -> BundlePredictor:
        """The loaded predictor for ``name``, loading it first if needed (LRU bookkeeping)."""
        with self._lock:
            model = self.get_model(name)
            if model is None:
                self.load_model(name)
                model = self.get_model(name)
            else:
                self._touch(name)
        assert isinstance(model, BundlePredictor)
        return model

    def _touch(self, name: str) -> None:
        self._order[name] = None
        self._order.move_to_end(name)
        while len(self._order) > self.capacity:
            oldest, _ = self._order.popitem(last=False)
            if oldest in self.models:
                logger.info("unloading %s (least recently used)", oldest)
                super().unload(oldest)

    def unload(self, name: str) -> None:
        with self._lock:
            self._order.pop(name, None)
            super().unload(name)
