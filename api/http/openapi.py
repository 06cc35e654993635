"""The OpenAPI document: request bodies in JSON and form, error answers, the Token scheme.

FastAPI describes query and path parameters and response models itself. What
it cannot see is added here:

* **Request bodies.** Bodies arrive as JSON (what ximilar-client sends) or as
  form fields (``curl -F``), so routes parse them with :func:`body_of`
  dependencies instead of a FastAPI ``Body``. :func:`request_body` turns the
  model into the operation's ``requestBody`` for each content type, and
  :func:`install` puts the models' schemas into ``components``.
* **Errors.** Every answer that is not a success is ``{"detail", "code"}``
  (:class:`api.schemas.common.ErrorPublic`); :func:`errors` declares the
  statuses an operation can answer, 422 included (FastAPI's default 422 schema
  says ``detail`` is a list; ours is a string).
* **Security.** Token auth (``Authorization: Token <key>``, or ``Bearer
  <key>``) as two alternative schemes, on every operation that needs a token,
  so Swagger UI's Authorize button works.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, get_args, get_origin

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi.params import Depends
from fastapi.routing import iter_route_contexts
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from api.schemas.common import ErrorPublic

REF = "#/components/schemas/{model}"
_FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")

# Why each error status happens, for the docs.
_ERROR_TEXT = {
    400: "Bad input (the detail says what).",
    401: "No token, or an unknown one.",
    404: "Not found, or another workspace's.",
    409: "Conflicts with the current state.",
    413: "The request or the image is too large.",
    422: "The body or a parameter does not match the schema (each problem in errors).",
    429: "A per-token or per-workspace limit was reached; see Retry-After.",
    503: "A dependency (a model, the cluster) is not ready; see Retry-After.",
}
# What any operation that takes a token and a body can answer besides its own statuses.
COMMON = (400, 401, 404, 413, 422, 429)

_body_models: dict[str, type[BaseModel]] = {}
_extra_models: list[type[BaseModel]] = []


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """``responses=`` entries for these error statuses, with the error schema."""
    return {status: {"model": ErrorPublic, "description": _ERROR_TEXT[status]} for status in sorted(statuses)}


def also_document(*models: type[BaseModel]) -> None:
    """Put models that are only referenced by hand (``$ref``) into the document's components."""
    _extra_models.extend(models)


def request_body(
    model: type[BaseModel], *, form: type[BaseModel] | bool = False, required: bool = True
) -> dict[str, Any]:
    """The ``requestBody`` of an operation whose body is ``model`` (as JSON, and as form fields when
    ``form`` is true, or as the form model given)."""
    _body_models[model.__name__] = model
    ref = {"$ref": REF.format(model=model.__name__)}
    content: dict[str, Any] = {"application/json": {"schema": ref}}
    if form:
        form_model = model if form is True else form
        assert isinstance(form_model, type)
        _body_models[form_model.__name__] = form_model
        form_ref = {"$ref": REF.format(model=form_model.__name__)}
        types = _FORM_TYPES if form is True else _FORM_TYPES[:1]
        content.update({media: {"schema": form_ref} for media in types})
    return {"requestBody": {"required": required, "content": content}}


def body_model_of(endpoint: Callable[..., Any]) -> dict[str, Any] | None:
    """The ``openapi_extra`` of an endpoint with a :func:`api.deps.body_of` parameter, if it has one."""
    for parameter in inspect.signature(endpoint, eval_str=True).parameters.values():
        annotation = parameter.annotation
        if get_origin(annotation) is None or not hasattr(annotation, "__metadata__"):
            continue
        for meta in get_args(annotation)[1:]:
            spec = getattr(getattr(meta, "dependency", None), "__body_spec__", None)
            if isinstance(meta, Depends) and spec is not None:
                return request_body(**spec)
    return None


def _needs_token(route: Any) -> bool:
    from api.deps import get_current_user

    dependant = getattr(route, "dependant", None)
    stack = list(dependant.dependencies) if dependant is not None else []
    while stack:
        dependant = stack.pop()
        if dependant.call is get_current_user:
            return True
        stack.extend(dependant.dependencies)
    return False


def install(app: FastAPI) -> None:
    """Replace ``app.openapi`` with the generator that adds bodies, error schemas and security."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        document = get_openapi(
            title=app.title,
            version=app.version,
            description=app.description,
            routes=app.routes,
            tags=app.openapi_tags,
        )
        components = document.setdefault("components", {})
        schemas = components.setdefault("schemas", {})
        models = [*_body_models.values(), *_extra_models]
        _, definitions = models_json_schema([(model, "validation") for model in models], ref_template=REF)
        for name, schema in definitions.get("$defs", {}).items():
            schemas.setdefault(name, schema)
        components["securitySchemes"] = {
            "Token": {
                "type": "apiKey",
                "in": "header",
                "name": "Authorization",
                "description": "Your API token as `Token <key>` (what `taskvision users create` printed).",
            },
            "Bearer": {"type": "http", "scheme": "bearer", "description": "The same key as a bearer token."},
        }
        secured = {
            (route.path_format, method.lower())
            for route in iter_route_contexts(app.routes)
            if _needs_token(route)
            for method in route.methods or ()
        }
        for path, operations in document.get("paths", {}).items():
            for method, operation in operations.items():
                if (path, method) in secured:
                    operation["security"] = [{"Token": []}, {"Bearer": []}]
        app.openapi_schema = document
        return document

    app.openapi = openapi  # type: ignore[method-assign]
