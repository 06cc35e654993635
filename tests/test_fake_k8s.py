"""The real Kubernetes and KServe clients against :class:`tests.support.fake_k8s.FakeKubernetes`.

These tests pin down what ``kubernetes.client.CustomObjectsApi`` and
``kserve.KServeClient`` put on the wire, and how they report the API server's
answers, so the control plane's InferenceService code can be tested without a
cluster.
"""

from __future__ import annotations

import json
import threading
import urllib.request
from collections.abc import Iterator
from typing import Any
from urllib.error import HTTPError

import pytest
from kserve import (
    KServeClient,
    V1beta1InferenceService,
    V1beta1InferenceServiceSpec,
    V1beta1ModelFormat,
    V1beta1ModelSpec,
    V1beta1PredictorSpec,
    constants,
)
from kubernetes import watch
from kubernetes.client import ApiClient, Configuration, CustomObjectsApi, V1DeleteOptions, V1ObjectMeta
from kubernetes.client.rest import ApiException
from urllib3.exceptions import MaxRetryError

from tests.support.fake_k8s import (
    JSON_PATCH,
    MERGE_PATCH,
    FakeKubernetes,
    ObjectKey,
    PatchError,
    apply_json_patch,
    apply_merge_patch,
)

GROUP, VERSION, PLURAL = "serving.kserve.io", "v1beta1", "inferenceservices"
NAMESPACE = "taskvision"
ISVCS = f"/apis/{GROUP}/{VERSION}/namespaces/{NAMESPACE}/{PLURAL}"

Json = dict[str, Any]


def _require_predictor(obj: Json) -> None:
    """A stand-in for the CRD schema: an InferenceService needs spec.predictor,
    and a model's storageUri must be a URI."""
    predictor = obj.get("spec", {}).get("predictor")
    if not isinstance(predictor, dict):
        raise ValueError("spec.predictor: Required value")
    if "://" not in predictor.get("model", {}).get("storageUri", "://"):
        raise ValueError("spec.predictor.model.storageUri: Invalid value: not a URI")


def _isvc(name: str = "task-abc", storage_uri: str = "s3://models/task-abc/1", **labels: str) -> Json:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "InferenceService",
        "metadata": {"name": name, "namespace": NAMESPACE, "labels": labels},
        "spec": {
            "predictor": {
                "model": {"modelFormat": {"name": "onnx"}, "runtime": "taskvision", "storageUri": storage_uri}
            }
        },
    }


def _kserve_isvc(storage_uri: str, name: str = "task-abc") -> V1beta1InferenceService:
    return V1beta1InferenceService(
        api_version=constants.KSERVE_V1BETA1,
        kind=constants.KSERVE_KIND_INFERENCESERVICE,
        metadata=V1ObjectMeta(name=name, namespace=NAMESPACE),
        spec=V1beta1InferenceServiceSpec(
            predictor=V1beta1PredictorSpec(
                model=V1beta1ModelSpec(
                    model_format=V1beta1ModelFormat(name="onnx"),
                    runtime="taskvision",
                    storage_uri=storage_uri,
                )
            )
        ),
    )


def _error(excinfo: pytest.ExceptionInfo[ApiException]) -> Json:
    """The ``Status`` body of an ``ApiException``."""
    body: Json = json.loads(excinfo.value.body)
    return body


@pytest.fixture
def k8s() -> Iterator[FakeKubernetes]:
    with FakeKubernetes(validator=_require_predictor) as server:
        yield server


@pytest.fixture
def api(k8s: FakeKubernetes) -> Iterator[CustomObjectsApi]:
    configuration = Configuration()
    configuration.host = k8s.url
    with ApiClient(configuration) as api_client:
        yield CustomObjectsApi(api_client)


@pytest.fixture
def kserve_client(k8s: FakeKubernetes) -> Iterator[KServeClient]:
    """KServeClient builds its APIs on the process-wide default Configuration,
    which loading a kubeconfig replaces; put the old default back afterwards."""
    saved = Configuration.get_default_copy()
    try:
        yield KServeClient(config_dict=k8s.kubeconfig())
    finally:
        Configuration.set_default(saved)


