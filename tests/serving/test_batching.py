"""Batching across requests: concurrent callers share backbone runs and get their own rows back."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from serving.batching import BatchingEmbedder
from taskvision.backbone import Embedder, backbone_onnx_path, onnx_session
from taskvision.preprocess import preprocess_bytes
from tests.support.images import shape_image


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    return Embedder(session=onnx_session(backbone_onnx_path(), threads=1))


def _images(n: int) -> list[np.ndarray]:
    return [preprocess_bytes(shape_image("circle", i), max_pixels=10**7)[0] for i in range(n)]


def test_concurrent_callers_share_runs_and_get_their_own_rows(embedder: Embedder) -> None:
    images = _images(8)
    expected = embedder.embed_arrays(np.stack(images))
    batching = BatchingEmbedder(embedder, window_ms=200, max_batch=16)
    start = threading.Barrier(8)

    def call(i: int) -> np.ndarray:
        start.wait()
        return batching.embed_arrays(images[i][None])

    with ThreadPoolExecutor(8) as pool:
        rows = list(pool.map(call, range(8)))
    np.testing.assert_allclose(np.concatenate(rows), expected, atol=1e-4)
    assert batching.images == 8 and batching.runs < 8


def test_a_full_batch_does_not_wait_for_the_window(embedder: Embedder) -> None:
    batching = BatchingEmbedder(embedder, window_ms=5000, max_batch=2)
    started = time.perf_counter()
    batching.embed_arrays(np.stack(_images(2)))
    assert time.perf_counter() - started < 4


def test_a_lone_caller_waits_at_most_the_window(embedder: Embedder) -> None:
    batching = BatchingEmbedder(embedder, window_ms=100, max_batch=16)
    batching.embed_arrays(np.stack(_images(1)))  # warm
    started = time.perf_counter()
    batching.embed_arrays(np.stack(_images(1)))
    assert 0.1 <= time.perf_counter() - started < 2.0


def test_a_failed_run_fails_every_caller_of_its_batch(embedder: Embedder) -> None:
    batching = BatchingEmbedder(embedder, window_ms=300, max_batch=16)
    good = np.stack(_images(1))
    bad = np.zeros((1, 3, 32, 32), dtype=np.float32)  # the wrong size: the batch cannot be run
    start = threading.Barrier(2)

    def call(arrays: np.ndarray) -> object:
        start.wait()
        try:
            return batching.embed_arrays(arrays)
        except Exception as exc:
            return exc

    with ThreadPoolExecutor(2) as pool:
        outcomes = list(pool.map(call, [good, bad]))
    assert all(isinstance(o, Exception) for o in outcomes)
    assert batching.embed_arrays(good).shape == (1, embedder.embed_arrays(good).shape[1])  # next batch works
