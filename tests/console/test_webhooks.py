"""Webhooks on the account page: add one (secret shown once), send a test, see its last deliveries."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from api.auth import create_user
from api.main import create_app
from api.settings import DEFAULT_BLOCKED_NETWORKS, Settings
from tests.api.test_webhooks import Receiver, verify
from tests.console.conftest import ConsoleFactory, ConsoleUser, flash, sign_in

ACCOUNT = "/console/account"


@pytest.fixture
def hooked_console(tmp_path: Path) -> Iterator[tuple[ConsoleUser, Receiver]]:
    """A running app (its dispatcher on) that may call a receiver on 127.0.0.1, signed in."""
    settings = Settings(
        data_dir=tmp_path,
        url_blocked_networks=[n for n in DEFAULT_BLOCKED_NETWORKS if n != "127.0.0.0/8"],
        webhook_retry_base_s=0.2,
        webhook_retry_window_s=1.5,
        webhook_poll_interval_s=0.1,
        webhook_timeout_s=2.0,
    )
    app: FastAPI = create_app(settings)
    with app.state.services.session_factory() as session:
        _, token = create_user(session, "hooked")
    receiver = Receiver()
    server = receiver.serve()
    with TestClient(app) as client:
        yield ConsoleUser(client=client, token=token, csrf=sign_in(client, token)), receiver
    server.shutdown()


def _wait_for(user: ConsoleUser, pattern: str, timeout: float = 15) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        panel = user.get("/console/account/webhooks").text
        if re.search(pattern, panel, re.S):
            return panel
        time.sleep(0.2)
    raise AssertionError(f"{pattern!r} not on the panel: {panel}")


@pytest.mark.slow
def test_a_webhook_is_added_tested_and_its_delivery_shown(
    hooked_console: tuple[ConsoleUser, Receiver],
) -> None:
    user, receiver = hooked_console
    assert "Add a webhook" in user.get(ACCOUNT).text
    added = user.post(
        "/console/account/webhooks",
        {"url": receiver.url, "events": ["training.failed", "training.succeeded"]},
    )
    assert added.status_code == 201
    secret = re.search(r"<code data-secret>(whsec_[0-9a-f]+)</code>", added.text)
    assert secret and "shown only now" in added.text
    page = user.get(ACCOUNT).text
    assert receiver.url in page and secret[1] not in page  # the secret is never shown again
    assert "Told when: training.failed, training.succeeded" in page and "No deliveries yet." in page
    hook_id = re.search(r'action="/console/account/webhooks/([0-9a-f-]{36})/test"', page)[1]

    answer = user.post(f"/console/account/webhooks/{hook_id}/test")
    assert flash(user, answer).startswith("ok: Test delivery queued")
    panel = _wait_for(user, r'data-delivery-status="SUCCEEDED">\s*<td>ping</td>.*?delivered.*?HTTP 200')
    assert "hx-trigger" not in panel.split("</h2>")[0]  # nothing pending: the panel stops reloading
    body = receiver.received[0]["body"]
    assert verify(secret[1], receiver.received[0]["headers"], body) and b'"event":"ping"' in body

    deleted = user.post(f"/console/account/webhooks/{hook_id}/delete")
    assert flash(user, deleted) == "ok: Webhook deleted."
    assert receiver.url not in user.get(ACCOUNT).text


def test_a_refused_target_is_said_in_words_and_another_workspaces_webhook_is_a_404(
    make_console: ConsoleFactory,
) -> None:
    alice, bob = make_console("alice"), make_console("bob")
    refused = alice.post(
        "/console/account/webhooks", {"url": "http://10.1.2.3/hook", "events": ["training.failed"]}
    )
    assert refused.status_code == 400
    assert (
        "Refusing webhook target 10.1.2.3" in refused.text and 'value="http://10.1.2.3/hook"' in refused.text
    )
    unknown = alice.post("/console/account/webhooks", {"url": "https://example.com/h", "events": ["nope"]})
    assert unknown.status_code == 422 and 'aria-invalid="true"' in unknown.text
    bob.post("/console/account/webhooks", {"url": "https://example.com/bob", "events": ["training.failed"]})
    hook_id = re.search(r'webhooks/([0-9a-f-]{36})/test"', bob.get(ACCOUNT).text)[1]
    assert "example.com/bob" not in alice.get(ACCOUNT).text
    assert alice.post(f"/console/account/webhooks/{hook_id}/test").status_code == 404
    assert alice.post(f"/console/account/webhooks/{hook_id}/delete").status_code == 404
    assert "example.com/bob" in bob.get(ACCOUNT).text
