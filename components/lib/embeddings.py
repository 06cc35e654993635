"""Backbone embeddings of a snapshot's images for training, cached per image hash in the blob store.

One vector per (backbone, view, image): the view is the centre crop or its
mirror image. Cache keys (the Lite0 ones are those of before there were three
backbones, so those caches stay valid)::

    embeddings/<backbone embedding id>/<center|flip>/<sha[:2]>/<sha>.npy

Each image is decoded once (through :func:`taskvision.preprocess.decode_image`,
the one guarded decode path) for every backbone and view it is missing in; the
next batch decodes in threads while the backbones run on the current one.
Cache writes go through a small thread pool: a durable put costs about 5 ms
alone (two fsyncs), and concurrent ones overlap.
"""

from __future__ import annotations

import io
import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager

import numpy as np
import numpy.typing as npt
from PIL import Image

from taskvision import backbone, blob_layout
from taskvision.dataset import ManifestRow
from taskvision.preprocess import DRAFT_FACTOR, decode_image, draft_side, resize_and_crop, to_array
from taskvision.storage import BlobStore

logger = logging.getLogger(__name__)

Array = npt.NDArray[np.float32]
View = tuple[str, bool]  # (backbone id, mirrored)
BATCH = 32  # images decoded ahead
RUN_BATCH = 8  # images per ONNX Runtime run: larger batches are no faster on 2 cores, and grow its arena
WRITERS = 4

_EMBEDDERS: dict[str, backbone.Embedder] = {}
_LOCK = threading.Lock()


def training_embedder(backbone_id: str) -> backbone.Embedder:
    """One session per backbone and training process (no LRU: each image is embedded once anyway)."""
    with _LOCK:
        if backbone_id not in _EMBEDDERS:
            _EMBEDDERS[backbone_id] = backbone.Embedder(backbone_id=backbone_id)
        return _EMBEDDERS[backbone_id]


def cache_key(view: View, sha256: str) -> str:
    backbone_id, mirrored = view
    # Pictures decoded at another scale (an older DRAFT_FACTOR) are other inputs: other keys.
    variant = ("flip" if mirrored else "center") + f"-draft{DRAFT_FACTOR}"
    return blob_layout.embedding_key(backbone.backbone_spec(backbone_id).embedding_id, variant, sha256)


def decode_row(store: BlobStore, row: ManifestRow, *, max_pixels: int, min_side: int) -> Image.Image:
    """A training image, decoded upright to RGB (JPEGs at reduced scale down to ``min_side``)."""
    image, _ = decode_image(store.get(row.blob_key), max_pixels=max_pixels, min_side=min_side)
    return image


def prepared_arrays(image: Image.Image, backbone_ids: Sequence[str]) -> dict[str, Array]:
    """The centre-crop model input of ``image`` for each backbone."""
    out = {}
    for backbone_id in backbone_ids:
        config = backbone.backbone_spec(backbone_id).preprocess
        out[backbone_id] = to_array(resize_and_crop(image, config), config)
    return out


def mirror(arrays: Array) -> Array:
    """(N, C, H, W) model inputs of the mirror images (the preprocessing is per pixel)."""
    return np.ascontiguousarray(arrays[..., ::-1])


class CacheWriter:
    """Puts embeddings into the blob store on a few threads; :meth:`close` waits for them all."""

    def __init__(self, store: BlobStore, *, enabled: bool) -> None:
        self.store = store
        self.enabled = enabled
        self._pool = ThreadPoolExecutor(max_workers=WRITERS, thread_name_prefix="embedding-cache")
        self._pending: list[Future[None]] = []

    def put(self, key: str, vector: Array) -> None:
        if not self.enabled:
            return
        buf = io.BytesIO()
        np.save(buf, vector.astype(np.float32))
        self._pending.append(self._pool.submit(self.store.put, key, buf.getvalue()))

    def close(self) -> None:
        try:
            for future in self._pending:
                future.result()
        finally:
            self._pool.shutdown()


@contextmanager
def cache_writer(store: BlobStore, *, enabled: bool) -> Iterator[CacheWriter]:
    writer = CacheWriter(store, enabled=enabled)
    try:
        yield writer
    finally:
        writer.close()


def batches_of_images(
    store: BlobStore, rows: Sequence[ManifestRow], *, max_pixels: int, min_side: int, workers: int = 2
) -> Iterator[tuple[range, list[Image.Image]]]:
    """Decoded images, a batch at a time, the next batch decoding while the caller works."""
    spans = [range(i, min(i + BATCH, len(rows))) for i in range(0, len(rows), BATCH)]
    if not spans:
        return

    def load(i: int) -> Image.Image:
        return decode_row(store, rows[i], max_pixels=max_pixels, min_side=min_side)

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="decode") as pool:
        pending = pool.map(load, spans[0])
        for index, span in enumerate(spans):
            images = list(pending)
            if index + 1 < len(spans):
                pending = pool.map(load, spans[index + 1])
            yield span, images


def embed_views(
    store: BlobStore,
    rows: Sequence[ManifestRow],
    views: Sequence[View],
    *,
    use_cache: bool = True,
    max_pixels: int = 80_000_000,
    known: dict[View, Array] | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict[View, Array]:
    """Each view's (len(rows), embedding_dim) embeddings of ``rows``, from the cache where it has them.

    ``known`` views are taken as given (computed by the caller for these rows).
    ``progress(k)`` is told how many of the images that had to be embedded are done.
    """
    known = known or {}
    result: dict[View, Array] = {}
    missing: dict[View, list[int]] = {}
    for view in views:
        if view in known:
            result[view] = known[view]
            continue
        result[view] = np.zeros((len(rows), backbone.backbone_spec(view[0]).embedding_dim), dtype=np.float32)
        missing[view] = []
        for i, row in enumerate(rows):
            key = cache_key(view, row.sha256)
            if use_cache and store.exists(key):
                result[view][i] = np.load(io.BytesIO(store.get(key)))
            else:
                missing[view].append(i)
    todo = sorted({i for indices in missing.values() for i in indices})
    if todo:
        missing_sets = {view: set(indices) for view, indices in missing.items()}
        wanted = {i: {view for view, indices in missing_sets.items() if i in indices} for i in todo}
        backbone_ids = list(dict.fromkeys(view[0] for view, indices in missing.items() if indices))
        min_side = draft_side(max(backbone.backbone_spec(b).preprocess.resize_to for b in backbone_ids))
        todo_rows = [rows[i] for i in todo]
        done = 0
        with cache_writer(store, enabled=use_cache) as writer:
            for span, images in batches_of_images(store, todo_rows, max_pixels=max_pixels, min_side=min_side):
                inputs = [prepared_arrays(image, backbone_ids) for image in images]
                for backbone_id in backbone_ids:
                    for mirrored in (False, True):
                        view = (backbone_id, mirrored)
                        members = [k for k in span if view in wanted[todo[k]]]
                        if not members:
                            continue
                        arrays = np.stack([inputs[k - span.start][backbone_id] for k in members])
                        vectors = training_embedder(backbone_id).embed_arrays(
                            mirror(arrays) if mirrored else arrays, batch_size=RUN_BATCH
                        )
                        for k, vector in zip(members, vectors, strict=True):
                            result[view][todo[k]] = vector
                            writer.put(cache_key(view, rows[todo[k]].sha256), vector)
                done += len(span)
                if progress:
                    progress(done)
    logger.info(
        "embedded %d images for %d views (%d image-views from cache)",
        len(rows),
        len(views),
        sum(len(rows) - len(m) for m in missing.values()) + len(known) * len(rows),
    )
    return result
