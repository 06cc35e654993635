"""What the console pages read, in a few grouped queries per page (pages stay fast at 5,000+ images).

Every query is scoped to the viewer's workspace: objects are fetched through
:mod:`api.services.lookups` (another workspace's task is "not found"), and the
aggregate queries below only ever start from such an object or filter on the
workspace.

The image grid's filters are a table (:data:`IMAGE_FILTERS`): each names its
condition on ``TrainingImage``. "Wrong in the last evaluation" is an id list
(:class:`EvaluationMistakes`, read from the judging version's per-image
predictions by the page) turned into a condition here.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, Select, and_, exists, false, func, select
from sqlalchemy.orm import Session, selectinload

from api.db.models import (
    ImageLabel,
    ImagePrediction,
    Label,
    Model,
    Task,
    TaskLabel,
    TrainingImage,
    TrainingRun,
)
from api.schemas.common import ID_PATTERN
from taskvision.task_types import TaskType

# ---- tasks ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class TaskSummary:
    """A row of the task list."""

    task: Task
    labels: int
    images: int
    versions: int
    last_run: TrainingRun | None

    @property
    def last_trained(self) -> datetime | None:
        run = self.last_run
        return (run.finished or run.started or run.created) if run else None


def _task_images(task_ids: list[str]) -> ColumnElement[bool]:
    return TaskLabel.task_id.in_(task_ids)


def task_summaries(session: Session, workspace_id: str) -> list[TaskSummary]:
    """The workspace's tasks, newest first, with their counts and last training (five queries)."""
    tasks = session.scalars(
        select(Task).where(Task.workspace_id == workspace_id).order_by(Task.created.desc(), Task.id)
    ).all()
    ids = [task.id for task in tasks]
    if not ids:
        return []
    label_counts = dict(
        session.execute(
            select(TaskLabel.task_id, func.count()).where(_task_images(ids)).group_by(TaskLabel.task_id)
        ).all()
    )
    image_counts = dict(
        session.execute(
            select(TaskLabel.task_id, func.count(func.distinct(ImageLabel.image_id)))
            .join(ImageLabel, ImageLabel.label_id == TaskLabel.label_id)
            .where(_task_images(ids))
            .group_by(TaskLabel.task_id)
        ).all()
    )
    version_counts = dict(
        session.execute(
            select(Model.task_id, func.count()).where(Model.task_id.in_(ids)).group_by(Model.task_id)
        ).all()
    )
    latest = (
        select(TrainingRun.task_id, func.max(TrainingRun.created).label("created"))
        .where(TrainingRun.task_id.in_(ids))
        .group_by(TrainingRun.task_id)
        .subquery()
    )
    runs = {
        run.task_id: run
        for run in session.scalars(
            select(TrainingRun).join(
                latest, and_(TrainingRun.task_id == latest.c.task_id, TrainingRun.created == latest.c.created)
            )
        )
    }
    return [
        TaskSummary(
            task=task,
            labels=label_counts.get(task.id, 0),
            images=image_counts.get(task.id, 0),
            versions=version_counts.get(task.id, 0),
            last_run=runs.get(task.id),
        )
        for task in tasks
    ]


@dataclass(frozen=True)
class DeletionImpact:
    """What deleting a task takes with it (and what stays), for the confirmation page."""

    labels: int
    negative_label: bool
    images: int
    versions: int
    runs: int


def deletion_impact(session: Session, task: Task) -> DeletionImpact:
    labels = task.labels
    return DeletionImpact(
        labels=sum(1 for label in labels if label.negative_for_task != task.id),
        negative_label=any(label.negative_for_task == task.id for label in labels),
        images=_count(session, select(TrainingImage.id).where(in_task(task))),
        versions=_count(session, select(Model.id).where(Model.task_id == task.id)),
        runs=_count(session, select(TrainingRun.id).where(TrainingRun.task_id == task.id)),
    )


def _count(session: Session, stmt: Select[Any]) -> int:
    return int(session.scalar(select(func.count()).select_from(stmt.subquery())) or 0)


# ---- labels ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class LabelStat:
    """A task label with its images: how many, how many are test images, and (regression) the values."""

    label: Label
    negative: bool
    images: int
    test_images: int
    min_value: float | None = None
    max_value: float | None = None

    @property
    def training_images(self) -> int:
        return self.images - self.test_images


