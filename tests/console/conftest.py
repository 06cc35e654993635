"""Console tests without a browser: the pages through the TestClient, signed in with the real form."""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from markupsafe import escape

from api.auth import create_user
from api.console.security import SessionCodec

CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')
FORM_TOKEN = re.compile(r'name="form_token" value="([^"]+)"')


@dataclass
class ConsoleUser:
    """A signed-in browser, as far as the server can tell: the session cookie and the page's CSRF token."""

    client: TestClient
    token: str
    csrf: str

    def get(self, url: str, **options: Any) -> httpx.Response:
        return self.client.get(url, follow_redirects=False, **options)

    def post(self, url: str, data: dict[str, Any] | None = None, **options: Any) -> httpx.Response:
        """A form post with this session's CSRF token (as the page's forms send it)."""
        return self.client.post(
            url, data={**(data or {}), "csrf_token": self.csrf}, follow_redirects=False, **options
        )

    @property
    def api(self) -> dict[str, str]:
        """Headers for the REST API with the same user's token."""
        return {"Authorization": f"Token {self.token}"}


def sign_in(client: TestClient, token: str) -> str:
    """Sign in through the form; returns the CSRF token of the first page."""
    form = client.get("/console/sign-in")
    response = client.post(
        "/console/sign-in",
        data={"token": token, "form_token": FORM_TOKEN.search(form.text)[1], "next": "/console/tasks"},
        follow_redirects=False,
    )
    assert response.status_code == 303, response.text
    page = client.get("/console/tasks")
    assert page.status_code == 200
    return CSRF.search(page.text)[1]


ConsoleFactory = Callable[..., ConsoleUser]


@pytest.fixture
def make_console(app: FastAPI) -> Iterator[ConsoleFactory]:
    clients: list[TestClient] = []

    def make(name: str | None = None, *, base_url: str = "http://testserver") -> ConsoleUser:
        with app.state.services.session_factory() as session:
            _, token = create_user(session, name or f"user-{uuid.uuid4().hex[:8]}")
        client = TestClient(app, base_url=base_url)
        clients.append(client)
        return ConsoleUser(client=client, token=token, csrf=sign_in(client, token))

    yield make
    for client in clients:
        client.close()


@pytest.fixture
def console(make_console: ConsoleFactory) -> ConsoleUser:
    return make_console("alice")


def console_codec(app: FastAPI) -> SessionCodec:
    """The session codec of the console mounted on ``app``."""
    mounted = next(route for route in app.routes if getattr(route, "path", "") == "/console")
    codec: SessionCodec = mounted.app.state.console_codec  # type: ignore[attr-defined]
    return codec


def location(response: httpx.Response) -> str:
    assert response.status_code in (302, 303, 307), (response.status_code, response.text[:500])
    return str(response.headers["location"])


def flash(user: ConsoleUser, response: httpx.Response) -> str:
    """Follow a form post's redirect and return the message the next page shows."""
    page = user.get(location(response))
    found = re.search(r'<p class="flash flash-(\w+)" role="\w+">([^<]*)</p>', page.text)
    assert found, page.text[:2000]
    return f"{found[1]}: {found[2]}"


def create_task(user: ConsoleUser, name: str = "Rooms", task_type: str = "multi_class") -> str:
    response = user.post("/console/tasks", {"name": name, "type": task_type})
    return location(response).rsplit("/", 1)[1]


def add_label(user: ConsoleUser, task_id: str, name: str) -> str:
    response = user.post(f"/console/tasks/{task_id}/labels", {"name": name})
    assert flash(user, response) == f"ok: Label &#39;{escape(name)}&#39; added."
    labels = user.client.get(f"/recognition/v2/label/?task={task_id}", headers=user.api).json()["results"]
    return next(label["id"] for label in labels if label["name"] == name)
