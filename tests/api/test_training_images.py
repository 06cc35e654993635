"""Training images: upload paths, labels and values, filters, bulk update, downloads, bad input."""

from __future__ import annotations

import base64
import io
import threading
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy import func, select

from api.db.models import TrainingImage
from api.main import create_app
from api.settings import Settings
from tests.support.api import b64, create_label, create_task, upload
from tests.support.images import bomb_png, image_bytes

IMAGES = "/recognition/v2/training-image"


def _count_rows(app: FastAPI) -> int:
    with app.state.services.session_factory() as session:
        return int(session.scalar(select(func.count()).select_from(TrainingImage)) or 0)


# ---- upload ---------------------------------------------------------------------


def test_upload_base64_stores_original_and_thumbnail(app: FastAPI, client: TestClient) -> None:
    data = image_bytes(1, size=(640, 480))
    image = upload(client, data, test_image=True, real=True, meta_data={"shop": "A", "n": 3})
    assert (image["img_width"], image["img_height"]) == (640, 480)
    assert image["test_image"] is True and image["real"] is True
    assert image["meta_data"] == {"shop": "A", "n": 3}
    assert image["labels"] == [] and image["created"].endswith("Z")
    original = client.get(image["img_path"])
    assert original.status_code == 200 and original.content == data
    assert original.headers["content-type"] == "image/png"
    thumb = client.get(image["thumb_img_path"])
    assert thumb.headers["content-type"] == "image/jpeg"
    assert max(Image.open(io.BytesIO(thumb.content)).size) == 256
    # Content-addressed: the key is the SHA-256 of the bytes.
    import hashlib

    sha = hashlib.sha256(data).hexdigest()
    assert any(key.endswith(sha) for key in app.state.services.blobs.list_keys("images/"))


def test_upload_data_uri_and_multipart(client: TestClient) -> None:
    data_uri = "data:image/jpeg;base64," + b64(image_bytes(2, fmt="JPEG"))
    response = client.post(IMAGES, json={"base64": data_uri})
    assert response.status_code == 201
    multipart = client.post(
        IMAGES + "/",
        files={"img_path": ("photo.jpg", image_bytes(3, fmt="JPEG"), "image/jpeg")},
        data={"test_image": "true", "meta_data": '{"k": "v"}'},
    )
    assert multipart.status_code == 201, multipart.text
    assert multipart.json()["test_image"] is True and multipart.json()["meta_data"] == {"k": "v"}


def test_large_images_are_downscaled_unless_noresize(client: TestClient) -> None:
    big = image_bytes(4, size=(2400, 1600), fmt="JPEG")
    resized = upload(client, big)
    assert (resized["img_width"], resized["img_height"]) == (1536, 1024)
    kept = upload(client, image_bytes(5, size=(2400, 1600), fmt="JPEG"), noresize=True)
    assert (kept["img_width"], kept["img_height"]) == (2400, 1600)


def test_exif_rotation_is_reported_as_displayed(client: TestClient) -> None:
    image = Image.new("RGB", (80, 40), (10, 200, 10))
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees when displayed
    out = io.BytesIO()
    image.save(out, format="JPEG", exif=exif)
    stored = upload(client, out.getvalue())
    assert (stored["img_width"], stored["img_height"]) == (40, 80)


def test_identical_reupload_answers_with_the_existing_id(client: TestClient) -> None:
    data = image_bytes(6)
    first = upload(client, data)
    again = client.post(IMAGES, json={"base64": "data:image/png;base64," + b64(data)})
    assert again.status_code == 400
    body = again.json()
    assert body["code"] == "duplicate_image" and body["id"] == first["id"]
    assert f"image ID: {first['id']}" in body["detail"]  # what ximilar-client parses
    assert client.get(IMAGES).json()["count"] == 1