# ----------------------------------------------------------- CustomObjectsApi


def test_create_get_and_list(k8s: FakeKubernetes, api: CustomObjectsApi) -> None:
    created = api.create_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, _isvc())

    metadata = created["metadata"]
    assert metadata["name"] == "task-abc"
    assert metadata["namespace"] == NAMESPACE
    assert metadata["generation"] == 1
    assert metadata["resourceVersion"] == "1001"
    assert metadata["uid"] and metadata["creationTimestamp"].endswith("Z")
    assert k8s.objects[ObjectKey(GROUP, VERSION, NAMESPACE, PLURAL, "task-abc")] == created

    request = k8s.last_request("POST", ISVCS)
    assert request.content_type == "application/json"
    assert request.json == _isvc()

    assert api.get_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, "task-abc") == created
    listing = api.list_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL)
    assert listing["kind"] == "InferenceServiceList"
    assert listing["apiVersion"] == f"{GROUP}/{VERSION}"
    assert listing["items"] == [created]
    assert listing["metadata"]["resourceVersion"] == "1001"
    assert api.list_namespaced_custom_object(GROUP, VERSION, "elsewhere", PLURAL)["items"] == []


def test_list_filters_by_label_and_field_and_pages(k8s: FakeKubernetes, api: CustomObjectsApi) -> None:
    for name, stage in (("a", "prod"), ("b", "canary"), ("c", "prod")):
        api.create_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, _isvc(name, stage=stage))

    def names(**kwargs: Any) -> list[str]:
        listing = api.list_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, **kwargs)
        return [item["metadata"]["name"] for item in listing["items"]]

    assert names(label_selector="stage=prod") == ["a", "c"]
    assert names(label_selector="stage!=prod") == ["b"]
    assert names(label_selector="stage,!missing") == ["a", "b", "c"]
    assert names(field_selector="metadata.name=b") == ["b"]

    first = api.list_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, limit=2)
    assert [i["metadata"]["name"] for i in first["items"]] == ["a", "b"]
    assert names(limit=2, _continue=first["metadata"]["continue"]) == ["c"]

    everywhere = api.list_cluster_custom_object(GROUP, VERSION, PLURAL)
    assert len(everywhere["items"]) == 3


def test_missing_object_and_unknown_resource_are_404(api: CustomObjectsApi) -> None:
    with pytest.raises(ApiException) as excinfo:
        api.get_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, "nope")
    assert excinfo.value.status == 404
    assert _error(excinfo) == {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": 'inferenceservices.serving.kserve.io "nope" not found',
        "reason": "NotFound",
        "details": {"name": "nope", "group": GROUP, "kind": PLURAL},
        "code": 404,
    }

    with pytest.raises(ApiException) as excinfo:
        api.list_namespaced_custom_object("example.com", "v1", NAMESPACE, "widgets")
    assert excinfo.value.status == 404
    assert _error(excinfo)["message"] == "the server could not find the requested resource"


def test_create_twice_is_409_already_exists(api: CustomObjectsApi) -> None:
    api.create_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, _isvc())
    with pytest.raises(ApiException) as excinfo:
        api.create_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, _isvc())
    assert excinfo.value.status == 409
    assert _error(excinfo)["reason"] == "AlreadyExists"
    assert _error(excinfo)["message"] == 'inferenceservices.serving.kserve.io "task-abc" already exists'


