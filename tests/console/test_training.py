"""The train page: options with their defaults, live progress of a run, and a refused request in words."""

from __future__ import annotations

import re
from datetime import timedelta

from fastapi import FastAPI

from api.db.models import RunStatus, Task, TrainingRun, utcnow
from tests.console.conftest import ConsoleFactory, ConsoleUser, add_label, create_task, flash
from tests.support.console_data import add_images_directly


def _rest(user: ConsoleUser, path: str) -> dict:  # type: ignore[type-arg]
    answer = user.client.get(f"/recognition/v2/{path}", headers=user.api)
    assert answer.status_code == 200, answer.text
    return dict(answer.json())


def _trainable(app: FastAPI, user: ConsoleUser, name: str = "Rooms") -> str:
    """A categorization task with two labels of 25 images each (what a train request needs)."""
    task_id = create_task(user, name)
    labels = [add_label(user, task_id, "circle"), add_label(user, task_id, "square")]
    services = app.state.services
    with services.session_factory() as session:
        add_images_directly(session, services.blobs, session.get(Task, task_id), 50, label_ids=labels)
    return task_id


def test_a_training_request_records_only_the_options_changed(app: FastAPI, console: ConsoleUser) -> None:
    task_id = _trainable(app, console)
    page = console.get(f"/console/tasks/{task_id}/train").text
    assert re.search(r'<option value="flip" selected>flip \(default\)</option>', page)
    assert re.search(r'<option value="balanced" selected>balanced \(default\)</option>', page)
    assert 'name="quality"' in page and "Default: balanced." in page
    assert 'name="min_images_per_label" type="number"' in page and 'value="20"' in page
    answer = console.post(
        f"/console/tasks/{task_id}/train",
        {"mode": "auto", "quality": "fast", "augment": "none", "min_images_per_label": "20", "seed": "7"},
    )
    assert flash(console, answer) == "ok: Training queued."
    runs = _rest(console, f"training-run/?task={task_id}")["results"]
    assert [r["params"] for r in runs] == [
        {"quality": "fast", "augment": "none", "seed": 7, "production": False}
    ]
    again = console.post(f"/console/tasks/{task_id}/train", {"production": "true"})
    assert flash(console, again).startswith("error: Task &#39;Rooms&#39; is already training")
    panel = console.get(f"/console/tasks/{task_id}/runs/{runs[0]['id']}")
    assert 'hx-trigger="every 1s"' in panel.text and "Waiting for a free trainer" in panel.text
    assert "next in the queue" in panel.text and "Overall: <span data-overall>0 %</span>" in panel.text


def test_the_run_panel_shows_overall_progress_step_time_left_and_queue(
    app: FastAPI, make_console: ConsoleFactory
) -> None:
    alice = make_console("alice")
    first, second = _trainable(app, alice, "First"), _trainable(app, alice, "Second")
    alice.post(f"/console/tasks/{first}/train", {"production": "true"})
    alice.post(f"/console/tasks/{second}/train", {"production": "true"})
    services = app.state.services
    with services.session_factory() as session:
        runs = {run.task_id: run for run in session.query(TrainingRun)}
        ids = {task: run.id for task, run in runs.items()}
    panel = alice.get(f"/console/tasks/{second}/runs/{ids[second]}").text
    assert "number 2 in the queue" in panel  # the first task's run is ahead of it
    with services.session_factory() as session:
        run = session.get(TrainingRun, ids[first])
        run.status, run.step, run.progress = RunStatus.RUNNING, "train", 0.5
        run.started = utcnow() - timedelta(seconds=60)
        session.commit()
    panel = alice.get(f"/console/tasks/{first}/runs/{ids[first]}", headers={"HX-Request": "true"})
    assert "HX-Refresh" not in panel.headers  # still running: the panel keeps polling
    text = panel.text
    # validate (0.1) and split (0.05) done, half of train (0.7): half of the whole run
    assert "Overall: <span data-overall>50 %</span>" in text
    assert '<progress id="overall-progress" class="overall" max="1" value="0.5">' in text
    assert "Current step, train: <span data-step-progress>50 %</span>" in text
    assert re.search(r"about (59 s|1 min 00 s) left", text), text
    assert 'aria-current="step">train' in text and "in the queue" not in text
    assert "next in the queue" in alice.get(f"/console/tasks/{second}/runs/{ids[second]}").text
    page = alice.get(f"/console/tasks/{first}/train").text
    assert "Training now" in page and "Overall: <span data-overall>50 %</span>" in page


def test_a_refused_request_lists_the_problems_with_links_to_the_images(
    app: FastAPI, console: ConsoleUser
) -> None:
    task_id = create_task(console, "Shapes")
    circle = add_label(console, task_id, "circle")
    square = add_label(console, task_id, "square")
    services = app.state.services
    with services.session_factory() as session:
        add_images_directly(session, services.blobs, session.get(Task, task_id), 6, label_ids=[circle])
    both = console.client.get(f"/recognition/v2/training-image/?task={task_id}", headers=console.api)
    image_id = both.json()["results"][0]["id"]
    console.client.post(
        f"/recognition/v2/training-image/{image_id}/add-label", headers=console.api, json={"label_id": square}
    )
    answer = console.post(f"/console/tasks/{task_id}/train", {"production": "true"})
    assert answer.status_code == 400
    page = answer.text
    assert "The task cannot be trained yet" in page and "Nothing was queued." in page
    problems = re.findall(r"<li>(.*?)</li>", page.split('class="problems"')[1].split("</ul>")[0], re.S)
    assert any("1 image has more than one category of this task" in p for p in problems), problems
    circle_row = next(p for p in problems if "label &#39;circle&#39; has 6 images" in p)
    assert f"label={circle}" in circle_row and "the images of &#39;circle&#39;" in circle_row
    square_row = next(p for p in problems if "label &#39;square&#39; has 1 image;" in p)
    assert f"label={square}" in square_row
    fault = re.search(r'<a href="([^"]+)">See the 1 image at fault</a>', page)
    assert fault, page
    grid = console.get(fault[1].replace("&amp;", "&")).text
    assert grid.count("data-pick>") == 1 and f'value="{image_id}"' in grid
    assert "Showing only the images a message named (1 image)" in grid
    assert _rest(console, f"training-run/?task={task_id}")["count"] == 0  # nothing was queued


def test_a_failed_run_says_why_in_words_and_stops_polling(app: FastAPI, console: ConsoleUser) -> None:
    task_id = _trainable(app, console)
    console.post(f"/console/tasks/{task_id}/train", {"production": "true"})
    services = app.state.services
    with services.session_factory() as session:
        run = session.query(TrainingRun).one()
        services.watcher._fail(session, run, "2 images could not be decoded")
        session.commit()
        run_id = run.id
    answer = console.get(f"/console/tasks/{task_id}/runs/{run_id}", headers={"HX-Request": "true"})
    assert answer.headers["HX-Refresh"] == "true"  # the page that watched it reloads
    panel = console.get(f"/console/tasks/{task_id}/train").text
    assert "hx-trigger" not in panel and "Why it failed" in panel
    assert "2 images could not be decoded" in panel
    assert "A training of this task is running" not in panel and "Overall:" not in panel
