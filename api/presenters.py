"""ORM rows to the public JSON shapes (``schemas.*Public``), in one place."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fastapi import Request
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from api.db.models import (
    ImageLabel,
    Label,
    Model,
    RunStatus,
    Task,
    TaskLabel,
    TrainingImage,
    TrainingRun,
    TrainStatus,
)
from api.deps import get_services
from api.schemas.images import ImageLabelPublic, ImagePublic
from api.schemas.labels import LabelPublic, TaskRef
from api.schemas.models import ModelPublic
from api.schemas.runs import TrainingRunPublic
from api.schemas.tasks import LabelBrief, TaskPublic
from api.services import run_progress
from taskvision.metrics import current_names
from taskvision.task_types import LabelType, TaskType


def label_brief(label: Label) -> LabelBrief:
    return LabelBrief(
        id=label.id,
        name=label.name,
        type=label.type,
        output_name=label.output_name or label.name,
        negative_for_task=label.negative_for_task is not None,
    )


def task_public(task: Task) -> dict[str, Any]:
    return TaskPublic(
        id=task.id,
        name=task.name,
        type=TaskType(task.type),
        description=task.description,
        production_version=task.production_version,
        last_train_status=TrainStatus(task.last_train_status),
        last_train_error=task.last_train_error,
        canary_percent=task.canary_percent,
        serving_error=task.serving_error,
        labels=[label_brief(label) for label in task.labels],
        workspace=task.workspace_id,
        created=task.created,
    ).model_dump(mode="json")


def labels_public(session: Session, labels: Sequence[Label], *, with_counts: bool) -> list[dict[str, Any]]:
    """Serialize labels with their tasks (and image counts), in two queries for the whole page."""
    ids = [label.id for label in labels]
    tasks_by_label: dict[str, list[TaskRef]] = {i: [] for i in ids}
    if ids:
        rows = session.execute(
            select(TaskLabel.label_id, Task.id, Task.name)
            .join(Task, Task.id == TaskLabel.task_id)
            .where(TaskLabel.label_id.in_(ids))
            .order_by(TaskLabel.created)
        ).all()
        for label_id, task_id, task_name in rows:
            tasks_by_label[label_id].append(TaskRef(id=task_id, name=task_name))
    counts: dict[str, int] = {}
    if with_counts and ids:
        counts = dict(
            session.execute(
                select(ImageLabel.label_id, func.count())
                .where(ImageLabel.label_id.in_(ids))
                .group_by(ImageLabel.label_id)
            ).all()
        )
    return [
        LabelPublic(
            id=label.id,
            name=label.name,
            type=LabelType(label.type),
            description=label.description,
            output_name=label.output_name or label.name,
            negative_for_task=label.negative_for_task is not None,
            recognition_tasks=tasks_by_label[label.id],
            tasks_count=len(tasks_by_label[label.id]),
            images_count=counts.get(label.id, 0) if with_counts else None,
            workspace=label.workspace_id,
            created=label.created,
        ).model_dump(mode="json", exclude_none=True)
        for label in labels
    ]


_EXTENSIONS = {
    "image/jpeg": "jpg",
    "image/png": "png",
    "image/webp": "webp",
    "image/gif": "gif",
    "image/bmp": "bmp",
    "image/tiff": "tiff",
}


class ImageLinks:
    """Builds signed download links; made once per request (url_for per row is slow)."""

    def __init__(self, request: Request) -> None:
        self.base = str(request.base_url).rstrip("/") + "/recognition/v2/training-image/"
        self.signer = get_services(request).url_signer
        self.expires = self.signer.expiry()

    def url(self, image: TrainingImage, kind: str) -> str:
        ext = "jpg" if kind == "thumb" else _EXTENSIONS.get(image.content_type, "bin")
        signature = self.signer.sign(image.id, kind, self.expires)
        # The last path segment is a real file name: ximilar-client names downloads after it.
        return f"{self.base}{image.id}/{kind}/{image.id}.{ext}?expires={self.expires}&signature={signature}"


def _links(request: Request) -> ImageLinks:
    links = getattr(request.state, "image_links", None)
    if links is None:
        links = request.state.image_links = ImageLinks(request)
    return links


def image_public(image: TrainingImage, request: Request) -> dict[str, Any]:
    links = _links(request)
    return ImagePublic(
        id=image.id,
        created=image.created,
        img_path=links.url(image, "file"),
        thumb_img_path=links.url(image, "thumb"),
        img_width=image.width,
        img_height=image.height,
        meta_data=image.meta_data or {},
        test_image=image.test_image,
        real=image.real,
        verifyCount=image.verify_count,
        labels=[
            ImageLabelPublic(**label_brief(link.label).model_dump(), value=link.value)
            for link in image.label_links
        ],
        workspace=image.workspace_id,
    ).model_dump(mode="json")


def model_public(model: Model) -> dict[str, Any]:
    return ModelPublic(
        id=model.id,
        task=model.task_id,
        task_name=model.task.name,
        version=model.version,
        train_status=TrainStatus(model.train_status),
        production=model.task.production_version == model.version,
        metrics=current_names(model.task.type, model.metrics or {}),
        run_id=model.run_id,
        created=model.created,
    ).model_dump(mode="json")


def runs_public(session: Session, runs: Sequence[TrainingRun]) -> list[dict[str, Any]]:
    """Runs with their overall progress, time left, queue place and version link (one page at once)."""
    states = run_progress.describe(session, runs)
    return [run_public(run, states[run.id]) for run in runs]


def run_public(run: TrainingRun, state: run_progress.RunState | None = None) -> dict[str, Any]:
    return TrainingRunPublic(
        id=run.id,
        task=run.task_id,
        status=RunStatus(run.status),
        step=run.step,
        progress=run.progress,
        message=run.message,
        error=run.error,
        version=run.model_version,
        params=run.params or {},
        effective_params=run.effective_params or {},
        overall_progress=state.overall_progress if state else run_progress.overall_progress(run),
        eta_seconds=state.eta_seconds if state else None,
        queue_position=state.queue_position if state else None,
        model_id=state.model_id if state else None,
        created=run.created,
        started=run.started,
        finished=run.finished,
    ).model_dump(mode="json")
