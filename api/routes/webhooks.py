"""/recognition/v2/webhook: URLs a workspace is told about its trainings and production switches.

Deliveries are signed and retried (api/services/webhooks.py); ``GET /{id}/deliveries``
shows each one's status, attempts and the target's last answer.
"""

from __future__ import annotations

import ipaddress
from typing import Annotated, Any
from urllib.parse import urlsplit

from fastapi import Request, Response
from sqlalchemy import select

from api.db.models import User, WebhookDelivery, WebhookEndpoint
from api.deps import CurrentUser, SessionDep, SettingsDep, body_of
from api.http.openapi import COMMON, errors
from api.http.pagination import PageDep, paginate
from api.http.routing import SlashAgnosticRouter
from api.schemas.common import Page
from api.schemas.webhooks import DeliveryPublic, WebhookCreate, WebhookCreated, WebhookPublic
from api.services import webhooks
from api.services.url_fetch import check_url, is_blocked
from taskvision.errors import BadRequestError, NotFoundError

router = SlashAgnosticRouter(prefix="/recognition/v2/webhook", tags=["webhooks"], responses=errors(*COMMON))

WebhookBody = Annotated[WebhookCreate, body_of(WebhookCreate)]


def _public(endpoint: WebhookEndpoint) -> dict[str, Any]:
    return WebhookPublic(
        id=endpoint.id, url=endpoint.url, events=endpoint.events, created=endpoint.created
    ).model_dump(mode="json")


def _delivery(delivery: WebhookDelivery) -> dict[str, Any]:
    return DeliveryPublic.model_validate(delivery, from_attributes=True).model_dump(mode="json")


def _endpoint(session: SessionDep, user: User, webhook_id: str) -> WebhookEndpoint:
    endpoint = session.scalar(
        select(WebhookEndpoint).where(
            WebhookEndpoint.id == webhook_id, WebhookEndpoint.workspace_id == user.workspace_id
        )
    )
    if endpoint is None:
        raise NotFoundError(f"Webhook {webhook_id} not found.")
    return endpoint


@router.get("/", response_model=Page[WebhookPublic])
def list_webhooks(request: Request, session: SessionDep, user: CurrentUser, page: PageDep) -> Any:
    stmt = (
        select(WebhookEndpoint)
        .where(WebhookEndpoint.workspace_id == user.workspace_id)
        .order_by(WebhookEndpoint.created, WebhookEndpoint.id)
    )
    return paginate(
        session, stmt, request=request, page=page, serialize=lambda rows: [_public(e) for e in rows]
    )


@router.post("/", status_code=201, response_model=WebhookCreated)
def create_webhook(session: SessionDep, user: CurrentUser, data: WebhookBody, settings: SettingsDep) -> Any:
    """Register a URL; the answer carries the secret that signs its deliveries (shown only now)."""
    check_url(data.url)
    host = urlsplit(data.url).hostname or ""
    try:
        literal = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        literal = None  # a name: checked on the address each delivery connects to
    if literal is not None and is_blocked(str(literal), settings.blocked_networks):
        raise BadRequestError(
            f"Refusing webhook target {host}: a loopback, private, link-local or otherwise internal address.",
            code="refused_target",
        )
    endpoint = WebhookEndpoint(
        workspace_id=user.workspace_id,
        url=data.url,
        events=sorted(set(data.events)),
        secret=webhooks.new_secret(),
    )
    session.add(endpoint)
    session.commit()
    return {**_public(endpoint), "secret": endpoint.secret}


@router.get("/{webhook_id}", response_model=WebhookPublic)
def get_webhook(webhook_id: str, session: SessionDep, user: CurrentUser) -> Any:
    return _public(_endpoint(session, user, webhook_id))


@router.delete("/{webhook_id}", status_code=204, response_class=Response)
def delete_webhook(webhook_id: str, session: SessionDep, user: CurrentUser) -> Response:
    """Stop telling this URL (its pending deliveries go too)."""
    session.delete(_endpoint(session, user, webhook_id))
    session.commit()
    return Response(status_code=204)


@router.post("/{webhook_id}/test", status_code=202, response_model=DeliveryPublic)
def test_webhook(webhook_id: str, session: SessionDep, user: CurrentUser) -> Any:
    """Queue a ``ping`` delivery now; follow it in the deliveries."""
    return _delivery(webhooks.ping(session, _endpoint(session, user, webhook_id)))


@router.get("/{webhook_id}/deliveries", response_model=Page[DeliveryPublic])
def list_deliveries(
    webhook_id: str, request: Request, session: SessionDep, user: CurrentUser, page: PageDep
) -> Any:
    """The endpoint's deliveries, newest first: status, attempts, the target's last answer."""
    endpoint = _endpoint(session, user, webhook_id)
    stmt = (
        select(WebhookDelivery)
        .where(WebhookDelivery.endpoint_id == endpoint.id)
        .order_by(WebhookDelivery.created.desc(), WebhookDelivery.id)
    )
    return paginate(
        session, stmt, request=request, page=page, serialize=lambda rows: [_delivery(d) for d in rows]
    )
