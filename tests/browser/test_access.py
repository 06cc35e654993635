"""In Chromium: no serious accessibility violation on any page, phone width, and the keyboard alone."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest
from playwright.sync_api import Page, expect

from tests.browser.axe import violations
from tests.browser.conftest import PHONE, SharedTask, sign_in
from tests.support.images import tag_image
from tests.support.live_server import LiveServer


def _pages(server: LiveServer, task: SharedTask) -> dict[str, str]:
    base = f"{server.ip_url}console/tasks/{task.task_id}"
    return {
        "tasks": f"{server.ip_url}console/tasks",
        "labels": base,
        "images": f"{base}/images",
        "train": f"{base}/train",
        "versions": f"{base}/versions",
        "evaluation": f"{base}/versions/1",
        "try": f"{base}/try",
        "delete": f"{base}/delete",
        "account": f"{server.ip_url}console/account",
        "not found": f"{base}/versions/99",
    }


def _try_an_image(page: Page, tmp_path: Path) -> None:
    probe = tmp_path / "probe.png"
    probe.write_bytes(tag_image(True, False, 1))
    page.get_by_label("Choose an image").set_input_files(str(probe))
    page.get_by_role("button", name="Classify").click()
    expect(page.locator(".result")).to_be_visible()


def test_no_page_has_a_serious_or_critical_accessibility_violation(
    new_page: Callable[..., Page], server: LiveServer, shapes: SharedTask, tmp_path: Path
) -> None:
    page = new_page()
    page.goto(f"{server.ip_url}console/sign-in")
    found = {"sign-in": violations(page)}
    sign_in(page, server, shapes.token)
    for name, url in _pages(server, shapes).items():
        page.goto(url)
        found[name] = violations(page)
    page.goto(_pages(server, shapes)["try"])
    _try_an_image(page, tmp_path)
    found["try with an answer"] = violations(page)
    assert {name: v for name, v in found.items() if v} == {}


@pytest.mark.parametrize(
    "name", ["tasks", "labels", "images", "train", "versions", "evaluation", "try", "account"]
)
def test_pages_fit_a_phone_screen(
    new_page: Callable[..., Page], server: LiveServer, shapes: SharedTask, name: str
) -> None:
    page = new_page(viewport=PHONE, is_mobile=True, has_touch=True)
    sign_in(page, server, shapes.token)
    page.goto(_pages(server, shapes)[name])
    # nothing wider than the screen: the page never scrolls sideways (wide tables scroll in their own box)
    assert page.evaluate("() => document.documentElement.scrollWidth") <= PHONE["width"]
    expect(page.get_by_role("heading", level=1)).to_be_in_viewport()
    if name == "images":
        expect(page.get_by_text("Choose files")).to_be_visible()
        box = page.locator("[data-grid] li").first.bounding_box()
        assert box is not None and box["width"] >= 100  # thumbnails stay big enough to tell apart
    if name == "evaluation":
        expect(page.locator("table.confusion")).to_be_visible()


def _tab_to(page: Page, selector: str, *, limit: int = 80, backwards: bool = False) -> None:
    """Press Tab (or Shift+Tab) until the element matching ``selector`` has the focus."""
    for _ in range(limit):
        if page.evaluate("s => document.activeElement && document.activeElement.matches(s)", selector):
            return
        page.keyboard.press("Shift+Tab" if backwards else "Tab")
    raise AssertionError(f"{selector} never got the focus with the keyboard")


def test_the_main_flow_works_with_the_keyboard_alone(page: Page, server: LiveServer, tmp_path: Path) -> None:
    """Sign in, create a tagging task, add a tag, upload, select two images, tag them, train: keys only."""
    token = server.new_user("keyboard")
    # Playwright subscribes to file-chooser events without waiting for the browser's reply, so a
    # listener added just before the key press can lose that race on a busy machine: subscribe now.
    page.on("filechooser", lambda _: None)
    page.goto(f"{server.ip_url}console/sign-in")
    page.keyboard.type(token)  # the token field has the focus
    page.keyboard.press("Enter")
    page.wait_for_url(re.compile(r"/console/tasks$"))

    page.keyboard.press("Tab")
    expect(page.get_by_role("link", name="Skip to content")).to_be_focused()
    page.keyboard.press("Enter")
    _tab_to(page, "#task-name")
    page.keyboard.type("Keyboard tags")
    _tab_to(page, "#type-multi_class")
    page.keyboard.press("ArrowDown")  # radio group: the next type, Tagging
    expect(page.get_by_label("Tagging")).to_be_checked()
    _tab_to(page, "button.button-primary")
    page.keyboard.press("Enter")
    expect(page.get_by_role("heading", level=1)).to_have_text("Keyboard tags")

    _tab_to(page, "#new-label")
    page.keyboard.type("red")
    page.keyboard.press("Enter")
    expect(page.locator(".flash-ok")).to_have_text("Label 'red' added.")

    _tab_to(page, 'nav.tabs a[href$="/images"]')
    page.keyboard.press("Enter")
    page.wait_for_url(re.compile(r"/images$"))
    files = []
    for i in range(3):
        path = tmp_path / f"red-{i}.png"
        path.write_bytes(tag_image(True, False, 40 + i))
        files.append(str(path))
    _tab_to(page, "#upload-files")
    with page.expect_file_chooser() as chooser:
        page.keyboard.press("Space")
    chooser.value.set_files(files)
    expect(page.locator("[data-upload-status]")).to_have_text("3 uploaded.")
    _tab_to(page, "[data-upload-done] a")
    page.keyboard.press("Enter")
    page.wait_for_url(re.compile(r"show=all"))
    _tab_to(page, "nav.filters a:nth-child(2)")
    page.keyboard.press("Enter")
    page.wait_for_url(re.compile(r"show=unlabelled"))
    _tab_to(page, "[data-pick]")
    page.keyboard.press("Space")
    page.keyboard.press("Tab")
    page.keyboard.press("Space")
    expect(page.locator("[data-selected-count]")).to_have_text("2 selected")
    _tab_to(page, "#bulk-label", backwards=True)
    page.keyboard.press("Tab")
    expect(page.get_by_role("button", name="Apply to selected")).to_be_focused()
    page.keyboard.press("Enter")
    expect(page.locator(".flash-ok")).to_have_text("'red' set on 2 images.")

    _tab_to(page, 'nav.tabs a[href$="/train"]')
    page.keyboard.press("Enter")
    page.wait_for_url(re.compile(r"/train$"))
    _tab_to(page, "form button.button-primary")
    page.keyboard.press("Enter")
    # two images of one tag cannot train: the request is refused at once, in words, with links
    refusal = page.locator(".refusal")
    expect(refusal).to_contain_text("label 'red' has 2 images; at least 20 are needed")
    expect(refusal.get_by_role("link", name="the images of 'red'")).to_be_visible()
    assert violations(page) == []  # the train page with the refusal
