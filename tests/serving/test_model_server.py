"""``python -m serving``: the KServe ModelServer for bundles, over V1 and V2 (Open Inference) REST."""

from __future__ import annotations

import base64
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from components.lib.evaluate import evaluate_model
from components.lib.split import split_dataset
from components.lib.train import TrainConfig, train_model
from taskvision.bundle import BundleMeta
from taskvision.storage import LocalBlobStore
from tests.support.images import shape_image
from tests.support.snapshots import shapes_in_store

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small frozen-backbone bundle trained with the pipeline's own train step."""
    root = tmp_path_factory.mktemp("bundle")
    store = LocalBlobStore(root / "blobs")
    info, rows = shapes_in_store(store, per_label=12)
    out = root / "bundle"
    train_model(
        info, rows, split_dataset(info, rows), store, out, TrainConfig(mode="embed", cache_embeddings=False)
    )
    meta = BundleMeta.from_json((out / "bundle.json").read_text())
    meta.metrics = evaluate_model(out)  # what the register step adds
    (out / "bundle.json").write_text(meta.to_json())
    (out / "test_inputs.npz").unlink()
    return out


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _start(args: list[str], log: Path) -> tuple[subprocess.Popen[bytes], str]:
    """The model server as a child; its temporary files go to ``tmp/`` beside ``log``."""
    port = _free_port()
    scratch = log.parent / "tmp"
    scratch.mkdir(exist_ok=True)
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "TMPDIR": str(scratch)}
    with log.open("wb") as out:
        child = subprocess.Popen(
            [sys.executable, "-m", "serving", *args, "--http-port", str(port), "--enable_grpc", "false"],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if child.poll() is not None:
            raise AssertionError(f"the model server exited:\n{log.read_text()}")
        try:
            if requests.get(f"{url}/v2/health/live", timeout=1).status_code == 200:
                return child, url
        except requests.ConnectionError:
            time.sleep(0.2)
    child.kill()
    raise AssertionError(f"the model server did not start:\n{log.read_text()}")


@pytest.fixture
def one_model(bundle: Path, tmp_path: Path) -> Iterator[str]:
    child, url = _start(["--model-dir", str(bundle), "--model_name", "shapes"], tmp_path / "server.log")
    yield url
    child.terminate()
    child.wait(timeout=20)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_v1_and_v2_protocols_give_the_same_answer(one_model: str) -> None:
    circle, square = shape_image("circle", 50), shape_image("square", 51)
    assert requests.get(f"{one_model}/v2/models/shapes/ready", timeout=5).status_code == 200
    v1 = requests.post(
        f"{one_model}/v1/models/shapes:predict",
        json={"instances": [{"b64": _b64(circle)}, _b64(square)]},
        timeout=30,
    )
    assert v1.status_code == 200, v1.text
    predictions = v1.json()["predictions"]
    assert [p["best_label"]["name"] for p in predictions] == ["circle", "square"]

    v2 = requests.post(
        f"{one_model}/v2/models/shapes/infer",
        json={
            "inputs": [
                {"name": "image", "shape": [2], "datatype": "BYTES", "data": [_b64(circle), _b64(square)]}
            ]
        },
        timeout=30,
    )
    assert v2.status_code == 200, v2.text
    output = v2.json()["outputs"][0]
    assert output["name"] == "probabilities" and output["shape"] == [2, 2] and output["datatype"] == "FP32"
    probs = [output["data"][0:2], output["data"][2:4]]
    for row, prediction in zip(probs, predictions, strict=True):
        by_name = {label["name"]: label["prob"] for label in prediction["labels"]}
        assert row == pytest.approx([by_name["circle"], by_name["square"]], abs=1e-5)

    bad = requests.post(
        f"{one_model}/v1/models/shapes:predict", json={"instances": [{"b64": "!!"}]}, timeout=10
    )
    assert bad.status_code == 400
    assert requests.post(
        f"{one_model}/v1/models/shapes:predict", json={"instances": [_b64(circle)]}, timeout=10
    ).ok


def test_a_repository_of_bundles_loads_and_unloads_on_demand(bundle: Path, tmp_path: Path) -> None:
    models = tmp_path / "models"
    for name in ("task-a.v1", "task-a.v2"):
        shutil.copytree(bundle, models / name)
    child, url = _start(["--model-dir", str(models)], tmp_path / "server.log")
    try:
        body = {"instances": [_b64(shape_image("circle", 60))]}
        assert requests.post(f"{url}/v1/models/task-a.v1:predict", json=body, timeout=10).status_code == 404
        loaded = requests.post(f"{url}/v2/repository/models/task-a.v1/load", timeout=60)
        assert loaded.status_code == 200, loaded.text
        answer = requests.post(f"{url}/v1/models/task-a.v1:predict", json=body, timeout=30).json()
        assert answer["predictions"][0]["best_label"]["name"] == "circle"
        assert requests.post(f"{url}/v2/repository/models/task-a.v1/unload", timeout=30).status_code == 200
        assert requests.post(f"{url}/v1/models/task-a.v1:predict", json=body, timeout=10).status_code == 404
        missing = requests.post(f"{url}/v2/repository/models/nope/load", timeout=30)
        assert missing.status_code in (400, 404, 503)
    finally:
        child.terminate()
        child.wait(timeout=20)
