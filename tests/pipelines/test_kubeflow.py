"""Cluster mode's pipeline runner: the real kfp.Client against an in-process KFP v2beta1 API.

Kubeflow cannot run here, so ``tests/fake_kfp.py`` implements the API paths
the client calls and records what it sent. The pods' work is done by running
the same pipeline steps' library code on the run's recorded arguments.
"""

from __future__ import annotations

import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from google.protobuf import json_format
from kfp.client import client as kfp_client_module
from kfp.pipeline_spec import pipeline_spec_pb2

from api.auth import create_user
from api.main import create_app
from api.settings import Settings
from components.lib.evaluate import evaluate_model
from components.lib.register import register_bundle
from components.lib.split import split_dataset
from components.lib.train import TrainConfig, train_model
from components.lib.validate import validate_dataset
from pipelines.runners import KubeflowRunner, RunnerState
from taskvision.dataset import read_snapshot
from taskvision.storage import open_blob_store
from tests.support.fake_kfp import KFP_CLIENT_ENV_VARS, FakeKfpServer
from tests.training.helpers import make_task, train, wait

RUNS = "/apis/v2beta1/runs"


@pytest.fixture
def kfp_server(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[FakeKfpServer]:
    for name in KFP_CLIENT_ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(kfp_client_module.Client, "_LOCAL_KFP_CONTEXT", str(tmp_path / "kfp-context.json"))
    warnings.filterwarnings("ignore", category=FutureWarning)
    with FakeKfpServer() as server:
        yield server


def test_submit_status_and_cancel(
    kfp_server: FakeKfpServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    runner = KubeflowRunner(kfp_server.host, gpu_count=1)
    arguments = {
        "storage_url": "s3://bucket?endpoint=http://minio:9000",
        "snapshot_prefix": "datasets/t/r",
        "run_prefix": "runs/t/r",
        "run_id": "r",
        "bundle_prefix": "models/t/r",
        "epochs": 3,
    }
    handle = runner.submit("r", "t", arguments)
    body = kfp_server.last_request("POST", RUNS).json
    assert body["display_name"] == "train-r"
    experiment = kfp_server.experiments[body["experiment_id"]]
    assert experiment["display_name"] == "taskvision-task-t"
    assert body["runtime_config"]["parameters"] == arguments
    spec = json_format.ParseDict(body["pipeline_spec"], pipeline_spec_pb2.PipelineSpec())
    assert spec.pipeline_info.name == "taskvision-training"
    assert set(spec.root.dag.tasks) == {"validate", "split", "train", "evaluate", "register"}
    assert list(scratch.iterdir()) == []  # the compiled package lives in memory, not in leftover files

    # A second run of the same task reuses its experiment.
    runner.submit("r2", "t", {**arguments, "run_id": "r2"})
    assert len(kfp_server.requests_to("POST", "/apis/v2beta1/experiments")) == 1
    assert kfp_server.last_request("POST", RUNS).json["experiment_id"] == body["experiment_id"]

    assert runner.status(handle).state == RunnerState.RUNNING
    kfp_server.set_run_state(handle, "RUNNING")
    assert runner.status(handle).state == RunnerState.RUNNING
    kfp_server.set_run_state(handle, "FAILED", error="train: CUDA out of memory")
    failed = runner.status(handle)
    assert (failed.state, failed.message) == (RunnerState.FAILED, "train: CUDA out of memory")
    kfp_server.set_run_state(handle, "SUCCEEDED")
    assert runner.status(handle).state == RunnerState.SUCCEEDED
    other_id = next(rid for rid, run in kfp_server.runs.items() if run["display_name"] == "train-r2")
    runner.cancel(other_id)
    assert kfp_server.requests_to("POST", f"{RUNS}/{other_id}:terminate")
    assert kfp_server.runs[other_id]["state"] == "CANCELING"


@pytest.mark.parametrize(
    ("storage_url", "secret"), [("s3://bucket?endpoint=http://minio:9000", "tv-s3"), (None, None)]
)
def test_steps_get_s3_credentials_from_a_secret_only_with_an_s3_store(
    kfp_server: FakeKfpServer, tmp_path: Path, storage_url: str | None, secret: str | None
) -> None:
    from api.services.container import _runner

    settings = Settings(
        data_dir=tmp_path, kfp_host=kfp_server.host, storage_url=storage_url, kfp_s3_secret="tv-s3"
    )
    runner, kind = _runner(settings)
    assert kind == "kubeflow"
    runner.submit("r", "t", {"storage_url": settings.effective_storage_url, "run_id": "r"})
    submitted = kfp_server.last_request("POST", RUNS).json["pipeline_spec"]
    if secret is None:  # a bare PipelineSpec: no Kubernetes settings
        json_format.ParseDict(submitted, pipeline_spec_pb2.PipelineSpec())
        return
    assert set(submitted) == {"pipeline_spec", "platform_spec"}
    json_format.ParseDict(submitted["platform_spec"], pipeline_spec_pb2.PlatformSpec())
    executors = submitted["platform_spec"]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert len(executors) == 5
    for executor in executors.values():
        (entry,) = executor["secretAsEnv"]
        assert entry["secretName"] == secret
        assert {k["envVar"] for k in entry["keyToEnv"]} == {
            "TASKVISION_S3_ACCESS_KEY",
            "TASKVISION_S3_SECRET_KEY",
        }


def _act_as_kubeflow(arguments: dict[str, Any], tmp_path: Path) -> None:
    """What the pipeline's pods do: the same steps' library code, on the run's arguments."""
    store = open_blob_store(arguments["storage_url"])
    info, rows = read_snapshot(store, arguments["snapshot_prefix"])
    assert validate_dataset(info, rows, store).ok
    split = split_dataset(info, rows)
    model_dir = tmp_path / "model"
    train_model(info, rows, split, store, model_dir, TrainConfig(mode="embed"), run_id=arguments["run_id"])
    register_bundle(model_dir, evaluate_model(model_dir), store, arguments["bundle_prefix"])


def _submitted(kfp_server: FakeKfpServer, count: int, timeout: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        runs = kfp_server.requests_to("POST", RUNS)
        if len(runs) >= count:
            return dict(runs[count - 1].json)
        time.sleep(0.05)
    raise AssertionError("the control plane did not submit the run")


@pytest.mark.slow
def test_control_plane_trains_through_kubeflow(kfp_server: FakeKfpServer, tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data", kfp_host=kfp_server.host, train_poll_interval_s=0.1)
    app = create_app(settings)
    with app.state.services.session_factory() as session:
        _, token = create_user(session, "cluster-user")
    with TestClient(app, headers={"Authorization": f"Token {token}"}) as client:
        task = make_task(client, "multi_class", per_label=20)
        run = train(client, task["id"], epochs=3)
        body = _submitted(kfp_server, 1)
        arguments = body["runtime_config"]["parameters"]
        assert arguments["run_id"] == run["id"] and arguments["epochs"] == 3
        kfp_id = next(rid for rid, r in kfp_server.runs.items() if r["display_name"] == f"train-{run['id']}")
        kfp_server.set_run_state(kfp_id, "RUNNING")
        time.sleep(0.3)
        assert client.get(f"/recognition/v2/training-run/{run['id']}").json()["status"] == "RUNNING"

        _act_as_kubeflow(arguments, tmp_path)
        kfp_server.set_run_state(kfp_id, "SUCCEEDED")
        done = wait(client, run["id"], timeout=30)
        assert done["status"] == "SUCCEEDED" and done["version"] == 1
        assert client.get(f"/recognition/v2/task/{task['id']}").json()["production_version"] == 1

        second = train(client, task["id"])
        _submitted(kfp_server, 2)
        kfp_id = next(
            rid for rid, r in kfp_server.runs.items() if r["display_name"] == f"train-{second['id']}"
        )
        kfp_server.set_run_state(kfp_id, "FAILED", error="The node was low on resource: memory.")
        failed = wait(client, second["id"], timeout=30)
        assert failed["status"] == "FAILED" and "low on resource" in failed["error"]
        state = client.get(f"/recognition/v2/task/{task['id']}").json()
        assert state["last_train_status"] == "TRAINING_FAILED" and state["production_version"] == 1
