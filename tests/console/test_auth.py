"""Signing in and out, what the session cookie is, CSRF, and the REST API's indifference to cookies."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from api.auth import rotate_token
from api.console.security import SESSION_COOKIE
from api.settings import Settings
from tests.console.conftest import FORM_TOKEN, ConsoleUser, console_codec, create_task, location


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    """Sessions and headers do not depend on the database: the embedded deployment is enough here."""
    return Settings(data_dir=tmp_path)


def _sign_in_response(client: TestClient, token: str, next_url: str = "/console/tasks") -> object:
    form = client.get("/console/sign-in")
    return client.post(
        "/console/sign-in",
        data={"token": token, "form_token": FORM_TOKEN.search(form.text)[1], "next": next_url},
        follow_redirects=False,
    )


def test_the_site_root_leads_to_the_console_and_its_pages_to_the_sign_in(anonymous: TestClient) -> None:
    for root in ("/", "/console", "/console/"):
        assert location(anonymous.get(root, follow_redirects=False)) == "/console/tasks"
    answer = anonymous.get("/console/tasks/abc/images?page=2", follow_redirects=False)
    assert location(answer) == "/console/sign-in?next=%2Fconsole%2Ftasks%2Fabc%2Fimages%3Fpage%3D2"
    page = anonymous.get("/console/sign-in")
    assert page.status_code == 200 and "API token" in page.text


def test_sign_in_gives_a_signed_http_only_strict_cookie_scoped_to_the_console(
    app: FastAPI, client: TestClient
) -> None:
    browser = TestClient(app)
    answer = _sign_in_response(browser, client.token, "/console/account")  # type: ignore[attr-defined]
    assert location(answer) == "/console/account"  # type: ignore[arg-type]
    cookie = next(v for v in answer.headers.get_list("set-cookie") if v.startswith(f"{SESSION_COOKIE}="))  # type: ignore[attr-defined]
    attributes = {part.strip().split("=")[0].lower() for part in cookie.split(";")[1:]}
    assert {"httponly", "path", "samesite", "max-age"} <= attributes and "secure" not in attributes
    assert "Path=/console" in cookie and "SameSite=strict" in cookie and "Max-Age=28800" in cookie
    assert client.token not in cookie  # type: ignore[attr-defined]  # the token itself is never in it
    assert "alice" in browser.get("/console/account").text


def test_behind_https_the_cookie_is_secure(app: FastAPI, client: TestClient) -> None:
    browser = TestClient(app, base_url="https://console.example")
    answer = _sign_in_response(browser, client.token)  # type: ignore[attr-defined]
    cookie = next(v for v in answer.headers.get_list("set-cookie") if v.startswith(f"{SESSION_COOKIE}="))  # type: ignore[attr-defined]
    assert "Secure" in cookie


def test_a_wrong_token_is_told_and_signs_nobody_in(app: FastAPI) -> None:
    browser = TestClient(app)
    answer = _sign_in_response(browser, "0" * 40)
    assert answer.status_code == 401  # type: ignore[attr-defined]
    assert "That is not a valid API token." in answer.text  # type: ignore[attr-defined]
    assert SESSION_COOKIE not in browser.cookies
    assert location(browser.get("/console/tasks", follow_redirects=False)).startswith("/console/sign-in")


def test_the_sign_in_form_needs_its_own_token(app: FastAPI, client: TestClient) -> None:
    """Login CSRF: a form posted from elsewhere lacks the double-submit value and signs nobody in."""
    browser = TestClient(app)
    answer = browser.post("/console/sign-in", data={"token": client.token}, follow_redirects=False)  # type: ignore[attr-defined]
    assert answer.status_code == 400 and SESSION_COOKIE not in browser.cookies


def test_after_sign_in_only_console_paths_are_followed(app: FastAPI, client: TestClient) -> None:
    for target in (
        "https://evil.example/",
        "//evil.example/console/",
        "/recognition/v2/task/",
        "/console\\x",
    ):
        browser = TestClient(app)
        assert location(_sign_in_response(browser, client.token, target)) == "/console/tasks"  # type: ignore[arg-type, attr-defined]


def test_a_tampered_or_expired_cookie_is_no_session(app: FastAPI, console: ConsoleUser) -> None:
    value = console.client.cookies[SESSION_COOKIE]
    payload, signature = value.split(".")
    for forged in (f"{payload}x.{signature}", f"{payload}.{'0' * len(signature)}", "garbage", ""):
        browser = TestClient(app, cookies={SESSION_COOKIE: forged})
        assert location(browser.get("/console/tasks", follow_redirects=False)).startswith("/console/sign-in")
    codec = console_codec(app)
    claims = codec.read(value)
    assert claims is not None
    old, _ = codec.issue(claims.token_id, now=1_000_000)  # expired decades ago
    expired = TestClient(app, cookies={SESSION_COOKIE: old})
    assert location(expired.get("/console/tasks", follow_redirects=False)).startswith("/console/sign-in")


def test_sign_out_ends_the_session_even_for_a_copied_cookie(app: FastAPI, console: ConsoleUser) -> None:
    copied = console.client.cookies[SESSION_COOKIE]
    answer = console.post("/console/sign-out")
    assert location(answer) == "/console/sign-in"
    assert SESSION_COOKIE not in console.client.cookies
    replay = TestClient(app, cookies={SESSION_COOKIE: copied})
    assert location(replay.get("/console/tasks", follow_redirects=False)).startswith("/console/sign-in")


def test_rotating_the_token_ends_its_sessions(app: FastAPI, console: ConsoleUser) -> None:
    with app.state.services.session_factory() as session:
        rotate_token(session, "alice")
    assert location(console.get("/console/tasks")).startswith("/console/sign-in")


def test_a_post_without_the_csrf_token_is_refused(console: ConsoleUser) -> None:
    for data in ({"name": "x", "type": "multi_class"}, {"name": "x", "csrf_token": "wrong"}):
        answer = console.client.post("/console/tasks", data=data, follow_redirects=False)
        assert answer.status_code == 403 and "did not come from this console" in answer.text
    assert console.client.get("/recognition/v2/task/", headers=console.api).json()["count"] == 0
    # the header htmx and console.js send works as well as the form field
    answer = console.client.post(
        "/console/tasks",
        data={"name": "by header", "type": "multi_class"},
        headers={"X-CSRF-Token": console.csrf},
        follow_redirects=False,
    )
    assert answer.status_code == 303
    assert console.client.get("/recognition/v2/task/", headers=console.api).json()["count"] == 1


def test_a_post_from_another_site_is_refused_even_with_the_token(console: ConsoleUser) -> None:
    answer = console.client.post(
        "/console/tasks",
        data={"name": "x", "type": "multi_class", "csrf_token": console.csrf},
        headers={"Origin": "https://evil.example"},
        follow_redirects=False,
    )
    assert answer.status_code == 403 and "another site" in answer.text


def test_the_session_cookie_never_authorizes_a_rest_call(app: FastAPI, console: ConsoleUser) -> None:
    cookie = f"{SESSION_COOKIE}={console.client.cookies[SESSION_COOKIE]}"
    rest = TestClient(app)
    for method, url in (
        ("GET", "/recognition/v2/task/"),
        ("POST", "/recognition/v2/task/"),
        ("GET", "/account/v2/user"),
    ):
        answer = rest.request(method, url, headers={"Cookie": cookie}, json={"name": "x"})
        assert answer.status_code == 401 and answer.json()["code"] == "not_authenticated"


def test_every_console_answer_carries_a_strict_content_security_policy(
    console: ConsoleUser, anonymous: TestClient
) -> None:
    for answer in (
        console.get("/console/tasks"),
        console.get("/console/tasks/missing"),
        console.get("/console/static/console.js"),
        anonymous.get("/console/sign-in"),
    ):
        policy = answer.headers["content-security-policy"]
        assert "script-src 'self'" in policy and "unsafe-inline" not in policy and "unsafe-eval" not in policy
        assert "frame-ancestors 'none'" in policy and answer.headers["x-content-type-options"] == "nosniff"
    assert "content-security-policy" not in anonymous.get("/healthz").headers  # the REST API is unchanged


def test_names_are_escaped_in_every_page(console: ConsoleUser) -> None:
    hostile = "<img src=x onerror=alert(1)>\"'&"
    task_id = create_task(console, name=hostile)
    console.post(f"/console/tasks/{task_id}/labels", {"name": hostile})
    for path in (
        "/console/tasks",
        f"/console/tasks/{task_id}",
        f"/console/tasks/{task_id}/images",
        f"/console/tasks/{task_id}/delete",
    ):
        html = console.get(path).text
        assert "<img src=x" not in html, path
        assert "&lt;img src=x onerror=alert(1)&gt;&#34;&#39;&amp;" in html, path
    assert re.search(r"<title>&lt;img src=x", console.get(f"/console/tasks/{task_id}").text)


def test_a_signed_in_user_skips_the_sign_in_page(console: ConsoleUser) -> None:
    assert location(console.get("/console/sign-in?next=/console/account")) == "/console/account"