def test_concurrent_uploads_of_the_same_image_store_it_once(app: FastAPI, client: TestClient) -> None:
    data = b64(image_bytes(7, size=(300, 200)))
    barrier = threading.Barrier(6)
    results: list[Any] = []

    def send() -> None:
        with TestClient(app, headers={"Authorization": f"Token {client.token}"}) as own:  # type: ignore[attr-defined]
            barrier.wait()
            response = own.post(IMAGES, json={"base64": data})
            results.append((response.status_code, response.json()))

    threads = [threading.Thread(target=send) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    statuses = sorted(status for status, _ in results)
    assert statuses == [201] + [400] * 5
    ids = {body["id"] for _, body in results}
    assert len(ids) == 1
    assert _count_rows(app) == 1
    assert len(app.state.services.blobs.list_keys("images/")) == 1


# ---- bad input ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"base64": "not base64 at all!!"}, 400, "invalid_image"),
        ({"base64": b64(b"hello, I am text")}, 400, "invalid_image"),
        ({"base64": b64(image_bytes(1)[:60])}, 400, "invalid_image"),  # truncated PNG
        ({"base64": b64(bomb_png())}, 413, "image_too_large"),
        ({}, 400, "no_image"),
        ({"base64": ""}, 400, "no_image"),
        ({"base64": b64(image_bytes(1)), "url": "http://example.com/a.png"}, 400, "no_image"),
        ({"base64": b64(image_bytes(1)), "meta_data": "nope"}, 400, "invalid_meta_data"),
        ({"base64": b64(image_bytes(1)), "meta_data": [1]}, 422, "validation_error"),
    ],
    ids=[
        "invalid-base64",
        "not-an-image",
        "truncated",
        "decompression-bomb",
        "empty",
        "blank",
        "two-sources",
        "meta-not-json",
        "meta-not-object",
    ],
)
def test_bad_uploads_fail_cleanly(
    app: FastAPI, client: TestClient, body: dict, status: int, code: str
) -> None:
    response = client.post(IMAGES, json=body)
    assert response.status_code == status, response.text
    assert response.json()["code"] == code and response.json()["detail"]
    assert _count_rows(app) == 0
    assert app.state.services.blobs.list_keys() == []


def test_empty_body_is_a_clear_error(client: TestClient) -> None:
    response = client.post(IMAGES, content=b"", headers={"Content-Type": "application/json"})
    assert response.status_code == 400 and "base64" in response.json()["detail"]


def test_size_cap_is_413_and_configurable(settings: Settings) -> None:
    small_cap = settings.model_copy(update={"max_upload_bytes": 50_000})
    app = create_app(small_cap)
    try:
        from api.auth import create_user

        with app.state.services.session_factory() as session:
            _, token = create_user(session, "capped")
        client = TestClient(app, headers={"Authorization": f"Token {token}"})
        big = image_bytes(1, size=(600, 600), fmt="BMP")  # ~1 MB uncompressed
        assert len(big) > 50_000
        response = client.post(IMAGES, json={"base64": b64(big)})
        assert response.status_code == 413 and response.json()["code"] == "too_large"
        multipart = client.post(IMAGES, files={"img_path": ("a.bmp", big, "image/bmp")})
        assert multipart.status_code == 413
        assert client.post(IMAGES, json={"base64": b64(image_bytes(2))}).status_code == 201
        assert len(app.state.services.blobs.list_keys("images/")) == 1
    finally:
        app.state.services.engine.dispose()