def test_replace_bumps_versions_and_rejects_stale_or_missing_resource_version(
    k8s: FakeKubernetes, api: CustomObjectsApi
) -> None:
    current = api.create_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, _isvc())
    current["spec"]["predictor"]["model"]["storageUri"] = "s3://models/task-abc/2"

    replaced = api.replace_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, "task-abc", current)
    assert replaced["metadata"]["resourceVersion"] == "1002"
    assert replaced["metadata"]["generation"] == 2
    assert replaced["metadata"]["uid"] == current["metadata"]["uid"]
    assert k8s.last_request("PUT", f"{ISVCS}/task-abc").content_type == "application/json"

    # Only metadata changed: a new resourceVersion, the same generation.
    replaced["metadata"]["labels"] = {"stage": "prod"}
    relabelled = api.replace_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, "task-abc", replaced)
    assert (relabelled["metadata"]["resourceVersion"], relabelled["metadata"]["generation"]) == ("1003", 2)

    # Nothing changed: nothing is written.
    again = api.replace_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, "task-abc", relabelled)
    assert again["metadata"]["resourceVersion"] == "1003"

    with pytest.raises(ApiException) as excinfo:
        api.replace_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, "task-abc", current)
    assert excinfo.value.status == 409
    assert _error(excinfo)["reason"] == "Conflict"
    assert "the object has been modified" in _error(excinfo)["message"]

    with pytest.raises(ApiException) as excinfo:
        api.replace_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, "task-abc", _isvc())
    assert excinfo.value.status == 422
    assert "metadata.resourceVersion" in _error(excinfo)["message"]

    with pytest.raises(ApiException) as excinfo:
        api.replace_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, "other", relabelled)
    assert excinfo.value.status == 404


def test_patch_sends_merge_patch_by_default(k8s: FakeKubernetes, api: CustomObjectsApi) -> None:
    api.create_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, _isvc(stage="canary"))
    patch = {
        "metadata": {"labels": {"stage": None, "owner": "tv"}},
        "spec": {"predictor": {"model": {"storageUri": "s3://models/task-abc/2"}}},
    }

    patched = api.patch_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, "task-abc", patch)

    request = k8s.last_request("PATCH", f"{ISVCS}/task-abc")
    assert request.content_type == MERGE_PATCH
    assert request.json == patch
    assert patched["metadata"]["labels"] == {"owner": "tv"}
    assert patched["spec"]["predictor"]["model"] == {
        "modelFormat": {"name": "onnx"},
        "runtime": "taskvision",
        "storageUri": "s3://models/task-abc/2",
    }
    assert (patched["metadata"]["resourceVersion"], patched["metadata"]["generation"]) == ("1002", 2)

    stale = {"metadata": {"resourceVersion": "1001"}, "spec": {"predictor": {"minReplicas": 1}}}
    with pytest.raises(ApiException) as excinfo:
        api.patch_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, "task-abc", stale)
    assert excinfo.value.status == 409


def test_json_patch_needs_call_api_and_a_list_body(k8s: FakeKubernetes, api: CustomObjectsApi) -> None:
    """patch_namespaced_custom_object always sends merge-patch, so an RFC 6902
    list sent through it is a (failing) merge patch; a JSON patch needs
    ``ApiClient.call_api`` with the content type set by hand."""
    api.create_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, _isvc())
    operations = [
        {"op": "test", "path": "/spec/predictor/model/runtime", "value": "taskvision"},
        {"op": "replace", "path": "/spec/predictor/model/storageUri", "value": "s3://models/task-abc/3"},
        {"op": "add", "path": "/metadata/annotations", "value": {"taskvision/model-version": "3"}},
    ]

    with pytest.raises(ApiException) as excinfo:
        api.patch_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, "task-abc", operations)
    assert excinfo.value.status == 422
    assert k8s.requests[-1].content_type == MERGE_PATCH

    path = "/apis/{group}/{version}/namespaces/{namespace}/{plural}/{name}"
    params = {
        "group": GROUP,
        "version": VERSION,
        "namespace": NAMESPACE,
        "plural": PLURAL,
        "name": "task-abc",
    }
    headers = {"Content-Type": JSON_PATCH, "Accept": "application/json"}
    patched = api.api_client.call_api(
        path,
        "PATCH",
        params,
        [],
        headers,
        body=operations,
        response_type="object",
        _return_http_data_only=True,
    )
    assert k8s.requests[-1].content_type == JSON_PATCH
    assert patched["spec"]["predictor"]["model"]["storageUri"] == "s3://models/task-abc/3"
    assert patched["metadata"]["annotations"] == {"taskvision/model-version": "3"}

    # The REST layer turns a json-patch+json request with a dict body into a
    # strategic merge patch, which no custom resource accepts.
    with pytest.raises(ApiException) as excinfo:
        api.api_client.call_api(path, "PATCH", params, [], headers, body={"spec": {}}, response_type="object")
    assert excinfo.value.status == 415
    assert k8s.requests[-1].content_type == "application/strategic-merge-patch+json"

    failing = [{"op": "test", "path": "/spec/predictor/model/runtime", "value": "other"}]
    with pytest.raises(ApiException) as excinfo:
        api.api_client.call_api(path, "PATCH", params, [], headers, body=failing, response_type="object")
    assert excinfo.value.status == 422


