"""Browser tests of the web console: Playwright (Python) drives Debian's Chromium against the real server.

One ``taskvision serve`` (uvicorn, its own data directory) and one Chromium serve every test of this
folder. Tests that only read pages share ``shapes``: a categorization task with images and a version
(imported, with metrics: the journey is what trains). Each test gets a fresh browser context (no
cookies), signed in as a user of its own where it matters.

Playwright cannot download its own browser here; it runs ``/usr/bin/chromium`` (``apt-get install
chromium``; ``.ci/run`` installs it). Without it, or without the playwright package, every test of
the folder is skipped with one reason. A failing test leaves a screenshot in ``var/test-artifacts/``.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import requests

from tests.conftest import SUMMARY_LINES
from tests.support.live_server import TASKVISION, LiveServer, running_server

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page

CHROMIUM = Path(os.environ.get("CHROMIUM", "/usr/bin/chromium"))  # another path: CHROMIUM=...
CHROMIUM_ARGS = [
    "--no-sandbox",  # the tests may run as root
    "--headless",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
ARTIFACTS = Path(__file__).resolve().parents[2] / "var" / "test-artifacts"
DESKTOP = {"width": 1280, "height": 900}
PHONE = {"width": 390, "height": 844}
TIMEOUT_MS = 15_000


try:
    import playwright.sync_api  # noqa: F401

    PLAYWRIGHT_MISSING = ""
except ImportError:  # the dev extra brings it; without it these modules cannot even be imported
    PLAYWRIGHT_MISSING = "the playwright package is missing (pip install playwright)"
    collect_ignore_glob = ["test_*.py"]


def _missing() -> str | None:
    if PLAYWRIGHT_MISSING:
        return PLAYWRIGHT_MISSING
    if not CHROMIUM.exists():
        return f"Chromium not found at {CHROMIUM} (apt-get install chromium, or set CHROMIUM=path)"
    return None


_not_run: list[str] = []


def _say_not_run(config: pytest.Config, line: str) -> None:
    """One line for the terminal summary; a pytest-xdist worker hands it to the controller, which
    prints it (``tests/conftest.py``): a worker's own summary is not shown."""
    _not_run.append(line)
    if hasattr(config, "workeroutput"):
        config.workeroutput.setdefault(SUMMARY_LINES, []).append(line)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark this folder's tests; without a browser, set them aside and say why once (terminal summary)."""
    here = Path(__file__).parent
    ours = [item for item in items if Path(str(item.fspath)).is_relative_to(here)]
    for item in ours:
        item.add_marker(pytest.mark.browser)
        item.add_marker(pytest.mark.slow)
    reason = _missing()
    if PLAYWRIGHT_MISSING:
        _say_not_run(config, f"browser tests not run: {PLAYWRIGHT_MISSING}")
    elif reason and ours:
        config.hook.pytest_deselected(items=ours)
        items[:] = [item for item in items if item not in ours]
        _say_not_run(config, f"{len(ours)} browser tests not run: {reason}")


def pytest_terminal_summary(terminalreporter: Any) -> None:
    for line in _not_run:
        terminalreporter.write_line(line)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    setattr(item, f"report_{report.when}", report)
    return report


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    with running_server(tmp_path_factory.mktemp("console-browser")) as live:
        yield live


@pytest.fixture(scope="session")
def browser() -> Iterator[Browser]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def new_page(browser: Browser, request: pytest.FixtureRequest) -> Iterator[Callable[..., Page]]:
    """Open pages in fresh contexts (desktop size unless told); a failing test leaves screenshots."""
    pages: list[Page] = []

    def open_page(viewport: dict[str, int] | None = None, **options: Any) -> Page:
        context = browser.new_context(viewport=viewport or DESKTOP, **options)
        context.set_default_timeout(TIMEOUT_MS)
        page = context.new_page()
        pages.append(page)
        return page

    yield open_page
    failed = any(
        getattr(request.node, f"report_{when}", None) is not None
        and getattr(request.node, f"report_{when}").failed
        for when in ("setup", "call")
    )
    for i, page in enumerate(pages):
        if failed:
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            name = re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.nodeid)[-150:]
            path = ARTIFACTS / f"{name}-{i}.png"
            try:
                page.screenshot(path=str(path), full_page=True)
                print(f"screenshot of the failure: {path}")
            except Exception as exc:  # the page may be gone; the failure itself matters more
                print(f"no screenshot: {exc}")
        page.context.close()


@pytest.fixture
def page(new_page: Callable[..., Page]) -> Page:
    return new_page()


def sign_in(page: Page, server: LiveServer, token: str) -> None:
    page.goto(f"{server.ip_url}console/sign-in")
    page.get_by_label("API token").fill(token)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(re.compile(r".*/console/tasks$"))


