"""A refused train request (``not_trainable``) as the train page shows it: each problem with its links.

The API answers a train request the task's data cannot pass at once, with every
problem in words, the images per label and the images at fault
(:class:`taskvision.errors.NotTrainableError`). The page lists the problems; a
problem that names one of the task's labels links to that label's images, and
the images at fault (e.g. with two categories) are one link to a grid of just
them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

from api.console.pages.common import task_url
from api.db.models import Task
from taskvision.errors import NotTrainableError

# The images at fault are linked by id in the URL; past this many the link shows the first ones.
MAX_LINKED_IMAGES = 100


@dataclass(frozen=True)
class Problem:
    text: str
    links: list[tuple[str, str]] = field(default_factory=list)  # (title, url)


@dataclass(frozen=True)
class Refusal:
    """Why the task cannot be trained yet, with where to fix it."""

    problems: list[Problem]
    counts: list[tuple[str, int, str | None]]  # label name, images, its images' URL
    fault_count: int
    fault_url: str | None


def images_url(task: Task, *, label_id: str | None = None, image_ids: list[str] | None = None) -> str:
    params: dict[str, str] = {"show": "all"}
    if label_id:
        params["label"] = label_id
    if image_ids:
        params["ids"] = ",".join(image_ids[:MAX_LINKED_IMAGES])
    return task_url(task, "/images") + "?" + urlencode(params)


def _items(value: object) -> list[Any]:
    return list(value) if isinstance(value, list | tuple) else []


def refusal(task: Task, error: NotTrainableError) -> Refusal:
    extra = error.extra
    problems_raw = [str(p) for p in _items(extra.get("problems"))]
    counts_field = extra.get("counts")
    counts_raw: dict[str, Any] = dict(counts_field) if isinstance(counts_field, dict) else {}
    fault = [str(i) for i in _items(extra.get("image_ids"))]
    by_name = {label.name: label for label in task.labels}
    problems = []
    for text in problems_raw:
        links = [
            (f"the images of '{name}'", images_url(task, label_id=label.id))
            for name, label in by_name.items()
            if f"'{name}'" in text
        ]
        if not links and "label(s)" in text:
            links.append(("add labels", task_url(task)))
        elif not links and "no labelled training images" in text:
            links.append(("upload images", task_url(task, "/images")))
        problems.append(Problem(text=text, links=links))
    counts = [
        (name, int(count), images_url(task, label_id=by_name[name].id) if name in by_name else None)
        for name, count in counts_raw.items()
    ]
    return Refusal(
        problems=problems,
        counts=counts,
        fault_count=len(fault),
        fault_url=images_url(task, image_ids=fault) if fault else None,
    )