def test_delete_answers_a_status_then_404(k8s: FakeKubernetes, api: CustomObjectsApi) -> None:
    created = api.create_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, _isvc())

    status = api.delete_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, "task-abc")

    assert status == {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Success",
        "details": {"name": "task-abc", "group": GROUP, "kind": PLURAL, "uid": created["metadata"]["uid"]},
    }
    assert k8s.objects == {}
    assert k8s.last_request("DELETE", f"{ISVCS}/task-abc").body is None
    with pytest.raises(ApiException) as excinfo:
        api.delete_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, "task-abc")
    assert excinfo.value.status == 404


def test_delete_waits_for_finalizers_and_checks_preconditions(
    k8s: FakeKubernetes, api: CustomObjectsApi
) -> None:
    body = _isvc()
    body["metadata"]["finalizers"] = ["inferenceservice.finalizers"]
    created = api.create_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, body)

    stale = V1DeleteOptions(preconditions={"resourceVersion": "1"})
    with pytest.raises(ApiException) as excinfo:
        api.delete_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, "task-abc", body=stale)
    assert excinfo.value.status == 409

    marked = api.delete_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, "task-abc")
    assert marked["metadata"]["deletionTimestamp"]
    assert marked["metadata"]["uid"] == created["metadata"]["uid"]

    api.patch_namespaced_custom_object(
        GROUP, VERSION, NAMESPACE, PLURAL, "task-abc", {"metadata": {"finalizers": None}}
    )
    assert k8s.objects == {}


def test_every_write_is_validated(k8s: FakeKubernetes, api: CustomObjectsApi) -> None:
    invalid = _isvc()
    del invalid["spec"]["predictor"]
    with pytest.raises(ApiException) as excinfo:
        api.create_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, invalid)
    assert excinfo.value.status == 422
    error = _error(excinfo)
    assert error["reason"] == "Invalid"
    assert (
        error["message"]
        == 'InferenceService.serving.kserve.io "task-abc" is invalid: spec.predictor: Required value'
    )
    assert k8s.objects == {}

    current = api.create_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, _isvc())
    current["spec"] = {}
    with pytest.raises(ApiException) as excinfo:
        api.replace_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, "task-abc", current)
    assert excinfo.value.status == 422
    with pytest.raises(ApiException) as excinfo:
        api.patch_namespaced_custom_object(
            GROUP, VERSION, NAMESPACE, PLURAL, "task-abc", {"spec": {"predictor": None}}
        )
    assert excinfo.value.status == 422
    assert (
        k8s.get_object(GROUP, VERSION, NAMESPACE, PLURAL, "task-abc")["metadata"]["resourceVersion"] == "1001"
    )

    bad_name = _isvc("Task_ABC")
    with pytest.raises(ApiException) as excinfo:
        api.create_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, bad_name)
    assert excinfo.value.status == 422
    assert "metadata.name" in _error(excinfo)["message"]


