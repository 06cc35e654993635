"""Building blocks shared by every resource's schemas: ids, text, names, errors, pages, the request base.

What the schema says is what is checked: text that reaches a database column
has a ``pattern`` without NUL (PostgreSQL cannot store it), names must hold a
visible character (they are stripped), and enumerations are strict. JSON
bodies are validated strictly (a ``"true"`` string is not a boolean, a ``5.0``
is not an integer), form fields leniently (they are all text), see
:func:`api.http.body.parse`.
"""

from __future__ import annotations

from enum import Enum
from typing import Annotated, Any, Generic, TypeVar

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, StringConstraints

# Ids are UUIDs; imported or generated names stay within URL-safe characters.
ID_PATTERN = r"^[A-Za-z0-9._~-]{1,64}$"
# Any text without NUL (in the schema only: the body parser enforces it).
NO_NUL = "^[^\\u0000]*$"
# At least one character that is not white space (names are stripped), and no NUL. The
# explicit \u001c-\u001f: Python strips them too, though Unicode does not call them space.
NAME_PATTERN = "^[^\\u0000]*[^\\u0000\\s\\u001c-\\u001f][^\\u0000]*$"
INT32_MAX = 2**31 - 1

Id = Annotated[str, StringConstraints(pattern=ID_PATTERN)]
Text = Annotated[str, StringConstraints(pattern=NO_NUL)]
Name = Annotated[
    str, StringConstraints(min_length=1, max_length=255, pattern=NAME_PATTERN), AfterValidator(str.strip)
]


def _whole(value: Any) -> Any:
    # JSON Schema counts 5.0 as an integer; strict validation would not.
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


# An integer under strict validation: a JSON number with no fraction, never a string or a
# boolean. Bounds go before it inside the Annotated (Annotated[int, Field(ge=1), WholeNumber]),
# so that the OpenAPI document shows them as minimum/maximum.
WholeNumber = BeforeValidator(_whole)
VersionNumber = Annotated[int, Field(ge=1, le=INT32_MAX), WholeNumber]


def strict_enum(enum: type[E]) -> Any:
    """Accept an enumeration's values as JSON strings under strict validation."""
    return BeforeValidator(lambda value: enum(value) if isinstance(value, str) else value)


T = TypeVar("T")
E = TypeVar("E", bound=Enum)


class RequestBody(BaseModel):
    """Base of every request body. Unknown fields are ignored: clients send extra keys, such as
    the ``workspace`` ximilar-client adds (``api.deps.check_body_workspace`` checks it)."""

    model_config = ConfigDict(extra="ignore")


class ErrorPublic(BaseModel):
    """Every error answer: a human ``detail`` (what ximilar-client reads) and a stable ``code``."""

    detail: str
    code: str
    errors: list[dict[str, Any]] | None = Field(
        default=None, description="422 only: each problem with its location (loc), message and type."
    )
    id: str | None = Field(default=None, description="Duplicate upload only: the existing image's id.")
    problems: list[str] | None = Field(
        default=None, description="not_trainable only: every reason the task cannot be trained yet."
    )
    counts: dict[str, int] | None = Field(default=None, description="not_trainable only: images per label.")
    image_ids: list[str] | None = Field(
        default=None, description="not_trainable only: the images at fault (e.g. with two categories)."
    )


class Page(BaseModel, Generic[T]):
    """One page of a list (DRF style): ``next``/``previous`` are paths relative to the server root."""

    count: int = Field(description="Items matching the filters, on all pages.")
    next: str | None
    previous: str | None
    results: list[T]
