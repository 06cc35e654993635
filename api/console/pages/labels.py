"""A task's front page: its labels (create, attach, detach, rename), images per label against the minimum."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from api.console import actions, queries
from api.console.charts import label_bars
from api.console.deps import CsrfChecked, ViewerDep
from api.console.pages.common import act, form_fields, load_task, task_context, task_url
from api.console.rendering import render
from api.db.models import Label, Task
from api.deps import SessionDep, SettingsDep
from taskvision.errors import NotFoundError
from taskvision.task_types import LABEL_TYPE_FOR_TASK, TaskType

router = APIRouter()


def _blockers(task: Task, stats: list[queries.LabelStat], minimum: int) -> list[str]:
    """What stops a training, in words, from the counts alone (the pipeline checks the images too)."""
    problems = []
    outputs = [stat for stat in stats if not stat.negative]
    if task.type != TaskType.REGRESSION and len(outputs) < 2:
        problems.append(f"The task has {len(outputs)} label(s); at least 2 are needed to train.")
    if task.type == TaskType.REGRESSION and not outputs:
        problems.append("A regression task needs a value label.")
    for stat in outputs:
        if stat.images and not stat.training_images:
            problems.append(f"All {stat.images} images of '{stat.label.name}' are test images.")
        elif stat.images < minimum:
            problems.append(
                f"'{stat.label.name}' has {stat.images} image(s); at least {minimum} are needed "
                f"({minimum - stat.images} more)."
            )
    return problems


@router.get("/tasks/{task_id}")
def task_labels(
    request: Request, task_id: str, session: SessionDep, settings: SettingsDep, viewer: ViewerDep
) -> Response:
    task = load_task(session, viewer, task_id)
    stats = queries.label_stats(session, task)
    minimum = settings.min_images_per_label
    label_type = LABEL_TYPE_FOR_TASK[TaskType(task.type)]
    chart = label_bars([(s.label.name, s.images, not s.negative) for s in stats], minimum=minimum)
    runs = queries.runs(session, task, limit=1)
    return render(
        request,
        "labels.html",
        {
            **task_context(task, "labels"),
            "stats": stats,
            "chart": chart,
            "minimum": minimum,
            "blockers": _blockers(task, stats, minimum),
            "label_type": label_type,
            "attachable": queries.attachable_labels(session, task, label_type),
            "last_run": runs[0] if runs else None,
        },
        viewer=viewer,
    )


def _task_label(task: Task, label_id: str) -> Label:
    label = next((label for label in task.labels if label.id == label_id), None)
    if label is None:
        raise NotFoundError(f"Label {label_id} not found in this task.")
    return label


@router.post("/tasks/{task_id}/labels", dependencies=[CsrfChecked])
async def create_label(request: Request, task_id: str, session: SessionDep, viewer: ViewerDep) -> Response:
    task = load_task(session, viewer, task_id)
    form = await form_fields(request)

    def create() -> str:
        actions.create_label(session, viewer.user, task, form)
        return f"Label '{str(form.get('name', '')).strip()}' added."

    return act(request, session, task_url(task), create)


@router.post("/tasks/{task_id}/labels/attach", dependencies=[CsrfChecked])
async def attach_label(request: Request, task_id: str, session: SessionDep, viewer: ViewerDep) -> Response:
    task = load_task(session, viewer, task_id)
    form = await form_fields(request)

    def attach() -> str:
        actions.attach_label(session, viewer.user, task, str(form.get("label_id", "")))
        return "Label attached."

    return act(request, session, task_url(task), attach)


@router.post("/tasks/{task_id}/labels/{label_id}/detach", dependencies=[CsrfChecked])
def detach_label(
    request: Request, task_id: str, label_id: str, session: SessionDep, viewer: ViewerDep
) -> Response:
    task = load_task(session, viewer, task_id)
    label = _task_label(task, label_id)
    name = label.name

    def detach() -> str:
        actions.detach_label(session, viewer.user, task, label.id)
        return f"Label '{name}' detached; its images keep it."

    return act(request, session, task_url(task), detach)


@router.post("/tasks/{task_id}/labels/{label_id}/rename", dependencies=[CsrfChecked])
async def rename_label(
    request: Request, task_id: str, label_id: str, session: SessionDep, viewer: ViewerDep
) -> Response:
    task = load_task(session, viewer, task_id)
    label = _task_label(task, label_id)
    form = await form_fields(request)

    def rename() -> str:
        actions.rename_label(session, viewer.user, label.id, form)
        return "Label renamed."

    return act(request, session, task_url(task), rename)
