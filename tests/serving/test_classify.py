"""POST /recognition/v2/classify: the Ximilar response shape, versions, stored images, bad input."""

from __future__ import annotations

import base64
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from api.auth import create_user
from tests.serving.conftest import Trained
from tests.support.api import b64
from tests.support.images import bomb_png, image_bytes, shape_image, size_image, tag_image
from tests.training.helpers import train, wait

pytestmark = pytest.mark.slow
CLASSIFY = "/recognition/v2/classify"


def classify(client: TestClient, task_id: str, records: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    response = client.post(CLASSIFY, json={"task_id": task_id, "records": records, **extra})
    assert response.status_code == 200, response.text
    return dict(response.json())


def test_multi_class_response_shape(trained: Trained) -> None:
    task = trained.tasks["multi_class"]
    circle = shape_image("circle", 101)
    square = shape_image("square", 102)
    records = [
        {"_base64": b64(circle), "_id": "a", "_file": "/tmp/circle.png", "note": {"x": 1}},
        {"_base64": "data:image/png;base64," + b64(square), "_id": "b"},
    ]
    answer = classify(trained.client, task["id"], records)
    assert answer["task_id"] == task["id"] and answer["version"] == 1
    assert answer["status"] == {"code": 200, "text": "OK"}
    assert 0 < answer["statistics"]["processing time"] < 10
    first, second = answer["records"]
    assert first["_status"] == {"code": 200, "text": "OK"}
    assert (first["_id"], first["_file"], first["note"]) == ("a", "/tmp/circle.png", {"x": 1})
    assert "_base64" not in first
    assert (first["_width"], first["_height"]) == (96, 96)
    assert first["best_label"]["name"] == "circle" and second["best_label"]["name"] == "square"
    for record in answer["records"]:
        probs = [label["prob"] for label in record["labels"]]
        assert probs == sorted(probs, reverse=True)
        assert abs(sum(probs) - 1.0) < 1e-3
        assert record["best_label"] == record["labels"][0]
        assert set(record["best_label"]) == {"id", "name", "prob"}
    # "task" works as well as "task_id" (the docs' name for it).
    alias = trained.client.post(CLASSIFY, json={"task": task["id"], "records": records[:1]}).json()
    assert alias["records"][0]["best_label"]["name"] == "circle"


def test_multi_label_best_label_holds_the_tags_above_threshold(trained: Trained) -> None:
    task = trained.tasks["multi_label"]
    records = [
        {"_base64": b64(tag_image(True, True, 201))},
        {"_base64": b64(tag_image(True, False, 202))},
        {"_base64": b64(tag_image(False, False, 203))},
    ]
    both, red, none = classify(trained.client, task["id"], records)["records"]
    assert sorted(tag["name"] for tag in both["best_label"]) == ["red", "striped"]
    assert [tag["name"] for tag in red["best_label"]] == ["red"]
    assert [tag["name"] for tag in none["best_label"]] == ["gen-multi_label (negative)"]
    for record in (both, red, none):
        assert sorted(tag["name"] for tag in record["labels"]) == ["red", "striped"]


def test_regression_answers_the_value(trained: Trained) -> None:
    task = trained.tasks["regression"]
    small, large = classify(
        trained.client,
        task["id"],
        [{"_base64": b64(size_image(8, 301))}, {"_base64": b64(size_image(38, 302))}],
    )["records"]
    assert small["best_label"]["name"] == "radius" and set(small["best_label"]) == {"id", "name", "value"}
    assert small["best_label"]["value"] < large["best_label"]["value"]
    assert abs(small["best_label"]["value"] - 8) < 10 and abs(large["best_label"]["value"] - 38) < 10


def test_explicit_versions_and_switching_production(trained: Trained) -> None:
    client, task = trained.client, trained.tasks["multi_class"]
    run = wait(client, train(client, task["id"])["id"])
    assert run["version"] == 2
    record = [{"_base64": b64(shape_image("circle", 401))}]
    assert classify(client, task["id"], record)["version"] == 2
    assert classify(client, task["id"], record, version=1)["version"] == 1
    missing = client.post(CLASSIFY, json={"task_id": task["id"], "version": 7, "records": record})
    assert missing.status_code == 404 and "version 7" in missing.json()["detail"]
    client.patch(f"/recognition/v2/task/{task['id']}", json={"production_version": 1})
    assert classify(client, task["id"], record)["version"] == 1  # takes effect on the next request
    client.patch(f"/recognition/v2/task/{task['id']}", json={"production_version": 2})


def test_store_images_keeps_them_for_review(trained: Trained) -> None:
    client, task = trained.client, trained.tasks["multi_class"]
    data = shape_image("square", 501)
    answer = classify(client, task["id"], [{"_base64": b64(data)}, {"_base64": "broken!"}], store_images=True)
    stored_id = answer["records"][0]["_stored_image_id"]
    assert "_stored_image_id" not in answer["records"][1]
    image = client.get(f"/recognition/v2/training-image/{stored_id}").json()
    assert image["labels"] == [] and client.get(image["img_path"]).content == data
    again = classify(client, task["id"], [{"_base64": b64(data)}], store_images=True)
    assert again["records"][0]["_stored_image_id"] == stored_id  # not stored twice


def test_served_probabilities_equal_the_evaluation_steps(trained: Trained) -> None:
    """The same images through the train step's embedding path and through /classify."""
    from components.lib.embeddings import embed_views
    from taskvision import features
    from taskvision.dataset import read_snapshot
    from taskvision.inference import BundleModel

    client, task = trained.client, trained.tasks["multi_label"]
    app = client.app  # type: ignore[attr-defined]
    blobs = app.state.services.blobs
    runs = client.get(f"/recognition/v2/training-run/?task={task['id']}").json()["results"]
    run = next(r for r in runs if r["version"] == 1)
    _info, rows = read_snapshot(blobs, f"datasets/{task['id']}/{run['id']}")
    rows = rows[:10]
    bundle = BundleModel.load(blobs.root / f"models/{task['id']}/{run['id']}")
    ids = bundle.meta.features
    vectors = embed_views(blobs, rows, features.views_needed(ids), use_cache=False)
    evaluated = bundle.outputs(bundle.logits_from_embeddings(features.assemble(vectors, ids)))
    records = [{"_base64": b64(blobs.get(row.blob_key))} for row in rows]
    served = classify(client, task["id"], records, version=1)["records"]
    names = [label["name"] for label in bundle.meta.labels]
    for expected, record in zip(evaluated, served, strict=True):
        by_name = {label["name"]: label["prob"] for label in record["labels"]}
        np.testing.assert_allclose([by_name[n] for n in names], expected, atol=1e-5)


def test_one_backbone_pass_per_image_across_tasks(trained: Trained) -> None:
    from taskvision.backbone import shared_embedder

    client = trained.client
    embedder = shared_embedder()
    record = [{"_base64": b64(shape_image("circle", 601))}]
    before = embedder.images_embedded
    classify(client, trained.tasks["multi_class"]["id"], record)
    classify(client, trained.tasks["multi_label"]["id"], record)
    classify(client, trained.tasks["regression"]["id"], record)
    classify(client, trained.tasks["multi_class"]["id"], record, version=1)
    assert embedder.images_embedded - before == 1


# ---- bad input -------------------------------------------------------------------------


class _Images(BaseHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        if self.path.startswith("/image.png"):
            data = shape_image("circle", 700)
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        elif self.path.startswith("/redirect"):
            self.send_response(302)
            self.send_header("Location", self.path.split("to=", 1)[1])
            self.end_headers()
        elif self.path.startswith("/hang"):
            time.sleep(3)
            self.send_response(204)
            self.end_headers()


@pytest.fixture(scope="module")
def image_server() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Images)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_each_bad_record_fails_alone(trained: Trained, image_server: str) -> None:
    good = {"_base64": b64(shape_image("square", 800))}
    bad = {
        "invalid base64": {"_base64": "@@@ not base64"},
        "not an image": {"_base64": base64.b64encode(b"just some text").decode()},
        "decompression bomb": {"_base64": b64(bomb_png())},
        "neither url nor base64": {"_id": "x"},
        "loopback": {"_url": "http://127.0.0.2:9/a.png"},
        "private": {"_url": "http://10.0.0.1/a.png"},
        "metadata service": {"_url": "http://169.254.169.254/latest/meta-data/"},
        "redirect to metadata": {"_url": f"{image_server}/redirect?to=http://169.254.169.254/"},
        "hangs": {"_url": f"{image_server}/hang"},
    }
    records = [good, *bad.values()]
    started = time.monotonic()
    answer = classify(trained.client, trained.tasks["multi_class"]["id"], records[:10])
    assert time.monotonic() - started < 8  # the hanging URL timed out (1 s here)
    assert answer["records"][0]["_status"]["code"] == 200
    for (case, _), record in zip(bad.items(), answer["records"][1:], strict=True):
        assert record["_status"]["code"] in (400, 413), case
        assert record["_status"]["text"], case
        assert "best_label" not in record, case
    texts = {case: r["_status"]["text"] for case, r in zip(bad, answer["records"][1:], strict=True)}
    assert "Refusing" in texts["metadata service"] and "Refusing" in texts["redirect to metadata"]
    assert "timed out" in texts["hangs"]
    # ...and the service still answers.
    fetched = classify(
        trained.client, trained.tasks["multi_class"]["id"], [{"_url": f"{image_server}/image.png"}]
    )
    assert fetched["records"][0]["best_label"]["name"] == "circle"


def test_request_level_errors(trained: Trained) -> None:
    client, task = trained.client, trained.tasks["multi_class"]
    record = {"_base64": b64(image_bytes(1))}
    eleven = client.post(CLASSIFY, json={"task_id": task["id"], "records": [record] * 11})
    # The schema says at most 10 records, so it is a 422 naming the field.
    assert eleven.status_code == 422 and eleven.json()["errors"][0]["loc"] == ["records"]
    assert client.post(CLASSIFY, json={"task_id": task["id"], "records": []}).status_code == 400
    no_task = client.post(CLASSIFY, json={"records": [record]})
    assert no_task.status_code == 400 and no_task.json()["code"] == "no_task"
    assert client.post(CLASSIFY, json={"task_id": "nope", "records": [record]}).status_code == 404
    untrained = client.post("/recognition/v2/task", json={"name": "fresh"}).json()
    refused = client.post(CLASSIFY, json={"task_id": untrained["id"], "records": [record]})
    assert refused.status_code == 400 and refused.json()["code"] == "not_trained"
    app = client.app  # type: ignore[attr-defined]
    with app.state.services.session_factory() as session:
        _, token = create_user(session, "someone-else")
    stranger = client.post(
        CLASSIFY,
        json={"task_id": task["id"], "records": [record]},
        headers={"Authorization": f"Token {token}"},
    )
    assert stranger.status_code == 404
    assert client.post(CLASSIFY, json={"task_id": task["id"], "records": ["x"]}).status_code == 422


def test_a_huge_photo_is_answered(trained: Trained) -> None:
    huge = image_bytes(9, size=(6000, 4000), fmt="JPEG")
    record = classify(trained.client, trained.tasks["multi_class"]["id"], [{"_base64": b64(huge)}])[
        "records"
    ][0]
    assert record["_status"]["code"] == 200 and (record["_width"], record["_height"]) == (6000, 4000)