def label_stats(session: Session, task: Task) -> list[LabelStat]:
    """The task's labels in the order they were attached (a negative label last), with their image counts."""
    labels = task.labels
    ids = [label.id for label in labels]
    rows = {
        label_id: (count, tests, low, high)
        for label_id, count, tests, low, high in session.execute(
            select(
                ImageLabel.label_id,
                func.count(),
                func.count().filter(TrainingImage.test_image.is_(True)),
                func.min(ImageLabel.value),
                func.max(ImageLabel.value),
            )
            .join(TrainingImage, TrainingImage.id == ImageLabel.image_id)
            .where(ImageLabel.label_id.in_(ids))
            .group_by(ImageLabel.label_id)
        ).all()
    }
    stats = []
    for label in labels:
        count, tests, low, high = rows.get(label.id, (0, 0, None, None))
        stats.append(
            LabelStat(
                label=label,
                negative=label.negative_for_task == task.id,
                images=int(count),
                test_images=int(tests),
                min_value=low,
                max_value=high,
            )
        )
    return sorted(stats, key=lambda stat: stat.negative)


def attachable_labels(session: Session, task: Task, label_type: str) -> list[Label]:
    """The workspace's labels of the task's label type that the task does not have yet."""
    attached = select(TaskLabel.label_id).where(TaskLabel.task_id == task.id)
    return list(
        session.scalars(
            select(Label)
            .where(
                Label.workspace_id == task.workspace_id,
                Label.type == label_type,
                Label.negative_for_task.is_(None),
                Label.id.not_in(attached),
            )
            .order_by(Label.name, Label.id)
            .limit(500)
        ).all()
    )


# ---- images ---------------------------------------------------------------------------------


def in_task(task: Task) -> ColumnElement[bool]:
    """Images that carry at least one of the task's labels."""
    return exists().where(
        ImageLabel.image_id == TrainingImage.id,
        ImageLabel.label_id.in_(select(TaskLabel.label_id).where(TaskLabel.task_id == task.id)),
    )


def unlabelled() -> ColumnElement[bool]:
    """Images with no label at all (just uploaded, or stored by classify)."""
    return ~exists().where(ImageLabel.image_id == TrainingImage.id)


def stored_by_classify(task: Task) -> ColumnElement[bool]:
    """Images classify stored (``store_images``) with an answer of this task's model."""
    return exists().where(ImagePrediction.image_id == TrainingImage.id, ImagePrediction.task_id == task.id)


@dataclass(frozen=True)
class EvaluationMistakes:
    """The images the task's judging version got wrong in its evaluation (most confident first)."""

    version: int
    test_ids: list[str]  # the test split's
    all_ids: list[str]  # with the training images answered out of fold
    capped: bool  # more were wrong than a filter takes (MAX_MISTAKES, the most confident kept)


MAX_MISTAKES = 10_000  # ids in one IN (): well within SQLite's and PostgreSQL's bound-parameter limits


def _wrong(ids: Callable[[EvaluationMistakes], list[str]]) -> Callable[..., ColumnElement[bool]]:
    def condition(task: Task, mistakes: EvaluationMistakes | None = None) -> ColumnElement[bool]:
        chosen = ids(mistakes) if mistakes is not None else []
        return TrainingImage.id.in_(chosen) if chosen else false()

    return condition


@dataclass(frozen=True)
class ImageFilter:
    """One entry of the grid's filter bar (``in_bar``: False for a variant reached from its entry)."""

    name: str
    title: str
    condition: Callable[..., ColumnElement[bool]]  # (task, mistakes) -> condition on TrainingImage
    in_bar: bool = True
    needs_evaluation: bool = False


IMAGE_FILTERS: dict[str, ImageFilter] = {
    f.name: f
    for f in (
        ImageFilter("all", "In this task", lambda task, mistakes=None: in_task(task)),
        ImageFilter("unlabelled", "Unlabelled", lambda task, mistakes=None: unlabelled()),
        ImageFilter("stored", "Stored by classify", lambda task, mistakes=None: stored_by_classify(task)),
        ImageFilter(
            "test",
            "Test images",
            lambda task, mistakes=None: and_(in_task(task), TrainingImage.test_image.is_(True)),
        ),
        ImageFilter(
            "wrong", "Wrong in the last evaluation", _wrong(lambda m: m.test_ids), needs_evaluation=True
        ),
        ImageFilter(
            "wrong-all",
            "Wrong in the last evaluation, with training images",
            _wrong(lambda m: m.all_ids),
            in_bar=False,
            needs_evaluation=True,
        ),
    )
}