def test_status_is_a_subresource(k8s: FakeKubernetes, api: CustomObjectsApi) -> None:
    body = _isvc()
    body["status"] = {"url": "http://forged"}
    created = api.create_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, body)
    assert "status" not in created

    ready = k8s.mark_inference_service_ready("task-abc", NAMESPACE)
    assert ready["metadata"]["generation"] == 1
    assert ready["metadata"]["resourceVersion"] == "1002"
    fetched = api.get_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, "task-abc")
    assert fetched["status"]["url"] == "http://task-abc.taskvision.example.com"
    assert {"type": "Ready", "status": "True"}.items() <= fetched["status"]["conditions"][-1].items()
    assert fetched["status"]["observedGeneration"] == 1

    # A write to the main resource keeps the status the controller wrote...
    fetched["status"] = {}
    kept = api.replace_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, "task-abc", fetched)
    assert kept["status"] == ready["status"]
    # ... and a write to /status touches nothing else.
    patched = api.patch_namespaced_custom_object_status(
        GROUP, VERSION, NAMESPACE, PLURAL, "task-abc", {"status": {"url": "http://moved"}, "spec": {}}
    )
    assert k8s.requests[-1].path == f"{ISVCS}/task-abc/status"
    assert patched["status"]["url"] == "http://moved"
    assert patched["spec"] == created["spec"]

    k8s.set_status(GROUP, VERSION, NAMESPACE, PLURAL, "task-abc", {"url": "http://direct"})
    assert api.get_namespaced_custom_object_status(GROUP, VERSION, NAMESPACE, PLURAL, "task-abc")[
        "status"
    ] == {"url": "http://direct"}


def test_watch_streams_existing_objects_then_changes(k8s: FakeKubernetes, api: CustomObjectsApi) -> None:
    api.create_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, _isvc())
    timer = threading.Timer(0.2, k8s.mark_inference_service_ready, args=("task-abc", NAMESPACE))
    timer.start()

    events: list[tuple[str, str]] = []
    stream = watch.Watch().stream(
        api.list_namespaced_custom_object, GROUP, VERSION, NAMESPACE, PLURAL, timeout_seconds=10
    )
    for event in stream:
        events.append((event["type"], event["object"]["metadata"]["resourceVersion"]))
        if event["type"] == "MODIFIED":
            break
    timer.join()

    assert events == [("ADDED", "1001"), ("MODIFIED", "1002")]
    assert k8s.requests[-1].query == {"watch": "True", "timeoutSeconds": "10"}


def test_seeded_objects_and_watch_from_a_resource_version(k8s: FakeKubernetes, api: CustomObjectsApi) -> None:
    seeded = _isvc("seeded")
    seeded["status"] = {"url": "http://seeded.example.com"}
    stored = k8s.add_object(seeded)
    assert stored["status"] == seeded["status"]  # add_object keeps status, unlike a POST
    assert stored["metadata"]["resourceVersion"] == "1001"
    api.create_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, _isvc())
    k8s.remove_object(GROUP, VERSION, NAMESPACE, PLURAL, "seeded")

    # Resuming from a resourceVersion replays only what happened after it.
    stream = watch.Watch().stream(
        api.list_namespaced_custom_object,
        GROUP,
        VERSION,
        NAMESPACE,
        PLURAL,
        resource_version="1001",
        timeout_seconds=10,
    )
    events: list[tuple[str, str, str]] = []
    for event in stream:
        metadata = event["object"]["metadata"]
        events.append((event["type"], metadata["name"], metadata["resourceVersion"]))
        if event["type"] == "DELETED":
            break
    assert events == [("ADDED", "task-abc", "1002"), ("DELETED", "seeded", "1003")]
    assert [(e.type, e.key.name) for e in k8s.events] == [
        ("ADDED", "seeded"),
        ("ADDED", "task-abc"),
        ("DELETED", "seeded"),
    ]


def test_down_refuses_connections_until_up(k8s: FakeKubernetes, api: CustomObjectsApi) -> None:
    api.create_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, _isvc())
    url = k8s.url

    k8s.down()
    assert k8s.is_down
    with pytest.raises(MaxRetryError):
        api.get_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, "task-abc")

    k8s.up()
    assert k8s.url == url
    assert api.get_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, "task-abc")["metadata"]

    k8s.down(mode="unavailable")
    with pytest.raises(ApiException) as excinfo:
        api.get_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, "task-abc")
    assert excinfo.value.status == 503
    assert _error(excinfo)["reason"] == "ServiceUnavailable"
    k8s.up()
    assert not k8s.is_down
    assert api.list_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL)["items"]


