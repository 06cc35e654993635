"""Every page of a task with 5,000 images is served in at most 300 ms (the console's Server-Timing).

The images are written straight into the database (``tests.support.console_data``): what 5,000
uploads leave behind, without 5,000 uploads. The categorization task also has two versions (the
production one with per-image predictions for all 5,000 images: its test split and the training
images out of fold), ten runs, and 500 unlabelled images classify stored with its answers (the
review queue). A regression task of 5,000 images with values and predictions sits beside it.
Each page is asked for once to warm up (that first answer is printed too: it parses the version's
predictions), then five times; the median server time counts (this machine is shared, so a single
slow answer proves little).
"""

from __future__ import annotations

import gc
import re
import statistics
from pathlib import Path

import pytest
from fastapi import FastAPI

from api.db.models import RunStatus, Task, TrainingImage, TrainingRun, utcnow
from api.services.versions import import_bundle
from taskvision.task_types import TaskType
from tests.console.conftest import ConsoleUser, add_label, create_task
from tests.support.console_data import (
    add_images_directly,
    classify_answers_directly,
    evaluate_directly,
    evaluated_bundle,
    version_of,
)

pytestmark = pytest.mark.slow

IMAGES = 5_000
BUDGET_MS = 300.0
REPEATS = 5


def _server_ms(console: ConsoleUser, url: str) -> float:
    answer = console.get(url)
    assert answer.status_code == 200, (url, answer.status_code)
    return float(re.fullmatch(r"app;dur=([0-9.]+)", answer.headers["server-timing"])[1])  # type: ignore[index]


def test_every_page_of_a_5000_image_task_takes_at_most_300_ms(
    app: FastAPI, console: ConsoleUser, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    task_id = create_task(console, "Big")
    labels = [add_label(console, task_id, name) for name in ("cat", "dog", "bird")]
    services = app.state.services
    with services.session_factory() as session:
        task = session.get(Task, task_id)
        assert task is not None
        add_images_directly(session, services.blobs, task, IMAGES, label_ids=labels)
        add_images_directly(session, services.blobs, task, 500, label_ids=[], seed=1)  # unlabelled
        for seed in (1, 2):
            folder = evaluated_bundle(
                tmp_path / f"v{seed}", TaskType.MULTI_CLASS, ["cat", "dog", "bird"], seed=seed
            )
            import_bundle(session, services.blobs, task, folder, production=True)
        evaluated = evaluate_directly(session, services.blobs, task, version_of(session, task_id, 2))
        stored = [
            image.id
            for image in session.query(TrainingImage).filter_by(workspace_id=task.workspace_id)
            if not image.label_links
        ]
        classify_answers_directly(session, task, 2, stored)
        for i in range(10):
            session.add(
                TrainingRun(
                    workspace_id=task.workspace_id,
                    task_id=task_id,
                    status=RunStatus.SUCCEEDED,
                    runner="local",
                    snapshot_prefix="",
                    params={"seed": i},
                    finished=utcnow(),
                    started=utcnow(),
                )
            )
        session.commit()
    ages_id = create_task(console, "Ages", "regression")
    age = add_label(console, ages_id, "age")
    with services.session_factory() as session:
        ages = session.get(Task, ages_id)
        assert ages is not None
        before = session.query(TrainingImage).count()
        add_images_directly(session, services.blobs, ages, IMAGES, label_ids=[age], values=True, seed=2)
        assert session.query(TrainingImage).count() == before + IMAGES
        folder = evaluated_bundle(tmp_path / "ages", TaskType.REGRESSION, ["age"], seed=3)
        import_bundle(session, services.blobs, ages, folder, production=True)
        valued = evaluate_directly(session, services.blobs, ages, version_of(session, ages_id, 1), seed=3)
    assert len(evaluated) == IMAGES and len(valued) == IMAGES
    base, ages_base = f"/console/tasks/{task_id}", f"/console/tasks/{ages_id}"
    grid = console.get(f"{base}/images?show=all&page=84").text  # 5,000 / 60: the last page
    thumb = re.search(r'src="(/console/images/[^"]+/thumb)"', grid)[1]  # type: ignore[index]
    pages = {
        "tasks": "/console/tasks",
        "labels": base,
        "images": f"{base}/images",
        "images, last page": f"{base}/images?show=all&page=84",
        "images, one label": f"{base}/images?show=all&label={labels[1]}",
        "images, test": f"{base}/images?show=test",
        "images, unlabelled": f"{base}/images?show=unlabelled",
        "train": f"{base}/train",
        "versions": f"{base}/versions",
        "images, wrong": f"{base}/images?show=wrong",
        "images, wrong+train": f"{base}/images?show=wrong-all",
        "evaluation": f"{base}/versions/2",
        "evaluation, +train": f"{base}/versions/2?split=all",
        "evaluation, a cell": f"{base}/versions/2?actual=cat&predicted=dog",
        "evaluation, no preds": f"{base}/versions/1",
        "compare": f"{base}/versions/compare?a=1&b=2",
        "review, stored": f"{base}/review",
        "review, disagreeing": f"{base}/review?kind=disagreement",
        "regression labels": ages_base,
        "regression images": f"{ages_base}/images",
        "regression eval": f"{ages_base}/versions/1",
        "regression review": f"{ages_base}/review?kind=disagreement",
        "try it": f"{base}/try",
        "delete": f"{base}/delete",
        "account": "/console/account",
        "a thumbnail": thumb,
    }
    first, medians, slowest = {}, {}, {}
    gc.collect()
    gc.freeze()  # as `taskvision serve` does after start-up (api/cli.py)
    try:
        for name, url in pages.items():
            first[name] = _server_ms(console, url)
            times = [_server_ms(console, url) for _ in range(REPEATS)]
            medians[name], slowest[name] = statistics.median(times), max(times)
    finally:
        gc.unfreeze()
    assert '<td class="num">5,000</td>' in console.get("/console/tasks").text
    assert 'Unlabelled <span class="count">500</span>' in console.get(f"{base}/images").text
    wrong = sum(1 for r in evaluated if r["split"] == "test" and not r["correct"])
    assert (
        f'Wrong in the last evaluation <span class="count">{wrong:,}</span>'
        in console.get(f"{base}/images").text
    )
    review = console.get(f"{base}/review").text
    assert "500" in review and "Stored by classify" in review
    assert "chart-scatter" in console.get(f"{ages_base}/versions/1").text
    with capsys.disabled():
        print(
            f"\nconsole server time (ms), tasks with {IMAGES:,} images (+500 stored by classify); "
            f"first answer, then median and max of {REPEATS}:"
        )
        for name in pages:
            print(f"  {name:22s} {first[name]:7.1f} {medians[name]:7.1f} {slowest[name]:7.1f}")
    assert {name: ms for name, ms in medians.items() if ms > BUDGET_MS} == {}
    # Every answer, not only the typical one (the issue asks for any page within the budget).
    assert {name: ms for name, ms in slowest.items() if ms > BUDGET_MS} == {}
