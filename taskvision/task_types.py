"""Task and label types, and which label type fits which task type."""

from __future__ import annotations

from enum import StrEnum


class TaskType(StrEnum):
    """What a task predicts."""

    MULTI_CLASS = "multi_class"  # categorization: exactly one category per image
    MULTI_LABEL = "multi_label"  # tagging: any number of tags, plus a negative label for "none"
    REGRESSION = "regression"  # a continuous value per image


class LabelType(StrEnum):
    """What a label is; each task type takes exactly one label type."""

    CATEGORY = "category"
    TAG = "tag"
    VALUE = "value"


LABEL_TYPE_FOR_TASK: dict[TaskType, LabelType] = {
    TaskType.MULTI_CLASS: LabelType.CATEGORY,
    TaskType.MULTI_LABEL: LabelType.TAG,
    TaskType.REGRESSION: LabelType.VALUE,
}


def label_fits_task(label_type: LabelType, task_type: TaskType) -> bool:
    """True when a label of ``label_type`` may be attached to a task of ``task_type``."""
    return LABEL_TYPE_FOR_TASK[task_type] is label_type
