"""The README's screenshots of the console, taken from the running app.

Always written to ``var/test-artifacts/screenshots/``; with ``UPDATE_SCREENSHOTS=1`` also to
``docs/`` (the files the README shows, in 256 colours to keep the repository small):
``UPDATE_SCREENSHOTS=1 pytest tests/browser -k screenshots``.
"""

from __future__ import annotations

import os
import re
import struct
from pathlib import Path

import numpy as np
from PIL import Image
from playwright.sync_api import Page, expect

from taskvision.metrics import classification_metrics
from taskvision.task_types import TaskType
from tests.browser.axe import violations
from tests.browser.conftest import ARTIFACTS, api, import_bundle, sign_in, store_live_predictions
from tests.support.api import b64
from tests.support.console_data import evaluated_bundle
from tests.support.images import image_bytes, shape_image
from tests.support.live_server import LiveServer

DOCS = Path(__file__).resolve().parents[2] / "docs"
SIZE = {"width": 1280, "height": 800}


def _save(page: Page, name: str) -> None:
    shot = ARTIFACTS / "screenshots" / name
    shot.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(shot))
    width, height = struct.unpack(">II", shot.read_bytes()[16:24])  # the PNG's IHDR
    assert (width, height) == (SIZE["width"], SIZE["height"])
    if os.environ.get("UPDATE_SCREENSHOTS") == "1":
        # the repository's copy in 256 colours (a third of the bytes; flat UI colours stay exact)
        with Image.open(shot) as image:
            palette = image.convert("RGB").quantize(
                256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE
            )
            DOCS.mkdir(exist_ok=True)
            palette.save(DOCS / name, optimize=True)


def test_readme_screenshots(page: Page, server: LiveServer, tmp_path: Path) -> None:
    token = server.new_user("screens")
    http = api(server, token)
    base = f"{server.ip_url}recognition/v2"
    task = http.post(f"{base}/task/", json={"name": "Shapes", "type": "multi_class"}).json()
    counts = {"circle": 24, "square": 22, "mixed": 9}  # "mixed" is short of the minimum of 20
    ids, truth = [], []
    for index, (name, count) in enumerate(counts.items()):
        label = http.post(f"{base}/label/", json={"name": name, "type": "category"}).json()
        http.post(f"{base}/task/{task['id']}/add-label", json={"label_id": label["id"]}).raise_for_status()
        for i in range(count):
            data = image_bytes(700 + i, size=(96, 96)) if name == "mixed" else shape_image(name, 700 + i)
            image = http.post(
                f"{base}/training-image/", json={"base64": b64(data), "test_image": len(ids) % 3 == 0}
            ).json()
            http.post(f"{base}/training-image/{image['id']}/add-label", json={"label_id": label["id"]})
            ids.append(image["id"])
            truth.append(index)
    bundle = evaluated_bundle(tmp_path / "b", TaskType.MULTI_CLASS, list(counts), seed=5)
    import_bundle(server, task["id"], bundle)
    # its evaluation: a made-up, mostly right model's answers on the test images and, out of fold, the others
    rng = np.random.default_rng(5)
    targets = np.array(truth)
    logits = rng.normal(0, 1, size=(len(ids), len(counts)))
    logits[np.arange(len(ids)), targets] += 1.6
    probs = (np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)).astype(np.float32)
    test = np.arange(len(ids)) % 3 == 0
    kept = store_live_predictions(
        server,
        task["id"],
        1,
        [i for i, t in zip(ids, test, strict=True) if t],
        targets[test],
        probs[test],
        metrics=classification_metrics(targets[test], probs[test], list(counts)),
    )
    train = [i for i, t in zip(ids, test, strict=True) if not t]
    store_live_predictions(
        server, task["id"], 1, train, targets[~test], probs[~test], split="train", append=kept
    )
    # an app classified six new photos and kept them: the review queue
    for i in range(6):
        data = shape_image("circle" if i % 2 else "square", 900 + i) if i < 4 else image_bytes(900 + i)
        http.post(
            f"{base}/classify",
            json={"task_id": task["id"], "records": [{"_base64": b64(data)}], "store_images": True},
        ).raise_for_status()
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

    page.get_by_role("link", name=re.compile("^Wrong in the last evaluation")).click()
    expect(page.locator("[data-pick]")).to_have_count(4)  # the test images version 1 answered wrong
    page.get_by_role("link", name=re.compile(r"^With training images")).click()
    expect(page.locator("[data-pick]")).to_have_count(12)
    assert violations(page) == []

    page.goto(f"{url}/versions/1")
    expect(page.locator("table.confusion a.count").first).to_be_visible()
    page.evaluate(
        "() => window.scrollTo(0, document.getElementById('eval-title').closest('section').offsetTop - 12)"
    )
    _save(page, "console-evaluation.png")

    page.goto(f"{url}/versions/1?split=all")
    page.evaluate("() => window.scrollTo(0, document.getElementById('mistakes').offsetTop - 12)")
    page.wait_for_function("() => [...document.querySelectorAll('ul.mistakes img')].every(i => i.complete)")
    expect(page.locator("ul.mistakes li").first).to_contain_text("Label it")
    _save(page, "console-mistakes.png")

    page.goto(f"{url}/review")
    expect(page.locator("[data-suggestion]")).to_be_visible()
    _save(page, "console-review.png")
