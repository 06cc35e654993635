"""An in-process stand-in for the Kubeflow Pipelines v2beta1 REST API.

Kubeflow cannot run on a developer machine or in CI, so the tests drive the
*real* ``kfp.Client`` against this small HTTP server instead. It implements
exactly the paths the client calls for the methods TaskVision uses, with the
payload and response shapes of the generated ``kfp_server_api`` package
(snake_case JSON field names, e.g. ``experiment_id``, ``display_name``,
``pipeline_spec``, ``runtime_config``), and records every request so a test can
assert on what would have been sent to a real cluster.

Endpoints (all under ``/apis/v2beta1``):

=======  ==========================  =========================================
GET      ``/healthz``                ``kfp.Client(...)`` construction
POST     ``/experiments``            ``create_experiment``
GET      ``/experiments``            ``list_experiments``, ``get_experiment(experiment_name=...)``
GET      ``/experiments/{id}``       ``get_experiment(experiment_id=...)``
POST     ``/runs``                   ``create_run_from_pipeline_package``, ``run_pipeline``
GET      ``/runs``                   ``list_runs``
GET      ``/runs/{id}``              ``get_run``, ``wait_for_run_completion``
POST     ``/runs/{id}:terminate``    ``terminate_run``
=======  ==========================  =========================================

Anything else answers 404 with a ``google.rpc.Status``-shaped JSON body; a body
that is not a JSON object, or an invalid filter / page token, answers 400.

Run states only change when a test says so (:meth:`FakeKfpServer.set_run_state`),
except ``:terminate``, which, like the real API server, moves a PENDING, RUNNING
or PAUSED run to ``CANCELING`` and refuses any other state with 400.
"""

from __future__ import annotations

import copy
import json
import re
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from tests.support.request_log import RequestLog

__all__ = ["KFP_CLIENT_ENV_VARS", "RUN_STATES", "FakeKfpServer", "KfpApiError", "RecordedRequest"]

API_PREFIX = "/apis/v2beta1"

#: Every ``V2beta1RuntimeState`` value the generated client knows.
RUN_STATES = frozenset(
    {
        "RUNTIME_STATE_UNSPECIFIED",
        "PENDING",
        "RUNNING",
        "SUCCEEDED",
        "SKIPPED",
        "FAILED",
        "CANCELING",
        "CANCELED",
        "PAUSED",
    }
)
_FINISHED_STATES = frozenset({"SUCCEEDED", "SKIPPED", "FAILED", "CANCELED"})
_TERMINABLE_STATES = frozenset({"RUNTIME_STATE_UNSPECIFIED", "PENDING", "RUNNING", "PAUSED"})

#: Environment variables ``kfp.Client`` reads (host, experiment name overrides,
#: OAuth ids). Tests should clear them so a developer's shell cannot redirect
#: or rename what the client sends.
KFP_CLIENT_ENV_VARS = (
    "KF_PIPELINES_ENDPOINT",
    "KF_PIPELINES_UI_ENDPOINT",
    "KF_PIPELINES_DEFAULT_EXPERIMENT_NAME",
    "KF_PIPELINES_OVERRIDE_EXPERIMENT_NAME",
    "KF_PIPELINES_IAP_OAUTH2_CLIENT_ID",
    "KF_PIPELINES_APP_OAUTH2_CLIENT_ID",
    "KF_PIPELINES_APP_OAUTH2_CLIENT_SECRET",
)

# google.rpc.Code values used in error bodies.
_CODE_UNKNOWN = 2
_CODE_INVALID_ARGUMENT = 3
_CODE_NOT_FOUND = 5
_CODE_ALREADY_EXISTS = 6

# Filter operations, by the enum number kfp.Client sends and by name (protojson accepts both).
_FILTER_OPERATIONS: dict[int | str, str] = {
    1: "EQUALS",
    2: "NOT_EQUALS",
    9: "IS_SUBSTRING",
    "EQUALS": "EQUALS",
    "NOT_EQUALS": "NOT_EQUALS",
    "IS_SUBSTRING": "IS_SUBSTRING",
}

Json = dict[str, Any]


@dataclass(frozen=True)
class RecordedRequest:
    """One HTTP request the server received, recorded before it was handled.

    ``body`` is the parsed JSON for a JSON request body, the raw bytes for any
    other content type (pipeline uploads are multipart), and ``None`` when the
    request had no body. ``query`` maps each parameter to its first value;
    ``kfp.Client`` never repeats one.
    """

    method: str
    path: str
    query: dict[str, str]
    body: Any
    headers: dict[str, str]

    @property
    def json(self) -> Json:
        """The body as a JSON object (fails loudly when it is not one)."""
        if not isinstance(self.body, dict):
            raise TypeError(f"{self.method} {self.path} has no JSON object body: {self.body!r}")
        return self.body


