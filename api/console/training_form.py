"""The train page's options, made from the API's ``TrainRequest`` schema with the service's defaults.

Every field of the schema becomes an input (a choice becomes a select, a flag a
checkbox, a number a number field), pre-filled with the default the service
would use, so an option the API gains later appears here by itself. On submit
only the options changed from their defaults are sent, so the run records what
the user actually chose.
"""

from __future__ import annotations

import types
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from api.http.body import parse
from api.schemas.tasks import TrainRequest
from api.settings import Settings

TITLES = {
    "mode": "Mode",
    "quality": "Quality",
    "augment": "Augmentation",
    "epochs": "Epochs",
    "learning_rate": "Learning rate",
    "batch_size": "Batch size",
    "min_images_per_label": "Minimum images per label",
    "test_fraction": "Share of images kept for testing",
    "seed": "Random seed",
    "production": "Put the new version in production when it is ready",
}
# Said where the schema's description says nothing (or only repeats the title).
HELP = {
    "quality": "fast: one backbone, quickest; balanced: picks the best of a few models by cross-validation "
    "(about 30 s for 600 images on a CPU); best: more candidates, minutes.",
    "augment": "flip: also learn from mirrored copies of the training images; none: the images as they are.",
    "min_images_per_label": "A training stops at its first step when a label has fewer images.",
    "test_fraction": "These images are kept out of training to measure the new version.",
    "seed": "The same seed and the same images give the same split and the same model.",
    "production": "Off: the new version waits in the versions list until you switch to it.",
}
# Shown under "More options"; any other field (one the API adds later) is shown up front.
ADVANCED = {"epochs", "learning_rate", "batch_size", "min_images_per_label", "test_fraction", "seed"}


@dataclass(frozen=True)
class OptionField:
    name: str
    title: str
    help: str
    kind: Literal["select", "checkbox", "integer", "number"]
    default: Any
    choices: tuple[str, ...] = ()
    minimum: float | None = None
    maximum: float | None = None
    advanced: bool = False

    @property
    def default_text(self) -> str:
        if isinstance(self.default, bool):
            return "yes" if self.default else "no"
        return "" if self.default is None else str(self.default)


def _inner(annotation: Any) -> Any:
    """The annotation without ``| None`` and ``Annotated``."""
    origin = get_origin(annotation)
    if origin in (Union, types.UnionType):
        args = [arg for arg in get_args(annotation) if arg is not type(None)]
        return _inner(args[0]) if len(args) == 1 else annotation
    if origin is Annotated:
        return _inner(get_args(annotation)[0])
    return annotation


def _bounds(info: Any) -> tuple[float | None, float | None]:
    """The lowest and highest value a numeric field allows (exclusive bounds shown as the bound).

    Constraints sit on the field (``Field(gt=0, lt=1)``) or, for an optional field, inside its
    ``Annotated[int, Field(ge=1, le=500)] | None``.
    """
    constraints = list(info.metadata)
    stack = [info.annotation]
    while stack:
        current = stack.pop()
        for meta in getattr(current, "__metadata__", ()):
            constraints.extend(getattr(meta, "metadata", [meta]))
        stack.extend(get_args(current))
    low = high = None
    for item in constraints:
        for name in ("ge", "gt"):
            if getattr(item, name, None) is not None:
                low = float(getattr(item, name))
        for name in ("le", "lt"):
            if getattr(item, name, None) is not None:
                high = float(getattr(item, name))
    return low, high


def option_fields(settings: Settings) -> list[OptionField]:
    defaults: dict[str, Any] = {**settings.training_defaults()}
    fields = []
    for name, info in TrainRequest.model_fields.items():
        inner = _inner(info.annotation)
        default = defaults.get(name, info.default)
        low, high = _bounds(info)
        if get_origin(inner) is Literal:
            kind: Any = "select"
            choices = tuple(str(c) for c in get_args(inner))
        elif inner is bool:
            kind, choices = "checkbox", ()
        elif inner is int:
            kind, choices = "integer", ()
        else:
            kind, choices = "number", ()
        fields.append(
            OptionField(
                name=name,
                title=TITLES.get(name, name.replace("_", " ").capitalize()),
                help=HELP.get(name, info.description or ""),
                kind=kind,
                default=default,
                choices=choices,
                minimum=low,
                maximum=high,
                advanced=name in ADVANCED,
            )
        )
    return fields


def chosen_options(settings: Settings, form: dict[str, Any]) -> dict[str, Any]:
    """The submitted options that differ from the defaults, typed and checked by ``TrainRequest``."""
    changed: dict[str, Any] = {}
    for option in option_fields(settings):
        if option.kind == "checkbox":
            value = option.name in form
            if value != bool(option.default):
                changed[option.name] = "true" if value else "false"
            continue
        raw = str(form.get(option.name, "")).strip()
        if raw == "" or raw == option.default_text:
            continue
        if option.kind in ("integer", "number") and _same_number(raw, option.default):
            continue
        changed[option.name] = raw
    return parse(TrainRequest, changed, form=True).model_dump(exclude_none=True, exclude_defaults=True)


def _same_number(raw: str, default: Any) -> bool:
    try:
        return default is not None and float(raw) == float(default)
    except ValueError:
        return False
