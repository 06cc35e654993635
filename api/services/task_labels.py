"""Which labels a task predicts: attaching and detaching, with the task type's rules."""

from __future__ import annotations

from sqlalchemy.orm import Session

from api.db.models import Label, Task, TaskLabel
from taskvision.errors import BadRequestError, ConflictError
from taskvision.task_types import LABEL_TYPE_FOR_TASK, LabelType, TaskType, label_fits_task


def attach_label(session: Session, task: Task, label: Label) -> None:
    """Make ``task`` predict ``label`` (idempotent); commits. 400 when the label type does not fit."""
    task_type, label_type = TaskType(task.type), LabelType(label.type)
    if not label_fits_task(label_type, task_type):
        raise BadRequestError(
            f"A {task_type} task takes {LABEL_TYPE_FOR_TASK[task_type]} labels; "
            f"label '{label.name}' is a {label_type}.",
            code="label_type_mismatch",
        )
    if label.negative_for_task is not None and label.negative_for_task != task.id:
        raise BadRequestError("A negative label belongs to its own task only.", code="negative_label")
    if session.get(TaskLabel, (task.id, label.id)) is None:
        session.add(TaskLabel(task_id=task.id, label_id=label.id))
        session.commit()
        session.refresh(task)


def detach_label(session: Session, task: Task, label: Label) -> None:
    """Stop ``task`` predicting ``label`` (idempotent); commits. A task's negative label stays (409)."""
    if label.negative_for_task == task.id:
        raise ConflictError("The negative label of a tagging task cannot be removed from it.")
    link = session.get(TaskLabel, (task.id, label.id))
    if link is not None:
        session.delete(link)
        session.commit()
        session.refresh(task)
