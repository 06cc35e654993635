"""Training through the API with the real local KFP runner (kfp.local), for each task type."""

from __future__ import annotations

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
from api.settings import Settings
from taskvision.bundle import BundleMeta
from tests.training import datasets
from tests.training.helpers import add_label, make_task, train, upload, wait

pytestmark = pytest.mark.slow

TASKS = "/recognition/v2/task"


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path, train_poll_interval_s=0.2)


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    """A signed-in user of a running service (the training watcher is started by the app's lifespan)."""
    app = create_app(settings)
    with app.state.session_factory() as session:
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
        matrix = metrics["confusion_matrix"]["matrix"]
        assert sum(map(sum, matrix)) == metrics["test_images"]
    elif task_type == "multi_label":
        assert 0.8 <= metrics["mAP"] <= 1.0
        assert set(metrics["per_label"]) == {
            "red",
            "striped",
        }  # the negative label is "no tag", not an output
        assert all(0 < m["threshold"] < 1 for m in metrics["per_label"].values())
    else:
        assert metrics["r2"] > 0.5  # the disc's radius is learnable from the frozen features
        assert 0 < metrics["mae"] < 8  # radii span 6..41
        assert metrics["rmse"] >= metrics["mae"]


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

    done = wait(client, run["id"])
    assert done["status"] == "SUCCEEDED", done
    assert (done["version"], done["step"], done["progress"]) == (1, "register", 1.0)
    state = client.get(f"{TASKS}/{task['id']}").json()
    assert (state["production_version"], state["last_train_status"]) == (1, "TRAINED")
    models = client.get(f"/recognition/v2/model/?task={task['id']}").json()["results"]
    assert [m["version"] for m in models] == [1]
    _check_metrics(task_type, models[0]["metrics"])

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
    blobs = client.app.state.blobs  # type: ignore[attr-defined]
    meta = BundleMeta.from_json(blobs.get(f"models/{task['id']}/{done['id']}/bundle.json"))
    assert meta.selection["quality"] == "fast" and [c["name"] for c in meta.selection["candidates"]] == [
        "lite0-ms1"
    ]
    assert meta.training["quality"] == "fast"
    # Regression answers stay within the training values' range (plus a margin): radii span 6..41.
    (low, high) = meta.value_range[0]
    assert 0 <= low < 10 and 37 < high < 45
    model = client.get(f"/recognition/v2/model/?task={task['id']}").json()["results"][0]
    assert model["metrics"]["out_of_range"] >= 0 and "mae" in model["metrics"]


def test_validation_failure_explains_itself_and_the_task_stays_usable(client: TestClient) -> None:
    task = client.post(TASKS, json={"name": "flowers", "type": "multi_class"}).json()
    rose, tulip = (
        add_label(client, task["id"], "rose", "category"),
        add_label(client, task["id"], "tulip", "category"),
    )
    for i in range(12):
        upload(client, datasets.shape_image("circle", i), [rose])
    for i in range(20):
        upload(client, datasets.shape_image("square", i), [tulip])
    failed = wait(client, train(client, task["id"])["id"])
    assert failed["status"] == "FAILED" and failed["step"] == "validate"
    assert "label 'rose' has 12 images; at least 20 are needed" in failed["error"]
    state = client.get(f"{TASKS}/{task['id']}").json()
    assert state["last_train_status"] == "TRAINING_FAILED"
    assert "label 'rose' has 12 images" in state["last_train_error"]
    assert state["production_version"] == -1
    assert client.get(f"/recognition/v2/model/?task={task['id']}").json()["count"] == 0

    for i in range(12, 20):
        upload(client, datasets.shape_image("circle", i), [rose])
    fixed = wait(client, train(client, task["id"])["id"])
    assert fixed["status"] == "SUCCEEDED" and fixed["version"] == 1
    assert client.get(f"{TASKS}/{task['id']}").json()["last_train_error"] == ""


def test_a_killed_run_fails_cleanly_and_the_task_can_train_again(
    client: TestClient, settings: Settings
) -> None:
    task = make_task(client, "multi_class", per_label=20)
    run = train(client, task["id"])
    deadline = time.monotonic() + 60
    pid = None
    while pid is None and time.monotonic() < deadline:
        children = client.app.state.training.runner._children  # type: ignore[attr-defined]
        if run["id"] in children:
            pid = children[run["id"]].pid
        time.sleep(0.1)
    assert pid is not None
    os.killpg(pid, signal.SIGKILL)
    killed = wait(client, run["id"])
    assert killed["status"] == "FAILED"
    assert "killed" in killed["error"]
    assert client.get(f"{TASKS}/{task['id']}").json()["last_train_status"] == "TRAINING_FAILED"
    assert client.get(f"/recognition/v2/model/?task={task['id']}").json()["count"] == 0
    again = wait(client, train(client, task["id"])["id"])
    assert again["status"] == "SUCCEEDED" and again["version"] == 1


