"""Tasks: CRUD, labels of a task, production version, routing quirks the client depends on."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from fastapi.testclient import TestClient

from api.db.models import Model, Task
from tests.support.api import create_label, create_task


@pytest.mark.parametrize("task_type", ["multi_class", "multi_label", "regression"])
def test_create_and_get_task(client: TestClient, task_type: str) -> None:
    response = client.post(
        "/recognition/v2/task", json={"name": "Rooms", "type": task_type, "description": "which room"}
    )
    assert response.status_code == 201
    task = response.json()
    assert task["name"] == "Rooms" and task["type"] == task_type and task["description"] == "which room"
    assert task["production_version"] == -1
    assert task["last_train_status"] == "NOT_TRAINED"
    assert task["created"].endswith("Z")
    assert client.get(f"/recognition/v2/task/{task['id']}").json() == task


def test_tagging_task_gets_a_negative_label(client: TestClient) -> None:
    task = create_task(client, "multi_label", "Dresses")
    assert [label["negative_for_task"] for label in task["labels"]] == [True]
    labels = client.get(f"/recognition/v2/label/?task={task['id']}").json()["results"]
    assert len(labels) == 1 and labels[0]["negative_for_task"] is True and labels[0]["type"] == "tag"
    # It cannot be detached from its task, deleted alone, or attached elsewhere.
    negative = labels[0]["id"]
    assert (
        client.post(
            f"/recognition/v2/task/{task['id']}/remove-label", json={"label_id": negative}
        ).status_code
        == 409
    )
    assert client.delete(f"/recognition/v2/label/{negative}").status_code == 409
    other = create_task(client, "multi_label", "Other")
    assert (
        client.post(f"/recognition/v2/task/{other['id']}/add-label", json={"label_id": negative}).status_code
        == 400
    )
    # Deleting the task deletes its negative label.
    assert client.delete(f"/recognition/v2/task/{task['id']}/").status_code == 204
    assert client.get(f"/recognition/v2/label/{negative}").status_code == 404


def test_create_from_form_fields_like_the_curl_example(client: TestClient) -> None:
    response = client.post(
        "/recognition/v2/task/",
        data={"name": "My new task", "type": "multi_class", "description": "Demo task"},
    )
    assert response.status_code == 201
    assert response.json()["description"] == "Demo task"


@pytest.mark.parametrize(
    "body",
    [
        {"name": "x", "type": "object_detection"},
        {"type": "multi_class"},
        {"name": "", "type": "multi_class"},
        {"name": "x", "type": None},
    ],
)
def test_invalid_task_is_422_with_reason(client: TestClient, body: dict) -> None:
    response = client.post("/recognition/v2/task", json=body)
    assert response.status_code == 422
    assert response.json()["code"] == "validation_error"
    assert response.json()["detail"].startswith("Invalid request:")
    assert client.get("/recognition/v2/task").json()["count"] == 0


def test_empty_or_broken_body(client: TestClient) -> None:
    empty = client.post("/recognition/v2/task", content=b"", headers={"Content-Type": "application/json"})
    assert empty.status_code == 422
    broken = client.post(
        "/recognition/v2/task", content=b"{nope", headers={"Content-Type": "application/json"}
    )
    assert broken.status_code == 400 and broken.json()["code"] == "invalid_json"
    array = client.post("/recognition/v2/task", json=[1, 2])
    assert array.status_code == 400


def test_update_task(client: TestClient) -> None:
    task = create_task(client)
    patched = client.patch(f"/recognition/v2/task/{task['id']}", json={"name": "New", "description": "d"})
    assert patched.status_code == 200 and patched.json()["name"] == "New"
    put = client.put(f"/recognition/v2/task/{task['id']}/", json={"description": "e"})
    assert put.json()["name"] == "New" and put.json()["description"] == "e"


def _add_model(app, task_id: str, version: int, status: str = "TRAINED") -> None:
    with app.state.services.session_factory() as session:
        workspace = session.get(Task, task_id).workspace_id
        session.add(
            Model(
                workspace_id=workspace,
                task_id=task_id,
                version=version,
                train_status=status,
                metrics={"accuracy": 0.9},
                created=datetime.now(UTC),
            )
        )
        session.commit()


def test_production_version_must_be_a_trained_version(app, client: TestClient) -> None:
    task = create_task(client)
    url = f"/recognition/v2/task/{task['id']}"
    missing = client.patch(url, json={"production_version": 1})
    assert missing.status_code == 400 and missing.json()["code"] == "unknown_version"
    _add_model(app, task["id"], 1)
    _add_model(app, task["id"], 2)
    _add_model(app, task["id"], 3, status="TRAINING_FAILED")
    assert client.patch(url, json={"production_version": 2}).json()["production_version"] == 2
    assert client.patch(url, json={"production_version": 1}).json()["production_version"] == 1
    assert client.patch(url, json={"production_version": 3}).status_code == 400
    assert client.get(url).json()["production_version"] == 1


@pytest.mark.parametrize(
    ("task_type", "good", "bad"),
    [
        ("multi_class", "category", "tag"),
        ("multi_label", "tag", "value"),
        ("regression", "value", "category"),
    ],
)
def test_label_type_must_fit_task_type(client: TestClient, task_type: str, good: str, bad: str) -> None:
    task = create_task(client, task_type)
    fitting, wrong = create_label(client, good, "fits"), create_label(client, bad, "wrong")
    ok = client.post(f"/recognition/v2/task/{task['id']}/add-label", json={"label_id": fitting["id"]})
    assert ok.status_code == 200
    assert fitting["id"] in [label["id"] for label in ok.json()["labels"]]
    refused = client.post(f"/recognition/v2/task/{task['id']}/add-label", json={"label_id": wrong["id"]})
    assert refused.status_code == 400 and refused.json()["code"] == "label_type_mismatch"
    assert good in refused.json()["detail"]
    # Adding twice is harmless; removing detaches.
    again = client.post(f"/recognition/v2/task/{task['id']}/add-label", json={"label_id": fitting["id"]})
    assert [label["id"] for label in again.json()["labels"]].count(fitting["id"]) == 1
    removed = client.post(f"/recognition/v2/task/{task['id']}/remove-label", json={"label_id": fitting["id"]})
    assert fitting["id"] not in [label["id"] for label in removed.json()["labels"]]
    assert client.get(f"/recognition/v2/label/{fitting['id']}").status_code == 200  # detached, not deleted


def test_add_label_with_form_field_and_unknown_label(client: TestClient) -> None:
    task = create_task(client)
    label = create_label(client)
    assert (
        client.post(
            f"/recognition/v2/task/{task['id']}/add-label", data={"label_id": label["id"]}
        ).status_code
        == 200
    )
    unknown = client.post(f"/recognition/v2/task/{task['id']}/add-label", json={"label_id": "nope"})
    assert unknown.status_code == 400 and unknown.json()["code"] == "unknown_label"
    assert client.post(f"/recognition/v2/task/{task['id']}/add-label", json={}).status_code == 422


def test_every_path_works_with_and_without_trailing_slash_and_never_redirects(client: TestClient) -> None:
    for suffix in ("", "/"):
        created = client.post("/recognition/v2/task" + suffix, json={"name": "s"}, follow_redirects=False)
        assert created.status_code == 201
        task_id = created.json()["id"]
        base = f"/recognition/v2/task/{task_id}{suffix}"
        assert client.get(base, follow_redirects=False).status_code == 200
        assert client.patch(base, json={"name": "t"}, follow_redirects=False).status_code == 200
        assert client.get("/recognition/v2/task" + suffix, follow_redirects=False).status_code == 200
        assert client.delete(base, follow_redirects=False).status_code == 204


def test_unknown_paths_and_methods_answer_json(client: TestClient) -> None:
    missing = client.get("/recognition/v2/nothing")
    assert missing.status_code == 404 and missing.json()["code"] == "not_found"
    wrong = client.post("/recognition/v2/task/some-id")
    assert wrong.status_code == 405 and wrong.json()["code"] == "method_not_allowed"


def test_delete_task_removes_its_models_and_keeps_shared_labels(app, client: TestClient) -> None:
    task = create_task(client)
    label = create_label(client)
    client.post(f"/recognition/v2/task/{task['id']}/add-label", json={"label_id": label["id"]})
    _add_model(app, task["id"], 1)
    assert client.get(f"/recognition/v2/model/?task={task['id']}").json()["count"] == 1
    assert client.delete(f"/recognition/v2/task/{task['id']}/").status_code == 204
    assert client.get(f"/recognition/v2/task/{task['id']}").status_code == 404
    assert client.get("/recognition/v2/model/").json()["count"] == 0
    assert client.get(f"/recognition/v2/label/{label['id']}").json()["tasks_count"] == 0