class KfpApiError(Exception):
    """An error answer: HTTP status plus a ``google.rpc.Status`` body."""

    def __init__(self, status: HTTPStatus, code: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def _now() -> str:
    """An RFC 3339 timestamp as the API server writes them."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _not_found(kind: str, resource_id: str) -> KfpApiError:
    return KfpApiError(HTTPStatus.NOT_FOUND, _CODE_NOT_FOUND, f"{kind} {resource_id} not found")


def _bad_request(message: str) -> KfpApiError:
    return KfpApiError(HTTPStatus.BAD_REQUEST, _CODE_INVALID_ARGUMENT, message)


class FakeKfpServer(RequestLog[RecordedRequest]):
    """A threaded HTTP server on 127.0.0.1 that speaks the KFP v2beta1 REST API.

    Use it as a context manager and point the real client at :attr:`host`::

        with FakeKfpServer() as kfp_server:
            client = kfp.Client(host=kfp_server.host)
            result = client.create_run_from_pipeline_package("p.yaml", experiment_name="x")
            kfp_server.set_run_state(result.run_id, "FAILED", error="OOMKilled")
            assert client.get_run(result.run_id).error.message == "OOMKilled"

    State lives in plain dicts shaped like the API's JSON (``experiments`` and
    ``runs``, keyed by id), so a test can read what was stored; change it
    through :meth:`add_experiment` and :meth:`set_run_state`.
    """

    def __init__(self, *, multi_user: bool = False) -> None:
        """``multi_user`` is what ``/healthz`` reports; with ``True`` the client
        tries to read the in-cluster namespace file at construction."""
        self.multi_user = multi_user
        self.requests: list[RecordedRequest] = []
        self.experiments: dict[str, Json] = {}
        self.runs: dict[str, Json] = {}
        self._lock = threading.RLock()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._routes: list[tuple[str, re.Pattern[str], Callable[..., Json]]] = [
            ("GET", re.compile(r"/healthz"), self._healthz),
            ("POST", re.compile(r"/experiments"), self._create_experiment),
            ("GET", re.compile(r"/experiments"), self._list_experiments),
            ("GET", re.compile(r"/experiments/(?P<experiment_id>[^/:]+)"), self._get_experiment),
            ("POST", re.compile(r"/runs"), self._create_run),
            ("GET", re.compile(r"/runs"), self._list_runs),
            ("GET", re.compile(r"/runs/(?P<run_id>[^/:]+)"), self._get_run),
            ("POST", re.compile(r"/runs/(?P<run_id>[^/:]+):terminate"), self._terminate_run),
        ]

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> FakeKfpServer:
        """Bind a free loopback port and serve in a daemon thread."""
        if self._httpd is not None:
            raise RuntimeError("FakeKfpServer is already running")
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.05},  # shutdown() waits up to one poll interval
            name="fake-kfp-server",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and release the port."""
        if self._httpd is None:
            return
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._httpd = None
        self._thread = None

    @property
    def host(self) -> str:
        """``http://127.0.0.1:PORT``, the value for ``kfp.Client(host=...)``."""
        if self._httpd is None:
            raise RuntimeError("FakeKfpServer is not running")
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    # ------------------------------------------------------------ test helpers

    def add_experiment(self, display_name: str, *, namespace: str = "", description: str = "") -> str:
        """Create an experiment as if someone else had made it; returns its id."""
        with self._lock:
            return str(self._store_experiment(display_name, namespace, description)["experiment_id"])

    def set_run_state(self, run_id: str, state: str, error: str | None = None) -> Json:
        """Move a run to ``state`` (a ``V2beta1RuntimeState`` name) as the
        cluster would; ``error`` becomes ``run.error.message``. Returns the run."""
        if state not in RUN_STATES:
            raise ValueError(f"unknown run state {state!r}; expected one of {sorted(RUN_STATES)}")
        with self._lock:
            run = self.runs.get(run_id)
            if run is None:
                raise KeyError(f"no run {run_id!r}; known runs: {sorted(self.runs)}")
            now = _now()
            status: Json = {"update_time": now, "state": state}
            run["state"] = state
            if error is None:
                run.pop("error", None)
            else:
                run["error"] = {"code": _CODE_UNKNOWN, "message": error, "details": []}
                status["error"] = run["error"]
            run["state_history"].append(status)
            if state in _FINISHED_STATES:
                run["finished_at"] = now
            return run

    # ---------------------------------------------------------------- dispatch

    def handle(
        self, method: str, raw_path: str, headers: dict[str, str], raw_body: bytes
    ) -> tuple[int, Json]:
        """Record one request and answer it; returns (HTTP status, JSON body)."""
        split = urlsplit(raw_path)
        query = {key: values[0] for key, values in parse_qs(split.query, keep_blank_values=True).items()}
        body: Any = None
        body_error: str | None = None
        if raw_body:
            content_type = next((v for k, v in headers.items() if k.lower() == "content-type"), "")
            if content_type.split(";")[0].strip() == "application/json":
                try:
                    body = json.loads(raw_body)
                except ValueError as exc:
                    body, body_error = raw_body, f"malformed JSON body: {exc}"
            else:
                body = raw_body
        with self._lock:
            self.requests.append(RecordedRequest(method, split.path, query, body, headers))
        try:
            if body_error is not None:
                raise _bad_request(body_error)
            handler, params = self._route(method, split.path)
            with self._lock:
                # A copy, so a test changing state cannot race the response being written.
                return HTTPStatus.OK, copy.deepcopy(handler(query=query, body=body, **params))
        except KfpApiError as exc:
            return exc.status, {"error": exc.message, "code": exc.code, "message": exc.message, "details": []}

    def _route(self, method: str, path: str) -> tuple[Callable[..., Json], dict[str, str]]:
        if path.startswith(API_PREFIX):
            rest = path[len(API_PREFIX) :]
            for route_method, pattern, handler in self._routes:
                match = pattern.fullmatch(rest)
                if match and route_method == method:
                    return handler, {k: unquote(v) for k, v in match.groupdict().items()}
        raise KfpApiError(HTTPStatus.NOT_FOUND, _CODE_NOT_FOUND, f"no handler for {method} {path}")

    # ---------------------------------------------------------------- handlers

    def _healthz(self, *, query: dict[str, str], body: Any) -> Json:
        return {"multi_user": self.multi_user, "pipeline_store": "database"}

    def _create_experiment(self, *, query: dict[str, str], body: Any) -> Json:
        experiment = _require_object(body)
        name = experiment.get("display_name")
        if not isinstance(name, str) or not name:
            raise _bad_request("experiment display_name is required")
        namespace = experiment.get("namespace") or ""
        if any(e["display_name"] == name and e["namespace"] == namespace for e in self.experiments.values()):
            raise KfpApiError(
                HTTPStatus.CONFLICT, _CODE_ALREADY_EXISTS, f"experiment {name!r} already exists"
            )
        return self._store_experiment(name, namespace, experiment.get("description") or "")

    def _list_experiments(self, *, query: dict[str, str], body: Any) -> Json:
        namespace = query.get("namespace", "")
        items = [e for e in self.experiments.values() if not namespace or e["namespace"] == namespace]
        page, total, token = _paginate(_apply_filter(items, query.get("filter")), query)
        return {"experiments": page, "total_size": total, "next_page_token": token}

    def _get_experiment(self, *, query: dict[str, str], body: Any, experiment_id: str) -> Json:
        if experiment_id not in self.experiments:
            raise _not_found("Experiment", experiment_id)
        return self.experiments[experiment_id]

    def _create_run(self, *, query: dict[str, str], body: Any) -> Json:
        submitted = _require_object(body)
        name = submitted.get("display_name")
        if not isinstance(name, str) or not name:
            raise _bad_request("run display_name is required")
        spec = submitted.get("pipeline_spec")
        reference = submitted.get("pipeline_version_reference")
        if (spec is None) == (reference is None):
            raise _bad_request("a run needs exactly one of pipeline_spec and pipeline_version_reference")
        if spec is not None and not isinstance(spec, dict):
            raise _bad_request("pipeline_spec must be a JSON object")
        runtime_config = submitted.get("runtime_config") or {}
        if not isinstance(runtime_config, dict) or not isinstance(runtime_config.get("parameters", {}), dict):
            raise _bad_request("runtime_config.parameters must be a JSON object")
        experiment_id = submitted.get("experiment_id") or query.get("experiment_id") or ""
        if not experiment_id:
            experiment_id = self._default_experiment_id()
        elif experiment_id not in self.experiments:
            raise _not_found("Experiment", experiment_id)
        now = _now()
        run: Json = {
            **submitted,
            "run_id": str(uuid.uuid4()),
            "experiment_id": experiment_id,
            "runtime_config": runtime_config,
            "storage_state": "AVAILABLE",
            "created_at": now,
            "scheduled_at": "1970-01-01T00:00:00Z",
            "finished_at": "1970-01-01T00:00:00Z",
            "state": "PENDING",
            "state_history": [{"update_time": now, "state": "PENDING"}],
        }
        self.runs[run["run_id"]] = run
        self.experiments[experiment_id]["last_run_created_at"] = now
        return run

    def _list_runs(self, *, query: dict[str, str], body: Any) -> Json:
        items = list(self.runs.values())
        if experiment_id := query.get("experiment_id"):
            items = [r for r in items if r["experiment_id"] == experiment_id]
        elif namespace := query.get("namespace"):
            ids = {e["experiment_id"] for e in self.experiments.values() if e["namespace"] == namespace}
            items = [r for r in items if r["experiment_id"] in ids]
        page, total, token = _paginate(_apply_filter(items, query.get("filter")), query)
        return {"runs": page, "total_size": total, "next_page_token": token}

    def _get_run(self, *, query: dict[str, str], body: Any, run_id: str) -> Json:
        if run_id not in self.runs:
            raise _not_found("Run", run_id)
        return self.runs[run_id]

    def _terminate_run(self, *, query: dict[str, str], body: Any, run_id: str) -> Json:
        run = self._get_run(query=query, body=body, run_id=run_id)
        if run["state"] not in _TERMINABLE_STATES:
            raise _bad_request(f"Failed to terminate a run {run_id}. Row not found")
        self.set_run_state(run_id, "CANCELING")
        return {}

    # ----------------------------------------------------------------- storage

    def _store_experiment(self, display_name: str, namespace: str, description: str) -> Json:
        experiment: Json = {
            "experiment_id": str(uuid.uuid4()),
            "display_name": display_name,
            "description": description,
            "created_at": _now(),
            "namespace": namespace,
            "storage_state": "AVAILABLE",
        }
        self.experiments[experiment["experiment_id"]] = experiment
        return experiment

    def _default_experiment_id(self) -> str:
        for experiment in self.experiments.values():
            if experiment["display_name"] == "Default":
                return str(experiment["experiment_id"])
        return str(self._store_experiment("Default", "", "")["experiment_id"])