def test_a_run_interrupted_by_a_restart_is_marked_failed(settings: Settings) -> None:
    app = create_app(settings)
    with app.state.session_factory() as session:
        _, token = create_user(session, "restarter")
    headers = {"Authorization": f"Token {token}"}
    with TestClient(app, headers=headers) as client:
        task = make_task(client, "multi_class", per_label=20)
        run = train(client, task["id"])
        app.state.training.stop()  # the old process's watcher is gone...
        with app.state.session_factory() as session:  # ...while its run was running
            row = session.get(TrainingRun, run["id"])
            assert row is not None
            row.status = "RUNNING"
            session.commit()
        app.state.training.runner.cancel(run["id"])
    restarted = create_app(settings)
    with TestClient(restarted, headers=headers) as client:
        failed = client.get(f"/recognition/v2/training-run/{run['id']}").json()
        assert failed["status"] == "FAILED" and "restart" in failed["error"]
        assert client.get(f"{TASKS}/{task['id']}").json()["last_train_status"] == "TRAINING_FAILED"
        assert wait(client, train(client, task["id"])["id"])["status"] == "SUCCEEDED"


def test_deleting_a_task_removes_runs_snapshots_and_bundles(client: TestClient) -> None:
    task = make_task(client, "multi_class", per_label=20)
    assert wait(client, train(client, task["id"])["id"])["status"] == "SUCCEEDED"
    blobs = client.app.state.blobs  # type: ignore[attr-defined]
    for prefix in ("datasets", "runs", "models"):
        assert blobs.list_keys(f"{prefix}/{task['id']}/"), prefix
    assert client.delete(f"{TASKS}/{task['id']}/").status_code == 204
    for prefix in ("datasets", "runs", "models"):
        assert blobs.list_keys(f"{prefix}/{task['id']}/") == [], prefix
    assert client.get(f"/recognition/v2/training-run/?task={task['id']}").status_code == 404
    with client.app.state.session_factory() as session:  # type: ignore[attr-defined]
        assert session.scalars(select(TrainingRun)).all() == []


@pytest.mark.postgres
@pytest.mark.s3
def test_training_with_postgres_and_s3(postgres_url: str, s3_server: Any, tmp_path: Path) -> None:
    """The cluster-mode stores: the pipeline steps read the snapshot from and write the bundle to S3."""
    from tests.conftest import s3_storage_settings

    settings = Settings(
        data_dir=tmp_path,
        database_url=postgres_url,
        train_poll_interval_s=0.2,
        **s3_storage_settings(s3_server, "training"),
    )
    app = create_app(settings)
    with app.state.session_factory() as session:
        _, token = create_user(session, "s3-trainer")
    with TestClient(app, headers={"Authorization": f"Token {token}"}) as client:
        task = make_task(client, "multi_class", per_label=20)
        done = wait(client, train(client, task["id"])["id"])
        assert done["status"] == "SUCCEEDED", done
        prefix = f"models/{task['id']}/{done['id']}"
        meta = BundleMeta.from_json(app.state.blobs.get(f"{prefix}/bundle.json"))
        assert app.state.blobs.list_keys(f"{prefix}/") == sorted(
            f"{prefix}/{name}" for name in ["bundle.json", *meta.files]
        )


def test_runs_queue_one_at_a_time(client: TestClient) -> None:
    first_task, second_task = (
        make_task(client, "multi_class", per_label=20),
        make_task(client, "regression", 12),
    )
    first = train(client, first_task["id"])
    second = train(client, second_task["id"])
    _running_snapshot(client, first["id"])
    assert client.get(f"/recognition/v2/training-run/{second['id']}").json()["status"] == "QUEUED"
    assert wait(client, first["id"])["status"] == "SUCCEEDED"
    finished = wait(client, second["id"])
    assert finished["status"] == "SUCCEEDED" and finished["started"] >= wait(client, first["id"])["finished"]
    listed = client.get(f"/recognition/v2/training-run/?task={second_task['id']}").json()
    assert [run["id"] for run in listed["results"]] == [second["id"]]