def test_version_health_and_bad_requests(k8s: FakeKubernetes) -> None:
    def call(
        method: str, path: str, data: bytes | None = None, content_type: str = "application/json"
    ) -> Any:
        request = urllib.request.Request(
            k8s.url + path, data=data, method=method, headers={"Content-Type": content_type}
        )
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                text = response.read().decode()
                return response.status, json.loads(text) if text.startswith("{") else text
        except HTTPError as error:
            return error.code, json.load(error)

    assert k8s.configuration().host == k8s.url
    status, version = call("GET", "/version")
    assert status == 200
    assert version["major"] == "1"
    assert call("GET", "/readyz") == (200, "ok")

    status, body = call("POST", ISVCS, b"{not json")
    assert (status, body["reason"]) == (400, "BadRequest")
    status, body = call("POST", ISVCS, json.dumps({**_isvc(), "apiVersion": f"{GROUP}/v1alpha1"}).encode())
    assert status == 400
    assert "does not match the expected API version" in body["message"]
    status, body = call("POST", f"{ISVCS}/task-abc")
    assert (status, body["reason"]) == (405, "MethodNotAllowed")


def test_patch_helpers_follow_the_rfcs() -> None:
    # RFC 7386 appendix A, one of the examples.
    target = {"title": "Goodbye!", "author": {"givenName": "John", "familyName": "Doe"}, "tags": ["a", "b"]}
    patch = {"title": "Hello!", "author": {"familyName": None}, "tags": ["c"], "phoneNumber": "+01-123"}
    assert apply_merge_patch(target, patch) == {
        "title": "Hello!",
        "author": {"givenName": "John"},
        "tags": ["c"],
        "phoneNumber": "+01-123",
    }
    assert target["author"] == {"givenName": "John", "familyName": "Doe"}

    document = {"foo": ["bar", "baz"], "a/b": 1}
    operations = [
        {"op": "add", "path": "/foo/1", "value": "qux"},
        {"op": "add", "path": "/foo/-", "value": "end"},
        {"op": "move", "from": "/a~1b", "path": "/moved"},
        {"op": "copy", "from": "/foo/0", "path": "/first"},
        {"op": "remove", "path": "/foo/2"},
    ]
    assert apply_json_patch(document, operations) == {
        "foo": ["bar", "qux", "end"],
        "moved": 1,
        "first": "bar",
    }
    with pytest.raises(PatchError):
        apply_json_patch(document, [{"op": "remove", "path": "/missing"}])
    with pytest.raises(PatchError):
        apply_json_patch(document, [{"op": "replace", "path": "/foo/5", "value": 0}])


# ---------------------------------------------------------------- KServeClient


def test_kserve_client_create_get_patch_replace_delete(
    k8s: FakeKubernetes, kserve_client: KServeClient
) -> None:
    created = kserve_client.create(_kserve_isvc("s3://models/task-abc/1"))
    assert created["metadata"]["generation"] == 1
    assert kserve_client.get("task-abc", namespace=NAMESPACE) == created
    assert [i["metadata"]["name"] for i in kserve_client.get(namespace=NAMESPACE)["items"]] == ["task-abc"]

    patched = kserve_client.patch("task-abc", _kserve_isvc("s3://models/task-abc/2"))
    assert patched["spec"]["predictor"]["model"]["storageUri"] == "s3://models/task-abc/2"
    assert patched["metadata"]["generation"] == 2

    replacement = _kserve_isvc("s3://models/task-abc/3")
    replaced = kserve_client.replace("task-abc", replacement)
    assert replaced["metadata"]["generation"] == 3
    assert replacement.metadata.resource_version == patched["metadata"]["resourceVersion"]  # set by replace()

    status = kserve_client.delete("task-abc", namespace=NAMESPACE)
    assert status["status"] == "Success"

    calls = [(r.method, r.path, r.content_type, r.query) for r in k8s.requests]
    assert calls == [
        ("POST", ISVCS, "application/json", {}),
        ("GET", f"{ISVCS}/task-abc", "application/json", {}),
        ("GET", ISVCS, "application/json", {}),
        ("PATCH", f"{ISVCS}/task-abc", MERGE_PATCH, {}),
        ("GET", f"{ISVCS}/task-abc", "application/json", {}),  # replace() reads the resourceVersion first
        ("PUT", f"{ISVCS}/task-abc", "application/json", {}),
        ("DELETE", f"{ISVCS}/task-abc", "application/json", {}),
    ]
    sent = k8s.requests[0].json
    assert sent["spec"]["predictor"]["model"] == {
        "modelFormat": {"name": "onnx"},
        "name": "",  # V1beta1ModelSpec's container name defaults to ""
        "runtime": "taskvision",
        "storageUri": "s3://models/task-abc/1",
    }
    assert k8s.requests[5].json["metadata"]["resourceVersion"] == patched["metadata"]["resourceVersion"]


