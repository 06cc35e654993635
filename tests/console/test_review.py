"""The review page: stored images one at a time, the most uncertain first; accept, correct, skip, retrain."""

from __future__ import annotations

import base64
import re
from pathlib import Path

from fastapi import FastAPI

from api.db.models import Task
from api.services.versions import import_bundle
from taskvision.task_types import TaskType
from tests.console.conftest import ConsoleFactory, ConsoleUser, add_label, create_task, flash, location
from tests.support.console_data import add_images_directly, evaluated_bundle
from tests.support.images import shape_image


def _task_with_version(app: FastAPI, console: ConsoleUser, tmp_path: Path) -> tuple[str, dict[str, str]]:
    task_id = create_task(console, "Shapes")
    labels = {name: add_label(console, task_id, name) for name in ("circle", "square")}
    folder = evaluated_bundle(tmp_path / "bundle", TaskType.MULTI_CLASS, ["circle", "square"])
    with app.state.services.session_factory() as session:
        import_bundle(session, app.state.services.blobs, session.get(Task, task_id), folder, production=True)
    return task_id, labels


def _store(console: ConsoleUser, task_id: str, count: int) -> list[str]:
    records = [
        {"_base64": base64.b64encode(shape_image("circle" if i % 2 else "square", 300 + i)).decode()}
        for i in range(count)
    ]
    answer = console.client.post(
        "/recognition/v2/classify",
        headers=console.api,
        json={"task_id": task_id, "records": records, "store_images": True},
    )
    assert answer.status_code == 200, answer.text
    return [r["_stored_image_id"] for r in answer.json()["records"]]


def _queue(console: ConsoleUser, task_id: str) -> list[dict]:  # type: ignore[type-arg]
    answer = console.client.get(f"/recognition/v2/task/{task_id}/review", headers=console.api)
    return list(answer.json()["results"])


def _labels(console: ConsoleUser, image_id: str) -> list[str]:
    image = console.client.get(f"/recognition/v2/training-image/{image_id}", headers=console.api).json()
    return sorted(label["name"] for label in image["labels"])


def _card(page: str) -> str:
    found = re.search(r'action="/console/tasks/[^/]+/review/([0-9a-f-]{36})"', page)
    assert found, page
    return found[1]


def test_the_queue_shows_the_most_uncertain_first_and_accepts_corrects_and_skips(
    app: FastAPI, console: ConsoleUser, tmp_path: Path
) -> None:
    task_id, labels = _task_with_version(app, console, tmp_path)
    url = f"/console/tasks/{task_id}/review"
    assert "No stored image waits for a label" in console.get(url).text
    _store(console, task_id, 4)
    queue = _queue(console, task_id)
    page = console.get(url).text
    assert "Image 1 of 4, the most uncertain first" in page
    first = _card(page)
    assert first == queue[0]["image"]["id"]  # the REST queue's order: most uncertain first
    suggested = queue[0]["suggested"][0]["name"]
    assert re.search(rf"Version 1 suggests: <strong data-suggestion>{suggested}</strong>", page)
    assert 'data-key="a"' in page and 'data-key="1"' in page and 'data-key="s"' in page

    skipped = console.get(f"{url}?kind=uncertain&at=1").text
    assert "Image 2 of 4" in skipped and _card(skipped) == queue[1]["image"]["id"]

    answer = console.post(f"{url}/{first}", {"decision": "accept", "kind": "uncertain", "at": "0"})
    assert location(answer) == f"{url}?kind=uncertain"
    assert flash(console, answer) == "ok: Suggestion accepted."
    assert _labels(console, first) == [suggested]

    page = console.get(url).text
    second = _card(page)
    assert "Image 1 of 3" in page and second == queue[1]["image"]["id"]
    answer = console.post(
        f"{url}/{second}",
        {"decision": "correct", "label_ids": labels["square"], "kind": "uncertain", "at": "0"},
    )
    assert flash(console, answer) == "ok: Labelled &#39;square&#39;."
    assert _labels(console, second) == ["square"]
    refused = console.post(f"{url}/{_card(console.get(url).text)}", {"decision": "correct", "at": "0"})
    assert flash(console, refused) == "error: A categorization image takes exactly one label."
    assert [item["image"]["id"] for item in _queue(console, task_id)] == [q["image"]["id"] for q in queue[2:]]


def test_retrain_now_appears_once_images_were_labelled_and_queues_a_training(
    app: FastAPI, console: ConsoleUser, tmp_path: Path
) -> None:
    task_id, labels = _task_with_version(app, console, tmp_path)
    url = f"/console/tasks/{task_id}/review"
    services = app.state.services
    with services.session_factory() as session:
        add_images_directly(
            session, services.blobs, session.get(Task, task_id), 50, label_ids=list(labels.values())
        )
    assert "Retrain now" in console.get(url).text  # 50 labelled since version 1 was imported
    stored = _store(console, task_id, 1)
    console.post(f"{url}/{stored[0]}", {"decision": "accept"})
    page = console.get(url).text
    assert "51 images labelled since the last training." in page
    answer = console.post(f"{url}/retrain")
    assert location(answer) == f"/console/tasks/{task_id}/train"
    assert flash(console, answer) == "ok: Training queued."
    page = console.get(url).text
    assert "Retrain now" not in page and "A training of this task is running" in page


def test_another_workspaces_review_is_a_404(
    app: FastAPI, make_console: ConsoleFactory, tmp_path: Path
) -> None:
    alice, bob = make_console("alice"), make_console("bob")
    task_id, _ = _task_with_version(app, bob, tmp_path)
    stored = _store(bob, task_id, 1)
    assert alice.get(f"/console/tasks/{task_id}/review").status_code == 404
    assert (
        alice.post(f"/console/tasks/{task_id}/review/{stored[0]}", {"decision": "accept"}).status_code == 404
    )
    own = create_task(alice, "Mine")
    answer = alice.post(f"/console/tasks/{own}/review/{stored[0]}", {"decision": "accept"})
    assert answer.status_code == 404 and _labels(bob, stored[0]) == []
    odd = alice.post(f"/console/tasks/{own}/review/bad%00id", {"decision": "accept"})
    assert odd.status_code in (400, 404)  # refused, never a 500
