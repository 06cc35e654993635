"""The backbone gives the same embeddings whichever way it runs; serving uses ONNX Runtime."""

from __future__ import annotations

import numpy as np
import pytest

from taskvision.backbone import EMBEDDING_DIM, Embedder, build_embedding_model
from taskvision.preprocess import preprocess_bytes
from tests.support.images import shape_image


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    arrays = [
        preprocess_bytes(shape_image(kind, i), max_pixels=10**7)[0]
        for kind in ("circle", "square")
        for i in range(3)
    ]
    return np.stack(arrays)


@pytest.mark.slow
def test_onnx_runtime_channels_last_and_torchscript_match_eager_torch(images: np.ndarray) -> None:
    import torch

    model = build_embedding_model()
    x = torch.from_numpy(images)
    with torch.inference_mode():
        eager = model(x).numpy()
        channels_last = model.to(memory_format=torch.channels_last)(
            x.to(memory_format=torch.channels_last)
        ).numpy()
        scripted = torch.jit.freeze(torch.jit.trace(model.to(memory_format=torch.contiguous_format), x[:1]))
        torchscript = scripted(x).numpy()
    onnx = Embedder().embed_arrays(images)
    assert eager.shape == onnx.shape == (6, EMBEDDING_DIM)
    for other in (channels_last, torchscript, onnx):
        assert np.abs(other - eager).max() < 1e-3
    # Embeddings of different pictures differ: the comparison above is not trivially true.
    assert np.abs(eager[0] - eager[3]).max() > 0.1


def test_the_embedding_cache_skips_the_backbone_for_a_known_image(images: np.ndarray) -> None:
    embedder = Embedder(cache_size=4)
    first = embedder.embed_arrays(images[:2])
    again = embedder.embed_arrays(images[:3])
    assert embedder.images_embedded == 3
    np.testing.assert_array_equal(first, again[:2])
    embedder.embed_arrays(images[3:6])  # evicts the oldest beyond 4 entries
    embedder.embed_arrays(images[:1])
    assert embedder.images_embedded == 7


def test_overlapping_runs_use_the_one_thread_session_with_the_same_embeddings(images: np.ndarray) -> None:
    import threading

    from taskvision.backbone import backbone_onnx_path, onnx_session

    path = backbone_onnx_path()
    embedder = Embedder(
        session=onnx_session(path, spinning=False),
        concurrent_session=onnx_session(path, threads=1, spinning=False),
    )
    alone = embedder.embed_arrays(images)
    assert embedder.concurrent_runs == 0  # nothing else was running

    barrier = threading.Barrier(4)
    results: dict[int, np.ndarray] = {}

    def worker(k: int) -> None:
        barrier.wait()
        for _ in range(3):
            results[k] = embedder.embed_arrays(images)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert embedder.concurrent_runs > 0
    for embedded in results.values():
        np.testing.assert_allclose(embedded, alone, atol=1e-4)
