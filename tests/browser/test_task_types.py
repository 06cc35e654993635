"""In Chromium: the pages of a tagging and of a regression task (negative label, values, evaluations)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import requests
from playwright.sync_api import Page, expect

from taskvision.task_types import TaskType
from tests.browser.axe import violations
from tests.browser.conftest import (
    ARTIFACTS,
    api,
    drop_files,
    import_bundle,
    paste,
    sign_in,
    store_live_predictions,
)
from tests.support.api import b64
from tests.support.console_data import evaluated_bundle
from tests.support.images import size_image, tag_image
from tests.support.live_server import LiveServer


def _task(
    http: requests.Session, server: LiveServer, name: str, task_type: str, labels: dict[str, str]
) -> dict:  # type: ignore[type-arg]
    base = f"{server.ip_url}recognition/v2"
    task = http.post(f"{base}/task/", json={"name": name, "type": task_type}).json()
    for label, label_type in labels.items():
        created = http.post(f"{base}/label/", json={"name": label, "type": label_type}).json()
        http.post(f"{base}/task/{task['id']}/add-label", json={"label_id": created["id"]}).raise_for_status()
    return dict(http.get(f"{base}/task/{task['id']}").json())


def test_tagging_pages(page: Page, server: LiveServer, tmp_path: Path) -> None:
    token = server.new_user("tags")
    http = api(server, token)
    task = _task(http, server, "Tags", "multi_label", {"red": "tag", "striped": "tag"})
    for i in range(8):
        http.post(
            f"{server.ip_url}recognition/v2/training-image/", json={"base64": b64(tag_image(i < 4, False, i))}
        )
    sign_in(page, server, token)
    page.goto(f"{server.ip_url}console/tasks/{task['id']}/images?show=unlabelled")
    boxes = page.locator("[data-pick]")
    expect(boxes).to_have_count(8)
    boxes.nth(0).click()
    boxes.nth(3).click(modifiers=["Shift"])  # a range
    expect(page.locator("[data-selected-count]")).to_have_text("4 selected")
    page.locator("#bulk-label").select_option(label="red")
    page.get_by_role("button", name="Apply to selected").click()
    expect(page.locator(".flash-ok")).to_have_text("'red' set on 4 images.")
    page.get_by_role("button", name="Select page").click()
    expect(page.locator("[data-selected-count]")).to_have_text("4 selected")
    page.locator("#bulk-label").select_option(label="Tags (negative)")
    page.get_by_role("button", name="Apply to selected").click()
    expect(page.locator(".flash-ok")).to_have_text("'Tags (negative)' set on 4 images.")

    page.get_by_role("link", name="Labels").click()
    negative = page.get_by_role("row", name=re.compile(r"Tags \(negative\)"))
    expect(negative).to_contain_text("negative")
    expect(negative).to_contain_text("images with none of the tags")
    expect(negative.get_by_role("button", name=re.compile("Detach"))).to_have_count(0)
    # the negative label is drawn but not held to the minimum; the tags are
    expect(page.locator("svg.chart desc")).to_have_text(
        "red: 4 (16 more needed). striped: 0 (20 more needed). Tags (negative): 4. "
    )
    assert violations(page) == []

    names = [lb["name"] for lb in task["labels"] if not lb["negative_for_task"]]
    import_bundle(
        server, task["id"], evaluated_bundle(tmp_path / "tags", TaskType.MULTI_LABEL, names, seed=3)
    )
    page.goto(f"{server.ip_url}console/tasks/{task['id']}/versions/1")
    expect(page.locator(".figures")).to_contain_text("mAP")
    headers = page.locator("table thead th")
    expect(headers).to_have_text(["Label", "Precision", "Recall", "F1", "AP", "Threshold", "Support"])
    expect(page.locator("table tbody th")).to_have_text(["red", "striped"])
    assert violations(page) == []

    page.get_by_role("link", name="Try it").click()
    paste(page, text="https://example.com/photo.jpg")  # a pasted URL fills the URL field
    expect(page.get_by_label("or an image URL")).to_have_value("https://example.com/photo.jpg")
    paste(page, image=tag_image(True, True, 99))  # a pasted image replaces it
    expect(page.locator("[data-try-name]")).to_have_text("pasted.png")
    expect(page.get_by_label("or an image URL")).to_have_value("")
    page.get_by_role("button", name="Classify").click()
    expect(page.locator(".best")).to_contain_text("Tags:")
    expect(page.locator(".result-image")).to_be_visible()
    expect(page.locator(".probs li")).to_have_count(2)
    assert violations(page) == []


def test_regression_pages(page: Page, server: LiveServer, tmp_path: Path) -> None:
    token = server.new_user("ages")
    http = api(server, token)
    task = _task(http, server, "Sizes", "regression", {"radius": "value"})
    radius = task["labels"][0]["id"]
    base = f"{server.ip_url}recognition/v2/training-image"
    for i, value in enumerate((10.0, 20.0, 30.0)):
        image = http.post(f"{base}/", json={"base64": b64(size_image(int(value), i))}).json()
        http.post(
            f"{base}/{image['id']}/add-label", json={"label_id": radius, "value": value}
        ).raise_for_status()
    sign_in(page, server, token)
    page.goto(f"{server.ip_url}console/tasks/{task['id']}")
    row = page.get_by_role("row", name=re.compile("radius"))
    expect(row).to_contain_text("value label")
    expect(row).to_contain_text("10.00 \u2013 30.00")

    # two more images dropped on the page (no label: a regression value is set per image)
    page.get_by_role("link", name="Images").click()
    drop_files(
        page, "[data-upload-url] [data-dropzone]", {"a.png": size_image(12, 50), "b.png": size_image(14, 51)}
    )
    expect(page.locator("[data-upload-status]")).to_have_text("2 uploaded.")
    page.get_by_role("link", name="Show the images").click()
    expect(page.get_by_role("link", name=re.compile("^Unlabelled"))).to_contain_text("2")

    # an inline edit saves without leaving the page
    page.evaluate("() => { window.stillHere = true; }")
    field = page.locator(".value-form input[name=value]").first
    field.fill("42")
    field.press("Enter")
    expect(page.locator(".value-form .saved")).to_have_text("Saved")
    assert page.evaluate("() => window.stillHere === true")
    expect(page.locator(".value-form input[name=value]").first).to_have_value("42.0")
    assert violations(page) == []

    # a value for several images at once
    page.locator("[data-pick]").nth(1).click()
    page.locator("[data-pick]").nth(2).click()
    page.get_by_label("Action").select_option("set-value")
    page.get_by_label("Value", exact=True).fill("7")
    page.get_by_role("button", name="Apply to selected").click()
    expect(page.locator(".flash-ok")).to_have_text("Value set on 2 images.")
    values = sorted(lb["value"] for im in http.get(f"{base}/").json()["results"] for lb in im["labels"])
    assert values == [7.0, 7.0, 42.0]

    import_bundle(
        server, task["id"], evaluated_bundle(tmp_path / "sizes", TaskType.REGRESSION, ["radius"], seed=4)
    )
    labelled = [im for im in http.get(f"{base}/").json()["results"] if im["labels"]]
    targets = np.array([[im["labels"][0]["value"]] for im in labelled], dtype=np.float32)
    store_live_predictions(
        server,
        task["id"],
        1,
        [im["id"] for im in labelled],
        targets,
        targets + np.array([[1.5], [-0.5], [9.0]], dtype=np.float32),
        tolerance=4.0,
    )
    page.goto(f"{server.ip_url}console/tasks/{task['id']}/versions/1")
    expect(page.locator(".figures dt")).to_have_text(["MAE", "RMSE", "R²"])
    scatter = page.get_by_role(
        "img", name=re.compile(r"^Predicted radius against actual radius, 3 test images")
    )
    expect(scatter.locator("circle")).to_have_count(3)
    expect(scatter.locator("circle.dot-wrong")).to_have_count(1)
    expect(page.get_by_role("img", name=re.compile(r"^Absolute error of 3 test images"))).to_be_visible()
    page.locator("#reg-title").scroll_into_view_if_needed()
    page.screenshot(path=str(ARTIFACTS / "screenshots" / "regression-evaluation.png"), full_page=True)
    assert violations(page) == []
    page.get_by_role("link", name="Try it").click()
    drop_files(page, "[data-try] [data-dropzone]", {"disc.png": size_image(25, 77)})
    expect(page.locator("[data-try-name]")).to_have_text("disc.png")
    page.get_by_role("button", name="Classify").click()
    expect(page.locator(".result .figure dt")).to_have_text("radius")
    expect(page.locator(".result .figure dd")).to_have_text(re.compile(r"^-?\d+\.\d\d$"))
    assert violations(page) == []
