"""The journey of a new user, in Chromium, from sign-in to switching production back.

Sign in; create a categorization task with two labels; upload 2 x 25 generated images with the file
picker (two circles among the squares: labelling mistakes); train and watch the run reach production;
read the version's evaluation, open a confusion-matrix cell, fix a mislabelled image from the gallery
of wrong answers; retrain; accept an image from the review queue with the keyboard; try an image;
compare the versions; switch production back to the first.
"""

from __future__ import annotations

import base64
import re
from pathlib import Path

import requests
from playwright.sync_api import Page, expect

from tests.browser.axe import violations
from tests.browser.conftest import sign_in
from tests.support.images import shape_image
from tests.support.live_server import LiveServer

TRAINING_TIMEOUT_MS = 300_000


def _files(folder: Path, kind: str, count: int, *, mislabelled: int = 0, other: str = "") -> list[str]:
    """``count`` images of ``kind``, the last ``mislabelled`` of them really of ``other``."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        wrong = i >= count - mislabelled
        path = folder / f"{kind}-{i:02d}.png"
        path.write_bytes(shape_image(other, 500 + i) if wrong else shape_image(kind, 100 + i))
        paths.append(str(path))
    return paths


def _upload(page: Page, label: str, files: list[str]) -> None:
    page.get_by_label("Label for these images").select_option(label=label)
    page.locator("#upload-files").set_input_files(files)
    expect(page.locator("[data-upload-status]")).to_have_text(f"{len(files)} uploaded.", timeout=60_000)


def _train_and_wait(page: Page, version: int) -> None:
    page.get_by_role("link", name="Train", exact=True).click()
    page.get_by_role("button", name="Train", exact=True).click()
    expect(page.locator(".flash-ok")).to_have_text("Training queued.")
    expect(page.locator("#run-panel progress.overall")).to_be_attached()  # live, without a reload
    expect(page.locator("#run-panel")).to_contain_text(
        f"Version {version} is ready and in production", timeout=TRAINING_TIMEOUT_MS
    )


def _task_id(page: Page) -> str:
    found = re.search(r"/console/tasks/([0-9a-f-]{36})", page.url)
    assert found, page.url
    return found[1]


def test_a_new_user_labels_trains_evaluates_tries_and_switches_back(
    page: Page, server: LiveServer, tmp_path: Path
) -> None:
    token = server.new_user("journey")
    sign_in(page, server, token)

    # a categorization task with two labels
    page.get_by_label("Name").fill("Shapes journey")
    page.get_by_label("Categorization").check()
    page.get_by_role("button", name="Create task").click()
    expect(page.get_by_role("heading", level=1)).to_have_text("Shapes journey")
    for name in ("circle", "square"):
        page.get_by_label("New category label").fill(name)
        page.get_by_role("button", name="Add label").click()
        expect(page.locator(".flash-ok")).to_have_text(f"Label '{name}' added.")
    expect(page.locator(".blockers")).to_contain_text("'circle' has 0 image(s); at least 20 are needed")

    # 2 x 25 images through the file picker, each batch with its label
    page.get_by_role("link", name="Images").click()
    _upload(page, "circle", _files(tmp_path / "circles", "circle", 25))
    _upload(page, "square", _files(tmp_path / "squares", "square", 25, mislabelled=2, other="circle"))
    page.get_by_role("link", name="Show the images").click()
    expect(page.locator("[data-grid] li")).to_have_count(50)
    expect(page.get_by_role("link", name=re.compile(r"^In this task"))).to_contain_text("50")

    page.get_by_role("link", name="Labels").click()
    expect(page.locator(".ready")).to_contain_text("Every label has enough images")
    expect(page.locator("svg.chart desc")).to_have_text("circle: 25. square: 25. ")

    # train: the run panel follows it without a reload until the version is in production
    _train_and_wait(page, 1)
    expect(page.locator("#task-meta")).to_contain_text("production: version 1")
    assert violations(page) == []  # the train page with its finished run
    page.get_by_role("link", name="See its evaluation").click()

    # the evaluation: headline figures, the confusion matrix with named axes, per-label figures
    expect(page.get_by_role("heading", name=re.compile("Evaluation of version 1"))).to_be_visible()
    matrix = page.locator("table.confusion")
    expect(matrix.get_by_role("columnheader", name=re.compile("Predicted label"))).to_be_visible()
    expect(matrix.get_by_role("columnheader", name=re.compile("Actual label"))).to_be_visible()
    expect(matrix.get_by_role("rowheader")).to_have_text(["circle", "square"])
    expect(page.locator(".figures .figure").first).to_contain_text("Accuracy")

    # a confusion-matrix cell shows its test images
    matrix.locator('td[data-actual="circle"][data-predicted="circle"] a.count').click()
    expect(page.get_by_role("heading", name="Actual circle, predicted circle")).to_be_visible()
    expect(page.locator("ul.mistakes li").first).to_be_visible()
    # the two circles labelled square are answered circle: fix one label with a click
    page.get_by_role("link", name="Back to the mistakes").click()
    page.get_by_role("link", name=re.compile("With training images")).click()
    wrong = page.locator("ul.mistakes li").filter(has=page.locator("[data-true]", has_text="square"))
    expect(wrong.first.locator("[data-predicted]")).to_have_text("circle")
    wrong.first.get_by_role("button", name=re.compile("^Label it circle")).click()
    expect(page.locator(".flash-ok")).to_have_text("The image is now labelled 'circle'.")
    expect(page.locator(".card-fixed")).to_have_count(1)

    # retrain with the fixed label
    _train_and_wait(page, 2)

    # an app classifies with store_images; the review queue offers the image with a suggestion
    stored = base64.b64encode(shape_image("square", 7777)).decode()
    answer = requests.post(
        f"{server.ip_url}recognition/v2/classify",
        headers={"Authorization": f"Token {token}"},
        json={"task_id": _task_id(page), "records": [{"_base64": stored}], "store_images": True},
        timeout=60,
    )
    assert answer.status_code == 200, answer.text
    page.get_by_role("link", name="Review").click()
    expect(page.locator("[data-suggestion]")).to_have_text("square")
    page.keyboard.press("a")  # accept, with the keyboard
    expect(page.locator(".flash-ok")).to_have_text("Suggestion accepted.")
    expect(page.locator(".empty")).to_contain_text("No stored image waits for a label")
    expect(page.get_by_role("button", name="Retrain now")).to_be_visible()
    assert violations(page) == []  # the review page

    # try it: a circle it has never seen
    page.get_by_role("link", name="Try it").click()
    probe = tmp_path / "probe.png"
    probe.write_bytes(shape_image("circle", 9999))
    page.get_by_label("Choose an image").set_input_files(str(probe))
    expect(page.locator("[data-try-preview]")).to_be_visible()
    page.get_by_role("button", name="Classify").click()
    expect(page.locator(".best")).to_contain_text("Best label: circle")
    expect(page.locator(".probs li")).to_have_count(2)

    # the second version compared with the first, then production back to version 1
    page.get_by_role("link", name="Versions").click()
    expect(page.locator("table.versions tbody tr")).to_have_count(2)
    page.get_by_role("button", name="Compare").click()
    expect(page.get_by_role("heading", name="Version 1 and version 2")).to_be_visible()
    page.get_by_role("link", name="All versions").click()
    page.get_by_role("button", name="Make version 1 production").click()
    expect(page.locator(".flash-ok")).to_have_text("Version 1 is now in production.")
    expect(page.locator("tr.is-production")).to_contain_text("version 1")

    # the REST API agrees
    tasks = requests.get(
        f"{server.ip_url}recognition/v2/task/", headers={"Authorization": f"Token {token}"}, timeout=10
    ).json()["results"]
    assert [(t["name"], t["production_version"]) for t in tasks] == [("Shapes journey", 1)]
