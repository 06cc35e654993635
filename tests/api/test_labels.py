"""Labels: CRUD, search, per-task listing, counts, delete and wipe."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from tests.support.api import create_label, create_task, upload
from tests.support.images import image_bytes


@pytest.mark.parametrize("label_type", ["category", "tag", "value"])
def test_create_get_update_label(client: TestClient, label_type: str) -> None:
    created = client.post(
        "/recognition/v2/label",
        json={"name": "Rose", "type": label_type, "description": "red flower", "output_name": "rose"},
    )
    assert created.status_code == 201
    label = created.json()
    assert (label["name"], label["type"], label["output_name"]) == ("Rose", label_type, "rose")
    assert label["negative_for_task"] is False and label["images_count"] == 0
    fetched = client.get(f"/recognition/v2/label/{label['id']}").json()
    assert fetched == label
    updated = client.patch(f"/recognition/v2/label/{label['id']}", json={"name": "Red rose"}).json()
    assert updated["name"] == "Red rose" and updated["description"] == "red flower"
    assert (
        client.put(f"/recognition/v2/label/{label['id']}/", json={"output_name": "r"}).json()["output_name"]
        == "r"
    )


def test_label_type_defaults_to_category_and_unknown_type_is_refused(client: TestClient) -> None:
    assert client.post("/recognition/v2/label", json={"name": "a"}).json()["type"] == "category"
    refused = client.post("/recognition/v2/label", json={"name": "b", "type": "colour"})
    assert refused.status_code == 422 and "type" in refused.json()["detail"]
    assert client.get("/recognition/v2/label").json()["count"] == 1


def test_output_name_falls_back_to_name(client: TestClient) -> None:
    assert create_label(client, name="Tulip")["output_name"] == "Tulip"


def test_search_and_task_filter(client: TestClient) -> None:
    task = create_task(client)
    names = ["Red rose", "White rose", "Tulip", "100%_real"]
    labels = {name: create_label(client, name=name) for name in names}
    client.post(f"/recognition/v2/task/{task['id']}/add-label", json={"label_id": labels["Tulip"]["id"]})

    def search(term: str) -> list[str]:
        return sorted(
            r["name"] for r in client.get("/recognition/v2/label/", params={"search": term}).json()["results"]
        )

    assert search("rose") == ["Red rose", "White rose"]
    assert search("ROSE") == ["Red rose", "White rose"]
    assert search('"tul"') == ["Tulip"]  # the docs' curl example quotes the term
    assert search("%") == ["100%_real"]  # wildcards are literal
    assert search("_") == ["100%_real"]
    in_task = client.get(f"/recognition/v2/label/?task={task['id']}").json()
    assert [r["name"] for r in in_task["results"]] == ["Tulip"]
    assert in_task["results"][0]["recognition_tasks"] == [{"id": task["id"], "name": "task"}]


def test_images_count_and_wipe(client: TestClient) -> None:
    label = create_label(client)
    images = [upload(client, image_bytes(i)) for i in range(3)]
    for image in images[:2]:
        client.post(f"/recognition/v2/training-image/{image['id']}/add-label", json={"label_id": label["id"]})
    assert client.get(f"/recognition/v2/label/{label['id']}").json()["images_count"] == 2
    wiped = client.delete(f"/recognition/v2/label/{label['id']}/wipe")
    assert wiped.status_code == 200 and wiped.json()["removed_from_images"] == 2
    assert client.get(f"/recognition/v2/label/{label['id']}").json()["images_count"] == 0
    assert client.get(f"/recognition/v2/training-image/{images[0]['id']}").json()["labels"] == []
    assert client.get("/recognition/v2/training-image").json()["count"] == 3  # images stay


def test_delete_label_detaches_it_everywhere(client: TestClient) -> None:
    tasks = [create_task(client, name=f"t{i}") for i in range(2)]
    label = create_label(client)
    image = upload(client, image_bytes(1))
    for task in tasks:
        client.post(f"/recognition/v2/task/{task['id']}/add-label", json={"label_id": label["id"]})
    client.post(f"/recognition/v2/training-image/{image['id']}/add-label", json={"label_id": label["id"]})
    assert client.delete(f"/recognition/v2/label/{label['id']}").status_code == 204
    assert client.get(f"/recognition/v2/label/{label['id']}").status_code == 404
    for task in tasks:
        assert client.get(f"/recognition/v2/task/{task['id']}").json()["labels"] == []
    assert client.get(f"/recognition/v2/training-image/{image['id']}").json()["labels"] == []


def test_label_side_task_links(client: TestClient) -> None:
    task = create_task(client)
    label = create_label(client)
    linked = client.post(f"/recognition/v2/label/{label['id']}/add-task", json={"task_id": task["id"]})
    assert linked.json()["recognition_tasks"] == [{"id": task["id"], "name": "task"}]
    unlinked = client.post(f"/recognition/v2/label/{label['id']}/remove-task", json={"task_id": task["id"]})
    assert unlinked.json()["recognition_tasks"] == []
