"""Webhooks: tell a workspace's URLs when its trainings start, succeed or fail, and when production changes.

Order of work, and why:
1. :func:`emit` adds one delivery row per subscribed endpoint *in the transaction
   that changes the state* (an outbox): an event is never lost to a crash, and
   never sent for a change that was rolled back.
2. :class:`WebhookDispatcher` (a background job with a thread of its own, so a
   slow target never delays the run watcher or a request) claims due deliveries
   with a conditional update (two replicas never send one twice), and POSTs
   them concurrently, each with a timeout.
3. A 2xx answer finishes the delivery. Anything else is retried with a growing
   back-off (``webhook_retry_base_s`` x 3^n, at most an hour apart) until
   ``webhook_retry_window_s`` (a day) after the event, then the delivery is
   recorded as failed. A target refused by the address rules (loopback, private,
   link-local... as for image URLs) fails at once.

Every delivery is signed: ``X-TaskVision-Signature: t=<unix time>,v1=<hex>``
where ``v1`` is HMAC-SHA256 with the endpoint's secret over ``"<t>.<body>"``
(:func:`signature`). A receiver recomputes it, compares in constant time, and
refuses a ``t`` too far from its own clock (replays).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import secrets
import time
from datetime import datetime, timedelta
from typing import Any

import anyio
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from api.db.models import DeliveryStatus, WebhookDelivery, WebhookEndpoint, new_id, utcnow
from api.services.url_fetch import Network, post_json
from taskvision.errors import TaskVisionError

logger = logging.getLogger(__name__)

EVENTS = ("training.started", "training.succeeded", "training.failed", "version.production_changed")
PING = "ping"  # sent by POST /webhook/{id}/test
_MAX_GAP_S = 3600.0


def new_secret() -> str:
    return "whsec_" + secrets.token_hex(24)


def signature(secret: str, timestamp: int, body: bytes) -> str:
    """The ``X-TaskVision-Signature`` header value for ``body`` sent at ``timestamp``."""
    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


def emit(session: Session, workspace_id: str, event: str, data: dict[str, Any]) -> int:
    """Queue ``event`` for every endpoint of the workspace that wants it (in the caller's transaction)."""
    endpoints = session.scalars(select(WebhookEndpoint).where(WebhookEndpoint.workspace_id == workspace_id))
    queued = 0
    now = utcnow()
    for endpoint in endpoints:
        if event != PING and event not in endpoint.events:
            continue
        session.add(_delivery(endpoint, event, data, now))
        queued += 1
    return queued


def _delivery(endpoint: WebhookEndpoint, event: str, data: dict[str, Any], now: datetime) -> WebhookDelivery:
    delivery_id = new_id()
    payload = {
        "id": delivery_id,
        "event": event,
        "created": now.isoformat(),
        "workspace": endpoint.workspace_id,
        "data": data,
    }
    return WebhookDelivery(
        id=delivery_id,
        endpoint_id=endpoint.id,
        event=event,
        payload=payload,
        status=DeliveryStatus.PENDING,
        next_attempt=now,
        created=now,
    )


def ping(session: Session, endpoint: WebhookEndpoint) -> WebhookDelivery:
    """Queue a test delivery to one endpoint (committed)."""
    delivery = _delivery(endpoint, PING, {"message": "This is a test delivery from TaskVision."}, utcnow())
    session.add(delivery)
    session.commit()
    return delivery


class WebhookDispatcher:
    def __init__(
        self,
        session_factory: sessionmaker[Session],
        *,
        blocked_networks: tuple[Network, ...],
        timeout_s: float,
        retry_base_s: float,
        retry_window_s: float,
        max_in_flight: int,
    ) -> None:
        self.session_factory = session_factory
        self.blocked_networks = blocked_networks
        self.timeout_s = timeout_s
        self.retry_base_s = retry_base_s
        self.retry_window_s = retry_window_s
        self.max_in_flight = max_in_flight

    def tick(self) -> int:
        """Send the due deliveries (at most ``max_in_flight`` at once); returns how many were tried."""
        claimed = self._claim()
        if claimed:
            anyio.run(self._send_all, claimed)
        return len(claimed)

    def _claim(self) -> list[tuple[str, str, str, bytes]]:
        """Due deliveries, leased to this process (their next attempt moved past the timeout)."""
        now = utcnow()
        lease = now + timedelta(seconds=self.timeout_s * 3 + 5)
        with self.session_factory() as session:
            due = session.execute(
                select(WebhookDelivery.id, WebhookDelivery.next_attempt)
                .where(WebhookDelivery.status == DeliveryStatus.PENDING, WebhookDelivery.next_attempt <= now)
                .order_by(WebhookDelivery.next_attempt)
                .limit(self.max_in_flight)
            ).all()
            claimed = []
            for delivery_id, next_attempt in due:
                result = session.execute(
                    update(WebhookDelivery)
                    .where(WebhookDelivery.id == delivery_id, WebhookDelivery.next_attempt == next_attempt)
                    .values(next_attempt=lease)
                    .execution_options(synchronize_session=False)
                )
                if getattr(result, "rowcount", 0) == 1:
                    claimed.append(delivery_id)
            session.commit()
            jobs = []
            for delivery_id in claimed:
                delivery = session.get(WebhookDelivery, delivery_id)
                endpoint = session.get(WebhookEndpoint, delivery.endpoint_id) if delivery else None
                if delivery is None or endpoint is None:
                    continue
                body = json.dumps(delivery.payload, separators=(",", ":"), sort_keys=True).encode()
                jobs.append((delivery.id, endpoint.url, endpoint.secret, body))
            return jobs

    async def _send_all(self, jobs: list[tuple[str, str, str, bytes]]) -> None:
        async with anyio.create_task_group() as group:
            for job in jobs:
                group.start_soon(self._send, *job)

    async def _send(self, delivery_id: str, url: str, secret: str, body: bytes) -> None:
        event = json.loads(body)["event"]
        headers = {
            "Content-Type": "application/json",
            "X-TaskVision-Event": event,
            "X-TaskVision-Delivery": delivery_id,
            "X-TaskVision-Signature": signature(secret, int(time.time()), body),
        }
        status: int | None = None
        error = ""
        permanent = False
        try:
            status = await post_json(
                url, body, headers, timeout_s=self.timeout_s, blocked_networks=self.blocked_networks
            )
            if not 200 <= status < 300:
                error = f"HTTP {status}"
        except TaskVisionError as exc:
            error = exc.detail
            permanent = error.startswith("Refusing")  # the address rules will not change their mind
        await anyio.to_thread.run_sync(self._record, delivery_id, status, error, permanent)

    def _record(self, delivery_id: str, status: int | None, error: str, permanent: bool) -> None:
        with self.session_factory() as session:
            delivery = session.get(WebhookDelivery, delivery_id)
            if delivery is None:
                return
            now = utcnow()
            delivery.attempts += 1
            delivery.last_status_code, delivery.last_error = status, error
            if not error:
                delivery.status, delivery.finished, delivery.next_attempt = (
                    DeliveryStatus.SUCCEEDED,
                    now,
                    None,
                )
            else:
                gap = min(_MAX_GAP_S, self.retry_base_s * 3 ** (delivery.attempts - 1))
                retry_at = now + timedelta(seconds=gap)
                expired = retry_at > delivery.created + timedelta(seconds=self.retry_window_s)
                if permanent or expired:
                    delivery.status, delivery.finished, delivery.next_attempt = (
                        DeliveryStatus.FAILED,
                        now,
                        None,
                    )
                else:
                    delivery.next_attempt = retry_at
            session.commit()
            logger.info("webhook delivery %s: %s", delivery_id, error or f"HTTP {status}")
