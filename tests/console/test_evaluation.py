"""The evaluation page's per-image part: the wrong images, a confusion cell's images, the one-click fix."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from fastapi import FastAPI

from api.db.models import Model, Task, TrainingImage
from api.services.versions import import_bundle
from components.lib.evaluate import image_predictions, write_predictions
from components.lib.register import PREDICTIONS_FILE
from taskvision.bundle import BundleMeta
from taskvision.metrics import classification_metrics
from taskvision.task_types import TaskType
from tests.console.conftest import ConsoleFactory, ConsoleUser, add_label, create_task, flash, location
from tests.support.console_data import add_images_directly, evaluated_bundle

# (true label index, circle probability): two mistakes, the first more confident
ANSWERS = [(0, 0.1), (1, 0.7), (0, 0.8), (1, 0.2), (0, 0.95), (1, 0.1), (0, 0.6), (1, 0.3)]


def _evaluated_task(app: FastAPI, user: ConsoleUser, tmp_path: Path) -> tuple[str, list[str]]:
    """A task whose version 1 has per-image predictions written by the evaluate step's own code."""
    task_id = create_task(user, "Shapes")
    labels = [add_label(user, task_id, "circle"), add_label(user, task_id, "square")]
    services = app.state.services
    folder = evaluated_bundle(tmp_path / "bundle", TaskType.MULTI_CLASS, ["circle", "square"])
    with services.session_factory() as session:
        task = session.get(Task, task_id)
        add_images_directly(session, services.blobs, task, len(ANSWERS), label_ids=labels, test_share=1.0)
        images = session.query(TrainingImage).order_by(TrainingImage.meta_data["file_name"].as_string()).all()
        ids = [image.id for image in images]
        import_bundle(session, services.blobs, task, folder, production=True)
        model = session.query(Model).filter_by(task_id=task_id).one()
        meta = BundleMeta.from_json(services.blobs.get(f"{model.bundle_uri}/bundle.json").decode())
        targets = np.array([truth for truth, _ in ANSWERS])
        outputs = np.array([[p, 1 - p] for _, p in ANSWERS], dtype=np.float32)
        records = image_predictions(meta, "test", ids, targets, outputs, tolerance=0.0)
        write_predictions(tmp_path / PREDICTIONS_FILE, records)
        services.blobs.put(
            f"{model.bundle_uri}/{PREDICTIONS_FILE}", (tmp_path / PREDICTIONS_FILE).read_bytes()
        )
        model.metrics = classification_metrics(targets, outputs, ["circle", "square"])  # the same answers
        session.commit()
    return task_id, ids


def _cards(page: str) -> list[tuple[str, str, str]]:
    return re.findall(
        r"<dd data-true>([^<]*)</dd>.*?<dd data-predicted>([^<]*)</dd>.*?<dd>([^<]*)</dd>", page, re.S
    )


def _labels(user: ConsoleUser, image_id: str) -> list[str]:
    image = user.client.get(f"/recognition/v2/training-image/{image_id}", headers=user.api).json()
    return sorted(label["name"] for label in image["labels"])


def test_the_wrong_images_show_most_confident_first_and_a_click_fixes_the_label(
    app: FastAPI, console: ConsoleUser, tmp_path: Path
) -> None:
    task_id, ids = _evaluated_task(app, console, tmp_path)
    url = f"/console/tasks/{task_id}/versions/1"
    page = console.get(url).text
    assert "2 images the version answered wrong" in page
    assert _cards(page) == [("circle", "square", "90 %"), ("square", "circle", "70 %")]
    fix = re.search(rf'action="({url}/fix/{ids[0]})"', page)
    assert fix and "Label it square" in page

    answer = console.post(fix[1], {"back": url + "#mistakes"})
    assert location(answer) == url + "#mistakes"
    assert flash(console, answer) == "ok: The image is now labelled &#39;square&#39;."
    assert _labels(console, ids[0]) == ["square"]
    page = console.get(url).text
    assert "Now labelled as predicted." in page and page.count("Label it ") == 1


def test_a_confusion_cell_shows_its_images(app: FastAPI, console: ConsoleUser, tmp_path: Path) -> None:
    task_id, _ = _evaluated_task(app, console, tmp_path)
    url = f"/console/tasks/{task_id}/versions/1"
    page = console.get(url).text
    cell = re.search(r'data-actual="square" data-predicted="circle">\s*<a class="count" href="([^"]+)"', page)
    assert cell, page
    drill = console.get(cell[1].replace("&amp;", "&")).text
    assert "Actual square, predicted circle" in drill and _cards(drill) == [("square", "circle", "70 %")]
    right = console.get(f"{url}?actual=circle&predicted=circle").text
    assert [c[:2] for c in _cards(right)] == [("circle", "circle")] * 3 and "Label it" not in right


def test_a_version_without_predictions_says_so_and_others_cannot_fix(
    app: FastAPI, make_console: ConsoleFactory, tmp_path: Path
) -> None:
    alice, bob = make_console("alice"), make_console("bob")
    task_id, ids = _evaluated_task(app, bob, tmp_path)
    assert alice.post(f"/console/tasks/{task_id}/versions/1/fix/{ids[0]}").status_code == 404
    own = create_task(alice, "Mine")
    add_label(alice, own, "circle")
    add_label(alice, own, "square")
    folder = evaluated_bundle(tmp_path / "plain", TaskType.MULTI_CLASS, ["circle", "square"])
    with app.state.services.session_factory() as session:
        import_bundle(session, app.state.services.blobs, session.get(Task, own), folder, production=True)
    page = alice.get(f"/console/tasks/{own}/versions/1").text
    assert "This version has no per-image predictions" in page and 'class="count" href' not in page
    assert alice.post(f"/console/tasks/{own}/versions/1/fix/{ids[0]}").status_code == 404
    assert _labels(bob, ids[0]) == ["circle"]
