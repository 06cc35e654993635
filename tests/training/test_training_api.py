"""Training through the API with the real local KFP runner (kfp.local), for each task type.

Trainings whose model does not matter to the test (a retrain after a failure, a kill or a
restart, a queued second run, a webhook's trigger, a task about to be deleted) use
``quality="fast"``: the default, ``balanced``, adds a partial fine-tune of the backbone (about
30 s per training here) and is trained in the tests that check what it chooses.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from api.auth import create_user
from api.db.models import TrainingRun
from api.main import create_app
from api.settings import DEFAULT_BLOCKED_NETWORKS, Settings
from taskvision.bundle import BundleMeta
from tests.support.images import image_bytes, shape_image
from tests.training.helpers import IMAGES, add_label, make_task, train, upload, wait

pytestmark = pytest.mark.slow

TASKS = "/recognition/v2/task"


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path, train_poll_interval_s=0.2)


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    """A signed-in user of a running service (the training watcher is started by the app's lifespan)."""
    app = create_app(settings)
    with app.state.services.session_factory() as session:
        _, token = create_user(session, "trainer")
    with TestClient(app, headers={"Authorization": f"Token {token}"}) as client:
        yield client


def _running_snapshot(client: TestClient, run_id: str, timeout: float = 60) -> dict[str, Any]:
    """The run as seen while it runs, once a step has reported."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = client.get(f"/recognition/v2/training-run/{run_id}").json()
        if run["status"] == "RUNNING" and run["step"]:
            return dict(run)
        assert run["status"] in ("QUEUED", "STARTING", "RUNNING"), run  # STARTING: being submitted
        time.sleep(0.05)
    raise AssertionError("the run never reported a step")


def _check_metrics(task_type: str, metrics: dict[str, Any]) -> None:
    assert metrics["test_images"] >= 8
    if task_type == "multi_class":
        assert 0.9 <= metrics["accuracy"] <= 1.0
        assert set(metrics["per_label"]) == {"circle", "square"}
        matrix = metrics["confusion_matrix"]
        assert (matrix["rows"], matrix["columns"]) == ("actual", "predicted")
        assert sum(map(sum, matrix["actual_by_predicted"])) == metrics["test_images"]
        assert 0.0 <= metrics["macro_f1"] <= 1.0 and "f1" not in metrics
    elif task_type == "multi_label":
        assert 0.8 <= metrics["mAP"] <= 1.0
        assert 0.0 <= metrics["exact_match_accuracy"] <= 1.0 and "accuracy" not in metrics
        assert 0.0 <= metrics["micro_f1"] <= 1.0
        assert set(metrics["per_label"]) == {
            "red",
            "striped",
        }  # the negative label is "no tag", not an output
        assert all(0 < m["threshold"] < 1 for m in metrics["per_label"].values())
    else:
        assert metrics["r2"] > 0.5  # the disc's radius is learnable from the frozen features
        assert 0 < metrics["mae"] < 8  # radii span 6..41
        assert metrics["rmse"] >= metrics["mae"]


def _check_evaluation(client: TestClient, task: dict[str, Any], model: dict[str, Any]) -> None:
    """Every test image's answer is listed with its image, mistakes filter, the report is served."""
    url = f"/recognition/v2/model/{model['id']}"
    test = client.get(f"{url}/predictions?page_size=100").json()
    images = set(_task_images(client, task))
    assert test["count"] == model["metrics"]["test_images"] and test["next"] is None
    assert {p["image_id"] for p in test["results"]} <= images
    assert all(p["split"] == "test" and p["image"]["thumb_img_path"] for p in test["results"])
    wrong = client.get(f"{url}/predictions?wrong=true&page_size=100").json()["results"]
    assert [p["image_id"] for p in wrong] == [p["image_id"] for p in test["results"] if not p["correct"]]
    train_side = client.get(f"{url}/predictions?split=train&page_size=100").json()
    assert 0 < train_side["count"] <= len(images) - test["count"]
    assert not {p["image_id"] for p in train_side["results"]} & {p["image_id"] for p in test["results"]}
    report = client.get(f"{url}/report").json()
    assert report["markdown"].startswith("# Evaluation (") and report["metrics"] == model["metrics"]
    assert report["selection"]["chosen"] and report["version"] == model["version"]
    markdown = client.get(f"{url}/report?format=markdown")
    assert (
        markdown.headers["content-type"].startswith("text/markdown") and markdown.text == report["markdown"]
    )


def _task_images(client: TestClient, task: dict[str, Any]) -> list[str]:
    page = client.get(f"{IMAGES}/?task={task['id']}&page_size=100").json()
    assert page["next"] is None
    return [image["id"] for image in page["results"]]


@pytest.mark.parametrize("task_type", ["multi_class", "multi_label", "regression"])
def test_train_retrain_and_switch_production(client: TestClient, task_type: str) -> None:
    task = make_task(client, task_type)
    run = train(client, task["id"])
    assert run["status"] == "QUEUED" and run["task"] == task["id"]
    assert client.get(f"{TASKS}/{task['id']}").json()["last_train_status"] == "IN_TRAINING"
    assert client.post(f"{TASKS}/{task['id']}/train").status_code == 409  # already training
    seen = _running_snapshot(client, run["id"])
    assert seen["step"] in {"validate", "split", "train", "evaluate", "register"}
    assert 0.0 <= seen["progress"] <= 1.0 and seen["started"]

    assert 0.0 <= seen["overall_progress"] <= 1.0 and seen["queue_position"] is None

    done = wait(client, run["id"])
    assert done["status"] == "SUCCEEDED", done
    assert (done["version"], done["step"], done["progress"], done["overall_progress"]) == (
        1,
        "register",
        1.0,
        1.0,
    )
    effective = done["effective_params"]
    assert effective["train_images"] + effective["test_images"] == len(_task_images(client, task))
    assert effective["augment"] == "flip" and effective["seed"] == 0 and effective["production"] is True
    assert effective["mode"] == "embed" and effective["quality"] == "balanced" and effective["chosen_model"]
    state = client.get(f"{TASKS}/{task['id']}").json()
    assert (state["production_version"], state["last_train_status"]) == (1, "TRAINED")
    models = client.get(f"/recognition/v2/model/?task={task['id']}").json()["results"]
    assert [m["version"] for m in models] == [1]
    # The run and its version point at each other.
    assert done["model_id"] == models[0]["id"] and models[0]["run_id"] == run["id"]
    _check_metrics(task_type, models[0]["metrics"])
    _check_evaluation(client, task, models[0])

    second = wait(client, train(client, task["id"], quality="fast")["id"])  # the default ran above
    assert second["status"] == "SUCCEEDED" and second["version"] == 2
    assert client.get(f"{TASKS}/{task['id']}").json()["production_version"] == 2
    versions = [
        m["version"] for m in client.get(f"/recognition/v2/model/?task={task['id']}").json()["results"]
    ]
    assert versions == [2, 1]

    switched = client.patch(f"{TASKS}/{task['id']}", json={"production_version": 1})
    assert switched.status_code == 200 and switched.json()["production_version"] == 1
    production = [
        m
        for m in client.get(f"/recognition/v2/model/?task={task['id']}").json()["results"]
        if m["production"]
    ]
    assert [m["version"] for m in production] == [1]


def test_the_quality_option_reaches_the_train_step(client: TestClient) -> None:
    task = make_task(client, "regression", per_label=20)
    refused = client.post(f"{TASKS}/{task['id']}/train", json={"quality": "ultra"})
    assert refused.status_code == 422 and "quality" in refused.text
    done = wait(client, train(client, task["id"], quality="fast")["id"])
    assert done["status"] == "SUCCEEDED" and done["params"]["quality"] == "fast"
    blobs = client.app.state.services.blobs  # type: ignore[attr-defined]
    meta = BundleMeta.from_json(blobs.get(f"models/{task['id']}/{done['id']}/bundle.json"))
    assert meta.selection["quality"] == "fast" and [c["name"] for c in meta.selection["candidates"]] == [
        "lite0-ms1"
    ]
    assert meta.training["quality"] == "fast"
    # Regression answers stay within the training values' range (plus a margin): radii span 6..41.
    (low, high) = meta.value_range[0]
    assert 0 <= low < 10 and 37 < high < 45

    # A retrain of unchanged data refits the current version's choice; reselect scores them all again.
    again = wait(client, train(client, task["id"], quality="fast")["id"])
    report = client.get(f"/recognition/v2/model/{again['model_id']}/report").json()
    assert report["selection"]["reused"]["from_run"] == done["id"]
    assert report["selection"]["reused"]["changed_images"] == 0
    assert "only its choice" in report["markdown"]
    fresh = wait(client, train(client, task["id"], quality="fast", reselect=True)["id"])
    assert fresh["status"] == "SUCCEEDED" and fresh["effective_params"]["production"] is True
    assert fresh["effective_params"]["reselect"] is True and again["effective_params"]["reselect"] is False
    report = client.get(f"/recognition/v2/model/{fresh['model_id']}/report").json()
    assert "reused" not in report["selection"]
    model = client.get(f"/recognition/v2/model/?task={task['id']}").json()["results"][0]
    assert model["metrics"]["out_of_range"] >= 0 and "mae" in model["metrics"]


def test_a_task_that_cannot_pass_validation_is_refused_at_once(client: TestClient) -> None:
    task = client.post(TASKS, json={"name": "flowers", "type": "multi_class"}).json()
    lonely = client.post(f"{TASKS}/{task['id']}/train")
    assert lonely.status_code == 400 and lonely.json()["code"] == "not_trainable"
    assert "The task has 0 label(s); at least 2 are needed to train." in lonely.json()["problems"]
    rose, tulip = (
        add_label(client, task["id"], "rose", "category"),
        add_label(client, task["id"], "tulip", "category"),
    )
    for i in range(12):
        upload(client, shape_image("circle", i), [rose])
    for i in range(20):
        upload(client, shape_image("square", i), [tulip])
    both = upload(client, shape_image("square", 99), [rose, tulip])
    refused = client.post(f"{TASKS}/{task['id']}/train", json={})
    assert refused.status_code == 400, refused.text
    body = refused.json()
    assert body["counts"] == {"rose": 13, "tulip": 21}
    assert body["image_ids"] == [both]
    assert body["problems"] == [
        "1 image has more than one category of this task; a categorization image needs exactly one.",
        "label 'rose' has 13 images; at least 20 are needed",
    ]
    assert body["detail"].startswith("The task cannot be trained yet: 1 image has more than one category")
    # Nothing was queued, and the task is as it was.
    assert client.get(f"/recognition/v2/training-run/?task={task['id']}").json()["count"] == 0
    assert client.get(f"{TASKS}/{task['id']}").json()["last_train_status"] == "NOT_TRAINED"
    # A lower minimum for this training only is honoured.
    assert client.post(f"{TASKS}/{task['id']}/train", json={"min_images_per_label": 10}).json()["code"] == (
        "not_trainable"
    )  # still the image with two categories
    client.post(f"{IMAGES}/{both}/remove-label", json={"label_id": rose})
    assert client.post(f"{TASKS}/{task['id']}/train", json={"min_images_per_label": 10}).status_code == 202


def test_a_problem_only_the_images_show_fails_the_run_in_validation(client: TestClient) -> None:
    """The pipeline's validation stays the authority: it also reads the images."""
    task = client.post(TASKS, json={"name": "flowers", "type": "multi_class"}).json()
    rose, tulip = (
        add_label(client, task["id"], "rose", "category"),
        add_label(client, task["id"], "tulip", "category"),
    )
    for i in range(20):
        upload(client, shape_image("circle", i), [rose])
        upload(client, shape_image("square", i), [tulip])
    tiny = upload(client, image_bytes(5, size=(8, 8)), [rose])  # too small to learn from
    failed = wait(client, train(client, task["id"])["id"])
    assert failed["status"] == "FAILED" and failed["step"] == "validate"
    assert f"Unusable images: {tiny} is 8x8 px" in failed["error"]
    state = client.get(f"{TASKS}/{task['id']}").json()
    assert state["last_train_status"] == "TRAINING_FAILED" and "8x8 px" in state["last_train_error"]
    assert state["production_version"] == -1
    assert client.get(f"/recognition/v2/model/?task={task['id']}").json()["count"] == 0

    assert client.delete(f"{IMAGES}/{tiny}").status_code == 204
    fixed = wait(client, train(client, task["id"], quality="fast")["id"])
    assert fixed["status"] == "SUCCEEDED" and fixed["version"] == 1


@pytest.mark.parametrize("runner", ["warm", "kfp-local"])
def test_a_killed_run_fails_cleanly_and_the_task_can_train_again(settings: Settings, runner: str) -> None:
    app = create_app(settings.model_copy(update={"pipeline_runner": runner, "train_poll_interval_s": 0.2}))
    with app.state.services.session_factory() as session:
        _, token = create_user(session, "killer")
    with TestClient(app, headers={"Authorization": f"Token {token}"}) as client:
        task = make_task(client, "multi_class", per_label=20)
        run = train(client, task["id"])
        deadline = time.monotonic() + 60
        pid = None
        while pid is None and time.monotonic() < deadline:
            pid = app.state.services.training.runner.pid_of(run["id"])
            time.sleep(0.1)
        assert pid is not None
        os.killpg(pid, signal.SIGKILL)
        killed = wait(client, run["id"])
        assert killed["status"] == "FAILED"
        assert "was killed (signal 9)" in killed["error"]
        assert client.get(f"{TASKS}/{task['id']}").json()["last_train_status"] == "TRAINING_FAILED"
        assert client.get(f"/recognition/v2/model/?task={task['id']}").json()["count"] == 0
        again = wait(client, train(client, task["id"], quality="fast")["id"])
        assert again["status"] == "SUCCEEDED" and again["version"] == 1


def test_a_run_interrupted_by_a_restart_is_marked_failed(settings: Settings) -> None:
    app = create_app(settings)
    with app.state.services.session_factory() as session:
        _, token = create_user(session, "restarter")
    headers = {"Authorization": f"Token {token}"}
    with TestClient(app, headers=headers) as client:
        task = make_task(client, "multi_class", per_label=20)
        run = train(client, task["id"])
        app.state.services.jobs.stop()  # the old process's watcher is gone...
        with app.state.services.session_factory() as session:  # ...while its run was running
            row = session.get(TrainingRun, run["id"])
            assert row is not None
            row.status = "RUNNING"
            session.commit()
        app.state.services.training.runner.cancel(run["id"])
    restarted = create_app(settings)
    with TestClient(restarted, headers=headers) as client:
        failed = client.get(f"/recognition/v2/training-run/{run['id']}").json()
        assert failed["status"] == "FAILED" and "restart" in failed["error"]
        assert client.get(f"{TASKS}/{task['id']}").json()["last_train_status"] == "TRAINING_FAILED"
        assert wait(client, train(client, task["id"], quality="fast")["id"])["status"] == "SUCCEEDED"


def test_deleting_a_task_removes_runs_snapshots_and_bundles(client: TestClient) -> None:
    task = make_task(client, "multi_class", per_label=20)
    assert wait(client, train(client, task["id"], quality="fast")["id"])["status"] == "SUCCEEDED"
    blobs = client.app.state.services.blobs  # type: ignore[attr-defined]
    for prefix in ("datasets", "runs", "models"):
        assert blobs.list_keys(f"{prefix}/{task['id']}/"), prefix
    assert client.delete(f"{TASKS}/{task['id']}/").status_code == 204
    for prefix in ("datasets", "runs", "models"):
        assert blobs.list_keys(f"{prefix}/{task['id']}/") == [], prefix
    assert client.get(f"/recognition/v2/training-run/?task={task['id']}").status_code == 404
    with client.app.state.services.session_factory() as session:  # type: ignore[attr-defined]
        assert session.scalars(select(TrainingRun)).all() == []


@pytest.mark.postgres
@pytest.mark.s3
def test_training_with_postgres_and_s3(
    postgres_url: str, s3_server: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cluster-mode stores: the pipeline steps read the snapshot from and write the bundle to S3."""
    from components.lib.refit import FEATURES_FILE
    from tests.conftest import s3_storage_settings

    system_tmp = tmp_path / "system-tmp"  # what the service's children would otherwise write to
    system_tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(system_tmp))

    settings = Settings(
        data_dir=tmp_path,
        database_url=postgres_url,
        secret_key="test-signing-key",
        train_poll_interval_s=0.2,
        pipeline_runner="kfp-local",  # the real KFP pipeline, every step in a subprocess
        **s3_storage_settings(s3_server, "training"),
    )
    app = create_app(settings)
    with app.state.services.session_factory() as session:
        _, token = create_user(session, "s3-trainer")
    with TestClient(app, headers={"Authorization": f"Token {token}"}) as client:
        task = make_task(client, "multi_class", per_label=20)
        done = wait(client, train(client, task["id"])["id"])
        assert done["status"] == "SUCCEEDED", done
        prefix = f"models/{task['id']}/{done['id']}"
        meta = BundleMeta.from_json(app.state.services.blobs.get(f"{prefix}/bundle.json"))
        stored = ["bundle.json", "predictions.jsonl", "report.md", *meta.files]
        if meta.selection.get("kind") in ("partial_finetune", "partial_finetune+linear"):
            stored.append(FEATURES_FILE)  # a tuned network's per-image features, for the next retrain
        assert app.state.services.blobs.list_keys(f"{prefix}/") == sorted(
            f"{prefix}/{name}" for name in stored
        )
        model = client.get(f"/recognition/v2/model/?task={task['id']}").json()["results"][0]
        _check_evaluation(client, task, model)
    assert list(system_tmp.iterdir()) == []  # the steps' temporary files went with the run's folder


def test_runs_queue_one_at_a_time(client: TestClient) -> None:
    first_task, second_task = (
        make_task(client, "multi_class", per_label=20),
        make_task(client, "regression", 12),
    )
    first = train(client, first_task["id"], quality="fast")
    second = train(client, second_task["id"], quality="fast")
    running = _running_snapshot(client, first["id"])
    waiting = client.get(f"/recognition/v2/training-run/{second['id']}").json()
    assert waiting["status"] == "QUEUED" and waiting["queue_position"] == 1 and waiting["eta_seconds"] is None
    assert running["queue_position"] is None
    assert wait(client, first["id"])["status"] == "SUCCEEDED"
    finished = wait(client, second["id"])
    assert finished["status"] == "SUCCEEDED" and finished["started"] >= wait(client, first["id"])["finished"]
    listed = client.get(f"/recognition/v2/training-run/?task={second_task['id']}").json()
    assert [run["id"] for run in listed["results"]] == [second["id"]]


def test_webhooks_tell_about_a_training_and_a_slow_target_delays_nothing(tmp_path: Path) -> None:
    from tests.api.test_url_deadlines import BlackHole
    from tests.api.test_webhooks import Receiver, verify

    settings = Settings(
        data_dir=tmp_path,
        train_poll_interval_s=0.2,
        url_blocked_networks=[n for n in DEFAULT_BLOCKED_NETWORKS if n != "127.0.0.0/8"],
        webhook_timeout_s=1.0,
        webhook_retry_base_s=0.5,
        webhook_poll_interval_s=0.1,
    )
    app = create_app(settings)
    with app.state.services.session_factory() as session:
        _, token = create_user(session, "hooks")
    receiver, hole = Receiver(), BlackHole()
    server = receiver.serve()
    try:
        with TestClient(app, headers={"Authorization": f"Token {token}"}) as client:
            good = client.post("/recognition/v2/webhook", json={"url": receiver.url}).json()
            slow = client.post(
                "/recognition/v2/webhook", json={"url": f"http://127.0.0.1:{hole.port}/"}
            ).json()
            task = make_task(client, "multi_class", per_label=20)
            run = train(client, task["id"], quality="fast")
            done = wait(client, run["id"])
            assert done["status"] == "SUCCEEDED"
            deadline = time.monotonic() + 20
            slow_url = f"/recognition/v2/webhook/{slow['id']}/deliveries"
            while time.monotonic() < deadline:
                slow_deliveries = client.get(slow_url).json()["results"]
                tried = len(slow_deliveries) == 3 and all(d["attempts"] for d in slow_deliveries)
                if len(receiver.received) >= 3 and tried:
                    break
                time.sleep(0.1)
    finally:
        server.shutdown()
        hole.close()
    events = {
        event["event"]: event["data"] for event in (json.loads(got["body"]) for got in receiver.received)
    }
    # Deliveries go out concurrently, so their order of arrival is not fixed.
    assert set(events) == {"training.started", "training.succeeded", "version.production_changed"}
    assert events["training.started"]["run"]["id"] == run["id"]
    assert all(verify(good["secret"], got["headers"], got["body"]) for got in receiver.received)
    succeeded = events["training.succeeded"]
    assert succeeded["run"]["id"] == run["id"] and succeeded["version"] == 1
    assert succeeded["model_id"] == done["model_id"] and "accuracy" in succeeded["metrics"]
    assert events["version.production_changed"]["production_version"] == 1
    # The target that never answers got the same events, each attempt cut off after the timeout,
    # while the training went on (the deliveries run in a thread of their own).
    assert {d["event"] for d in slow_deliveries} == set(events)
    assert all("did not answer" in d["last_error"] for d in slow_deliveries), slow_deliveries
