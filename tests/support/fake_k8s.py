"""An in-process stand-in for the Kubernetes API server's custom-object endpoints.

Kubernetes cannot run on a developer machine or in CI, so the tests drive the
*real* ``kubernetes.client.CustomObjectsApi`` (and ``kserve.KServeClient``,
which is a thin layer over it) against this small HTTP server instead. It
implements the paths the client calls for namespaced custom resources such as
KServe's ``serving.kserve.io/v1beta1`` ``inferenceservices``, answers errors
as Kubernetes ``Status`` objects, and records every request so a test can
assert on what would have been sent to a real cluster.

Endpoints (``{r}`` is ``/apis/{group}/{version}/namespaces/{namespace}/{plural}``):

=========================  ==========================  ===========================================
GET                        ``{r}``                     ``list_namespaced_custom_object`` (also
                                                       ``?watch=true``, as ``kubernetes.watch``
                                                       and ``KServeClient.get(watch=True)`` use it)
GET                        ``/apis/{g}/{v}/{plural}``  ``list_cluster_custom_object`` (all namespaces)
POST                       ``{r}``                     ``create_namespaced_custom_object``
GET                        ``{r}/{name}``              ``get_namespaced_custom_object``
PUT                        ``{r}/{name}``              ``replace_namespaced_custom_object``
PATCH                      ``{r}/{name}``              ``patch_namespaced_custom_object``
DELETE                     ``{r}/{name}``              ``delete_namespaced_custom_object``
GET, PUT, PATCH            ``{r}/{name}/status``       ``*_namespaced_custom_object_status``
GET                        ``/version``                ``VersionApi.get_code``
GET                        ``/healthz`` ``/readyz``    plain ``ok``
                           ``/livez``
=========================  ==========================  ===========================================

Semantics follow the API server for custom resources (apiextensions-apiserver):

* ``resourceVersion`` is one counter shared by all objects (like etcd's), sent
  as a string; every write that changes an object bumps it, a no-op write
  does not.
* ``generation`` starts at 1 and goes up only when something outside
  ``metadata`` (and ``status``, for resources with a status subresource) changes.
* With a status subresource, writes to the main resource ignore ``status``
  (create drops it) and writes to ``/status`` change nothing but ``status``.
* ``PUT`` needs ``metadata.resourceVersion`` (custom resources refuse
  unconditional updates: 422) and answers 409 Conflict when it is stale;
  a patch that carries a stale ``metadata.resourceVersion`` is a 409 too.
* ``PATCH`` accepts ``application/merge-patch+json`` (RFC 7386, what
  ``patch_namespaced_custom_object`` always sends) and
  ``application/json-patch+json`` (RFC 6902); strategic merge patch is 415,
  as it is for every custom resource.
* ``DELETE`` answers a ``Status`` with ``status: Success``; an object with
  ``metadata.finalizers`` only gets a ``deletionTimestamp`` (and is returned)
  until an update empties the finalizers.
* Every write is checked by the test's ``validator`` (anything that raises
  means invalid, answered 422 Invalid with the exception's text).

Not modelled: OpenAPI defaulting and pruning of unknown fields, admission
webhooks, server-side apply, ``managedFields``, cluster-scoped resources,
delete-collection, and authentication (every request is allowed).
"""

from __future__ import annotations

import copy
import json
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any, Literal, NamedTuple
from urllib.parse import parse_qs, unquote, urlsplit

from tests.support.request_log import RequestLog

if TYPE_CHECKING:
    from kubernetes.client import Configuration

__all__ = [
    "JSON_PATCH",
    "KSERVE_RESOURCES",
    "MERGE_PATCH",
    "CustomResource",
    "FakeKubernetes",
    "KubernetesApiError",
    "ObjectKey",
    "RecordedRequest",
    "Validator",
    "WatchEvent",
    "apply_json_patch",
    "apply_merge_patch",
]

Json = dict[str, Any]
#: Checks a whole object as it would be stored; raising anything means "invalid".
Validator = Callable[[Json], None]

MERGE_PATCH = "application/merge-patch+json"
JSON_PATCH = "application/json-patch+json"
_STRATEGIC_MERGE_PATCH = "application/strategic-merge-patch+json"

_KSERVE_GROUP = "serving.kserve.io"
_FAKE_VERSION = {
    "major": "1",
    "minor": "30",
    "gitVersion": "v1.30.0-taskvision-fake",
    "gitCommit": "0000000000000000000000000000000000000000",
    "gitTreeState": "clean",
    "buildDate": "2024-04-17T00:00:00Z",
    "goVersion": "go1.22.2",
    "compiler": "gc",
    "platform": "linux/amd64",
}
# metadata.name of a custom resource: a lowercase RFC 1123 subdomain.
_NAME_RE = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
# Server-owned metadata that a client's update cannot change.
_IMMUTABLE_METADATA = (
    "name",
    "namespace",
    "uid",
    "creationTimestamp",
    "generation",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
)


@dataclass(frozen=True)
class CustomResource:
    """One served version of a namespaced custom resource (what a CRD declares)."""

    group: str
    version: str
    plural: str
    kind: str
    status_subresource: bool = True

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}"

    @property
    def list_kind(self) -> str:
        return f"{self.kind}List"

    @property
    def singular(self) -> str:
        return self.kind.lower()


#: The KServe resources of /work/shared/crds/kserve (namespaced ones), with
#: their status subresources as the CRDs declare them.
KSERVE_RESOURCES = (
    CustomResource(_KSERVE_GROUP, "v1beta1", "inferenceservices", "InferenceService"),
    CustomResource(_KSERVE_GROUP, "v1alpha1", "servingruntimes", "ServingRuntime", status_subresource=False),
    CustomResource(_KSERVE_GROUP, "v1alpha1", "trainedmodels", "TrainedModel"),
)


