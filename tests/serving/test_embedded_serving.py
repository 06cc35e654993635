"""Embedded serving from an S3-like blob store: a 2 s download of one version stalls no other task."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from api.services.classifiers import EmbeddedClassifier
from serving.extractors import DEFAULT_FEATURES
from taskvision.bundle import HEAD_ARRAYS_FILE, outputs_from_logits
from taskvision.preprocess import DEFAULT, preprocess_bytes
from taskvision.storage import LocalBlobStore
from tests.support.bundles import random_head, write_head_bundle
from tests.support.images import shape_image

DELAY_S = 2.0
IMAGE = shape_image("square", 3)


class SlowStore:
    """A blob store whose objects under one prefix take ``DELAY_S`` to download (like a slow S3)."""

    def __init__(self, inner: LocalBlobStore, slow_prefix: str) -> None:
        self.inner = inner
        self.slow_prefix = slow_prefix
        self.gets: list[str] = []
        self._lock = threading.Lock()

    def get(self, key: str) -> bytes:
        with self._lock:
            self.gets.append(key)
        if key.startswith(self.slow_prefix):
            time.sleep(DELAY_S)
        return self.inner.get(key)

    def put(self, key: str, data: bytes, *, content_type: str = "application/octet-stream") -> None:
        self.inner.put(key, data, content_type=content_type)

    def exists(self, key: str) -> bool:
        return self.inner.exists(key)

    def delete(self, key: str) -> None:
        self.inner.delete(key)

    def delete_prefix(self, prefix: str) -> int:
        return self.inner.delete_prefix(prefix)

    def list_keys(self, prefix: str = "") -> list[str]:
        return self.inner.list_keys(prefix)

    def uri(self, key: str) -> str:
        return self.inner.uri(key)


def _serving(tmp_path: Path, tasks: int) -> tuple[EmbeddedClassifier, SlowStore]:
    inner = LocalBlobStore(tmp_path / "blobs")
    for i in range(tasks):
        write_head_bundle(tmp_path / "blobs" / "models" / f"task-{i}" / "run", n_labels=2 + i, seed=i)
    store = SlowStore(inner, slow_prefix="models/task-0/")
    serving = EmbeddedClassifier(store, tmp_path / "cache", memory_mb=64, max_image_pixels=10**7)
    return serving, store


def _classify(serving: EmbeddedClassifier, task: int) -> float:
    start = time.perf_counter()
    (answer,) = serving.predictor(f"task-{task}", 1, f"models/task-{task}/run").classify([IMAGE])
    assert isinstance(answer, dict) and len(answer["labels"]) == 2 + task
    return time.perf_counter() - start


def test_a_slow_download_delays_no_other_task(tmp_path: Path) -> None:
    serving, store = _serving(tmp_path, tasks=6)
    _classify(serving, 1)  # warm: the backbone session is loaded
    with ThreadPoolExecutor(3) as pool:
        started = time.perf_counter()
        slow = [pool.submit(_classify, serving, 0) for _ in range(2)]  # two requests, one cold version
        time.sleep(0.05)
        others = [_classify(serving, task) for task in (1, 2, 3, 4, 5, 1, 2, 3, 4, 5)]
        others_done = time.perf_counter() - started
        slow_times = [future.result(timeout=30) for future in slow]
    assert min(slow_times) >= 2 * DELAY_S  # bundle.json and head.onnx, each DELAY_S
    assert others_done < DELAY_S, others  # four cold and six warm versions answered meanwhile
    assert max(others) < 1.0, others
    # The two requests for the slow version downloaded it once.
    assert store.gets.count("models/task-0/run/bundle.json") == 1
    assert store.gets.count("models/task-0/run/head.onnx") == 1
    assert _classify(serving, 0) < 1.0  # now it is loaded


def test_a_bundle_from_s3_brings_its_head_arrays(tmp_path: Path) -> None:
    """A version copied from S3 is served from the same files as one read in place: head.npz too."""
    bundle = tmp_path / "blobs" / "models" / "task-npz" / "run"
    meta = write_head_bundle(bundle, n_labels=4, seed=1, npz=True)
    # The head bank prefers head.npz: give it different weights than head.onnx, so an answer
    # computed from head.onnx alone (the arrays left behind) would not match.
    weight, bias = random_head(4, seed=2)
    np.savez(bundle / HEAD_ARRAYS_FILE, weight=weight, bias=bias)
    inner = LocalBlobStore(tmp_path / "blobs")
    remote = EmbeddedClassifier(
        SlowStore(inner, slow_prefix="nothing/"), tmp_path / "cache", memory_mb=64, max_image_pixels=10**7
    )
    local = EmbeddedClassifier(inner, tmp_path / "cache-local", memory_mb=64, max_image_pixels=10**7)
    answers = [
        serving.predictor("task-npz", 1, "models/task-npz/run").classify([IMAGE])[0]
        for serving in (remote, local)
    ]
    assert (tmp_path / "cache" / "models" / "task-npz" / "run" / HEAD_ARRAYS_FILE).is_file()
    assert answers[0] == answers[1]
    pixels, _ = preprocess_bytes(IMAGE, max_pixels=10**7)
    embedding = remote.extractors.embed(DEFAULT_FEATURES, {DEFAULT: pixels[None]})
    probabilities = outputs_from_logits(meta, embedding @ weight.T + bias)
    labels = {item["id"]: item["prob"] for item in answers[0]["labels"]}  # type: ignore[index]
    expected = {f"label-{i}": round(float(p), 5) for i, p in enumerate(probabilities[0])}
    assert labels == pytest.approx(expected, abs=2e-5)
