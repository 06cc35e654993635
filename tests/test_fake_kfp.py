"""The real ``kfp.Client`` against :class:`tests.support.fake_kfp.FakeKfpServer`.

These tests pin down what the KFP SDK puts on the wire, so the training code
that submits pipelines can be tested without a Kubeflow cluster.

No ``from __future__ import annotations`` here: KFP reads the component and
pipeline signatures at decoration time and rejects string annotations
("Artifacts must have both a schema_title and a schema_version").
"""

import json
import urllib.request
import warnings
from collections.abc import Iterator
from pathlib import Path
from urllib.error import HTTPError

import kfp
import pytest
from google.protobuf import json_format
from kfp import compiler, dsl
from kfp.client import client as kfp_client_module
from kfp.pipeline_spec import pipeline_spec_pb2
from kfp_server_api import ApiException

from tests.support.fake_kfp import KFP_CLIENT_ENV_VARS, FakeKfpServer

EXPERIMENTS = "/apis/v2beta1/experiments"
RUNS = "/apis/v2beta1/runs"


@dsl.component(base_image="python:3.11")
def _count_images(task_id: str, min_images: int) -> int:
    return min_images


@dsl.pipeline(name="tiny-train")
def _tiny_pipeline(task_id: str, min_images: int = 3, learning_rate: float = 0.01) -> None:
    _count_images(task_id=task_id, min_images=min_images)


