"""``python -m serving`` with a folder of many bundles: a memory budget, reloads on demand, ``:explain``,
INT8 calibrated on a blob store's stored images."""

from __future__ import annotations

import base64
import time
from pathlib import Path

import pytest
import requests

from tests.serving.test_model_server import _start
from tests.support.bundles import write_head_bundle, write_network_bundle
from tests.support.images import shape_image

pytestmark = pytest.mark.slow


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_many_bundles_within_a_memory_budget(tmp_path: Path) -> None:
    models = tmp_path / "models"
    for i in range(12):
        write_head_bundle(models / f"task-{i}.v1", n_labels=3, seed=i)
    write_network_bundle(models / "tuned.v1", n_labels=2)
    store = tmp_path / "blobs"  # the service's blob store, with its stored training images
    for i in range(24):
        (store / "images" / "ws").mkdir(parents=True, exist_ok=True)
        (store / "images" / "ws" / f"{i:03d}").write_bytes(shape_image(("circle", "square")[i % 2], 800 + i))
    # About 32 KB a 3-label version (its head and 10 KiB): 0.1 MB holds three of them.
    log = tmp_path / "server.log"
    child, url = _start(
        ["--model-dir", str(models), "--memory-mb", "0.1", "--int8-calibration", str(store)], log
    )
    body = {"instances": [{"b64": _b64(shape_image("circle", 5))}]}
    try:
        names = [f"task-{i}.v1" for i in range(12)] + ["tuned.v1"]
        for name in names:
            loaded = requests.post(f"{url}/v2/repository/models/{name}/load", timeout=60)
            assert loaded.status_code == 200, loaded.text
        listed = requests.get(f"{url}/v1/models", timeout=10).json()["models"]
        assert set(listed) == set(names)  # evicted versions stay listed (see test_repository)
        for name in names:  # each answers: an evicted one loads again on its request
            answer = requests.post(f"{url}/v1/models/{name}:predict", json=body, timeout=60)
            assert answer.status_code == 200, (name, answer.text)
            assert len(answer.json()["predictions"][0]["labels"]) == (2 if name == "tuned.v1" else 3)
        explained = requests.post(f"{url}/v1/models/task-3.v1:explain", json=body, timeout=120)
        assert explained.status_code == 200, explained.text
        (prediction,) = explained.json()["predictions"]
        (heat,) = prediction["_explanations"]
        assert heat["id"] == prediction["best_label"]["id"] and heat["heatmap"].startswith("data:image/png")
        assert requests.post(f"{url}/v2/repository/models/task-3.v1/unload", timeout=30).status_code == 200
        gone = requests.post(f"{url}/v1/models/task-3.v1:predict", json=body, timeout=10)
        assert gone.status_code == 404  # unloaded on purpose: gone until loaded again
        deadline = time.monotonic() + 180  # calibration runs in the background, in a child process
        while "INT8 backbone in use" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(1)
        assert "INT8 backbone in use" in log.read_text(), log.read_text()[-2000:]
        answer = requests.post(f"{url}/v1/models/task-5.v1:predict", json=body, timeout=60)
        assert answer.status_code == 200 and len(answer.json()["predictions"][0]["labels"]) == 3
    finally:
        child.terminate()
        child.wait(timeout=20)
    assert child.returncode == 0
    left = [path.name for path in (tmp_path / "tmp").iterdir() if path.name != ".ses"]  # ONNX Runtime's
    assert left == []  # the INT8 backbones went with the server
