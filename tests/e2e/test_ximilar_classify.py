"""Train and classify with the unmodified ximilar-client against the real server (uvicorn)."""

from __future__ import annotations

import base64
import time
from pathlib import Path
from typing import Any

import pytest
from ximilar.client import RecognitionClient

from tests.support.images import shape_image
from tests.support.live_server import LiveServer

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def _wait_trained(client: RecognitionClient, task_id: str, version: int, timeout: float = 240) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        task, _ = client.get_task(task_id)
        if task.production_version == version and task.last_train_status == "TRAINED":
            return task
        assert task.last_train_status in ("IN_TRAINING", "TRAINED"), task.last_train_status
        time.sleep(0.5)
    raise AssertionError("training did not finish")


def _check_record(record: dict[str, Any], names: set[str]) -> None:
    assert record["_status"] == {"code": 200, "text": "OK"}
    assert set(record["best_label"]) == {"id", "name", "prob"}
    assert record["best_label"]["name"] in names
    assert [label["name"] for label in record["labels"]] and {
        label["name"] for label in record["labels"]
    } == names
    probs = [label["prob"] for label in record["labels"]]
    assert probs == sorted(probs, reverse=True) and abs(sum(probs) - 1) < 1e-3
    assert record["best_label"] == record["labels"][0]
    assert (record["_width"], record["_height"]) == (96, 96)


def test_train_and_classify_with_the_client(live_server: LiveServer, tmp_path: Path) -> None:
    token = live_server.new_user("classify")
    client = RecognitionClient(token=token, endpoint=live_server.base_url)
    task, _ = client.create_task("shapes", task_type="multi_class")
    circle, _ = client.create_label(name="circle", label_type="category")
    square, _ = client.create_label(name="square", label_type="category")
    task.add_label(circle.id)
    task.add_label(square.id)
    records = [
        {"_base64": base64.b64encode(shape_image(kind, i)), "labels": [label.id], "noresize": True}
        for kind, label in (("circle", circle), ("square", square))
        for i in range(20)
    ]
    images, _ = client.upload_images(records)
    assert len(images) == 40

    answer = task.train()
    assert answer["status"] == "QUEUED" and answer["task"] == task.id
    _wait_trained(client, task.id, 1)

    circle_file = tmp_path / "circle.png"
    circle_file.write_bytes(shape_image("circle", 900))
    square_bytes = shape_image("square", 901)
    # For classify the client wants _base64 as text (for uploads it wants bytes).
    result = task.classify(
        [{"_file": str(circle_file), "_id": 1}, {"_base64": base64.b64encode(square_bytes).decode()}]
    )
    assert result["status"] == {"code": 200, "text": "OK"}
    assert result["task_id"] == task.id and result["version"] == 1
    assert isinstance(result["statistics"]["processing time"], float)
    first, second = result["records"]
    _check_record(first, {"circle", "square"})
    _check_record(second, {"circle", "square"})
    assert first["_file"] == str(circle_file) and first["_id"] == 1  # the client's own fields come back
    assert first["best_label"]["name"] == "circle" and second["best_label"]["name"] == "square"

    # A second training makes version 2; version 1 can still be asked for, and images stored.
    task.train()
    _wait_trained(client, task.id, 2)
    latest = task.classify([{"_file": str(circle_file)}])
    assert latest["version"] == 2
    older = task.classify([{"_file": str(circle_file)}], version=1, store_images=True)
    assert older["version"] == 1
    stored_id = older["records"][0]["_stored_image_id"]
    stored, _ = client.get_image(stored_id)
    assert stored.id == stored_id

    # A bad record fails alone; the client only raises on a request-level error.
    mixed = task.classify([{"_base64": "bm90IGFuIGltYWdl", "noresize": True}, {"_file": str(circle_file)}])
    assert mixed["records"][0]["_status"]["code"] == 400 and mixed["records"][1]["_status"]["code"] == 200