@pytest.fixture
def kfp_server(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[FakeKfpServer]:
    """A running fake, with the client's environment and ~/.config/kfp/context.json isolated."""
    for name in KFP_CLIENT_ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(kfp_client_module.Client, "_LOCAL_KFP_CONTEXT", str(tmp_path / "kfp-context.json"))
    with FakeKfpServer() as server:
        yield server


@pytest.fixture
def client(kfp_server: FakeKfpServer) -> kfp.Client:
    with warnings.catch_warnings():
        # "This client only works with Kubeflow Pipeline v2.0.0-beta.2 and later versions."
        warnings.simplefilter("ignore", FutureWarning)
        return kfp.Client(host=kfp_server.host)


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("kfp") / "tiny_train.yaml"
    compiler.Compiler().compile(pipeline_func=_tiny_pipeline, package_path=str(path))
    return str(path)


def _parse_spec(pipeline_spec: dict[str, object]) -> pipeline_spec_pb2.PipelineSpec:
    return json_format.ParseDict(pipeline_spec, pipeline_spec_pb2.PipelineSpec())


def test_construction_calls_healthz_only(kfp_server: FakeKfpServer, client: kfp.Client) -> None:
    assert [(r.method, r.path) for r in kfp_server.requests] == [("GET", "/apis/v2beta1/healthz")]
    assert client.get_user_namespace() == ""


def test_submit_run_sends_experiment_name_spec_and_arguments(
    kfp_server: FakeKfpServer, client: kfp.Client, package: str
) -> None:
    result = client.create_run_from_pipeline_package(
        package,
        arguments={"task_id": "abc", "min_images": 5},
        run_name="train-abc-1",
        experiment_name="task-abc",
        enable_caching=False,
    )

    calls = [(r.method, r.path) for r in kfp_server.requests[1:]]
    assert calls == [("GET", EXPERIMENTS), ("POST", EXPERIMENTS), ("POST", RUNS)]

    lookup = kfp_server.last_request("GET", EXPERIMENTS)
    assert json.loads(lookup.query["filter"]) == {
        "predicates": [{"operation": 1, "key": "display_name", "stringValue": "task-abc"}]
    }
    assert lookup.query["namespace"] == ""
    assert kfp_server.last_request("POST", EXPERIMENTS).json == {"display_name": "task-abc", "namespace": ""}

    (experiment,) = kfp_server.experiments.values()
    body = kfp_server.last_request("POST", RUNS).json
    assert body["experiment_id"] == experiment["experiment_id"] == result.run_info.experiment_id
    assert body["display_name"] == "train-abc-1"
    assert body["runtime_config"] == {"parameters": {"task_id": "abc", "min_images": 5}}

    spec = _parse_spec(body["pipeline_spec"])
    assert spec.pipeline_info.name == "tiny-train"
    root_inputs = spec.root.input_definitions.parameters
    assert set(root_inputs) == {"task_id", "min_images", "learning_rate"}
    assert root_inputs["task_id"].parameter_type == pipeline_spec_pb2.ParameterType.STRING
    assert root_inputs["min_images"].default_value.number_value == 3
    assert all(not task.caching_options.enable_cache for task in spec.root.dag.tasks.values())

    assert result.run_id in kfp_server.runs
    assert result.run_info.state == "PENDING"
    assert result.run_info.display_name == "train-abc-1"


def test_existing_experiment_is_reused(kfp_server: FakeKfpServer, client: kfp.Client, package: str) -> None:
    experiment_id = kfp_server.add_experiment("task-abc")

    assert client.get_experiment(experiment_name="task-abc").experiment_id == experiment_id
    result = client.create_run_from_pipeline_package(
        package, arguments={"task_id": "abc"}, run_name="again", experiment_name="task-abc"
    )

    assert kfp_server.requests_to("POST", EXPERIMENTS) == []
    assert len(kfp_server.experiments) == 1
    assert kfp_server.last_request("POST", RUNS).json["experiment_id"] == experiment_id
    assert result.run_info.experiment_id == experiment_id


def test_create_and_list_experiments(kfp_server: FakeKfpServer, client: kfp.Client) -> None:
    created = client.create_experiment("task-abc")
    client.create_experiment("task-def")

    assert created.display_name == "task-abc"
    assert client.get_experiment(experiment_id=created.experiment_id).display_name == "task-abc"
    listed = client.list_experiments()
    assert [e.display_name for e in listed.experiments] == ["task-abc", "task-def"]
    assert listed.total_size == 2
    with pytest.raises(ValueError, match="No experiment is found with name task-xyz"):
        client.get_experiment(experiment_name="task-xyz")


def test_run_with_experiment_id_skips_experiment_calls(
    kfp_server: FakeKfpServer, client: kfp.Client, package: str
) -> None:
    experiment_id = kfp_server.add_experiment("task-abc")
    client.create_run_from_pipeline_package(
        package, arguments={"task_id": "abc"}, run_name="by-id", experiment_id=experiment_id
    )
    assert [(r.method, r.path) for r in kfp_server.requests[1:]] == [("POST", RUNS)]
    assert kfp_server.last_request("POST", RUNS).json["experiment_id"] == experiment_id


def test_get_run_reflects_state_changes(kfp_server: FakeKfpServer, client: kfp.Client, package: str) -> None:
    run_id = client.create_run_from_pipeline_package(
        package, arguments={"task_id": "abc"}, run_name="r", experiment_name="task-abc"
    ).run_id

    assert client.get_run(run_id).state == "PENDING"
    kfp_server.set_run_state(run_id, "RUNNING")
    assert client.get_run(run_id).state == "RUNNING"
    kfp_server.set_run_state(run_id, "SUCCEEDED")
    run = client.get_run(run_id)
    assert run.state == "SUCCEEDED"
    assert run.error is None
    assert [s.state for s in run.state_history] == ["PENDING", "RUNNING", "SUCCEEDED"]
    assert client.wait_for_run_completion(run_id, timeout=5).state == "SUCCEEDED"


def test_failed_run_carries_error_message(
    kfp_server: FakeKfpServer, client: kfp.Client, package: str
) -> None:
    run_id = client.create_run_from_pipeline_package(
        package, arguments={"task_id": "abc"}, run_name="r", experiment_name="task-abc"
    ).run_id

    kfp_server.set_run_state(run_id, "FAILED", error="train step: CUDA out of memory")

    run = client.get_run(run_id)
    assert run.state == "FAILED"
    assert run.error.message == "train step: CUDA out of memory"
    assert run.finished_at is not None
    assert kfp_server.last_request("GET", f"{RUNS}/{run_id}").body is None


def test_terminate_run(kfp_server: FakeKfpServer, client: kfp.Client, package: str) -> None:
    run_id = client.create_run_from_pipeline_package(
        package, arguments={"task_id": "abc"}, run_name="r", experiment_name="task-abc"
    ).run_id
    kfp_server.set_run_state(run_id, "RUNNING")

    assert client.terminate_run(run_id) == {}
    assert kfp_server.last_request("POST", f"{RUNS}/{run_id}:terminate").body is None
    assert client.get_run(run_id).state == "CANCELING"

    kfp_server.set_run_state(run_id, "CANCELED")
    with pytest.raises(ApiException) as excinfo:
        client.terminate_run(run_id)
    assert excinfo.value.status == 400


def test_list_runs_by_experiment(kfp_server: FakeKfpServer, client: kfp.Client, package: str) -> None:
    first = client.create_run_from_pipeline_package(
        package, arguments={"task_id": "a"}, run_name="a-1", experiment_name="task-a"
    )
    client.create_run_from_pipeline_package(
        package, arguments={"task_id": "b"}, run_name="b-1", experiment_name="task-b"
    )
    second = client.create_run_from_pipeline_package(
        package, arguments={"task_id": "a"}, run_name="a-2", experiment_name="task-a"
    )

    experiment_id = first.run_info.experiment_id
    listed = client.list_runs(experiment_id=experiment_id, sort_by="created_at desc", page_size=1)
    assert listed.total_size == 2
    assert len(listed.runs) == 1
    assert listed.next_page_token
    rest = client.list_runs(experiment_id=experiment_id, page_token=listed.next_page_token, page_size=1)
    assert {listed.runs[0].run_id, rest.runs[0].run_id} == {first.run_id, second.run_id}
    assert not rest.next_page_token

    request = kfp_server.last_request("GET", RUNS)
    assert request.query["experiment_id"] == experiment_id
    assert "namespace" not in request.query


def test_unknown_run_is_a_404(client: kfp.Client) -> None:
    with pytest.raises(ApiException) as excinfo:
        client.get_run("does-not-exist")
    assert excinfo.value.status == 404


def test_unknown_path_and_malformed_body(kfp_server: FakeKfpServer) -> None:
    def call(method: str, path: str, data: bytes | None) -> tuple[int, dict[str, object]]:
        request = urllib.request.Request(
            kfp_server.host + path, data=data, method=method, headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                return response.status, json.load(response)
        except HTTPError as error:
            return error.code, json.load(error)

    status, body = call("GET", "/apis/v2beta1/nothing-here", None)
    assert status == 404
    assert body["code"] == 5

    status, body = call("POST", RUNS, b"{not json")
    assert status == 400
    assert "malformed JSON" in str(body["message"])
    assert kfp_server.requests[-1].body == b"{not json"

    status, _ = call("POST", RUNS, b"[]")
    assert status == 400
    status, _ = call("GET", EXPERIMENTS + "?filter=nope", None)
    assert status == 400


def test_set_run_state_rejects_unknown_state(kfp_server: FakeKfpServer) -> None:
    with pytest.raises(KeyError):
        kfp_server.set_run_state("missing", "RUNNING")
    with pytest.raises(ValueError, match="unknown run state"):
        kfp_server.set_run_state("missing", "DONE")
