"""The review queue: images classify stored, most uncertain first, labelled in one call."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from api.db.models import Model, Task
from api.services.review import uncertainty
from api.services.versions import import_bundle
from taskvision.task_types import TaskType
from tests.support.api import b64, create_label, create_task
from tests.support.bundles import linear_bundle
from tests.support.images import image_bytes

TASKS = "/recognition/v2/task"
CLASSIFY = "/recognition/v2/classify"


def _servable(
    app: FastAPI, client: TestClient, tmp_path: Path, task_type: str, names: list[str]
) -> dict[str, Any]:
    task = create_task(client, task_type)
    label_type = {"multi_class": "category", "multi_label": "tag", "regression": "value"}[task_type]
    for name in names:
        label = create_label(client, label_type, name)
        client.post(f"{TASKS}/{task['id']}/add-label", json={"label_id": label["id"]})
    bundle = linear_bundle(tmp_path / task_type, TaskType(task_type), names, seed=3)
    with app.state.services.session_factory() as session:
        import_bundle(
            session, app.state.services.blobs, session.get(Task, task["id"]), bundle, production=True
        )
    return dict(client.get(f"{TASKS}/{task['id']}").json())


def _stored(client: TestClient, task: dict[str, Any], seeds: range) -> list[str]:
    records = [{"_base64": b64(image_bytes(seed, size=(96, 80))), "_id": seed} for seed in seeds]
    answer = client.post(
        CLASSIFY, json={"task_id": task["id"], "records": records, "store_images": True}
    ).json()
    return [record["_stored_image_id"] for record in answer["records"]]


def test_uncertainty_orders_by_margin_entropy_and_out_of_range() -> None:
    close = {"labels": [{"prob": 0.51}, {"prob": 0.49}]}
    sure = {"labels": [{"prob": 0.99}, {"prob": 0.01}]}
    assert uncertainty(TaskType.MULTI_CLASS, close) == pytest.approx(0.98)
    assert uncertainty(TaskType.MULTI_CLASS, sure) == pytest.approx(0.02)
    assert uncertainty(TaskType.MULTI_LABEL, {"labels": [{"prob": 0.5}, {"prob": 0.99}]}) == pytest.approx(
        1.0
    )
    assert uncertainty(TaskType.MULTI_LABEL, {"labels": [{"prob": 0.01}]}) < 0.1
    assert uncertainty(TaskType.REGRESSION, {"out_of_range": True}) == 1.0
    assert uncertainty(TaskType.REGRESSION, {}) == 0.0


@pytest.mark.slow
def test_the_queue_lists_stored_images_most_uncertain_first_and_a_review_labels_them(
    app: FastAPI, client: TestClient, other_client: TestClient, tmp_path: Path
) -> None:
    task = _servable(app, client, tmp_path, "multi_class", ["cat", "dog"])
    stored = _stored(client, task, range(6))
    queue = client.get(f"{TASKS}/{task['id']}/review").json()
    assert queue["count"] == 6 and {item["image"]["id"] for item in queue["results"]} == set(stored)
    order = [item["uncertainty"] for item in queue["results"]]
    assert order == sorted(order, reverse=True)
    first = queue["results"][0]
    assert first["version"] == 1 and len(first["suggested"]) == 1
    assert first["suggested"][0]["name"] == max(first["labels"], key=lambda label: label["prob"])["name"]

    # Accept the suggestion: the image gets that label and leaves the queue.
    accepted = client.post(f"{TASKS}/{task['id']}/review/{first['image']['id']}")
    assert accepted.status_code == 200, accepted.text
    assert [label["name"] for label in accepted.json()["labels"]] == [first["suggested"][0]["name"]]
    # Correct another: the label given wins.
    second = queue["results"][1]
    other = next(label for label in task["labels"] if label["name"] != second["suggested"][0]["name"])
    corrected = client.post(
        f"{TASKS}/{task['id']}/review/{second['image']['id']}", json={"label_ids": [other["id"]]}
    )
    assert [label["id"] for label in corrected.json()["labels"]] == [other["id"]]
    assert client.get(f"{TASKS}/{task['id']}/review").json()["count"] == 4

    third = queue["results"][2]["image"]["id"]
    two = client.post(
        f"{TASKS}/{task['id']}/review/{third}", json={"label_ids": [lb["id"] for lb in task["labels"]]}
    )
    assert two.status_code == 400 and two.json()["code"] == "one_category"
    unknown = client.post(f"{TASKS}/{task['id']}/review/{third}", json={"label_ids": ["nope"]})
    assert unknown.status_code == 400 and unknown.json()["code"] == "unknown_label"
    assert other_client.get(f"{TASKS}/{task['id']}/review").status_code == 404
    assert other_client.post(f"{TASKS}/{task['id']}/review/{third}").status_code == 404


@pytest.mark.slow
def test_a_tagging_review_can_say_none_of_the_tags(app: FastAPI, client: TestClient, tmp_path: Path) -> None:
    task = _servable(app, client, tmp_path, "multi_label", ["red", "round"])
    (image_id,) = _stored(client, task, range(1))
    reviewed = client.post(f"{TASKS}/{task['id']}/review/{image_id}", json={"label_ids": []}).json()
    assert [label["negative_for_task"] for label in reviewed["labels"]] == [True]
    assert client.get(f"{TASKS}/{task['id']}/review").json()["count"] == 0


def test_the_disagreement_list_shows_labelled_images_the_model_answers_differently(
    app: FastAPI, client: TestClient, other_client: TestClient
) -> None:
    task = create_task(client, "multi_class")
    cat, dog = (create_label(client, "category", name) for name in ("cat", "dog"))
    for label in (cat, dog):
        client.post(f"{TASKS}/{task['id']}/add-label", json={"label_id": label["id"]})
    images = [
        client.post("/recognition/v2/training-image", json={"base64": b64(image_bytes(seed))}).json()["id"]
        for seed in range(3)
    ]
    for image in images:
        client.post(f"/recognition/v2/training-image/{image}/add-label", json={"label_id": cat["id"]})

    def record(image: str, split: str, predicted: dict[str, Any], confidence: float) -> str:
        brief = {"id": predicted["id"], "name": predicted["name"]}
        return json.dumps(
            {
                "image_id": image,
                "split": split,
                "true_labels": [{"id": cat["id"], "name": "cat"}],
                "predicted_labels": [{**brief, "prob": confidence}],
                "scores": [{**brief, "prob": confidence}],
                "confidence": confidence,
                "correct": predicted is cat,
            }
        )

    # What the evaluate step stored for version 1: two of the three cats answered "dog".
    lines = [record(images[0], "train", dog, 0.6), record(images[1], "test", dog, 0.9)]
    lines.append(record(images[2], "test", cat, 0.8))
    app.state.services.blobs.put("models/t/r1/predictions.jsonl", "\n".join(lines).encode())
    with app.state.services.session_factory() as session:
        model = Model(
            workspace_id=session.get(Task, task["id"]).workspace_id,
            task_id=task["id"],
            version=1,
            train_status="TRAINED",
            bundle_uri="models/t/r1",
            metrics={},
            created=datetime.now(UTC),
        )
        session.add(model)
        session.commit()
    url = f"{TASKS}/{task['id']}/review?kind=disagreement"

    queue = client.get(url).json()
    assert [item["image"]["id"] for item in queue["results"]] == [images[1], images[0]]  # surest first
    first = queue["results"][0]
    assert first["kind"] == "disagreement" and first["split"] == "test" and first["version"] == 1
    assert [s["name"] for s in first["suggested"]] == ["dog"]
    assert [t["name"] for t in first["true_labels"]] == ["cat"]
    assert first["uncertainty"] == pytest.approx(0.1)
    # The uncertain queue (stored by classify) is a different list.
    assert client.get(f"{TASKS}/{task['id']}/review").json()["count"] == 0

    # Accepting the model's answer relabels the image, and it leaves the list.
    accepted = client.post(f"{TASKS}/{task['id']}/review/{images[1]}")
    assert accepted.status_code == 200, accepted.text
    assert [label["name"] for label in accepted.json()["labels"]] == ["dog"]
    assert [item["image"]["id"] for item in client.get(url).json()["results"]] == [images[0]]
    # Confirming the label it had (the model was wrong) takes it off the list too.
    confirmed = client.post(f"{TASKS}/{task['id']}/review/{images[0]}", json={"label_ids": [cat["id"]]})
    assert [label["name"] for label in confirmed.json()["labels"]] == ["cat"]
    assert client.get(url).json()["count"] == 0
    assert other_client.get(url).status_code == 404
