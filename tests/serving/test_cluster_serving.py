"""Cluster mode serving: one KServe InferenceService per task, managed through the real KServeClient.

Kubernetes cannot run here: ``tests/fake_k8s.py`` implements the custom-object
API (create/get/patch/delete, 404/409, resourceVersion) and validates every
write against the KServe CRD schema in ``../shared/crds``. The "pod" behind a
Ready InferenceService is a real ``python -m serving`` ModelServer on loopback.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml
from fastapi.testclient import TestClient

from api.auth import create_user
from api.main import create_app
from api.services.inference_services import InferenceServiceManager, service_name
from api.settings import Settings
from tests.serving.test_model_server import _start
from tests.support.api import b64
from tests.support.fake_k8s import FakeKubernetes
from tests.support.images import shape_image
from tests.support.k8s_schemas import load_crd_schemas, validate_custom_resource
from tests.training.helpers import make_task, train, wait

pytestmark = pytest.mark.slow

GROUP, VERSION, NS, PLURAL = "serving.kserve.io", "v1beta1", "taskvision", "inferenceservices"


def _validate(obj: dict[str, Any]) -> None:
    validate_custom_resource(obj, load_crd_schemas())


@pytest.fixture
def k8s() -> Iterator[FakeKubernetes]:
    with FakeKubernetes(validator=_validate) as server:
        yield server


@pytest.fixture
def cluster(k8s: FakeKubernetes, tmp_path: Path) -> Iterator[TestClient]:
    with _cluster_client(k8s, tmp_path) as client:
        yield client


@contextmanager
def _cluster_client(k8s: FakeKubernetes, tmp_path: Path) -> Iterator[TestClient]:
    """A cluster-mode control plane (reconcile loop running) on the fake Kubernetes API."""
    kubeconfig = tmp_path / "kubeconfig.yaml"
    kubeconfig.write_text(yaml.safe_dump(k8s.kubeconfig(NS)))
    settings = Settings(
        data_dir=tmp_path / "data",
        serving_backend="kserve",
        k8s_namespace=NS,
        kubeconfig=str(kubeconfig),
        isvc_max_replicas=3,
        train_poll_interval_s=0.1,
    )
    app = create_app(settings)
    with app.state.services.session_factory() as session:
        _, token = create_user(session, "cluster")
    with TestClient(app, headers={"Authorization": f"Token {token}"}) as client:
        yield client


def _isvc(k8s: FakeKubernetes, task_id: str) -> dict[str, Any] | None:
    return k8s.objects.get((GROUP, VERSION, NS, PLURAL, service_name(task_id)))  # type: ignore[call-overload]


def _eventually(check: Any, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError("condition not reached")


def _served_version(k8s: FakeKubernetes, task_id: str) -> int | None:
    obj = _isvc(k8s, task_id)
    return int(obj["metadata"]["annotations"]["taskvision.io/version"]) if obj else None


def test_inference_services_follow_the_production_version(
    cluster: TestClient, k8s: FakeKubernetes, tmp_path: Path
) -> None:
    app = cluster.app  # type: ignore[attr-defined]
    task = make_task(cluster, "multi_class", per_label=20)
    first = wait(cluster, train(cluster, task["id"])["id"])
    assert first["status"] == "SUCCEEDED", first["error"]

    # First deploy: created, schema-valid, scale to zero by default, bundle from the blob store.
    created = _eventually(lambda: _isvc(k8s, task["id"]))
    _validate(created)
    predictor = created["spec"]["predictor"]
    assert predictor["minReplicas"] == 0 and predictor["maxReplicas"] == 3
    assert predictor["model"]["runtime"] == "taskvision-predictor"
    assert predictor["model"]["modelFormat"] == {"name": "taskvision-bundle"}
    assert predictor["model"]["storageUri"] == app.state.services.blobs.uri(
        f"models/{task['id']}/{first['id']}"
    )
    assert "canaryTrafficPercent" not in predictor
    assert created["metadata"]["labels"]["taskvision.io/task"] == task["id"]

    # Not ready yet: classify answers 503 with a retry hint.
    record = [{"_base64": b64(shape_image("circle", 77))}]
    waiting = cluster.post("/recognition/v2/classify", json={"task_id": task["id"], "records": record})
    assert waiting.status_code == 503 and waiting.headers["Retry-After"] == "10"
    assert "retry" in waiting.json()["detail"]

    # KServe reports it Ready; the "pod" is a real KServe ModelServer with the bundle.
    bundle = Path(app.state.services.blobs.root) / "models" / task["id"] / first["id"]
    child, url = _start(
        ["--model-dir", str(bundle), "--model_name", service_name(task["id"])], tmp_path / "s.log"
    )
    try:
        k8s.set_status(
            GROUP,
            VERSION,
            NS,
            PLURAL,
            service_name(task["id"]),
            {
                "url": "http://example.invalid",
                "address": {"url": url},
                "conditions": [{"type": "Ready", "status": "True"}],
            },
        )
        answer = cluster.post("/recognition/v2/classify", json={"task_id": task["id"], "records": record})
        assert answer.status_code == 200, answer.text
        result = answer.json()["records"][0]
        assert result["best_label"]["name"] == "circle" and result["_width"] == 96
        assert (
            app.state.services.classifier.fallback.repository.get_models() == {}
        )  # nothing was served in-process
    finally:
        child.terminate()
        child.wait(timeout=20)

    # Version switch: a retrain patches the service; switching back patches it again.
    second = wait(cluster, train(cluster, task["id"], quality="fast")["id"])  # the default ran above
    _eventually(lambda: _served_version(k8s, task["id"]) == 2)
    assert _isvc(k8s, task["id"])["spec"]["predictor"]["model"]["storageUri"].endswith(second["id"])
    cluster.patch(f"/recognition/v2/task/{task['id']}", json={"production_version": 1})
    _eventually(lambda: _served_version(k8s, task["id"]) == 1)

    # Canary: version 2 takes 20 % of the traffic, then is promoted.
    cluster.patch(f"/recognition/v2/task/{task['id']}", json={"production_version": 2, "canary_percent": 20})
    canary = _eventually(
        lambda: (
            (o := _isvc(k8s, task["id"])) and o["spec"]["predictor"].get("canaryTrafficPercent") == 20 and o
        )
    )
    assert canary["metadata"]["annotations"]["taskvision.io/version"] == "2"
    _validate(canary)
    cluster.patch(f"/recognition/v2/task/{task['id']}", json={"canary_percent": None})
    _eventually(lambda: "canaryTrafficPercent" not in _isvc(k8s, task["id"])["spec"]["predictor"])
    assert len(k8s.requests_to("POST", f"/apis/{GROUP}/{VERSION}/namespaces/{NS}/{PLURAL}")) == 1

    # Deleting the task deletes its service.
    assert cluster.delete(f"/recognition/v2/task/{task['id']}/").status_code == 204
    assert _isvc(k8s, task["id"]) is None


def test_the_control_plane_keeps_working_while_the_api_server_is_down(
    cluster: TestClient, k8s: FakeKubernetes
) -> None:
    task = make_task(cluster, "multi_class", per_label=20)
    # The trainings' models do not matter here: quality "fast" (no partial fine-tune) saves ~30 s each.
    assert wait(cluster, train(cluster, task["id"], quality="fast")["id"])["status"] == "SUCCEEDED"
    _eventually(lambda: _served_version(k8s, task["id"]) == 1)
    k8s.down()
    try:
        second = wait(cluster, train(cluster, task["id"], quality="fast")["id"])  # training still works...
        assert second["status"] == "SUCCEEDED" and second["version"] == 2
        assert cluster.get("/recognition/v2/task").status_code == 200  # ...and the API
        state = _eventually(
            lambda: (t := cluster.get(f"/recognition/v2/task/{task['id']}").json())["serving_error"] and t
        )
        assert "unreachable" in state["serving_error"] and state["production_version"] == 2
        other = make_task(cluster, "regression", 12)
        assert cluster.delete(f"/recognition/v2/task/{other['id']}/").status_code == 204
        refused = cluster.post(
            "/recognition/v2/classify",
            json={"task_id": task["id"], "records": [{"_base64": b64(shape_image("circle", 1))}]},
        )
        assert refused.status_code == 503
    finally:
        k8s.up()
    # The reconcile loop retries: version 2 gets served and the error clears.
    _eventually(lambda: _served_version(k8s, task["id"]) == 2, timeout=30)
    _eventually(lambda: cluster.get(f"/recognition/v2/task/{task['id']}").json()["serving_error"] == "")


def test_a_conflicting_create_is_patched(k8s: FakeKubernetes, tmp_path: Path) -> None:
    manager = InferenceServiceManager(namespace=NS, kubeconfig=k8s.kubeconfig(NS))
    someone_elses = manager.build("t1", 1, "s3://bucket/models/t1/old")
    k8s.add_object(someone_elses)
    # Force the race: the object appears between our read and our create.
    manager._get = lambda name: None  # type: ignore[method-assign]
    manager.deploy("t1", 2, "s3://bucket/models/t1/new")
    creates = k8s.requests_to("POST", f"/apis/{GROUP}/{VERSION}/namespaces/{NS}/{PLURAL}")
    assert len(creates) == 1  # answered 409 AlreadyExists...
    stored = _isvc(k8s, "t1")
    assert stored is not None  # ...and then patched to what we want
    assert stored["spec"]["predictor"]["model"]["storageUri"] == "s3://bucket/models/t1/new"
    assert stored["metadata"]["annotations"]["taskvision.io/version"] == "2"


@pytest.mark.parametrize("canary", [None, 10])
def test_every_built_inference_service_matches_the_crd(canary: int | None) -> None:
    manager = InferenceServiceManager(namespace=NS, min_replicas=1, max_replicas=4)
    obj = manager.build("0f0e7c1c-2f7d-4a3e-9a51-3c2b7e2d9b10", 3, "s3://b/models/x/y", canary_percent=canary)
    _validate(obj)
    assert len(obj["metadata"]["name"]) <= 63
    broken = json.loads(json.dumps(obj))
    broken["spec"]["predictor"]["model"]["storageURI"] = "typo"
    with pytest.raises(Exception, match="storageURI"):
        _validate(broken)


def test_services_of_tasks_that_no_longer_exist_are_swept(k8s: FakeKubernetes, tmp_path: Path) -> None:
    manager = InferenceServiceManager(namespace=NS, kubeconfig=k8s.kubeconfig(NS))
    # Left behind: its task was deleted while the API was down, then the control plane restarted.
    k8s.add_object(manager.build("0b7c1a52-5a0e-4c5e-9d7e-1f9a0c2b3d4e", 1, "s3://bucket/models/gone/1"))
    someone_elses = manager.build("not-ours", 1, "s3://bucket/models/not-ours/1")
    someone_elses["metadata"]["labels"] = {"app": "something-else"}
    k8s.add_object(someone_elses)
    with _cluster_client(k8s, tmp_path) as client:
        _eventually(lambda: _isvc(k8s, "0b7c1a52-5a0e-4c5e-9d7e-1f9a0c2b3d4e") is None)
        assert _isvc(k8s, "not-ours") is not None  # not labelled as TaskVision's: left alone
        task = client.post("/recognition/v2/task", json={"name": "kept", "type": "multi_class"}).json()
        k8s.add_object(manager.build(task["id"], 1, f"s3://bucket/models/{task['id']}/1"))
        client.app.state.services.reconciler.sweep()  # type: ignore[attr-defined]
        assert _isvc(k8s, task["id"]) is not None  # its task exists
        list_calls = k8s.requests_to("GET", f"/apis/{GROUP}/{VERSION}/namespaces/{NS}/{PLURAL}")
        assert (
            list_calls and list_calls[-1].query["labelSelector"] == "app.kubernetes.io/managed-by=taskvision"
        )
