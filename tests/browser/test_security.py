"""In Chromium: hostile names run no script, forms need their CSRF token, the cookie is no API key."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import requests
from playwright.sync_api import Page, expect

from tests.browser.conftest import sign_in
from tests.support.images import shape_image
from tests.support.live_server import LiveServer

HOSTILE = "<img src=x onerror=alert(1)>"


def _watch_for_scripts(page: Page) -> list[str]:
    """Record every dialog (what alert(1) would open) and console error about blocked inline script."""
    ran: list[str] = []
    page.on("dialog", lambda dialog: (ran.append(dialog.message), dialog.dismiss()))
    return ran


def test_a_label_named_like_markup_is_shown_as_text_and_runs_nothing(
    new_page: Callable[..., Page], server: LiveServer, tmp_path: Path
) -> None:
    token = server.new_user("xss")
    image = tmp_path / f"{HOSTILE}.png"
    image.write_bytes(shape_image("circle", 1))
    task_url = ""
    # twice: with the CSP, and with the CSP bypassed, so that escaping alone is shown to suffice
    for bypass in (False, True):
        page = new_page(bypass_csp=bypass)
        ran = _watch_for_scripts(page)
        sign_in(page, server, token)
        if not bypass:
            page.get_by_label("Name").fill(HOSTILE)
            page.get_by_role("button", name="Create task").click()
            task_url = page.url
            page.get_by_label("New category label").fill(HOSTILE)
            page.get_by_role("button", name="Add label").click()
            expect(page.locator(".flash-ok")).to_have_text(f"Label '{HOSTILE}' added.")
            page.get_by_role("link", name="Images").click()
            page.get_by_label("Label for these images").select_option(label=HOSTILE)
            page.locator("#upload-files").set_input_files(str(image))
            expect(page.locator("[data-upload-status]")).to_have_text("1 uploaded.")
        for path in ("", "/images", "/train", "/versions", "/try", "/delete"):
            page.goto(task_url + path)
            expect(page.get_by_role("heading", level=1)).to_have_text(HOSTILE)
            assert page.locator('img[src="x"]').count() == 0, path
        page.goto(task_url + "/images")
        expect(page.locator(".chip").first).to_have_text(HOSTILE)
        expect(page.locator("[data-grid] img")).to_have_attribute("alt", f"{HOSTILE}.png")
        page.goto(f"{server.ip_url}console/tasks")
        expect(page.get_by_role("link", name=HOSTILE, exact=True)).to_be_visible()
        assert ran == [], f"a script ran (CSP bypassed: {bypass}): {ran}"


def test_csrf_and_cookies_protect_the_console_and_never_open_the_api(page: Page, server: LiveServer) -> None:
    token = server.new_user("csrf")
    sign_in(page, server, token)
    # HttpOnly: the page's scripts cannot read the session cookie
    assert "tv_session" not in page.evaluate("() => document.cookie")
    # a state-changing request from the page without the CSRF token is refused...
    status = page.evaluate(
        """async () => (await fetch('/console/tasks', {method: 'POST',
             body: new URLSearchParams({name: 'forged', type: 'multi_class'})})).status"""
    )
    assert status == 403
    # ...the cookie alone does not open the REST API...
    assert page.evaluate("async () => (await fetch('/recognition/v2/task/')).status") == 401
    assert (
        page.evaluate("async () => (await fetch('/account/v2/user', {credentials: 'include'})).status") == 401
    )
    # ...and a form another site submits to the console arrives without the cookie (SameSite=Strict)
    other_site = f"http://localhost:{server.port}/healthz"  # localhost and 127.0.0.1 are different sites
    page.goto(other_site)
    page.evaluate(
        """target => { const f = document.createElement('form'); f.method = 'POST'; f.action = target;
             for (const [k, v] of [['name', 'cross-site'], ['type', 'multi_class']]) {
               const i = document.createElement('input'); i.name = k; i.value = v; f.appendChild(i); }
             document.body.appendChild(f); f.submit(); }""",
        f"{server.ip_url}console/tasks",
    )
    page.wait_for_load_state()
    expect(page).to_have_url(re.compile(r"/console/sign-in"))
    tasks = requests.get(
        f"{server.ip_url}recognition/v2/task/", headers={"Authorization": f"Token {token}"}, timeout=10
    ).json()
    assert tasks["count"] == 0
    # signing out ends the session in this browser
    page.goto(f"{server.ip_url}console/tasks")
    page.get_by_role("button", name="Sign out").click()
    expect(page.locator(".flash-ok")).to_have_text("You are signed out.")
    page.goto(f"{server.ip_url}console/tasks")
    expect(page).to_have_url(re.compile(r"/console/sign-in\?next="))