_DATA_TRANSFER = """([files, text]) => {
  const transfer = new DataTransfer();
  for (const [name, b64, type] of files) {
    const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
    transfer.items.add(new File([bytes], name, {type}));
  }
  if (text) transfer.setData("text/plain", text);
  return transfer;
}"""


def drop_files(page: Page, selector: str, files: dict[str, bytes]) -> None:
    """Drag files from the desktop onto ``selector`` (dragenter, dragover, drop, as a browser does)."""
    import base64

    transfer = page.evaluate_handle(
        _DATA_TRANSFER, [[(n, base64.b64encode(d).decode(), "image/png") for n, d in files.items()], ""]
    )
    for kind in ("dragenter", "dragover", "drop"):
        page.dispatch_event(selector, kind, {"dataTransfer": transfer})


def paste(page: Page, *, image: bytes | None = None, text: str = "") -> None:
    """Paste into the page: an image (as a copied screenshot would be) or text."""
    import base64

    files = [("pasted.png", base64.b64encode(image).decode(), "image/png")] if image else []
    page.evaluate(
        f"""args => document.dispatchEvent(new ClipboardEvent("paste",
              {{clipboardData: ({_DATA_TRANSFER})(args), bubbles: true, cancelable: true}}))""",
        [files, text],
    )


# ---- a task with a version, shared by the tests that only read it ---------------------------------


@dataclass(frozen=True)
class SharedTask:
    token: str
    task_id: str
    name: str


def api(server: LiveServer, token: str) -> requests.Session:
    session = requests.Session()
    session.headers["Authorization"] = f"Token {token}"
    return session


def store_live_predictions(
    server: LiveServer,
    task_id: str,
    version: int,
    image_ids: list[str],
    targets: Any,
    outputs: Any,
    *,
    metrics: dict[str, Any] | None = None,
    **options: Any,
) -> list[dict[str, Any]]:
    """Per-image predictions for a version of the running server (``console_data.store_predictions``),
    written into its data directory as the register step would have; ``metrics`` replace the
    version's (so that they tell the same story as the predictions)."""
    from sqlalchemy import create_engine, select
    from sqlalchemy.orm import Session

    from api.db.models import Model
    from api.settings import Settings
    from tests.support.console_data import store_predictions

    settings = Settings(data_dir=server.data_dir, database_url=None, storage_url=None)
    engine = create_engine(settings.effective_database_url)
    try:
        with Session(engine) as session:
            model = session.scalar(select(Model).where(Model.task_id == task_id, Model.version == version))
            assert model is not None and model.bundle_uri, (
                f"version {version} of task {task_id} has no bundle"
            )
            uri = model.bundle_uri
            if metrics is not None:
                model.metrics = metrics
                session.commit()
    finally:
        engine.dispose()
    return store_predictions(settings.open_blob_store(), uri, image_ids, targets, outputs, **options)


def import_bundle(server: LiveServer, task_id: str, folder: Path) -> None:
    """``taskvision import-bundle`` into the running server's data directory (a new version)."""
    result = subprocess.run(
        [
            str(TASKVISION),
            "import-bundle",
            str(folder),
            "--task",
            task_id,
            "--data-dir",
            str(server.data_dir),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr


@pytest.fixture(scope="session")
def shapes(server: LiveServer, tmp_path_factory: pytest.TempPathFactory) -> SharedTask:
    """A categorization task (circle / square, 24 images each) with one version that has metrics."""
    from taskvision.task_types import TaskType
    from tests.support.api import b64
    from tests.support.console_data import evaluated_bundle
    from tests.support.images import shape_image

    token = server.new_user("shapes")
    http = api(server, token)
    base = f"{server.ip_url}recognition/v2"
    task = http.post(f"{base}/task/", json={"name": "Shapes", "type": "multi_class"}).json()
    for kind in ("circle", "square"):
        label = http.post(f"{base}/label/", json={"name": kind, "type": "category"}).json()
        http.post(f"{base}/task/{task['id']}/add-label", json={"label_id": label["id"]}).raise_for_status()
        for i in range(24):
            image = http.post(f"{base}/training-image/", json={"base64": b64(shape_image(kind, 500 + i))})
            http.post(
                f"{base}/training-image/{image.json()['id']}/add-label", json={"label_id": label["id"]}
            ).raise_for_status()
    bundle = tmp_path_factory.mktemp("shapes-bundle") / "bundle"
    import_bundle(server, task["id"], evaluated_bundle(bundle, TaskType.MULTI_CLASS, ["circle", "square"]))
    return SharedTask(token=token, task_id=task["id"], name="Shapes")
