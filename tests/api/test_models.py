"""Model versions: listing by task, detail, and the production guard on delete."""

from __future__ import annotations

import json
from datetime import UTC, datetime

from fastapi.testclient import TestClient

from api.db.models import Model, Task
from tests.support.api import create_task, upload
from tests.support.images import image_bytes


def _add(app, task_id: str, version: int) -> str:
    with app.state.services.session_factory() as session:
        task = session.get(Task, task_id)
        model = Model(
            workspace_id=task.workspace_id,
            task_id=task_id,
            version=version,
            train_status="TRAINED",
            metrics={"accuracy": 0.5 + version / 10},
            created=datetime.now(UTC),
        )
        session.add(model)
        session.commit()
        return model.id


def test_list_get_and_delete_models(app, client: TestClient) -> None:
    task, other = create_task(client, name="rooms"), create_task(client, name="other")
    ids = [_add(app, task["id"], v) for v in (1, 2)]
    _add(app, other["id"], 1)
    listed = client.get(f"/recognition/v2/model/?task={task['id']}").json()
    assert listed["count"] == 2
    assert [m["version"] for m in listed["results"]] == [2, 1]
    detail = client.get(f"/recognition/v2/model/{ids[0]}").json()
    assert detail == {
        "id": ids[0],
        "task": task["id"],
        "task_name": "rooms",
        "version": 1,
        "train_status": "TRAINED",
        "production": False,
        "metrics": {"accuracy": 0.6},
        "run_id": None,  # added by hand, not by a training run
        "created": detail["created"],
    }
    client.patch(f"/recognition/v2/task/{task['id']}", json={"production_version": 2})
    refused = client.delete(f"/recognition/v2/model/{ids[1]}/")
    assert refused.status_code == 409 and "production" in refused.json()["detail"]
    assert client.get(f"/recognition/v2/model/{ids[1]}").json()["production"] is True
    assert client.delete(f"/recognition/v2/model/{ids[0]}/").status_code == 204
    assert client.get(f"/recognition/v2/model/{ids[0]}").status_code == 404
    assert client.get("/recognition/v2/model").json()["count"] == 2
    assert client.get("/recognition/v2/model/?task=00000000-0000-4000-8000-000000000000").status_code == 404


def _evaluated_version(app, client: TestClient) -> tuple[str, list[str]]:
    """A version whose bundle folder holds per-image predictions, as the register step stores them."""
    task = create_task(client, name="flowers")
    images = [upload(client, image_bytes(seed))["id"] for seed in range(4)]
    labels = [{"id": "l-rose", "name": "rose"}, {"id": "l-tulip", "name": "tulip"}]

    def line(image: str, split: str, actual: int, predicted: int, confidence: float) -> str:
        return json.dumps(
            {
                "image_id": image,
                "split": split,
                "true_labels": [labels[actual]],
                "predicted_labels": [{**labels[predicted], "prob": confidence}],
                "scores": [{**label, "prob": 0.5} for label in labels],
                "confidence": confidence,
                "correct": actual == predicted,
            }
        )

    rows = [
        line(images[0], "test", 0, 0, 0.9),
        line(images[1], "test", 0, 1, 0.8),  # a confident mistake
        line(images[2], "test", 1, 0, 0.55),  # an unsure one
        line(images[3], "train", 1, 0, 0.7),  # out of fold
        line("deleted-since", "test", 1, 1, 0.6),
    ]
    blobs = app.state.services.blobs
    blobs.put("models/t/r/predictions.jsonl", ("\n".join(rows) + "\n").encode())
    model_id = _add(app, task["id"], 1)
    with app.state.services.session_factory() as session:
        model = session.get(Model, model_id)
        model.bundle_uri = "models/t/r"
        # Recorded before the metric names said which average they are.
        model.metrics = {
            "accuracy": 0.5,
            "precision": 0.4,
            "test_images": 4,
            "confusion_matrix": {"labels": ["rose", "tulip"], "matrix": [[1, 1], [1, 1]]},
        }
        session.commit()
    return model_id, images


def test_a_versions_predictions_filter_sort_and_link_their_images(app, client: TestClient) -> None:
    model_id, images = _evaluated_version(app, client)
    url = f"/recognition/v2/model/{model_id}/predictions"

    everything = client.get(url).json()
    assert everything["count"] == 4  # the test split by default
    assert [p["confidence"] for p in everything["results"]] == [0.9, 0.8, 0.6, 0.55]
    assert everything["results"][0]["image"]["thumb_img_path"].startswith("http://testserver/")
    assert everything["results"][2]["image"] is None  # its image was deleted since
    thumb = client.get(everything["results"][0]["image"]["thumb_img_path"])
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"

    wrong = client.get(f"{url}?wrong=true").json()["results"]
    assert [p["image_id"] for p in wrong] == [images[1], images[2]]
    cell = client.get(f"{url}?true_label=rose&predicted_label=l-tulip").json()["results"]
    assert [p["image_id"] for p in cell] == [images[1]]
    unsure_first = client.get(f"{url}?wrong=true&order=confidence").json()["results"]
    assert [p["image_id"] for p in unsure_first] == [images[2], images[1]]
    assert [p["image_id"] for p in client.get(f"{url}?split=train").json()["results"]] == [images[3]]
    assert client.get(f"{url}?split=all").json()["count"] == 5
    paged = client.get(f"{url}?page_size=3&page=2").json()
    assert len(paged["results"]) == 1 and paged["previous"] and paged["next"] is None
    assert client.get(f"{url}?split=holdout").status_code in (400, 422)


def test_a_version_from_before_reads_under_todays_metric_names_with_a_rebuilt_report(
    app, client: TestClient, other_client: TestClient
) -> None:
    model_id, _ = _evaluated_version(app, client)
    metrics = client.get(f"/recognition/v2/model/{model_id}").json()["metrics"]
    assert metrics["macro_precision"] == 0.4 and "precision" not in metrics
    assert metrics["confusion_matrix"]["actual_by_predicted"] == [[1, 1], [1, 1]]
    report = client.get(f"/recognition/v2/model/{model_id}/report").json()
    assert report["metrics"] == metrics and report["selection"] == {}
    assert report["markdown"].startswith("# Evaluation (multi_class, 4 test images)")
    assert "| macro_precision | 0.4000 |" in report["markdown"]
    markdown = client.get(f"/recognition/v2/model/{model_id}/report?format=markdown")
    assert markdown.text == report["markdown"]
    # Another workspace sees neither.
    assert other_client.get(f"/recognition/v2/model/{model_id}/predictions").status_code == 404
    assert other_client.get(f"/recognition/v2/model/{model_id}/report").status_code == 404


def test_a_version_without_per_image_predictions_lists_none(app, client: TestClient) -> None:
    task = create_task(client, name="imported")
    model_id = _add(app, task["id"], 1)
    assert client.get(f"/recognition/v2/model/{model_id}/predictions").json() == {
        "count": 0,
        "next": None,
        "previous": None,
        "results": [],
    }