def _require_object(body: Any) -> Json:
    if not isinstance(body, dict):
        raise _bad_request("request body must be a JSON object")
    return body


def _apply_filter(items: list[Json], raw_filter: str | None) -> list[Json]:
    """Apply a JSON ``v2beta1.Filter`` (string predicates only)."""
    if not raw_filter:
        return items
    try:
        predicates = json.loads(raw_filter).get("predicates", [])
    except (ValueError, AttributeError) as exc:
        raise _bad_request(f"invalid filter {raw_filter!r}: {exc}") from exc
    for predicate in predicates:
        operation = _FILTER_OPERATIONS.get(predicate.get("operation"))
        key = predicate.get("key")
        value = predicate.get("stringValue", predicate.get("string_value"))
        if operation is None or not isinstance(key, str) or not isinstance(value, str):
            raise _bad_request(f"unsupported filter predicate {predicate!r}")
        if operation == "EQUALS":
            items = [i for i in items if i.get(key) == value]
        elif operation == "NOT_EQUALS":
            items = [i for i in items if i.get(key) != value]
        else:
            items = [i for i in items if value in str(i.get(key, ""))]
    return items


def _paginate(items: list[Json], query: dict[str, str]) -> tuple[list[Json], int, str]:
    """Sort by ``sort_by`` ("field" or "field desc") and cut one page.

    The page token is the offset of the next page, as a string.
    """
    sort_by = query.get("sort_by", "").split()
    if sort_by:
        items = sorted(items, key=lambda i: str(i.get(sort_by[0], "")), reverse=sort_by[-1:] == ["desc"])
    try:
        size = int(query.get("page_size") or 20)
        start = int(query.get("page_token") or 0)
    except ValueError as exc:
        raise _bad_request(f"invalid page_size or page_token: {exc}") from exc
    end = start + max(size, 1)
    return items[start:end], len(items), str(end) if end < len(items) else ""


def _make_handler(server: FakeKfpServer) -> type[BaseHTTPRequestHandler]:
    """A request handler class bound to one :class:`FakeKfpServer`."""

    class Handler(BaseHTTPRequestHandler):
        def _serve(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            raw_body = self.rfile.read(length) if length else b""
            status, payload = server.handle(self.command, self.path, dict(self.headers.items()), raw_body)
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_DELETE = do_PUT = do_PATCH = _serve

        def log_message(self, format: str, *args: Any) -> None:
            """Stay quiet; the test reads :attr:`FakeKfpServer.requests` instead."""

    return Handler
