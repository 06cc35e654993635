"""Small API helpers for tests: create a task or a label, upload an image, base64."""

from __future__ import annotations

import base64
from typing import Any

from fastapi.testclient import TestClient


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def create_task(client: TestClient, task_type: str = "multi_class", name: str = "task") -> dict[str, Any]:
    response = client.post("/recognition/v2/task", json={"name": name, "type": task_type})
    assert response.status_code == 201, response.text
    return dict(response.json())


def create_label(client: TestClient, label_type: str = "category", name: str = "label") -> dict[str, Any]:
    response = client.post("/recognition/v2/label", json={"name": name, "type": label_type})
    assert response.status_code == 201, response.text
    return dict(response.json())


def upload(client: TestClient, data: bytes, **options: Any) -> dict[str, Any]:
    response = client.post("/recognition/v2/training-image", json={"base64": b64(data), **options})
    assert response.status_code == 201, response.text
    return dict(response.json())