def test_kserve_client_wraps_api_errors_in_runtime_error(kserve_client: KServeClient) -> None:
    with pytest.raises(RuntimeError, match=r"get_namespaced_custom_object:\s+\(404\)"):
        kserve_client.get("missing", namespace=NAMESPACE)
    kserve_client.create(_kserve_isvc("s3://models/task-abc/1"))
    with pytest.raises(RuntimeError, match=r"\(409\)"):
        kserve_client.create(_kserve_isvc("s3://models/task-abc/1"))
    with pytest.raises(RuntimeError, match=r"\(422\)"):
        kserve_client.patch("task-abc", _kserve_isvc("models/task-abc/2"))
    with pytest.raises(RuntimeError, match=r"\(422\)"):
        kserve_client.replace("task-abc", _kserve_isvc("models/task-abc/2"))


def test_kserve_client_waits_for_ready(
    k8s: FakeKubernetes, kserve_client: KServeClient, capsys: pytest.CaptureFixture[str]
) -> None:
    kserve_client.create(_kserve_isvc("s3://models/task-abc/1"))
    assert not kserve_client.is_isvc_ready("task-abc", namespace=NAMESPACE)
    # A status without Ready=True (an object with no status at all makes the watch sleep 2 s).
    k8s.set_status(GROUP, VERSION, NAMESPACE, PLURAL, "task-abc", {"observedGeneration": 1, "conditions": []})

    timer = threading.Timer(0.2, k8s.mark_inference_service_ready, args=("task-abc", NAMESPACE))
    timer.start()
    kserve_client.get("task-abc", namespace=NAMESPACE, watch=True, timeout_seconds=10)
    timer.join()

    watch_request = k8s.requests[-1]
    assert (watch_request.method, watch_request.path) == ("GET", ISVCS)
    assert watch_request.query == {"watch": "True", "timeoutSeconds": "10"}
    assert "http://task-abc.taskvision.example.com" in capsys.readouterr().out

    before = len(k8s.requests)
    kserve_client.wait_isvc_ready("task-abc", namespace=NAMESPACE, polling_interval=0.01, timeout_seconds=1)
    assert [(r.method, r.path) for r in k8s.requests[before:]] == [("GET", f"{ISVCS}/task-abc")]


def test_kserve_client_sees_a_down_api_server(k8s: FakeKubernetes, kserve_client: KServeClient) -> None:
    kserve_client.create(_kserve_isvc("s3://models/task-abc/1"))

    k8s.down()
    with pytest.raises(MaxRetryError):  # not wrapped: KServeClient only catches ApiException
        kserve_client.get("task-abc", namespace=NAMESPACE)
    k8s.up()
    assert kserve_client.get("task-abc", namespace=NAMESPACE)["metadata"]["name"] == "task-abc"

    k8s.down(mode="unavailable")
    with pytest.raises(RuntimeError, match=r"\(503\)"):
        kserve_client.get("task-abc", namespace=NAMESPACE)
    k8s.up()
    assert kserve_client.delete("task-abc", namespace=NAMESPACE)["status"] == "Success"
