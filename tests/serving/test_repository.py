"""The model repository: one load per cold version, no stall for the others, a memory budget."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from serving.model import BundlePredictor
from serving.repository import BundleRepository
from tests.support.bundles import write_head_bundle, write_network_bundle
from tests.support.images import shape_image

IMAGE = shape_image("circle", 7)


def _bundles(root: Path, count: int, n_labels: int = 4) -> None:
    for i in range(count):
        write_head_bundle(root / f"task-{i}.v1", n_labels=n_labels, seed=i)


def _repository(
    root: Path, *, memory_mb: float = 256, locate: Callable[[str], Path] | None = None
) -> BundleRepository:
    return BundleRepository(root, memory_mb=memory_mb, locate=locate)


def _answer(predictor: BundlePredictor) -> list[float]:
    (answer,) = predictor.classify([IMAGE])
    assert isinstance(answer, dict)
    return [label["prob"] for label in sorted(answer["labels"], key=lambda lb: lb["id"])]


def test_concurrent_requests_for_a_cold_version_load_it_once(tmp_path: Path) -> None:
    _bundles(tmp_path, 1)
    calls: list[str] = []

    def slow_locate(name: str) -> Path:
        calls.append(name)
        time.sleep(0.3)  # a download
        return tmp_path / name

    repository = _repository(tmp_path, locate=slow_locate)
    with ThreadPoolExecutor(8) as pool:
        predictors = list(pool.map(lambda _: repository.get_or_load("task-0.v1"), range(8)))
    assert calls == ["task-0.v1"] and repository.loads == 1
    assert all(p is predictors[0] for p in predictors)
    assert repository.get_or_load("task-0.v1") is predictors[0]  # loaded: no new load
    assert repository.loads == 1


def test_a_slow_load_delays_neither_loaded_nor_other_cold_versions(tmp_path: Path) -> None:
    _bundles(tmp_path, 3)
    release = threading.Event()

    def locate(name: str) -> Path:
        if name == "task-2.v1":
            release.wait(timeout=30)  # a download that takes as long as the test wants
        return tmp_path / name

    repository = _repository(tmp_path, locate=locate)
    warm = repository.get_or_load("task-0.v1")
    _answer(warm)  # the backbone session is up
    with ThreadPoolExecutor(1) as pool:
        slow = pool.submit(repository.get_or_load, "task-2.v1")
        time.sleep(0.1)
        assert not slow.done()
        latencies = []
        for _ in range(5):
            start = time.perf_counter()
            _answer(repository.get_or_load("task-0.v1"))
            latencies.append(time.perf_counter() - start)
        start = time.perf_counter()
        _answer(repository.get_or_load("task-1.v1"))  # another cold version loads meanwhile
        cold = time.perf_counter() - start
        assert not slow.done()  # all of that while the slow load was still going on
        release.set()
        _answer(slow.result(timeout=30))
    assert max(latencies) < 1.0 and cold < 1.0, (latencies, cold)


def test_a_failed_load_reaches_every_waiter_and_the_next_request_retries(tmp_path: Path) -> None:
    _bundles(tmp_path, 1)
    attempts: list[int] = []

    def flaky(name: str) -> Path:
        attempts.append(1)
        time.sleep(0.2)
        if len(attempts) == 1:
            raise ConnectionError("S3 is down")
        return tmp_path / name

    repository = _repository(tmp_path, locate=flaky)

    def ask(_: int) -> object:
        try:
            return repository.get_or_load("task-0.v1")
        except ConnectionError as exc:
            return exc

    with ThreadPoolExecutor(4) as pool:
        outcomes = list(pool.map(ask, range(4)))
    assert len(attempts) == 1 and all(isinstance(o, ConnectionError) for o in outcomes)
    assert isinstance(repository.get_or_load("task-0.v1"), BundlePredictor)
    assert len(attempts) == 2


def test_loaded_versions_stay_within_the_memory_budget(tmp_path: Path) -> None:
    _bundles(tmp_path, 6, n_labels=20)
    one = write_head_bundle(tmp_path / "probe", n_labels=20, seed=99)
    del one
    probe = BundlePredictor("probe", tmp_path / "probe")
    probe.load()
    size = probe.memory_bytes  # one 20-label head: about 150 KB
    repository = _repository(tmp_path, memory_mb=3.5 * size / (1 << 20))
    answers = {}
    for i in range(6):
        answers[i] = _answer(repository.get_or_load(f"task-{i}.v1"))
        assert repository.memory_bytes <= repository.memory_budget
        loaded = [model for model in repository.get_models().values() if model.ready]
        assert repository.memory_bytes == sum(model.memory_bytes for model in loaded)
    assert sorted(repository.get_models()) == ["task-3.v1", "task-4.v1", "task-5.v1"]
    assert len(repository.bank) == 3 and repository.evictions == 3
    # The least recently used goes first: touching task-3 makes task-4 the next one out.
    repository.get_or_load("task-3.v1")
    again = _answer(repository.get_or_load("task-0.v1"))  # unloaded: loads again, same answer
    assert again == answers[0]
    assert sorted(repository.get_models()) == ["task-0.v1", "task-3.v1", "task-5.v1"]


def test_full_networks_have_their_own_sessions_and_count_their_size(tmp_path: Path) -> None:
    write_network_bundle(tmp_path / "tuned.v1", n_labels=3)
    _bundles(tmp_path, 1)
    repository = _repository(tmp_path)
    tuned = repository.get_or_load("tuned.v1")
    head = repository.get_or_load("task-0.v1")
    assert tuned.network is not None and tuned.head is None
    assert head.head is not None and head.network is None and "task-0.v1" in repository.bank
    model_file = (tmp_path / "tuned.v1" / "model.onnx").stat().st_size
    assert tuned.memory_bytes >= 3 * model_file
    probs = _answer(tuned)
    assert len(probs) == 3 and abs(sum(probs) - 1) < 1e-3


def test_unloading_a_version_drops_its_head_from_the_bank(tmp_path: Path) -> None:
    _bundles(tmp_path, 2)
    repository = _repository(tmp_path)
    repository.get_or_load("task-0.v1")
    repository.get_or_load("task-1.v1")
    repository.unload("task-0.v1")
    assert "task-0.v1" not in repository.bank and "task-1.v1" in repository.bank
    assert repository.memory_bytes == repository.get_or_load("task-1.v1").memory_bytes
    with pytest.raises(FileNotFoundError):
        repository.get_or_load("missing.v1")


def test_a_head_bank_answer_equals_onnx_runtime_on_the_same_embedding(tmp_path: Path) -> None:
    from taskvision.backbone import shared_embedder
    from taskvision.inference import BundleModel

    _bundles(tmp_path, 1)
    predictor = _repository(tmp_path).get_or_load("task-0.v1")
    inputs, _ = predictor.decode(IMAGE)
    arrays = np.stack(list(inputs.values()))
    reference = BundleModel.load(tmp_path / "task-0.v1")
    expected = reference.outputs(reference.logits_from_embeddings(shared_embedder().embed_arrays(arrays)))
    np.testing.assert_allclose(predictor.outputs_for_arrays(arrays), expected, atol=1e-6)


def _run_in_thread(coroutine: Any) -> Any:
    """Await ``coroutine`` on a loop of its own in a worker thread, as KServe's model repository
    handlers do (and safe when this thread already runs a loop, as Playwright's sync API leaves one)."""
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coroutine).result()


def test_versions_loaded_through_the_repository_api_stay_listed_when_evicted(tmp_path: Path) -> None:
    _bundles(tmp_path, 5, n_labels=20)
    probe = BundlePredictor("probe", tmp_path / "task-0.v1")
    probe.load()
    repository = _repository(tmp_path, memory_mb=2.5 * probe.memory_bytes / (1 << 20))
    for i in range(5):
        assert _run_in_thread(repository.load(f"task-{i}.v1"))
    assert sorted(repository.get_models()) == [f"task-{i}.v1" for i in range(5)]
    ready = [name for name in repository.get_models() if _run_in_thread(repository.is_model_ready(name))]
    assert ready == ["task-3.v1", "task-4.v1"]
    evicted = repository.get_model("task-0.v1")  # what the data plane asks for: loaded again
    assert evicted is not None and evicted.ready and _answer(evicted)
    assert not _run_in_thread(repository.is_model_ready("task-3.v1"))  # the least recently used went out
    repository.unload("task-1.v1")
    assert repository.get_model("task-1.v1") is None  # unloaded on purpose: gone
