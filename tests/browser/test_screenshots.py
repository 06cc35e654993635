"""The README's screenshots of the console, taken from the running app.

Always written to ``var/test-artifacts/screenshots/``; with ``UPDATE_SCREENSHOTS=1`` also to
``docs/`` (the files the README shows): ``UPDATE_SCREENSHOTS=1 pytest tests/browser -k screenshots``.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

from playwright.sync_api import Page, expect

from taskvision.task_types import TaskType
from tests.browser.conftest import ARTIFACTS, api, import_bundle, sign_in
from tests.support.api import b64
from tests.support.console_data import evaluated_bundle
from tests.support.images import image_bytes, shape_image
from tests.support.live_server import LiveServer

DOCS = Path(__file__).resolve().parents[2] / "docs"
SIZE = {"width": 1280, "height": 800}


def _save(page: Page, name: str) -> None:
    targets = [ARTIFACTS / "screenshots" / name]
    if os.environ.get("UPDATE_SCREENSHOTS") == "1":
        targets.append(DOCS / name)
    for target in targets:
        target.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(target))
        width, height = struct.unpack(">II", target.read_bytes()[16:24])  # the PNG's IHDR
        assert (width, height) == (SIZE["width"], SIZE["height"])


def test_readme_screenshots(page: Page, server: LiveServer, tmp_path: Path) -> None:
    token = server.new_user("screens")
    http = api(server, token)
    base = f"{server.ip_url}recognition/v2"
    task = http.post(f"{base}/task/", json={"name": "Shapes", "type": "multi_class"}).json()
    counts = {"circle": 24, "square": 22, "mixed": 9}  # "mixed" is short of the minimum of 20
    for name, count in counts.items():
        label = http.post(f"{base}/label/", json={"name": name, "type": "category"}).json()
        http.post(f"{base}/task/{task['id']}/add-label", json={"label_id": label["id"]}).raise_for_status()
        for i in range(count):
            data = image_bytes(700 + i, size=(96, 96)) if name == "mixed" else shape_image(name, 700 + i)
            image = http.post(f"{base}/training-image/", json={"base64": b64(data)}).json()
            http.post(f"{base}/training-image/{image['id']}/add-label", json={"label_id": label["id"]})
    bundle = evaluated_bundle(
        tmp_path / "b", TaskType.MULTI_CLASS, list(counts), seed=5, test_images=60, skill=1.6
    )
    import_bundle(server, task["id"], bundle)
    sign_in(page, server, token)
    page.set_viewport_size(SIZE)
    url = f"{server.ip_url}console/tasks/{task['id']}"

    page.goto(url)
    expect(page.locator(".blockers")).to_contain_text("'mixed' has 9 image(s)")
    _save(page, "console-labels.png")

    page.goto(f"{url}/images?show=all")
    boxes = page.locator("[data-pick]")
    boxes.nth(9).click()
    boxes.nth(12).click(modifiers=["Shift"])
    expect(page.locator("[data-selected-count]")).to_have_text("4 selected")
    page.evaluate("() => window.scrollTo(0, document.querySelector('nav.filters').offsetTop - 12)")
    page.wait_for_function(
        "() => [...document.querySelectorAll('[data-grid] img')].slice(0, 21).every(i => i.complete)"
    )
    _save(page, "console-images.png")

    page.goto(f"{url}/versions/1")
    expect(page.locator("table.confusion")).to_be_visible()
    _save(page, "console-evaluation.png")
