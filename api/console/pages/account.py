"""The account page: the user, the workspace, the token's first characters, this session, the webhooks.

Webhooks are the REST API's (``/recognition/v2/webhook``), managed here through
its route functions: add one (its signing secret is shown once, on the page that
answers the form), send a test delivery, delete one, and see each one's last
deliveries (status, attempts, the target's answer). While a delivery is pending
the webhooks panel reloads itself every two seconds.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from sqlalchemy import select
from sqlalchemy.orm import Session

from api.console.deps import CsrfChecked, Viewer, ViewerDep
from api.console.pages.common import act, form_fields, form_list
from api.console.rendering import PREFIX, render
from api.db.models import DeliveryStatus, WebhookDelivery, WebhookEndpoint
from api.deps import SessionDep, SettingsDep
from api.http.body import parse
from api.routes import webhooks as webhook_routes
from api.schemas.common import ID_PATTERN
from api.schemas.webhooks import WebhookCreate
from api.services.webhooks import EVENTS
from taskvision.errors import NotFoundError, TaskVisionError

router = APIRouter()

ACCOUNT = f"{PREFIX}/account"
LAST_DELIVERIES = 5
EVENT_WORDS = {
    "training.started": "a training starts",
    "training.succeeded": "a training succeeds",
    "training.failed": "a training fails",
    "version.production_changed": "production switches to another version",
}


@dataclass(frozen=True)
class Hook:
    endpoint: WebhookEndpoint
    deliveries: list[WebhookDelivery]


def _hooks(session: Session, viewer: Viewer) -> list[Hook]:
    endpoints = session.scalars(
        select(WebhookEndpoint)
        .where(WebhookEndpoint.workspace_id == viewer.workspace_id)
        .order_by(WebhookEndpoint.created, WebhookEndpoint.id)
    ).all()
    hooks = []
    for endpoint in endpoints:
        deliveries = session.scalars(
            select(WebhookDelivery)
            .where(WebhookDelivery.endpoint_id == endpoint.id)
            .order_by(WebhookDelivery.created.desc(), WebhookDelivery.id)
            .limit(LAST_DELIVERIES)
        ).all()
        hooks.append(Hook(endpoint, list(deliveries)))
    return hooks


def _context(request: Request, session: Session, viewer: Viewer) -> dict[str, Any]:
    hooks = _hooks(session, viewer)
    return {
        "site": f"{request.url.scheme}://{request.url.netloc}",
        "hooks": hooks,
        "events": [(event, EVENT_WORDS[event]) for event in EVENTS],
        "pending": any(d.status == DeliveryStatus.PENDING for hook in hooks for d in hook.deliveries),
        "created": None,
        "form_error": "",
        "form_url": "",
    }


@router.get("/account")
def account(request: Request, session: SessionDep, viewer: ViewerDep) -> Response:
    return render(request, "account.html", _context(request, session, viewer), viewer=viewer)


@router.get("/account/webhooks")
def webhooks_panel(request: Request, session: SessionDep, viewer: ViewerDep) -> Response:
    """The webhooks panel alone (what htmx reloads while a delivery is pending)."""
    return render(request, "_webhooks.html", _context(request, session, viewer), viewer=viewer)


@router.post("/account/webhooks", dependencies=[CsrfChecked])
async def add_webhook(
    request: Request, session: SessionDep, settings: SettingsDep, viewer: ViewerDep
) -> Response:
    """Add a webhook; the answer is the page with its secret, shown this once."""
    form = await form_fields(request)
    events = await form_list(request, "events")
    context = _context(request, session, viewer)
    try:
        data = parse(WebhookCreate, {"url": form.get("url", ""), "events": events}, form=True)
        created = webhook_routes.create_webhook(
            session=session, user=viewer.user, data=data, settings=settings
        )
    except TaskVisionError as exc:
        session.rollback()
        context.update(form_error=exc.detail, form_url=str(form.get("url", ""))[:2048])
        return render(request, "account.html", context, viewer=viewer, status_code=exc.status)
    context.update(_context(request, session, viewer), created=created)
    return render(request, "account.html", context, viewer=viewer, status_code=201)


def _check_id(webhook_id: str) -> None:
    if not re.fullmatch(ID_PATTERN, webhook_id):
        raise NotFoundError(f"Webhook {webhook_id} not found.")


@router.post("/account/webhooks/{webhook_id}/test", dependencies=[CsrfChecked])
def test_webhook(request: Request, webhook_id: str, session: SessionDep, viewer: ViewerDep) -> Response:
    _check_id(webhook_id)

    def ping() -> str:
        webhook_routes.test_webhook(webhook_id=webhook_id, session=session, user=viewer.user)
        return "Test delivery queued: it shows under the webhook's last deliveries."

    return act(request, session, ACCOUNT, ping)


@router.post("/account/webhooks/{webhook_id}/delete", dependencies=[CsrfChecked])
def delete_webhook(request: Request, webhook_id: str, session: SessionDep, viewer: ViewerDep) -> Response:
    _check_id(webhook_id)

    def delete() -> str:
        webhook_routes.delete_webhook(webhook_id=webhook_id, session=session, user=viewer.user)
        return "Webhook deleted."

    return act(request, session, ACCOUNT, delete)