class ObjectKey(NamedTuple):
    """Where an object lives: ``objects[(group, version, namespace, plural, name)]``."""

    group: str
    version: str
    namespace: str
    plural: str
    name: str


@dataclass(frozen=True)
class RecordedRequest:
    """One HTTP request the server received, recorded before it was handled.

    ``body`` is the parsed JSON for a JSON body (any ``*json`` content type),
    the raw bytes for another content type, and ``None`` without a body.
    ``query`` maps each parameter to its first value (the client never repeats
    one); ``content_type`` is the media type without parameters.
    """

    method: str
    path: str
    query: dict[str, str]
    content_type: str
    body: Any
    headers: dict[str, str]

    @property
    def json(self) -> Json:
        """The body as a JSON object (fails loudly when it is not one)."""
        if not isinstance(self.body, dict):
            raise TypeError(f"{self.method} {self.path} has no JSON object body: {self.body!r}")
        return self.body


@dataclass(frozen=True)
class WatchEvent:
    """One change, as a watch stream reports it (``object`` is a snapshot)."""

    resource_version: int
    type: Literal["ADDED", "MODIFIED", "DELETED"]
    key: ObjectKey
    object: Json


class KubernetesApiError(Exception):
    """An error answer: the HTTP code plus the fields of a ``v1.Status``."""

    def __init__(self, code: int, reason: str, message: str, details: Json | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message
        self.details = details

    @property
    def status(self) -> Json:
        """The ``Status`` object the API server answers with."""
        status: Json = {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        }
        if self.details is not None:
            status["details"] = self.details
        return status


class PatchError(ValueError):
    """A patch document that cannot be applied."""


@dataclass
class _Response:
    """What a route answers: a JSON object, a text body, or a watch stream."""

    code: int
    body: Json | str = field(default_factory=dict)
    stream: Iterator[Json] | None = None


def _now() -> str:
    """An RFC 3339 timestamp as the API server writes them."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _qualified(resource: CustomResource) -> str:
    return f"{resource.plural}.{resource.group}"


def _not_found(resource: CustomResource, name: str) -> KubernetesApiError:
    return KubernetesApiError(
        HTTPStatus.NOT_FOUND,
        "NotFound",
        f'{_qualified(resource)} "{name}" not found',
        {"name": name, "group": resource.group, "kind": resource.plural},
    )


def _conflict(resource: CustomResource, name: str, why: str) -> KubernetesApiError:
    return KubernetesApiError(
        HTTPStatus.CONFLICT,
        "Conflict",
        f'Operation cannot be fulfilled on {_qualified(resource)} "{name}": {why}',
        {"name": name, "group": resource.group, "kind": resource.plural},
    )


def _invalid(resource: CustomResource, name: str, message: str, field_path: str = "") -> KubernetesApiError:
    cause: Json = {"reason": "FieldValueInvalid", "message": message}
    if field_path:
        cause["field"] = field_path
    return KubernetesApiError(
        HTTPStatus.UNPROCESSABLE_ENTITY,
        "Invalid",
        f'{resource.kind}.{resource.group} "{name}" is invalid: {message}',
        {"name": name, "group": resource.group, "kind": resource.kind, "causes": [cause]},
    )


def _bad_request(message: str) -> KubernetesApiError:
    return KubernetesApiError(HTTPStatus.BAD_REQUEST, "BadRequest", message)


def _no_such_resource() -> KubernetesApiError:
    return KubernetesApiError(
        HTTPStatus.NOT_FOUND, "NotFound", "the server could not find the requested resource", {}
    )


class FakeKubernetes(RequestLog[RecordedRequest]):
    """A threaded HTTP server on 127.0.0.1 that speaks the custom-object API.

    Use it as a context manager and point the real client at :attr:`url`::

        with FakeKubernetes(validator=validate_custom_resource) as k8s:
            api = CustomObjectsApi(ApiClient(k8s.configuration()))
            api.create_namespaced_custom_object("serving.kserve.io", "v1beta1", "default",
                                                "inferenceservices", isvc)
            k8s.mark_inference_service_ready("my-model")
            k8s.down()   # connections are refused until k8s.up()

    State is plain JSON-shaped dicts: :attr:`objects` (keyed by
    :class:`ObjectKey`) and :attr:`requests`. Reading them is always fine;
    change objects through :meth:`add_object`, :meth:`set_status`,
    :meth:`mark_inference_service_ready` and :meth:`remove_object`, which bump
    ``resourceVersion`` and feed watch streams like a real write would.
    """

    def __init__(
        self,
        *,
        validator: Validator | None = None,
        resources: Iterable[CustomResource] = KSERVE_RESOURCES,
    ) -> None:
        """``validator`` sees every object about to be written (after the
        server filled in metadata); ``resources`` are the custom resources
        served, anything else is 404 as on a cluster without that CRD."""
        self.validator = validator
        self.resources: dict[tuple[str, str, str], CustomResource] = {
            (r.group, r.version, r.plural): r for r in resources
        }
        self.objects: dict[ObjectKey, Json] = {}
        self.requests: list[RecordedRequest] = []
        self.events: list[WatchEvent] = []
        self.resource_version = 1000
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._epoch = 0  # bumped by down()/stop() to end open watch streams
        self._unavailable = False
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._port: int | None = None
        resource_path = (
            r"/apis/(?P<group>[^/]+)/(?P<version>[^/]+)/namespaces/(?P<namespace>[^/]+)/(?P<plural>[^/]+)"
        )
        self._routes: list[tuple[str, re.Pattern[str], Callable[..., _Response]]] = [
            ("GET", re.compile(r"/version/?"), self._version),
            ("GET", re.compile(r"/(?:healthz|readyz|livez)"), self._health),
            ("GET", re.compile(r"/apis/(?P<group>[^/]+)/(?P<version>[^/]+)/(?P<plural>[^/]+)"), self._list),
            ("GET", re.compile(resource_path), self._list),
            ("POST", re.compile(resource_path), self._create),
            ("GET", re.compile(resource_path + r"/(?P<name>[^/]+)"), self._get),
            ("PUT", re.compile(resource_path + r"/(?P<name>[^/]+)"), self._replace),
            ("PATCH", re.compile(resource_path + r"/(?P<name>[^/]+)"), self._patch),
            ("DELETE", re.compile(resource_path + r"/(?P<name>[^/]+)"), self._delete),
            ("GET", re.compile(resource_path + r"/(?P<name>[^/]+)/status"), self._get),
            ("PUT", re.compile(resource_path + r"/(?P<name>[^/]+)/status"), self._replace_status),
            ("PATCH", re.compile(resource_path + r"/(?P<name>[^/]+)/status"), self._patch_status),
        ]

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> FakeKubernetes:
        """Bind a free loopback port and serve in a daemon thread."""
        if self._port is not None:
            raise RuntimeError("FakeKubernetes is already running")
        self._listen(0)
        return self

    def stop(self) -> None:
        """Stop serving, end open watch streams and release the port."""
        self._close_listener()
        self._port = None
        self._unavailable = False

    def down(self, *, mode: Literal["refuse", "unavailable"] = "refuse") -> None:
        """Simulate the API server going away; open watch streams end.

        ``"refuse"`` closes the listening socket, so connecting fails
        (``ECONNREFUSED``: urllib3 raises ``MaxRetryError``, not an
        ``ApiException``). ``"unavailable"`` keeps listening but answers every
        request 503 ServiceUnavailable (an ``ApiException`` with status 503),
        like a load balancer in front of a dead API server. The port is kept
        for :meth:`up`.
        """
        if self._port is None:
            raise RuntimeError("FakeKubernetes is not running")
        if mode == "refuse":
            self._close_listener()
        else:
            self._unavailable = True
            self._end_watches()

    def up(self) -> None:
        """Serve again after :meth:`down`, on the same port (same :attr:`url`)."""
        if self._port is None:
            raise RuntimeError("FakeKubernetes is not running")
        self._unavailable = False
        if self._httpd is None:
            self._listen(self._port)

    @property
    def is_down(self) -> bool:
        return self._port is not None and (self._httpd is None or self._unavailable)

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT``, the value for ``Configuration.host``."""
        if self._port is None:
            raise RuntimeError("FakeKubernetes is not running")
        return f"http://127.0.0.1:{self._port}"

    def configuration(self) -> Configuration:
        """A fresh ``kubernetes.client.Configuration`` pointing at this server (no auth)."""
        from kubernetes.client import Configuration

        configuration = Configuration()
        configuration.host = self.url
        return configuration

    def kubeconfig(self, namespace: str = "default") -> Json:
        """A kubeconfig for this server, e.g. for ``KServeClient(config_dict=...)``."""
        return {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
            "users": [{"name": "fake", "user": {}}],
            "contexts": [
                {"name": "fake", "context": {"cluster": "fake", "user": "fake", "namespace": namespace}}
            ],
            "current-context": "fake",
        }

    def _listen(self, port: int) -> None:
        httpd = ThreadingHTTPServer(("127.0.0.1", port), _make_handler(self))
        httpd.daemon_threads = True
        thread = threading.Thread(
            target=httpd.serve_forever,
            kwargs={"poll_interval": 0.05},  # shutdown() waits up to one poll interval
            name="fake-kubernetes",
            daemon=True,
        )
        self._httpd, self._thread = httpd, thread
        self._port = httpd.server_address[1]
        thread.start()

    def _close_listener(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._httpd = None
        self._thread = None
        self._end_watches()

    def _end_watches(self) -> None:
        with self._changed:
            self._epoch += 1
            self._changed.notify_all()

    # ------------------------------------------------------------ test helpers

    def resource(self, group: str, version: str, plural: str) -> CustomResource:
        """The registered resource (``KeyError`` when it is not served)."""
        return self.resources[(group, version, plural)]

    def get_object(self, group: str, version: str, namespace: str, plural: str, name: str) -> Json:
        """A copy of a stored object (``KeyError`` when there is none)."""
        with self._lock:
            return copy.deepcopy(self.objects[ObjectKey(group, version, namespace, plural, name)])

    def add_object(self, obj: Json) -> Json:
        """Store an object as if someone else had created it (validated, with
        server metadata filled in, status kept); returns the stored copy."""
        group, _, version = str(obj["apiVersion"]).rpartition("/")
        resource = next(
            (
                r
                for r in self.resources.values()
                if (r.group, r.version, r.kind) == (group, version, obj["kind"])
            ),
            None,
        )
        if resource is None:
            raise KeyError(f"no resource of kind {obj['kind']!r} in {obj['apiVersion']!r} is registered")
        metadata = obj.get("metadata") or {}
        namespace = metadata.get("namespace") or "default"
        with self._lock:
            created = self._create_object(resource, namespace, obj, keep_status=True, dry_run=False)
            return copy.deepcopy(created)

    def set_status(
        self, group: str, version: str, namespace: str, plural: str, name: str, status: Json
    ) -> Json:
        """Replace ``status`` as a controller would (through ``/status``); returns the object."""
        resource = self.resource(group, version, plural)
        with self._lock:
            key = ObjectKey(group, version, namespace, plural, name)
            current = self._existing(resource, key)
            candidate = copy.deepcopy(current)
            candidate["status"] = copy.deepcopy(status)
            return copy.deepcopy(self._update(resource, key, current, candidate, dry_run=False))

    def mark_inference_service_ready(
        self, name: str, namespace: str = "default", *, url: str | None = None, version: str = "v1beta1"
    ) -> Json:
        """Give an InferenceService the status KServe's controller writes once
        it serves: ``Ready=True`` for the current generation and ``status.url``
        (default ``http://{name}.{namespace}.example.com``); returns the object."""
        with self._lock:
            current = self.get_object(_KSERVE_GROUP, version, namespace, "inferenceservices", name)
            generation = current["metadata"]["generation"]
            revision = f"{name}-predictor-{generation:05d}"
            now = _now()
            url = url or f"http://{name}.{namespace}.example.com"
            conditions = ["IngressReady", "LatestDeploymentReady", "PredictorReady", "Ready"]
            status: Json = {
                "observedGeneration": generation,
                "url": url,
                "address": {"url": f"http://{name}.{namespace}.svc.cluster.local"},
                "conditions": [{"type": c, "status": "True", "lastTransitionTime": now} for c in conditions],
                "components": {
                    "predictor": {
                        "latestCreatedRevision": revision,
                        "latestReadyRevision": revision,
                        "url": f"http://{name}-predictor.{namespace}.example.com",
                        "traffic": [{"latestRevision": True, "percent": 100, "revisionName": revision}],
                    }
                },
                "modelStatus": {
                    "transitionStatus": "UpToDate",
                    "states": {"activeModelState": "Loaded", "targetModelState": "Loaded"},
                    "copies": {"failedCopies": 0, "totalCopies": 1},
                },
            }
            return self.set_status(_KSERVE_GROUP, version, namespace, "inferenceservices", name, status)

    def remove_object(self, group: str, version: str, namespace: str, plural: str, name: str) -> Json:
        """Delete an object at once (finalizers ignored), as the garbage collector would."""
        with self._lock:
            return copy.deepcopy(self._remove(ObjectKey(group, version, namespace, plural, name)))

    # ---------------------------------------------------------------- dispatch

    def handle(self, method: str, raw_path: str, headers: dict[str, str], raw_body: bytes) -> _Response:
        """Record one request and answer it."""
        split = urlsplit(raw_path)
        query = {key: values[0] for key, values in parse_qs(split.query, keep_blank_values=True).items()}
        content_type = next((v for k, v in headers.items() if k.lower() == "content-type"), "")
        content_type = content_type.split(";")[0].strip().lower()
        body: Any = None
        body_error: str | None = None
        if raw_body:
            if "json" in content_type:
                try:
                    body = json.loads(raw_body)
                except ValueError as exc:
                    body, body_error = raw_body, f"error decoding JSON body: {exc}"
            else:
                body = raw_body
        request = RecordedRequest(method, split.path, query, content_type, body, headers)
        with self._lock:
            self.requests.append(request)
        try:
            if self._unavailable:
                raise KubernetesApiError(
                    HTTPStatus.SERVICE_UNAVAILABLE,
                    "ServiceUnavailable",
                    "the server is currently unable to handle the request",
                )
            if body_error is not None:
                raise _bad_request(body_error)
            handler, params = self._route(method, split.path)
            with self._lock:
                response = handler(request, **params)
                if isinstance(response.body, dict):
                    # A copy, so a test changing state cannot race the response being written.
                    response.body = copy.deepcopy(response.body)
                return response
        except KubernetesApiError as exc:
            return _Response(exc.code, exc.status)

    def _route(self, method: str, path: str) -> tuple[Callable[..., _Response], dict[str, str]]:
        path_matched = False
        for route_method, pattern, handler in self._routes:
            match = pattern.fullmatch(path)
            if match:
                path_matched = True
                if route_method == method:
                    return handler, {k: unquote(v) for k, v in match.groupdict().items()}
        if path_matched:
            raise KubernetesApiError(
                HTTPStatus.METHOD_NOT_ALLOWED,
                "MethodNotAllowed",
                f"the server does not allow this method on the requested resource ({method} {path})",
            )
        raise _no_such_resource()

    def _lookup(self, group: str, version: str, plural: str) -> CustomResource:
        resource = self.resources.get((group, version, plural))
        if resource is None:
            raise _no_such_resource()
        return resource

    # ------------------------------------------------------- version, health

    def _version(self, request: RecordedRequest) -> _Response:
        return _Response(HTTPStatus.OK, dict(_FAKE_VERSION))

    def _health(self, request: RecordedRequest) -> _Response:
        return _Response(HTTPStatus.OK, "ok")

    # ---------------------------------------------------------------- reads

    def _list(
        self, request: RecordedRequest, group: str, version: str, plural: str, namespace: str | None = None
    ) -> _Response:
        resource = self._lookup(group, version, plural)
        matches = _selector(request.query)
        if request.query.get("watch", "").lower() in {"true", "1"}:
            return _Response(HTTPStatus.OK, stream=self._watch(resource, namespace, request.query, matches))
        items = [
            obj
            for key, obj in sorted(self.objects.items())
            if (key.group, key.version, key.plural) == (group, version, plural)
            and (namespace is None or key.namespace == namespace)
            and matches(obj)
        ]
        metadata: Json = {"resourceVersion": str(self.resource_version)}
        try:
            start = int(request.query.get("continue") or 0)
            limit = int(request.query.get("limit") or 0)
        except ValueError as exc:
            raise _bad_request(f"invalid limit or continue token: {exc}") from exc
        end = start + limit if limit > 0 else len(items)
        if end < len(items):
            metadata["continue"] = str(end)
            metadata["remainingItemCount"] = len(items) - end
        return _Response(
            HTTPStatus.OK,
            {
                "apiVersion": resource.api_version,
                "kind": resource.list_kind,
                "metadata": metadata,
                "items": items[start:end],
            },
        )

    def _watch(
        self,
        resource: CustomResource,
        namespace: str | None,
        query: dict[str, str],
        matches: Callable[[Json], bool],
    ) -> Iterator[Json]:
        """Events as ``{"type": ..., "object": ...}``: with no (or a zero)
        ``resourceVersion`` first an ADDED for each existing object, then every
        change after it, until ``timeoutSeconds``, :meth:`down` or :meth:`stop`."""
        try:
            timeout = float(query["timeoutSeconds"]) if query.get("timeoutSeconds") else None
            since = int(query.get("resourceVersion") or 0)
        except ValueError as exc:
            raise _bad_request(f"invalid timeoutSeconds or resourceVersion: {exc}") from exc
        deadline = None if timeout is None else time.monotonic() + timeout
        epoch = self._epoch

        def selected(key: ObjectKey, obj: Json) -> bool:
            same_resource = (key.group, key.version, key.plural) == (
                resource.group,
                resource.version,
                resource.plural,
            )
            return same_resource and (namespace is None or key.namespace == namespace) and matches(obj)

        if since == 0:
            initial = [
                {"type": "ADDED", "object": copy.deepcopy(obj)}
                for key, obj in sorted(self.objects.items())
                if selected(key, obj)
            ]
            cursor = len(self.events)
        else:
            initial = []
            cursor = next(
                (i for i, e in enumerate(self.events) if e.resource_version > since), len(self.events)
            )

        def stream() -> Iterator[Json]:
            nonlocal cursor
            yield from initial
            while True:
                with self._changed:
                    while cursor == len(self.events) and self._epoch == epoch:
                        remaining = None if deadline is None else deadline - time.monotonic()
                        if remaining is not None and remaining <= 0:
                            return
                        self._changed.wait(remaining)
                    if self._epoch != epoch:
                        return
                    batch, cursor = self.events[cursor:], len(self.events)
                for event in batch:
                    if selected(event.key, event.object):
                        yield {"type": event.type, "object": event.object}

        return stream()

    def _get(
        self, request: RecordedRequest, group: str, version: str, namespace: str, plural: str, name: str
    ) -> _Response:
        resource = self._lookup(group, version, plural)
        return _Response(
            HTTPStatus.OK, self._existing(resource, ObjectKey(group, version, namespace, plural, name))
        )

    # ---------------------------------------------------------------- writes

    def _create(
        self, request: RecordedRequest, group: str, version: str, namespace: str, plural: str
    ) -> _Response:
        resource = self._lookup(group, version, plural)
        body = _require_object(request.body)
        created = self._create_object(resource, namespace, body, keep_status=False, dry_run=_dry_run(request))
        return _Response(HTTPStatus.CREATED, created)

    def _replace(
        self, request: RecordedRequest, group: str, version: str, namespace: str, plural: str, name: str
    ) -> _Response:
        return self._write(request, ObjectKey(group, version, namespace, plural, name), status_only=False)

    def _replace_status(
        self, request: RecordedRequest, group: str, version: str, namespace: str, plural: str, name: str
    ) -> _Response:
        return self._write(request, ObjectKey(group, version, namespace, plural, name), status_only=True)

    def _patch(
        self, request: RecordedRequest, group: str, version: str, namespace: str, plural: str, name: str
    ) -> _Response:
        return self._write(
            request, ObjectKey(group, version, namespace, plural, name), status_only=False, patch=True
        )

    def _patch_status(
        self, request: RecordedRequest, group: str, version: str, namespace: str, plural: str, name: str
    ) -> _Response:
        return self._write(
            request, ObjectKey(group, version, namespace, plural, name), status_only=True, patch=True
        )

    def _write(
        self, request: RecordedRequest, key: ObjectKey, *, status_only: bool, patch: bool = False
    ) -> _Response:
        """PUT or PATCH of the object or its ``/status``."""
        resource = self._lookup(key.group, key.version, key.plural)
        if status_only and not resource.status_subresource:
            raise _no_such_resource()
        current = self._existing(resource, key)
        body = self._apply_patch(resource, current, request) if patch else _require_object(request.body)
        _check_type_meta(resource, body)
        metadata = body.get("metadata")
        if not isinstance(metadata, dict):
            raise _invalid(resource, key.name, "metadata: Required value", "metadata")
        if metadata.get("name") != key.name:
            sent_name = metadata.get("name") or ""
            raise _bad_request(
                f"the name of the object ({sent_name}) does not match the name on the URL ({key.name})"
            )
        if metadata.get("namespace") not in (None, "", key.namespace):
            raise _bad_request(
                "the namespace of the provided object does not match the namespace sent on the request"
            )
        sent_version = metadata.get("resourceVersion")
        if not sent_version and not patch:
            raise _invalid(
                resource,
                key.name,
                "metadata.resourceVersion: Invalid value: 0x0: must be specified for an update",
                "metadata.resourceVersion",
            )
        if sent_version and sent_version != current["metadata"]["resourceVersion"]:
            raise _conflict(
                resource,
                key.name,
                "the object has been modified; please apply your changes to the latest version and try again",
            )
        if status_only:
            candidate = copy.deepcopy(current)
            if "status" in body:
                candidate["status"] = copy.deepcopy(body["status"])
            else:
                candidate.pop("status", None)
        else:
            candidate = copy.deepcopy(body)
            if resource.status_subresource:
                candidate.pop("status", None)
                if "status" in current:
                    candidate["status"] = copy.deepcopy(current["status"])
        return _Response(
            HTTPStatus.OK, self._update(resource, key, current, candidate, dry_run=_dry_run(request))
        )

    def _apply_patch(self, resource: CustomResource, current: Json, request: RecordedRequest) -> Json:
        if request.content_type in (
            _STRATEGIC_MERGE_PATCH,
            "application/apply-patch+yaml",
            "application/json",
            "",
        ):
            raise KubernetesApiError(
                HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
                "UnsupportedMediaType",
                f"the body of the request was in an unknown format ({request.content_type or 'none'}) - "
                f"accepted media types include: {JSON_PATCH}, {MERGE_PATCH}",
            )
        if request.body is None:
            raise _bad_request("the patch body is empty")
        try:
            if request.content_type == MERGE_PATCH:
                patched = apply_merge_patch(current, request.body)
            elif request.content_type == JSON_PATCH:
                if not isinstance(request.body, list):
                    raise _bad_request(f"a JSON patch must be an array of operations, not {request.body!r}")
                patched = apply_json_patch(current, request.body)
            else:
                raise KubernetesApiError(
                    HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
                    "UnsupportedMediaType",
                    f"the body of the request was in an unknown format ({request.content_type}) - "
                    f"accepted media types include: {JSON_PATCH}, {MERGE_PATCH}",
                )
        except PatchError as exc:
            raise KubernetesApiError(HTTPStatus.UNPROCESSABLE_ENTITY, "Invalid", str(exc)) from exc
        if not isinstance(patched, dict):
            raise _invalid(resource, current["metadata"]["name"], "the patched object is not a JSON object")
        return patched

    def _delete(
        self, request: RecordedRequest, group: str, version: str, namespace: str, plural: str, name: str
    ) -> _Response:
        resource = self._lookup(group, version, plural)
        key = ObjectKey(group, version, namespace, plural, name)
        current = self._existing(resource, key)
        options = request.body if isinstance(request.body, dict) else {}
        preconditions = options.get("preconditions") or {}
        metadata = current["metadata"]
        for field_name, label in (("uid", "UID"), ("resourceVersion", "ResourceVersion")):
            wanted = preconditions.get(field_name)
            if wanted and wanted != metadata[field_name]:
                raise _conflict(
                    resource,
                    name,
                    f"Precondition failed: {label} in precondition: {wanted}, "
                    f"{label} in object meta: {metadata[field_name]}",
                )
        dry_run = _dry_run(request)
        if metadata.get("finalizers"):
            # Deletion waits for the finalizers' owners; the object is returned, marked.
            if "deletionTimestamp" in metadata:
                return _Response(HTTPStatus.OK, current)
            marked = copy.deepcopy(current)
            marked["metadata"]["deletionTimestamp"] = _now()
            marked["metadata"]["deletionGracePeriodSeconds"] = 0
            return _Response(HTTPStatus.OK, marked if dry_run else self._store(key, marked, "MODIFIED"))
        if not dry_run:
            self._remove(key)
        return _Response(
            HTTPStatus.OK,
            {
                "kind": "Status",
                "apiVersion": "v1",
                "metadata": {},
                "status": "Success",
                "details": {"name": name, "group": group, "kind": plural, "uid": metadata["uid"]},
            },
        )

    # ----------------------------------------------------------------- storage

    def _existing(self, resource: CustomResource, key: ObjectKey) -> Json:
        obj = self.objects.get(key)
        if obj is None:
            raise _not_found(resource, key.name)
        return obj

    def _create_object(
        self, resource: CustomResource, namespace: str, body: Json, *, keep_status: bool, dry_run: bool
    ) -> Json:
        _check_type_meta(resource, body)
        obj = copy.deepcopy(body)
        metadata = obj.get("metadata")
        if metadata is None:
            metadata = obj["metadata"] = {}
        if not isinstance(metadata, dict):
            raise _bad_request("metadata must be a JSON object")
        if metadata.get("namespace") not in (None, "", namespace):
            raise _bad_request(
                "the namespace of the provided object does not match the namespace sent on the request"
            )
        if not metadata.get("name") and metadata.get("generateName"):
            metadata["name"] = f"{metadata['generateName']}{uuid.uuid4().hex[:5]}"
        name = metadata.get("name") or ""
        if not name:
            raise _invalid(
                resource,
                "",
                "metadata.name: Required value: name or generateName is required",
                "metadata.name",
            )
        if len(name) > 253 or not _NAME_RE.fullmatch(name):
            raise _invalid(
                resource,
                name,
                f'metadata.name: Invalid value: "{name}": a lowercase RFC 1123 subdomain must consist of '
                "lower case alphanumeric characters, '-' or '.', and must start and end with an "
                "alphanumeric character",
                "metadata.name",
            )
        if metadata.get("resourceVersion"):
            raise KubernetesApiError(
                HTTPStatus.INTERNAL_SERVER_ERROR,
                "InternalError",
                "resourceVersion should not be set on objects to be created",
            )
        key = ObjectKey(resource.group, resource.version, namespace, resource.plural, name)
        if key in self.objects:
            raise KubernetesApiError(
                HTTPStatus.CONFLICT,
                "AlreadyExists",
                f'{_qualified(resource)} "{name}" already exists',
                {"name": name, "group": resource.group, "kind": resource.plural},
            )
        if resource.status_subresource and not keep_status:
            obj.pop("status", None)
        for server_owned in ("deletionTimestamp", "deletionGracePeriodSeconds"):
            metadata.pop(server_owned, None)
        metadata.update(
            namespace=namespace,
            uid=str(uuid.uuid4()),
            creationTimestamp=_now(),
            generation=1,
            resourceVersion=str(self.resource_version + 1),
        )
        self._validate(resource, obj)
        return obj if dry_run else self._store(key, obj, "ADDED")

    def _update(
        self, resource: CustomResource, key: ObjectKey, current: Json, candidate: Json, *, dry_run: bool
    ) -> Json:
        """Write ``candidate`` over ``current`` (preconditions already checked)."""
        metadata, old_metadata = candidate.setdefault("metadata", {}), current["metadata"]
        for name in _IMMUTABLE_METADATA:
            if name in old_metadata:
                metadata[name] = old_metadata[name]
            else:
                metadata.pop(name, None)
        metadata["resourceVersion"] = old_metadata["resourceVersion"]
        if _spec(candidate, resource) != _spec(current, resource):
            metadata["generation"] = old_metadata["generation"] + 1
        if candidate == current:
            return current  # a no-op write changes nothing, not even resourceVersion
        self._validate(resource, candidate)
        if dry_run:
            return candidate
        if metadata.get("deletionTimestamp") and not metadata.get("finalizers"):
            self.objects[key] = candidate
            return self._remove(key)
        return self._store(key, candidate, "MODIFIED")

    def _validate(self, resource: CustomResource, obj: Json) -> None:
        if self.validator is None:
            return
        try:
            self.validator(copy.deepcopy(obj))
        except Exception as exc:
            raise _invalid(resource, obj["metadata"].get("name", ""), str(exc)) from exc

    def _store(self, key: ObjectKey, obj: Json, event_type: Literal["ADDED", "MODIFIED"]) -> Json:
        with self._changed:
            self.resource_version += 1
            obj["metadata"]["resourceVersion"] = str(self.resource_version)
            self.objects[key] = obj
            self.events.append(WatchEvent(self.resource_version, event_type, key, copy.deepcopy(obj)))
            self._changed.notify_all()
            return obj

    def _remove(self, key: ObjectKey) -> Json:
        with self._changed:
            obj = self.objects.pop(key)
            self.resource_version += 1
            obj["metadata"]["resourceVersion"] = str(self.resource_version)
            self.events.append(WatchEvent(self.resource_version, "DELETED", key, copy.deepcopy(obj)))
            self._changed.notify_all()
            return obj


# ------------------------------------------------------------------ helpers


def _require_object(body: Any) -> Json:
    if not isinstance(body, dict):
        raise _bad_request("the request body must be a JSON object")
    return body


def _dry_run(request: RecordedRequest) -> bool:
    value = request.query.get("dryRun")
    if value not in (None, "", "All"):
        raise _bad_request(f'unsupported dryRun value "{value}": only "All" is allowed')
    return value == "All"


def _check_type_meta(resource: CustomResource, body: Json) -> None:
    api_version, kind = body.get("apiVersion"), body.get("kind")
    if not api_version or not kind:
        missing = "Kind" if not kind else "apiVersion"
        raise _bad_request(f"Object '{missing}' is missing in '{json.dumps(body)[:200]}'")
    if api_version != resource.api_version:
        raise _bad_request(
            f"the API version in the data ({api_version}) does not match the expected API version "
            f"({resource.api_version})"
        )
    if kind != resource.kind:
        raise _bad_request(
            f"the kind in the data ({kind}) does not match the expected kind ({resource.kind})"
        )


def _spec(obj: Json, resource: CustomResource) -> Json:
    """What ``generation`` counts: everything but metadata (and status, with a status subresource)."""
    ignored = {"metadata", "status"} if resource.status_subresource else {"metadata"}
    return {k: v for k, v in obj.items() if k not in ignored}


def _selector(query: dict[str, str]) -> Callable[[Json], bool]:
    """A predicate for ``labelSelector`` (``k=v``, ``k==v``, ``k!=v``, ``k``,
    ``!k``) and ``fieldSelector`` (``metadata.name`` and ``metadata.namespace``)."""
    label_terms = [
        _parse_term(t, r"!?[\w./-]+|[\w./-]+\s*(?:==|!=|=)\s*[\w.-]*", "labelSelector")
        for t in _terms(query.get("labelSelector"))
    ]
    field_terms = [
        _parse_term(t, r"metadata\.(?:name|namespace)\s*(?:==|!=|=)\s*\S*", "fieldSelector")
        for t in _terms(query.get("fieldSelector"))
    ]

    def matches(obj: Json) -> bool:
        metadata = obj.get("metadata") or {}
        fields = {f"metadata.{k}": metadata.get(k) for k in ("name", "namespace")}
        labels = metadata.get("labels") or {}
        return all(_holds(term, fields) for term in field_terms) and all(
            _holds(t, labels) for t in label_terms
        )

    return matches


def _terms(selector: str | None) -> list[str]:
    return [term.strip() for term in (selector or "").split(",") if term.strip()]


def _parse_term(term: str, pattern: str, parameter: str) -> tuple[str, str, str | None]:
    """``(key, operator, value)``; the operator is ``=``, ``!=``, ``exists`` or ``!exists``."""
    if not re.fullmatch(pattern, term):
        raise _bad_request(f"unable to parse requirement {term!r} in {parameter}")
    match = re.fullmatch(r"(.+?)\s*(==|!=|=)\s*(.*)", term)
    if match:
        return match[1], "!=" if match[2] == "!=" else "=", match[3]
    return (term[1:], "!exists", None) if term.startswith("!") else (term, "exists", None)


def _holds(term: tuple[str, str, str | None], values: dict[str, Any]) -> bool:
    key, operator, value = term
    if operator == "exists":
        return key in values
    if operator == "!exists":
        return key not in values
    return (values.get(key) == value) == (operator == "=")


def apply_merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch: objects merge recursively, ``null`` deletes a
    key, anything else (arrays included) replaces. ``target`` is not changed."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = apply_merge_patch(result.get(key), value)
    return result


def apply_json_patch(document: Any, operations: list[Any]) -> Any:
    """RFC 6902 JSON patch (add, remove, replace, move, copy, test); raises
    :class:`PatchError` when an operation cannot be applied. ``document`` is not changed."""
    result = copy.deepcopy(document)
    for operation in operations:
        if not isinstance(operation, dict) or not isinstance(operation.get("path"), str):
            raise PatchError(f"invalid JSON patch operation {operation!r}")
        op, path = operation.get("op"), _pointer(operation["path"])
        if op in ("add", "replace", "test") and "value" not in operation:
            raise PatchError(f"JSON patch operation {op!r} needs a value")
        if op == "add":
            result = _pointer_add(result, path, copy.deepcopy(operation["value"]))
        elif op == "remove":
            result, _ = _pointer_remove(result, path)
        elif op == "replace":
            result, _ = _pointer_remove(result, path) if path else (result, None)
            result = _pointer_add(result, path, copy.deepcopy(operation["value"]))
        elif op in ("move", "copy"):
            if not isinstance(operation.get("from"), str):
                raise PatchError(f"JSON patch operation {op!r} needs 'from'")
            source = _pointer(operation["from"])
            if op == "move":
                result, value = _pointer_remove(result, source)
            else:
                value = copy.deepcopy(_pointer_get(result, source))
            result = _pointer_add(result, path, value)
        elif op == "test":
            if _pointer_get(result, path) != operation["value"]:
                raise PatchError(f"testing value {operation['path']} failed")
        else:
            raise PatchError(f"unknown JSON patch operation {op!r}")
    return result


def _pointer(path: str) -> list[str]:
    if path == "":
        return []
    if not path.startswith("/"):
        raise PatchError(f"invalid JSON pointer {path!r}")
    return [token.replace("~1", "/").replace("~0", "~") for token in path[1:].split("/")]


def _index(array: list[Any], token: str, *, for_insert: bool) -> int:
    if for_insert and token == "-":
        return len(array)
    if not token.isdigit() or (len(token) > 1 and token.startswith("0")):
        raise PatchError(f"invalid array index {token!r}")
    index = int(token)
    if index > len(array) or (index == len(array) and not for_insert):
        raise PatchError(f"array index {index} out of range")
    return index


def _pointer_get(document: Any, path: list[str]) -> Any:
    for token in path:
        if isinstance(document, dict):
            if token not in document:
                raise PatchError(f"missing key {token!r}")
            document = document[token]
        elif isinstance(document, list):
            document = document[_index(document, token, for_insert=False)]
        else:
            raise PatchError(f"cannot look up {token!r} in a {type(document).__name__}")
    return document


def _pointer_add(document: Any, path: list[str], value: Any) -> Any:
    if not path:
        return value
    parent = _pointer_get(document, path[:-1])
    if isinstance(parent, dict):
        parent[path[-1]] = value
    elif isinstance(parent, list):
        parent.insert(_index(parent, path[-1], for_insert=True), value)
    else:
        raise PatchError(f"cannot add {path[-1]!r} to a {type(parent).__name__}")
    return document


def _pointer_remove(document: Any, path: list[str]) -> tuple[Any, Any]:
    if not path:
        raise PatchError("cannot remove the whole document")
    parent = _pointer_get(document, path[:-1])
    if isinstance(parent, dict):
        if path[-1] not in parent:
            raise PatchError(f"missing key {path[-1]!r}")
        return document, parent.pop(path[-1])
    if isinstance(parent, list):
        return document, parent.pop(_index(parent, path[-1], for_insert=False))
    raise PatchError(f"cannot remove {path[-1]!r} from a {type(parent).__name__}")


def _make_handler(server: FakeKubernetes) -> type[BaseHTTPRequestHandler]:
    """A request handler class bound to one :class:`FakeKubernetes`.

    It speaks HTTP/1.1 (watch streams are chunked, which urllib3 needs to hand
    out events as they come) but closes every connection after one response,
    so no kept-alive connection outlives :meth:`FakeKubernetes.down`.
    """

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _serve(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            raw_body = self.rfile.read(length) if length else b""
            response = server.handle(self.command, self.path, dict(self.headers.items()), raw_body)
            self.close_connection = True
            if response.stream is not None:
                self._send_stream(response.code, response.stream)
                return
            if isinstance(response.body, str):
                data, content_type = response.body.encode(), "text/plain; charset=utf-8"
            else:
                data, content_type = json.dumps(response.body).encode(), "application/json"
            self.send_response(response.code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(data)

        def _send_stream(self, code: int, events: Iterator[Json]) -> None:
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Transfer-Encoding", "chunked")
            self.send_header("Connection", "close")
            self.end_headers()
            try:
                for event in events:
                    line = json.dumps(event).encode() + b"\n"
                    self.wfile.write(f"{len(line):X}\r\n".encode() + line + b"\r\n")
                    self.wfile.flush()
                self.wfile.write(b"0\r\n\r\n")
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client stopped watching

        do_GET = do_POST = do_DELETE = do_PUT = do_PATCH = _serve

        def log_message(self, format: str, *args: Any) -> None:
            """Stay quiet; the test reads :attr:`FakeKubernetes.requests` instead."""

    return Handler
