"""Tokens, tenancy and the account endpoints."""

from __future__ import annotations

import hashlib

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from api.db.models import ApiToken
from tests.support.api import create_label, create_task, upload
from tests.support.images import image_bytes

PROTECTED = [
    ("GET", "/recognition/v2/task"),
    ("POST", "/recognition/v2/task"),
    ("GET", "/recognition/v2/label/"),
    ("GET", "/recognition/v2/training-image"),
    ("POST", "/recognition/v2/training-image/"),
    ("GET", "/recognition/v2/model/"),
    ("GET", "/account/v2/user"),
    ("GET", "/account/v2/details/"),
]


@pytest.mark.parametrize(("method", "path"), PROTECTED)
def test_missing_token_is_401_json(anonymous: TestClient, method: str, path: str) -> None:
    response = anonymous.request(method, path)
    assert response.status_code == 401
    assert response.json()["code"] == "not_authenticated"
    assert "Token" in response.json()["detail"] or "credentials" in response.json()["detail"]


@pytest.mark.parametrize("header", ["Token nope", "Token ", "Basic abc", "abc", "Token a b"])
def test_invalid_token_is_401(anonymous: TestClient, header: str) -> None:
    response = anonymous.get("/recognition/v2/task", headers={"Authorization": header})
    assert response.status_code == 401
    assert set(response.json()) >= {"detail", "code"}


def test_health_and_docs_need_no_token(anonymous: TestClient) -> None:
    assert anonymous.get("/healthz").json() == {"status": "ok"}
    assert anonymous.get("/readyz").json() == {"status": "ok"}
    assert anonymous.get("/openapi.json").status_code == 200
    assert anonymous.get("/docs").status_code == 200


def test_tokens_are_stored_hashed(app, client: TestClient) -> None:
    with app.state.services.session_factory() as session:
        stored = session.scalars(select(ApiToken.token_hash)).all()
    assert client.token not in stored  # type: ignore[attr-defined]
    assert hashlib.sha256(client.token.encode()).hexdigest() in stored  # type: ignore[attr-defined]


def test_account_endpoints_describe_the_caller(client: TestClient) -> None:
    user = client.get("/account/v2/user").json()
    details = client.get("/account/v2/details/").json()
    assert user == details
    assert user["username"] == "alice"
    assert user["id"] and user["workspace"]


def test_other_tenants_objects_answer_404_like_missing_ones(
    client: TestClient, other_client: TestClient
) -> None:
    task = create_task(client, "multi_class")
    label = create_label(client, "category")
    image = upload(client, image_bytes(1))
    missing = "00000000-0000-4000-8000-000000000000"
    attempts = [
        ("GET", "/recognition/v2/task/{}", {}, task["id"]),
        ("PATCH", "/recognition/v2/task/{}", {"name": "x"}, task["id"]),
        ("DELETE", "/recognition/v2/task/{}/", None, task["id"]),
        ("POST", "/recognition/v2/task/{}/add-label", {"label_id": label["id"]}, task["id"]),
        ("GET", "/recognition/v2/label/{}", {}, label["id"]),
        ("DELETE", "/recognition/v2/label/{}", None, label["id"]),
        ("DELETE", "/recognition/v2/label/{}/wipe", None, label["id"]),
        ("GET", "/recognition/v2/training-image/{}", {}, image["id"]),
        ("GET", "/recognition/v2/training-image/{}/file", {}, image["id"]),
        ("PUT", "/recognition/v2/training-image/{}", {"meta_data": {}}, image["id"]),
        ("DELETE", "/recognition/v2/training-image/{}", None, image["id"]),
    ]
    for method, template, body, object_id in attempts:
        kwargs = {"json": body} if body else {}
        theirs = other_client.request(method, template.format(object_id), **kwargs)
        absent = other_client.request(method, template.format(missing), **kwargs)
        assert theirs.status_code == 404, (method, template, theirs.text)
        assert absent.status_code == 404
        assert theirs.json()["code"] == absent.json()["code"] == "not_found"
    # Bob's own label cannot be attached to Alice's task, nor Alice's label to Bob's task.
    bobs_task = create_task(other_client, "multi_class")
    attach = other_client.post(
        f"/recognition/v2/task/{bobs_task['id']}/add-label", json={"label_id": label["id"]}
    )
    unknown = other_client.post(
        f"/recognition/v2/task/{bobs_task['id']}/add-label", json={"label_id": missing}
    )
    # An id in a body only refers to an object: unknown is a 400 naming it, the same for
    # another workspace's label as for a label that does not exist.
    assert attach.status_code == unknown.status_code == 400
    assert attach.json()["code"] == unknown.json()["code"] == "unknown_label"
    # Listings never show the other workspace's objects.
    assert other_client.get("/recognition/v2/task").json()["count"] == 1
    assert other_client.get("/recognition/v2/label").json()["count"] == 0
    assert other_client.get("/recognition/v2/training-image").json()["count"] == 0
    # ...and everything of Alice's is untouched.
    assert client.get(f"/recognition/v2/task/{task['id']}").json()["name"] == "task"
    assert client.get(f"/recognition/v2/training-image/{image['id']}/file").status_code == 200


def test_same_image_in_two_workspaces_is_two_images(client: TestClient, other_client: TestClient) -> None:
    data = image_bytes(7)
    mine, theirs = upload(client, data), upload(other_client, data)
    assert mine["id"] != theirs["id"]
    other_client.delete(f"/recognition/v2/training-image/{theirs['id']}")
    assert client.get(f"/recognition/v2/training-image/{mine['id']}/file").content == data


def test_foreign_workspace_parameter_is_404(client: TestClient) -> None:
    response = client.get(
        "/recognition/v2/task", params={"workspace": "00000000-0000-4000-8000-000000000000"}
    )
    assert response.status_code == 404
    own = client.get("/account/v2/user").json()["workspace"]
    assert client.get("/recognition/v2/task", params={"workspace": own}).status_code == 200
    created = client.post("/recognition/v2/task", json={"name": "w", "workspace": own})
    assert created.status_code == 201
