"""The train page: the options (defaults shown), the live progress of the run, the task's recent runs.

The run panel is a fragment that htmx reloads every second while the run is
active (``/tasks/<id>/runs/<run id>``); once the run has ended, the answer
tells htmx to reload the whole page (``HX-Refresh``), whose panel then has no
trigger, so the polling stops. It shows the run's status, its overall progress,
the current step and its progress, the time left and the place in the queue
(:mod:`api.services.run_progress`, as the REST API reports them).

A train request the task's data cannot pass is refused at once (``not_trainable``):
the page is shown again with every problem in words, each linked to the images
at fault (a label's images, or the images named in the refusal).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from fastapi import APIRouter, Request
from fastapi.responses import Response

from api.console import actions, queries
from api.console.deps import CsrfChecked, ViewerDep
from api.console.pages.common import act, form_fields, load_task, task_context, task_url
from api.console.refusals import Refusal, refusal
from api.console.rendering import render
from api.console.training_form import chosen_options, option_fields
from api.db.models import RunStatus, Task, TrainingRun
from api.deps import ServicesDep, SessionDep, SettingsDep
from api.services import run_progress
from api.settings import Settings
from taskvision.errors import NotFoundError, NotTrainableError

router = APIRouter()

STEPS = ("validate", "split", "train", "evaluate", "register")
STATUS_WORDS = {
    RunStatus.QUEUED: "Waiting for a free trainer",
    RunStatus.STARTING: "Starting",
    RunStatus.RUNNING: "Training",
    RunStatus.FINISHING: "Registering the new version",
    RunStatus.SUCCEEDED: "Done",
    RunStatus.FAILED: "Failed",
    RunStatus.CANCELED: "Canceled",
}


@dataclass(frozen=True)
class RunView:
    """A run as the progress panel shows it."""

    run: TrainingRun
    status_words: str
    active: bool
    step_index: int | None  # 0-based position of the current step in STEPS
    elapsed_s: float | None
    in_production: bool
    # From the data-loop API: the run's overall progress 0-1, the time left, its place in the queue.
    overall: float | None = None
    eta_s: float | None = None
    queue_position: int | None = None

    @property
    def steps(self) -> list[tuple[str, str]]:
        """Each step with its state: done, current or to do."""
        states = []
        for i, step in enumerate(STEPS):
            if self.run.status == RunStatus.SUCCEEDED or (
                self.step_index is not None and i < self.step_index
            ):
                state = "done"
            elif i == self.step_index:
                state = "failed" if self.run.status == RunStatus.FAILED else "current"
            else:
                state = "todo"
            states.append((step, state))
        return states


def run_view(
    task: Task, run: TrainingRun, state: run_progress.RunState | None = None, now: datetime | None = None
) -> RunView:
    now = now or datetime.now(UTC)
    start = run.started or run.created
    end = run.finished or now
    return RunView(
        run=run,
        status_words=STATUS_WORDS.get(RunStatus(run.status), run.status),
        active=run.status in RunStatus.active(),
        step_index=STEPS.index(run.step) if run.step in STEPS else None,
        elapsed_s=(end - start).total_seconds() if start else None,
        in_production=run.model_version is not None and run.model_version == task.production_version,
        overall=state.overall_progress if state else None,
        eta_s=state.eta_seconds if state else None,
        queue_position=state.queue_position if state else None,
    )


def run_views(session: SessionDep, task: Task, runs: Sequence[TrainingRun]) -> list[RunView]:
    """The runs as the page shows them, with their progress, time left and place in the queue."""
    states = run_progress.describe(session, runs)
    return [run_view(task, run, states.get(run.id)) for run in runs]


def _train_page(
    request: Request,
    session: SessionDep,
    settings: Settings,
    viewer: ViewerDep,
    task: Task,
    *,
    refused: Refusal | None = None,
) -> Response:
    views = run_views(session, task, queries.runs(session, task, limit=10))
    return render(
        request,
        "train.html",
        {
            **task_context(task, "train"),
            "options": option_fields(settings),
            "current": views[0] if views else None,
            "runs": views,
            "refusal": refused,
        },
        viewer=viewer,
        status_code=400 if refused else 200,
    )


@router.get("/tasks/{task_id}/train")
def train_page(
    request: Request, task_id: str, session: SessionDep, settings: SettingsDep, viewer: ViewerDep
) -> Response:
    return _train_page(request, session, settings, viewer, load_task(session, viewer, task_id))


@router.post("/tasks/{task_id}/train", dependencies=[CsrfChecked])
async def start_training(
    request: Request, task_id: str, session: SessionDep, services: ServicesDep, viewer: ViewerDep
) -> Response:
    task = load_task(session, viewer, task_id)
    form = await form_fields(request)
    return queue_training(request, session, services.settings, viewer, task, form)


def queue_training(
    request: Request,
    session: SessionDep,
    settings: Settings,
    viewer: ViewerDep,
    task: Task,
    form: dict[str, str],
) -> Response:
    """Queue a run with the form's options; a task its data cannot train gets the page with why."""
    services = request.app.state.services

    def start() -> str:
        actions.train(session, services, viewer.user, task.id, chosen_options(settings, form))
        return "Training queued."

    try:
        return act(request, session, task_url(task, "/train"), start, keep=(NotTrainableError,))
    except NotTrainableError as exc:
        return _train_page(request, session, settings, viewer, task, refused=refusal(task, exc))


@router.get("/tasks/{task_id}/runs/{run_id}")
def run_panel(
    request: Request, task_id: str, run_id: str, session: SessionDep, viewer: ViewerDep
) -> Response:
    """The progress panel of one run (what htmx polls)."""
    task = load_task(session, viewer, task_id)
    run = queries.run(session, task, run_id)
    if run is None:
        raise NotFoundError(f"Training run {run_id} not found.")
    current = run_views(session, task, [run])[0]
    # The run has ended while the page watched it: reload the page, so that the task's status, the
    # Train button and the list of runs are current too.
    headers = {"HX-Refresh": "true"} if request.headers.get("hx-request") and not current.active else None
    return render(
        request,
        "_run.html",
        {**task_context(task, "train"), "current": current},
        viewer=viewer,
        headers=headers,
    )
