"""Request bodies: JSON (what ximilar-client sends) or form fields (what the curl examples send).

Bodies are read with a size cap, so a client cannot make us buffer gigabytes,
parsed by :func:`parse_json` (bounded nesting, no NaN/Infinity, no unpaired
surrogate in any string: the JSON encoder of every answer refuses those), and
validated with pydantic into the schema the endpoint names (:func:`parse`).
Anything malformed is a 400 or a 422, never a 500.
"""

from __future__ import annotations

import json
from types import UnionType
from typing import Annotated, Any, Literal, TypeVar, Union, get_args, get_origin

from fastapi import Request
from pydantic import BaseModel, ValidationError
from starlette.datastructures import UploadFile

from api.errors import RequestValidationFailed
from taskvision.errors import BadRequestError, PayloadTooLargeError

Schema = TypeVar("Schema", bound=BaseModel)

# Deepest nesting of arrays and objects accepted in a JSON body (or in a form's meta_data).
# Real bodies nest 3-4 levels; the C parser recurses per level and gives up near 1,000.
MAX_JSON_DEPTH = 64


def _refuse(message: str) -> BadRequestError:
    return BadRequestError(message, code="invalid_json")


def check_text(value: str, *, where: str) -> str:
    """Refuse text that no JSON answer can hold: an unpaired surrogate cannot be encoded in UTF-8.

    (NUL is refused where it matters, in the fields that reach text columns: their
    schemas say so, ``api/schemas/common.py``.)
    """
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise _refuse(f"{where} contains an unpaired UTF-16 surrogate.") from exc
    return value


def _check_tree(root: Any) -> None:
    """Depth and string checks over a parsed JSON value, iteratively (no recursion to exhaust)."""
    stack: list[tuple[Any, int]] = [(root, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, str):
            check_text(value, where="A string in the body")
        elif isinstance(value, dict | list):
            if depth > MAX_JSON_DEPTH:
                raise _refuse(f"The JSON is nested more than {MAX_JSON_DEPTH} levels deep.")
            if isinstance(value, dict):
                for key, item in value.items():
                    check_text(key, where="A key in the body")
                    stack.append((item, depth + 1))
            else:
                stack.extend((item, depth + 1) for item in value)


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def parse_json(raw: bytes | str) -> Any:
    """Parse untrusted JSON text; every way it can be bad is a :class:`BadRequestError` (400)."""
    try:
        parsed = json.loads(raw, parse_constant=_no_constants)
    except RecursionError as exc:
        raise _refuse(f"The JSON is nested more than {MAX_JSON_DEPTH} levels deep.") from exc
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError, NaN, over-long integers
        raise _refuse(f"The body is not valid JSON: {exc}") from exc
    _check_tree(parsed)
    return parsed


async def read_body(request: Request, *, max_bytes: int) -> dict[str, Any]:
    """Parse the request body into a dict. An empty body is ``{}``; one of only whitespace is not
    JSON (a 400), as any other text that is not.

    Multipart file fields are returned as ``UploadFile`` objects. A form field given twice is
    a 400: no form field takes more than one value.
    """
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_bytes:
        raise PayloadTooLargeError(f"The request body is larger than {max_bytes} bytes.")
    if content_type in ("multipart/form-data", "application/x-www-form-urlencoded"):
        form = await request.form(max_part_size=max_bytes)
        data: dict[str, Any] = {}
        for key, value in form.multi_items():
            check_text(key, where="A form field name")
            if key in data:  # no field takes a list; keeping one of them would drop the others unseen
                raise BadRequestError(f"Form field {key!r} is given more than once.", code="invalid_form")
            if isinstance(value, str):
                check_text(value, where=f"Form field {key!r}")
            data[key] = value
        return data
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise PayloadTooLargeError(f"The request body is larger than {max_bytes} bytes.")
        chunks.append(chunk)
    raw = b"".join(chunks)
    if not raw:
        return {}
    parsed = parse_json(raw)
    if not isinstance(parsed, dict):
        raise BadRequestError("The body must be a JSON object.", code="invalid_json")
    return parsed


def parse(schema: type[Schema], data: dict[str, Any], *, form: bool = False) -> Schema:
    """Validate ``data`` against ``schema``; a failure answers 422 with every problem listed.

    Validation is strict, as the OpenAPI document describes the body: ``"true"`` is not
    a boolean and ``"5"`` not an integer. Form fields are all text, so each is first read
    as the JSON literal it spells (``true``, ``5``, ``null``, ``{...}``) where its field
    takes such a value (:func:`_form_values`).
    """
    clean = {k: v for k, v in data.items() if not isinstance(v, UploadFile)}
    if form:
        clean = _form_values(schema, clean)
    try:
        return schema.model_validate(clean, strict=True)
    except ValidationError as exc:
        raise RequestValidationFailed(exc) from exc


def _accepts(annotation: Any) -> set[type]:
    """The JSON value types a field's annotation admits (str, int, float, bool, dict, list, None)."""
    origin = get_origin(annotation)
    if origin is Annotated:
        return _accepts(get_args(annotation)[0])
    if origin in (Union, UnionType):
        return set().union(*(_accepts(arg) for arg in get_args(annotation)))
    if annotation is type(None):
        return {type(None)}
    if origin is Literal:
        return {type(arg) for arg in get_args(annotation)}
    base = origin or annotation
    if isinstance(base, type):
        for kind in (bool, int, float, str, dict, list):
            if issubclass(base, kind):
                return {kind}
    return {str}


def _form_values(schema: type[BaseModel], fields: dict[str, Any]) -> dict[str, Any]:
    """Form text as the typed values the schema's fields take (what a JSON body would carry)."""
    by_name = {info.alias or name: info for name, info in schema.model_fields.items()}
    typed: dict[str, Any] = {}
    for key, text in fields.items():
        info = by_name.get(key)
        accepts = _accepts(info.annotation) if info is not None else {str}
        value: Any = text
        if isinstance(text, str) and accepts - {str}:
            try:
                literal = json.loads(text)
            except ValueError:
                literal = text
            kinds = {type(literal)} | ({float} if type(literal) is int else set())
            if kinds & (accepts - {str}):
                value = literal
        typed[key] = value
    return typed


def is_form(request: Request) -> bool:
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    return content_type in ("multipart/form-data", "application/x-www-form-urlencoded")
