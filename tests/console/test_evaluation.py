"""The evaluation page's per-image part: the wrong images, a confusion cell's images, the one-click fix."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from fastapi import FastAPI

from api.db.models import Model, Task, TrainingImage
from api.services.versions import import_bundle
from components.lib.evaluate import image_predictions, write_predictions
from components.lib.register import PREDICTIONS_FILE
from taskvision.bundle import BundleMeta
from taskvision.metrics import classification_metrics, regression_metrics
from taskvision.task_types import TaskType
from tests.console.conftest import ConsoleFactory, ConsoleUser, add_label, create_task, flash, location
from tests.support.console_data import (
    add_images_directly,
    classify_answers_directly,
    evaluated_bundle,
    store_predictions,
    version_of,
)

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


# (actual, predicted) radius of ten test images: one answer far off (20 -> 28), one exact (30 -> 30)
SIZES = [
    (10, 11),
    (12, 11.5),
    (15, 16),
    (18, 17),
    (20, 28),
    (22, 23),
    (25, 24.5),
    (28, 29),
    (30, 30),
    (33, 32),
]


def test_a_regression_version_draws_predicted_against_actual_and_its_errors(
    app: FastAPI, console: ConsoleUser, tmp_path: Path
) -> None:
    task_id = create_task(console, "Sizes", "regression")
    name = "radius <mm>"  # markup in a label name stays text in the SVG
    label = add_label(console, task_id, name)
    services = app.state.services
    folder = evaluated_bundle(tmp_path / "bundle", TaskType.REGRESSION, [name])
    targets = np.array([[a] for a, _ in SIZES], dtype=np.float32)
    outputs = np.array([[p] for _, p in SIZES], dtype=np.float32)
    metrics = regression_metrics(targets, outputs, [name])
    with services.session_factory() as session:
        task = session.get(Task, task_id)
        add_images_directly(session, services.blobs, task, len(SIZES), label_ids=[label], values=True)
        ids = [image.id for image in session.query(TrainingImage).all()]
        import_bundle(session, services.blobs, task, folder, production=True)
        model = version_of(session, task_id, 1)
        model.metrics = metrics
        tolerance = 2.0 * metrics["mae"]  # what the evaluate step counts as wrong
        store_predictions(services.blobs, model.bundle_uri, ids, targets, outputs, tolerance=tolerance)
        session.commit()
    page = console.get(f"/console/tasks/{task_id}/versions/1").text
    assert "<mm>" not in page

    scatter = re.search(r'<svg class="chart chart-scatter".*?</svg>', page, re.S)
    assert scatter, page
    svg = scatter[0]
    assert (
        '<title id="scatter-t">Predicted radius &lt;mm&gt; against actual radius &lt;mm&gt;, 10 test images'
        in svg
    )
    assert ">Actual radius &lt;mm&gt;</text>" in svg and ">Predicted radius &lt;mm&gt;</text>" in svg
    dots = re.findall(r'<circle cx="([0-9.]+)" cy="([0-9.]+)" r="\d" class="dot( dot-wrong)?"', svg)
    assert len(dots) == 10 and [bool(wrong) for *_, wrong in dots].count(True) == 1
    # the wrong dot sits at actual 20, predicted 28 on the axes' own ticks
    x_ticks = {
        float(t.replace(",", "")): float(x)
        for x, t in re.findall(
            r'<text x="([0-9.]+)" y="[0-9.]+" text-anchor="middle" class="tick">([0-9.,]+)<', svg
        )
    }
    y_ticks = {
        float(t.replace(",", "")): float(y) - 5
        for y, t in re.findall(
            r'<text x="[0-9.]+" y="([0-9.]+)" text-anchor="end" class="tick">([0-9.,]+)<', svg
        )
    }
    (lo, x_lo), (hi, x_hi) = min(x_ticks.items()), max(x_ticks.items())
    (_, y_lo), (_, y_hi) = min(y_ticks.items()), max(y_ticks.items())
    wrong = next((float(x), float(y)) for x, y, w in dots if w)
    assert wrong[0] == pytest.approx(x_lo + (20 - lo) / (hi - lo) * (x_hi - x_lo), abs=0.2)
    assert wrong[1] == pytest.approx(y_lo + (28 - lo) / (hi - lo) * (y_hi - y_lo), abs=0.2)
    assert y_hi < y_lo  # predicted grows upwards

    errors = re.search(r'<svg class="chart chart-histogram".*?</svg>', page, re.S)
    assert errors
    described = re.search(r'<desc id="errors-d">([^<]*)</desc>', errors[0])
    assert described
    bins = re.findall(r"([0-9.]+) to ([0-9.]+): (\d+) images?\.", described[1])
    assert sum(int(n) for *_, n in bins) == 10
    by_bin = [(float(a), float(b), int(n)) for a, b, n in bins]
    assert next(n for a, b, n in by_bin if a <= 8 < b) == 1  # the one 8 off
    assert sum(n for a, b, n in by_bin if b <= 2) == 9  # the others at most 1 off
    assert f"Further off than {tolerance:.2f} counts as wrong." in described[1]
    assert "counts as wrong: 1 image." in page
    # the gallery's card for it, with the error
    assert "radius &lt;mm&gt; = 20.00" in page and "radius &lt;mm&gt; = 28.00" in page


def test_a_regression_version_without_predictions_draws_no_charts(
    app: FastAPI, console: ConsoleUser, tmp_path: Path
) -> None:
    task_id = create_task(console, "Sizes", "regression")
    add_label(console, task_id, "radius")
    folder = evaluated_bundle(tmp_path / "plain", TaskType.REGRESSION, ["radius"])
    with app.state.services.session_factory() as session:
        import_bundle(session, app.state.services.blobs, session.get(Task, task_id), folder, production=True)
    page = console.get(f"/console/tasks/{task_id}/versions/1").text
    assert (
        ">MAE<" in page
        and "chart-scatter" not in page
        and "This version has no per-image predictions" in page
    )


def _grid_ids(page: str) -> set[str]:
    return set(re.findall(r'name="image_ids" value="([^"]+)"', page))


def test_the_image_grid_filters_what_the_production_version_got_wrong(
    app: FastAPI, console: ConsoleUser, tmp_path: Path
) -> None:
    task_id, ids = _evaluated_task(app, console, tmp_path)
    grid = f"/console/tasks/{task_id}/images"
    services = app.state.services
    with services.session_factory() as session:
        task = session.get(Task, task_id)
        labels = [label.id for label in task.labels]
        add_images_directly(session, services.blobs, task, 3, label_ids=labels, test_share=0.0, seed=1)
        training = [im.id for im in session.query(TrainingImage).filter_by(test_image=False)]
        model = version_of(session, task_id, 1)
        kept = services.blobs.get(f"{model.bundle_uri}/{PREDICTIONS_FILE}").decode().splitlines()
        # out of fold: the first training image answered wrong (a circle taken for a square)
        store_predictions(
            services.blobs,
            model.bundle_uri,
            training,
            np.array([0, 1, 0]),
            np.array([[0.2, 0.8], [0.3, 0.7], [0.9, 0.1]], dtype=np.float32),
            split="train",
            append=[json.loads(line) for line in kept],
        )
    page = console.get(f"{grid}?show=all").text
    assert re.search(r'show=wrong"[^>]*>Wrong in the last evaluation <span class="count">2</span>', page)
    wrong = console.get(f"{grid}?show=wrong").text
    assert _grid_ids(wrong) == {ids[0], ids[1]}
    assert "The images <a href" in wrong and "version 1</a> answered wrong" in wrong
    with_training = console.get(f"{grid}?show=wrong-all").text
    assert _grid_ids(with_training) == {ids[0], ids[1], training[0]}
    assert 'With training images (answered out of fold) <span class="count">3</span>' in with_training
    circle = labels[0] if task.labels[0].name == "circle" else labels[1]
    assert _grid_ids(console.get(f"{grid}?show=wrong&label={circle}").text) == {ids[0]}

    # a newer version without predictions does not speak for the task while version 1 is in production
    folder = evaluated_bundle(tmp_path / "v2", TaskType.MULTI_CLASS, ["circle", "square"], seed=2)
    with services.session_factory() as session:
        import_bundle(session, services.blobs, session.get(Task, task_id), folder, production=False)
    assert _grid_ids(console.get(f"{grid}?show=wrong").text) == {ids[0], ids[1]}
    answer = console.post(f"/console/tasks/{task_id}/versions/production", {"version": "2"})
    assert flash(console, answer) == "ok: Version 2 is now in production."
    page = console.get(f"{grid}?show=wrong").text
    assert "Wrong in the last evaluation" not in page and _grid_ids(page) == set()
    assert "No version of this task has per-image predictions yet" in page


def test_the_image_grid_filters_the_images_classify_stored(
    app: FastAPI, console: ConsoleUser, tmp_path: Path
) -> None:
    task_id, _ = _evaluated_task(app, console, tmp_path)
    services = app.state.services
    with services.session_factory() as session:
        task = session.get(Task, task_id)
        add_images_directly(session, services.blobs, task, 4, label_ids=[], test_share=0.0, seed=3)
        unlabelled = [im.id for im in session.query(TrainingImage) if not im.label_links]
        classify_answers_directly(session, task, 1, unlabelled[:3])
    grid = f"/console/tasks/{task_id}/images"
    page = console.get(f"{grid}?show=stored").text
    assert _grid_ids(page) == set(unlabelled[:3])
    assert 'Stored by classify <span class="count">3</span>' in page