@dataclass(frozen=True)
class ImageCard:
    """A thumbnail of the grid with the task's labels on the image."""

    image: TrainingImage
    labels: list[tuple[Label, float | None]]

    @property
    def value(self) -> float | None:
        return self.labels[0][1] if self.labels else None


@dataclass
class ImagePage:
    cards: list[ImageCard]
    total: int
    page: int
    page_size: int
    counts: dict[str, int] = field(default_factory=dict)  # images per filter

    @property
    def pages(self) -> int:
        return max(1, math.ceil(self.total / self.page_size))


def image_page(
    session: Session,
    task: Task,
    *,
    show: str,
    label_id: str | None,
    page: int,
    page_size: int,
    only_ids: list[str] | None = None,
    mistakes: EvaluationMistakes | None = None,
) -> ImagePage:
    """One page of the grid, newest first, with the count behind each filter.

    ``only_ids``: just these images of the workspace (whatever their labels), within the filter
    ``all`` meaning any image of the workspace. ``mistakes``: what the "wrong" filters show (none
    without an evaluation; their counts are then left out).
    """
    chosen = IMAGE_FILTERS.get(show, IMAGE_FILTERS["all"])
    conditions = [TrainingImage.workspace_id == task.workspace_id]
    if only_ids is not None:
        conditions.append(TrainingImage.id.in_([i for i in only_ids if re.fullmatch(ID_PATTERN, i)]))
        if show != "all":
            conditions.append(chosen.condition(task, mistakes))
    else:
        conditions.append(chosen.condition(task, mistakes))
    if label_id:
        conditions.append(
            exists().where(ImageLabel.image_id == TrainingImage.id, ImageLabel.label_id == label_id)
        )
    total = int(session.scalar(select(func.count()).select_from(TrainingImage).where(*conditions)) or 0)
    images = session.scalars(
        select(TrainingImage)
        .options(selectinload(TrainingImage.label_links))
        .where(*conditions)
        .order_by(TrainingImage.created.desc(), TrainingImage.id.desc())
        .offset((page - 1) * page_size)
        .limit(page_size)
    ).all()
    task_label_ids = {label.id for label in task.labels}
    cards = [
        ImageCard(
            image=image,
            labels=[
                (link.label, link.value) for link in image.label_links if link.label_id in task_label_ids
            ],
        )
        for image in images
    ]
    counts = {
        name: int(
            session.scalar(
                select(func.count())
                .select_from(TrainingImage)
                .where(TrainingImage.workspace_id == task.workspace_id, f.condition(task, mistakes))
            )
            or 0
        )
        for name, f in IMAGE_FILTERS.items()
        if mistakes is not None or not f.needs_evaluation
    }
    return ImagePage(cards=cards, total=total, page=page, page_size=page_size, counts=counts)


def owned_image_ids(session: Session, workspace_id: str, image_ids: list[str]) -> list[str]:
    """The ids among ``image_ids`` that are images of the workspace (others are ignored)."""
    # Only well-formed ids reach SQL (PostgreSQL refuses NUL in text; a posted form may hold anything).
    image_ids = [i for i in image_ids if re.fullmatch(ID_PATTERN, i)]
    if not image_ids:
        return []
    return list(
        session.scalars(
            select(TrainingImage.id).where(
                TrainingImage.workspace_id == workspace_id, TrainingImage.id.in_(image_ids)
            )
        ).all()
    )


# ---- versions and runs ----------------------------------------------------------------------


def versions(session: Session, task: Task) -> list[Model]:
    return list(
        session.scalars(select(Model).where(Model.task_id == task.id).order_by(Model.version.desc())).all()
    )


def version(session: Session, task: Task, number: int) -> Model | None:
    return session.scalar(select(Model).where(Model.task_id == task.id, Model.version == number))


def runs(session: Session, task: Task, *, limit: int = 10) -> list[TrainingRun]:
    return list(
        session.scalars(
            select(TrainingRun)
            .where(TrainingRun.task_id == task.id)
            .order_by(TrainingRun.created.desc(), TrainingRun.id)
            .limit(limit)
        ).all()
    )


def run(session: Session, task: Task, run_id: str) -> TrainingRun | None:
    return session.scalar(select(TrainingRun).where(TrainingRun.id == run_id, TrainingRun.task_id == task.id))


def run_of_version(session: Session, task: Task, number: int) -> TrainingRun | None:
    return session.scalar(
        select(TrainingRun).where(TrainingRun.task_id == task.id, TrainingRun.model_version == number)
    )


def is_regression(task: Task) -> bool:
    return task.type == TaskType.REGRESSION