def test_a_failed_commit_leaves_no_blob(
    app: FastAPI, client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sqlalchemy.orm import Session

    def broken_commit(self: Session) -> None:
        raise RuntimeError("database went away")

    monkeypatch.setattr(Session, "commit", broken_commit)
    quiet = TestClient(app, raise_server_exceptions=False, headers=client.headers)
    response = quiet.post(IMAGES, json={"base64": b64(image_bytes(9))})
    monkeypatch.undo()
    assert response.status_code == 500 and response.json()["code"] == "internal_error"
    assert _count_rows(app) == 0
    assert app.state.services.blobs.list_keys() == []


def test_stored_images_survive_a_restart(settings: Settings, client: TestClient, app: FastAPI) -> None:
    data = image_bytes(10)
    image = upload(client, data, meta_data={"a": 1})
    app.state.services.engine.dispose()
    restarted = create_app(settings)
    try:
        again = TestClient(restarted, headers={"Authorization": f"Token {client.token}"})  # type: ignore[attr-defined]
        assert again.get(f"{IMAGES}/{image['id']}").json()["meta_data"] == {"a": 1}
        assert again.get(f"{IMAGES}/{image['id']}/file").content == data
    finally:
        restarted.state.services.engine.dispose()


# ---- labels on images ----------------------------------------------------------------


def test_add_update_remove_labels_and_values(client: TestClient) -> None:
    category = create_label(client, "category", "cat")
    value = create_label(client, "value", "age")
    image = upload(client, image_bytes(11))
    url = f"{IMAGES}/{image['id']}"
    added = client.post(url + "/add-label", json={"label_id": category["id"]}).json()
    assert [(label["name"], label["value"]) for label in added["labels"]] == [("cat", None)]
    with_value = client.post(url + "/add-label", json={"label_id": value["id"], "value": 31.5}).json()
    assert {label["name"]: label["value"] for label in with_value["labels"]} == {"cat": None, "age": 31.5}
    updated = client.post(url + "/update-label", json={"label_id": value["id"], "value": 40}).json()
    assert {label["name"]: label["value"] for label in updated["labels"]}["age"] == 40
    via_docs_name = client.post(url + "/update-value", data={"label_id": value["id"], "value": "41"}).json()
    assert {label["name"]: label["value"] for label in via_docs_name["labels"]}["age"] == 41
    removed = client.post(url + "/remove-label", json={"label_id": category["id"]}).json()
    assert [label["name"] for label in removed["labels"]] == ["age"]
    assert client.get(url).json()["labels"] == removed["labels"]


@pytest.mark.parametrize("bad", ["NaN", "Infinity", "-Infinity", "nan", "abc", None])
def test_regression_value_must_be_a_finite_number(client: TestClient, bad: Any) -> None:
    value = create_label(client, "value", "age")
    image = upload(client, image_bytes(12))
    if isinstance(bad, str) and bad in ("NaN", "Infinity", "-Infinity"):
        body = f'{{"label_id": "{value["id"]}", "value": {bad}}}'.encode()  # JSON extension literals
        response = client.post(
            f"{IMAGES}/{image['id']}/add-label", content=body, headers={"Content-Type": "application/json"}
        )
    else:
        response = client.post(
            f"{IMAGES}/{image['id']}/add-label", json={"label_id": value["id"], "value": bad}
        )
    assert response.status_code in (400, 422), response.text
    assert client.get(f"{IMAGES}/{image['id']}").json()["labels"] == []


def test_value_only_for_value_labels_and_update_needs_existing(client: TestClient) -> None:
    category = create_label(client, "category")
    value = create_label(client, "value", "v")
    image = upload(client, image_bytes(13))
    url = f"{IMAGES}/{image['id']}"
    assert client.post(url + "/add-label", json={"label_id": category["id"], "value": 1}).status_code == 400
    not_on_it = client.post(url + "/update-label", json={"label_id": value["id"], "value": 2})
    assert not_on_it.status_code == 400 and not_on_it.json()["code"] == "label_not_on_image"
    assert client.post(url + "/add-label", json={"label_id": "missing"}).json()["code"] == "unknown_label"


def test_put_replaces_meta_data(client: TestClient) -> None:
    image = upload(client, image_bytes(14), meta_data={"a": 1})
    response = client.put(f"{IMAGES}/{image['id']}", json={"meta_data": {"b": [1, 2]}})
    assert response.json()["meta_data"] == {"b": [1, 2]}
    assert client.put(f"{IMAGES}/{image['id']}/", json={"meta_data": {}}).json()["meta_data"] == {}


# ---- listing and filters --------------------------------------------------------------


def _ids(client: TestClient, query: str) -> set[str]:
    response = client.get(f"{IMAGES}/?{query}")
    assert response.status_code == 200, response.text
    return {image["id"] for image in response.json()["results"]}


def test_filters(client: TestClient) -> None:
    task = create_task(client, "regression")
    red, blue = create_label(client, "tag", "red"), create_label(client, "tag", "blue")
    age = create_label(client, "value", "age")
    client.post(f"/recognition/v2/task/{task['id']}/add-label", json={"label_id": age["id"]})
    images = [upload(client, image_bytes(20 + i)) for i in range(5)]
    a, b, c, d, e = (image["id"] for image in images)
    for image_id, label in ((a, red), (b, red), (b, blue), (c, blue)):
        client.post(f"{IMAGES}/{image_id}/add-label", json={"label_id": label["id"]})
    for image_id, years in ((c, 10), (d, 30), (e, 50)):
        client.post(f"{IMAGES}/{image_id}/add-label", json={"label_id": age["id"], "value": years})
    client.post(f"{IMAGES}/update", json={"images": [a, d], "mark-test": True})
    client.post(f"{IMAGES}/update", json={"images": [e], "mark-real": True})

    assert _ids(client, "page=1") == {a, b, c, d, e}
    assert _ids(client, f"labels={red['id']}") == {a, b}
    assert _ids(client, f"label={red['id']}") == {a, b}
    assert _ids(client, f"labels={red['id']},{blue['id']}") == {a, b, c}
    assert _ids(client, f"not_labels={red['id']}") == {c, d, e}
    assert _ids(client, f"task={task['id']}") == {c, d, e}
    lid = age["id"]
    assert _ids(client, f"label_value_{lid}__gte=30") == {d, e}
    assert _ids(client, f"label_value_{lid}__gte=30&label_value_{lid}__lte=30") == {d}
    assert _ids(client, f"labels={lid}&label_value_{lid}__lte=10") == {c}
    assert _ids(client, "page=1&test=true") == {a, d}
    assert _ids(client, "test=false") == {b, c, e}
    assert _ids(client, "page=1&real=True") == {e}
    assert _ids(client, "verified=0") == {a, b, c, d, e}
    assert _ids(client, "verified=1") == set()
    assert client.get(f"{IMAGES}/?test=maybe").status_code == 422  # not a boolean (the schema says so)
    assert client.get(f"{IMAGES}/?label_value_{lid}__gte=old").status_code == 400


def test_image_pages(client: TestClient) -> None:
    for i in range(7):
        upload(client, image_bytes(40 + i))
    page = client.get(f"{IMAGES}/?page=1&page_size=3").json()
    seen = [image["id"] for image in page["results"]]
    while page["next"]:
        page = client.get(page["next"]).json()
        seen += [image["id"] for image in page["results"]]
    assert len(seen) == len(set(seen)) == 7


# ---- bulk update ---------------------------------------------------------------------


def test_bulk_update_by_ids_and_by_label_filter(client: TestClient) -> None:
    red, blue, green = (create_label(client, "tag", n) for n in ("red", "blue", "green"))
    images = [upload(client, image_bytes(60 + i))["id"] for i in range(3)]
    update = f"{IMAGES}/update"
    result = client.post(
        update,
        json={
            "images": images[:2],
            "labels": [],
            "labels-add": [red["id"], blue["id"]],
            "labels-remove": [],
            "mark-test": True,
            "workspace": "Default",
        },
    )
    assert result.status_code == 200 and result.json()["updated"] == 2
    # Select by label: every image with "blue" loses it and gains "green".
    result = client.post(
        update,
        json={
            "labels": [blue["id"]],
            "labels-add": [green["id"]],
            "labels-remove": [blue["id"]],
            "unmark-test": True,
        },
    )
    assert result.json()["updated"] == 2
    for image_id in images[:2]:
        image = client.get(f"{IMAGES}/{image_id}").json()
        assert sorted(label["name"] for label in image["labels"]) == ["green", "red"]
        assert image["test_image"] is False
    assert client.get(f"{IMAGES}/{images[2]}").json()["labels"] == []
    assert client.post(update, json={"labels-add": [red["id"]]}).status_code == 400  # no selection
    assert client.post(update, json={"images": ["missing"], "mark-real": True}).status_code == 404
    assert (
        client.post(update, json={"images": images, "mark-real": True, "unmark-real": True}).status_code
        == 400
    )


def test_bulk_update_refuses_value_labels_without_values(client: TestClient) -> None:
    age = create_label(client, "value", "age")
    image = upload(client, image_bytes(70))
    response = client.post(f"{IMAGES}/update", json={"images": [image["id"]], "labels-add": [age["id"]]})
    assert response.status_code == 400 and response.json()["code"] == "value_required"


# ---- delete ------------------------------------------------------------------------


def test_delete_removes_the_row_and_later_the_blobs(app: FastAPI, client: TestClient) -> None:
    label = create_label(client)
    image = upload(client, image_bytes(80))
    client.post(f"{IMAGES}/{image['id']}/add-label", json={"label_id": label["id"]})
    assert len(app.state.services.blobs.list_keys()) == 2
    assert client.delete(f"{IMAGES}/{image['id']}").status_code == 204
    assert client.get(f"{IMAGES}/{image['id']}").status_code == 404
    assert client.get(image["img_path"]).status_code == 404
    assert client.get(f"/recognition/v2/label/{label['id']}").json()["images_count"] == 0
    # The blobs wait out the grace period (300 s by default)...
    assert app.state.services.blob_collector.tick() == 0
    assert len(app.state.services.blobs.list_keys()) == 2
    # ...then go.
    assert app.state.services.blob_collector.tick(grace_s=0) == 1
    assert app.state.services.blobs.list_keys() == []
    assert app.state.services.blob_collector.tick(grace_s=0) == 0  # nothing is pending any more
    # The same image can be uploaded again afterwards.
    again = client.post(IMAGES, json={"base64": b64(image_bytes(80))})
    assert again.status_code == 201
    assert client.get(again.json()["img_path"]).content == image_bytes(80)


def test_an_image_uploaded_again_before_collection_keeps_its_blobs(app: FastAPI, client: TestClient) -> None:
    data = image_bytes(81)
    first = upload(client, data)
    assert client.delete(f"{IMAGES}/{first['id']}").status_code == 204
    second = upload(client, data)  # the same content, so the same blob keys
    assert app.state.services.blob_collector.tick(grace_s=0) == 0
    assert client.get(second["img_path"]).content == data
    assert len(app.state.services.blobs.list_keys()) == 2
    # The entry was dropped: deleting the second copy schedules its own collection.
    assert client.delete(f"{IMAGES}/{second['id']}").status_code == 204
    assert app.state.services.blob_collector.tick(grace_s=0) == 1
    assert app.state.services.blobs.list_keys() == []


def test_the_watcher_loop_collects_deleted_images_blobs(settings: Settings, client: TestClient) -> None:
    import time

    fast = settings.model_copy(
        update={"blob_gc_grace_s": 0.0, "blob_gc_interval_s": 0.05, "train_poll_interval_s": 0.05}
    )
    application = create_app(fast)
    try:
        with TestClient(application, headers={"Authorization": f"Token {client.token}"}) as other:  # type: ignore[attr-defined]
            image = upload(other, image_bytes(83))
            assert len(application.state.services.blobs.list_keys()) == 2
            assert other.delete(f"{IMAGES}/{image['id']}").status_code == 204
            deadline = time.monotonic() + 10
            while application.state.services.blobs.list_keys() and time.monotonic() < deadline:
                time.sleep(0.05)
            assert application.state.services.blobs.list_keys() == []
    finally:
        application.state.services.engine.dispose()


def test_a_queued_training_keeps_deleted_images_blobs_until_it_ends(app: FastAPI, client: TestClient) -> None:
    from api.db.models import TrainingRun

    app.state.services.jobs.stop()  # no watcher: the run below stays queued
    image = upload(client, image_bytes(82))
    task = create_task(client)
    with app.state.services.session_factory() as session:
        workspace = session.get(TrainingImage, image["id"]).workspace_id
        run = TrainingRun(
            workspace_id=workspace, task_id=task["id"], runner="local", snapshot_prefix="datasets/x"
        )
        session.add(run)
        session.commit()
        run_id = run.id
    assert client.delete(f"{IMAGES}/{image['id']}").status_code == 204
    assert app.state.services.blob_collector.tick(grace_s=0) == 0  # the run's snapshot may read them
    assert len(app.state.services.blobs.list_keys()) == 2
    with app.state.services.session_factory() as session:
        session.get(TrainingRun, run_id).status = "SUCCEEDED"
        session.commit()
    assert app.state.services.blob_collector.tick(grace_s=0) == 1
    assert app.state.services.blobs.list_keys() == []


def test_downloads_need_the_token_or_a_valid_signed_link(
    app: FastAPI, client: TestClient, other_client: TestClient, anonymous: TestClient
) -> None:
    data = image_bytes(90)
    image = upload(client, data)
    # The listed links are signed: a plain GET works, and the file name is <id>.<ext>.
    assert image["img_path"].split("?")[0].endswith(f"/{image['id']}/file/{image['id']}.png")
    assert anonymous.get(image["img_path"]).content == data
    assert anonymous.get(image["thumb_img_path"]).headers["content-type"] == "image/jpeg"
    bare = f"{IMAGES}/{image['id']}/file"
    assert anonymous.get(bare).status_code == 401
    assert client.get(bare).content == data
    assert other_client.get(bare).status_code == 404
    # A tampered, re-targeted or expired link is refused.
    path, query = image["img_path"].split("?")
    assert anonymous.get(path + "?" + query.replace("signature=", "signature=0")).status_code == 401
    assert anonymous.get(path.replace("/file/", "/thumb/") + "?" + query).status_code == 401
    signer = app.state.services.url_signer
    past = 1_000_000
    stale = f"{path}?expires={past}&signature={signer.sign(image['id'], 'file', past)}"
    assert anonymous.get(stale).status_code == 401
    assert "expired" in anonymous.get(stale).json()["detail"]


def test_base64_helpers_accept_wrapped_lines(client: TestClient) -> None:
    text = base64.encodebytes(image_bytes(91)).decode()  # 76-character lines
    assert "\n" in text
    assert client.post(IMAGES, json={"base64": text}).status_code == 201
