"""Typed FastAPI dependencies: the services, a DB session, the current user, the request body.

Routes name what they need with these aliases (``SessionDep``, ``CurrentUser``,
``TrainingDep``...) instead of reaching into ``request.app.state``.

The dependencies that only hand out a service are ``async def``: FastAPI runs a
plain ``def`` dependency in its thread pool, and a classify request named eight
of them (a worker-thread round trip each, about 0.07 ms on an idle machine and
more under load). Those that query the database stay plain functions, run in
the pool, off the event loop (:func:`get_db` only makes and closes a session).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated, Any, TypeVar

from fastapi import Depends, Path, Request
from pydantic import BaseModel
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from api.auth import authenticate, token_key
from api.db.models import User
from api.http.body import is_form, parse, read_body
from api.services.classifiers import Classifier
from api.services.container import Services
from api.services.rate_limits import ConcurrencyLimit
from api.services.serving_reconciler import ServingReconciler
from api.services.signing import UrlSigner
from api.services.training import TrainingQueue
from api.services.url_fetch import FetchSlots
from api.settings import Settings
from taskvision.errors import NotFoundError
from taskvision.storage import BlobStore


def get_services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


async def _services(request: Request) -> Services:
    return get_services(request)


ServicesDep = Annotated[Services, Depends(_services)]


async def get_settings(services: ServicesDep) -> Settings:
    return services.settings


async def get_db(services: ServicesDep) -> AsyncIterator[Session]:
    """A session for the request; closed after it, in the thread pool only if that is database work.

    Making a session touches no database (it connects on first use), and closing one that
    holds no transaction (classify closes its own before the model runs) is bookkeeping:
    as a plain generator, both ends were a trip to the thread pool on every request.
    """
    session = services.session_factory()
    try:
        yield session
    finally:
        if session.in_transaction():  # gives a connection back (a rollback): off the event loop
            await run_in_threadpool(session.close)
        else:
            session.close()


async def get_blobs(services: ServicesDep) -> BlobStore:
    return services.blobs


async def get_training(services: ServicesDep) -> TrainingQueue:
    return services.training


async def get_classifier(services: ServicesDep) -> Classifier:
    return services.classifier


async def get_classify_slots(services: ServicesDep) -> ConcurrencyLimit:
    return services.classify_slots


async def get_fetch_slots(services: ServicesDep) -> FetchSlots:
    return services.fetch_slots


async def get_url_signer(services: ServicesDep) -> UrlSigner:
    return services.url_signer


async def get_reconciler(services: ServicesDep) -> ServingReconciler | None:
    return services.reconciler


SettingsDep = Annotated[Settings, Depends(get_settings)]
SessionDep = Annotated[Session, Depends(get_db)]
BlobsDep = Annotated[BlobStore, Depends(get_blobs)]
TrainingDep = Annotated[TrainingQueue, Depends(get_training)]
ClassifierDep = Annotated[Classifier, Depends(get_classifier)]
ClassifySlotsDep = Annotated[ConcurrencyLimit, Depends(get_classify_slots)]
FetchSlotsDep = Annotated[FetchSlots, Depends(get_fetch_slots)]
UrlSignerDep = Annotated[UrlSigner, Depends(get_url_signer)]
ReconcilerDep = Annotated[ServingReconciler | None, Depends(get_reconciler)]


async def get_body(request: Request, settings: SettingsDep) -> dict[str, Any]:
    # base64 inflates by 4/3; leave room for the JSON around it.
    limit = settings.max_upload_bytes * 4 // 3 + 1024 * 1024
    return await read_body(request, max_bytes=limit)


BodyDep = Annotated[dict[str, Any], Depends(get_body)]


def _check_workspace(user: User, workspace: Any) -> None:
    """ximilar-client names a workspace when it is not "Default"; it must be the user's own."""
    if workspace in (None, "", "Default", user.workspace_id):
        return
    raise NotFoundError("Workspace not found.")


def get_current_user(request: Request, session: SessionDep, services: ServicesDep) -> User:
    """The token's user, after its request-rate allowance is spent (429 beyond it)."""
    authorization = request.headers.get("authorization")
    user = authenticate(session, authorization)
    services.rate_limits.take(token_key(authorization))
    _check_workspace(user, request.query_params.get("workspace"))
    return user


CurrentUser = Annotated[User, Depends(get_current_user)]


def check_body_workspace(user: User, body: dict[str, Any]) -> None:
    _check_workspace(user, body.get("workspace"))


Model = TypeVar("Model", bound=BaseModel)


def body_of(model: type[Model], *, form: type[BaseModel] | bool = False, required: bool = True) -> Any:
    """A dependency giving the request body parsed into ``model`` (JSON, or form fields).

    After the token is checked (401 comes before 400/422); a ``workspace`` field must be
    the caller's own. The route's OpenAPI ``requestBody`` is made from ``model`` (and
    ``form``) by the router (:func:`api.http.openapi.body_model_of`).
    """

    async def parse_body(request: Request, body: BodyDep, user: CurrentUser) -> Model:
        check_body_workspace(user, body)
        return parse(model, body, form=is_form(request))

    parse_body.__body_spec__ = {"model": model, "form": form, "required": required}  # type: ignore[attr-defined]
    return Depends(parse_body)


# Ids in paths. No pattern: an empty one would name the collection (``/task/`` is the list),
# and any other string is simply not found.
TaskIdPath = Annotated[str, Path(description="The task's id.")]
LabelIdPath = Annotated[str, Path(description="The label's id.")]
ImageIdPath = Annotated[str, Path(description="The training image's id.")]
ModelIdPath = Annotated[str, Path(description="The model version's id.")]
RunIdPath = Annotated[str, Path(description="The training run's id.")]
