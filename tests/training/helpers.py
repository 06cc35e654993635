"""API helpers for training tests: build a task on generated images, train it, wait for the run."""

from __future__ import annotations

import time
from typing import Any

from fastapi.testclient import TestClient

from tests.support.api import b64
from tests.support.images import shape_image, size_image, tag_image

TASKS = "/recognition/v2/task"
IMAGES = "/recognition/v2/training-image"


def add_label(client: TestClient, task_id: str, name: str, label_type: str) -> str:
    label = client.post("/recognition/v2/label", json={"name": name, "type": label_type}).json()
    assert client.post(f"{TASKS}/{task_id}/add-label", json={"label_id": label["id"]}).status_code == 200
    return str(label["id"])


def upload(client: TestClient, data: bytes, labels: list[str], values: dict[str, float] | None = None) -> str:
    image = client.post(IMAGES, json={"base64": b64(data)}).json()
    for label_id in labels:
        body: dict[str, Any] = {"label_id": label_id}
        if values and label_id in values:
            body["value"] = values[label_id]
        assert client.post(f"{IMAGES}/{image['id']}/add-label", json=body).status_code == 200
    return str(image["id"])


def make_task(client: TestClient, task_type: str, per_label: int = 24) -> dict[str, Any]:
    task = client.post(TASKS, json={"name": f"gen-{task_type}", "type": task_type}).json()
    if task_type == "multi_class":
        circle, square = (
            add_label(client, task["id"], "circle", "category"),
            add_label(client, task["id"], "square", "category"),
        )
        for i in range(per_label):
            upload(client, shape_image("circle", i), [circle])
            upload(client, shape_image("square", i), [square])
    elif task_type == "multi_label":
        negative = next(label["id"] for label in task["labels"] if label["negative_for_task"])
        red, striped = (
            add_label(client, task["id"], "red", "tag"),
            add_label(client, task["id"], "striped", "tag"),
        )
        for i in range(per_label // 2 + 2):
            upload(client, tag_image(True, False, i), [red])
            upload(client, tag_image(False, True, i), [striped])
            upload(client, tag_image(True, True, i), [red, striped])
            upload(client, tag_image(False, False, i), [negative])
    else:
        size = add_label(client, task["id"], "radius", "value")
        for i in range(per_label * 2):
            radius = 6 + (i * 7) % 36
            upload(client, size_image(radius, i), [size], {size: float(radius)})
    return task


def train(client: TestClient, task_id: str, **params: Any) -> dict[str, Any]:
    response = client.post(f"{TASKS}/{task_id}/train", json=params or None)
    assert response.status_code == 202, response.text
    return dict(response.json())


def wait(client: TestClient, run_id: str, timeout: float = 180) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = client.get(f"/recognition/v2/training-run/{run_id}").json()
        if run["status"] in ("SUCCEEDED", "FAILED", "CANCELED"):
            return dict(run)
        time.sleep(0.3)
    raise AssertionError(f"run {run_id} did not finish in {timeout} s: {run}")
