"""``python -m serving`` with a folder of many bundles: a memory budget, reloads on demand, ``:explain``."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
import requests

from tests.serving.bundles import write_head_bundle, write_network_bundle
from tests.serving.test_model_server import _start
from tests.training import datasets

pytestmark = pytest.mark.slow


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_many_bundles_within_a_memory_budget(tmp_path: Path) -> None:
    models = tmp_path / "models"
    for i in range(12):
        write_head_bundle(models / f"task-{i}.v1", n_labels=3, seed=i)
    write_network_bundle(models / "tuned.v1", n_labels=2)
    # About 26 KB a 3-label head: 0.1 MB holds three of them.
    child, url = _start(["--model-dir", str(models), "--memory-mb", "0.1"], tmp_path / "server.log")
    body = {"instances": [{"b64": _b64(datasets.shape_image("circle", 5))}]}
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
    finally:
        child.terminate()
        child.wait(timeout=20)
