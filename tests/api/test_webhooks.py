"""Webhooks: registration, signed deliveries to a local receiver, retries, and failures recorded."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from api.auth import create_user
from api.db.models import Task
from api.main import create_app
from api.services.versions import import_bundle
from api.settings import DEFAULT_BLOCKED_NETWORKS, Settings
from taskvision.task_types import TaskType
from tests.support.api import create_label, create_task
from tests.support.bundles import linear_bundle

HOOKS = "/recognition/v2/webhook"


@dataclass
class Receiver:
    """A local webhook target: records what it gets, answers ``fail_first`` times with 503 first."""

    fail_first: int = 0
    received: list[dict[str, Any]] = field(default_factory=list)
    url: str = ""

    def serve(self) -> ThreadingHTTPServer:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: object) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.received.append({"headers": dict(self.headers), "body": body})
                status = 503 if len(receiver.received) <= receiver.fail_first else 200
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{server.server_address[1]}/hook"
        return server


def verify(secret: str, headers: dict[str, str], body: bytes, *, tolerance_s: int = 300) -> bool:
    """What a receiver does (the README shows the same): recompute the HMAC, compare, check the time."""
    parts = dict(item.split("=", 1) for item in headers["X-TaskVision-Signature"].split(","))
    expected = hmac.new(secret.encode(), f"{parts['t']}.".encode() + body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, parts["v1"]) and abs(time.time() - int(parts["t"])) < tolerance_s


@pytest.fixture
def hooked(tmp_path: Path) -> Iterator[tuple[FastAPI, TestClient]]:
    """A running app (its background threads on) that may call 127.0.0.1, with quick retries."""
    settings = Settings(
        data_dir=tmp_path,
        url_blocked_networks=[n for n in DEFAULT_BLOCKED_NETWORKS if n != "127.0.0.0/8"],
        webhook_retry_base_s=0.2,
        webhook_retry_window_s=1.5,
        webhook_poll_interval_s=0.1,
        webhook_timeout_s=2.0,
    )
    app = create_app(settings)
    with app.state.services.session_factory() as session:
        _, token = create_user(session, "hooked")
    with TestClient(app, headers={"Authorization": f"Token {token}"}) as client:
        yield app, client


def _wait_deliveries(
    client: TestClient, hook_id: str, count: int, timeout: float = 15
) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        deliveries = client.get(f"{HOOKS}/{hook_id}/deliveries").json()["results"]
        if len(deliveries) >= count and all(d["status"] != "PENDING" for d in deliveries):
            return list(deliveries)
        time.sleep(0.1)
    raise AssertionError(f"deliveries not finished: {client.get(f'{HOOKS}/{hook_id}/deliveries').json()}")


def test_register_list_and_delete_webhooks(client: TestClient, other_client: TestClient) -> None:
    created = client.post(HOOKS, json={"url": "https://example.com/hook", "events": ["training.failed"]})
    assert created.status_code == 201, created.text
    hook = created.json()
    assert hook["secret"].startswith("whsec_") and hook["events"] == ["training.failed"]
    listed = client.get(HOOKS).json()
    assert listed["count"] == 1 and "secret" not in listed["results"][0]  # shown once, at creation
    assert other_client.get(f"{HOOKS}/{hook['id']}").status_code == 404
    assert other_client.get(HOOKS).json()["count"] == 0
    assert other_client.delete(f"{HOOKS}/{hook['id']}").status_code == 404
    assert client.delete(f"{HOOKS}/{hook['id']}").status_code == 204
    assert client.get(HOOKS).json()["count"] == 0


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:9/hook", "http://[::1]/hook", "http://169.254.169.254/", "file:///etc/passwd"]
)
def test_internal_targets_are_refused(client: TestClient, url: str) -> None:
    response = client.post(HOOKS, json={"url": url})
    assert response.status_code == 400, response.text


def test_unknown_events_are_refused(client: TestClient) -> None:
    assert (
        client.post(HOOKS, json={"url": "https://example.com/", "events": ["model.exploded"]}).status_code
        == 422
    )


@pytest.mark.slow
def test_deliveries_are_signed_and_tell_about_production_changes(
    hooked: tuple[FastAPI, TestClient], tmp_path: Path
) -> None:
    app, client = hooked
    receiver = Receiver()
    server = receiver.serve()
    try:
        hook = client.post(HOOKS, json={"url": receiver.url}).json()
        assert client.post(f"{HOOKS}/{hook['id']}/test").status_code == 202
        # A version made production (here by an import) is a production change.
        task = create_task(client, "multi_class", name="shapes")
        for name in ("a", "b"):
            client.post(
                f"/recognition/v2/task/{task['id']}/add-label",
                json={"label_id": create_label(client, name=name)["id"]},
            )
        with app.state.services.session_factory() as session:
            bundle = linear_bundle(tmp_path / "bundle", TaskType.MULTI_CLASS, ["a", "b"])
            import_bundle(
                session, app.state.services.blobs, session.get(Task, task["id"]), bundle, production=True
            )
        deliveries = _wait_deliveries(client, hook["id"], 2)
    finally:
        server.shutdown()
    assert {d["event"] for d in deliveries} == {"ping", "version.production_changed"}
    assert all(
        d["status"] == "SUCCEEDED" and d["attempts"] == 1 and d["last_status_code"] == 200 for d in deliveries
    )
    assert len(receiver.received) == 2
    for got in receiver.received:
        assert verify(hook["secret"], got["headers"], got["body"])
        assert not verify("whsec_wrong", got["headers"], got["body"])
        payload = json.loads(got["body"])
        assert got["headers"]["X-TaskVision-Event"] == payload["event"]
        assert got["headers"]["X-TaskVision-Delivery"] == payload["id"]
    change = next(json.loads(g["body"]) for g in receiver.received if b"production_changed" in g["body"])
    assert change["data"] == {
        "task": {"id": task["id"], "name": "shapes"},
        "production_version": 1,
        "previous_version": None,
    }


def _test_delivery(client: TestClient, receiver: Receiver) -> dict[str, Any]:
    """Register ``receiver``, send it a test event, and wait until its delivery has an outcome."""
    server = receiver.serve()
    try:
        hook = client.post(HOOKS, json={"url": receiver.url}).json()
        client.post(f"{HOOKS}/{hook['id']}/test")
        (delivery,) = _wait_deliveries(client, hook["id"], 1)
    finally:
        server.shutdown()
    return delivery


@pytest.mark.slow
def test_a_target_that_is_down_for_a_while_is_retried(hooked: tuple[FastAPI, TestClient]) -> None:
    receiver = Receiver(fail_first=2)
    delivery = _test_delivery(hooked[1], receiver)
    assert delivery["status"] == "SUCCEEDED" and delivery["attempts"] == 3
    assert len(receiver.received) == 3


@pytest.mark.slow
def test_a_target_that_stays_down_is_recorded_as_failed(hooked: tuple[FastAPI, TestClient]) -> None:
    receiver = Receiver(fail_first=1000)
    delivery = _test_delivery(hooked[1], receiver)
    # Retried with a growing back-off until the retry window (1.5 s here, a day by default) ran out.
    assert delivery["status"] == "FAILED" and delivery["attempts"] >= 2
    assert (delivery["last_status_code"], delivery["last_error"]) == (503, "HTTP 503")
    assert len(receiver.received) == delivery["attempts"]


@pytest.mark.slow
def test_a_target_behind_a_refused_address_fails_at_once(tmp_path: Path) -> None:
    """A name that resolves to loopback is refused when the delivery connects (no request is sent)."""
    app = create_app(Settings(data_dir=tmp_path, webhook_poll_interval_s=0.1))
    with app.state.services.session_factory() as session:
        _, token = create_user(session, "refused")
    with TestClient(app, headers={"Authorization": f"Token {token}"}) as client:
        hook = client.post(HOOKS, json={"url": "http://localhost:9/hook"}).json()
        client.post(f"{HOOKS}/{hook['id']}/test")
        (delivery,) = _wait_deliveries(client, hook["id"], 1)
    assert delivery["status"] == "FAILED" and delivery["attempts"] == 1
    assert delivery["last_error"].startswith("Refusing")
