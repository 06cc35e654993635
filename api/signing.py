"""Signed, expiring download links for stored images.

``img_path`` works with the API token like every other endpoint, and also
carries an HMAC signature so that a plain ``GET`` (a browser ``<img>``, or
ximilar-client's ``Image.download()``, which sends no token) can fetch it
until it expires. The signing key is generated once and kept in the database,
so every replica of the control plane signs and checks with the same key.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import secrets
import time

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from api.db.models import InstanceSecret

_KEY_NAME = "download-url-signing"
# Expiry is rounded up to the hour so that a link stays the same (and cacheable) within the hour.
_ROUND_S = 3600


class UrlSigner:
    def __init__(self, key: bytes, *, ttl_s: int) -> None:
        self._key = key
        self.ttl_s = ttl_s

    def expiry(self, now: float | None = None) -> int:
        now = time.time() if now is None else now
        return math.ceil((now + self.ttl_s) / _ROUND_S) * _ROUND_S

    def sign(self, image_id: str, kind: str, expires: int) -> str:
        message = f"{image_id}:{kind}:{expires}".encode()
        return hmac.new(self._key, message, hashlib.sha256).hexdigest()[:40]

    def verify(
        self, image_id: str, kind: str, expires: int, signature: str, *, now: float | None = None
    ) -> bool:
        now = time.time() if now is None else now
        if expires < now:
            return False
        return hmac.compare_digest(self.sign(image_id, kind, expires), signature)


def load_signing_key(session_factory: sessionmaker[Session]) -> bytes:
    """Return the instance's signing key, creating it on first start (safe against concurrent starts)."""
    with session_factory() as session:
        value = session.scalar(select(InstanceSecret.value).where(InstanceSecret.name == _KEY_NAME))
        if value is not None:
            return bytes.fromhex(value)
        session.add(InstanceSecret(name=_KEY_NAME, value=secrets.token_hex(32)))
        try:
            session.commit()
        except IntegrityError:
            session.rollback()
        value = session.scalar(select(InstanceSecret.value).where(InstanceSecret.name == _KEY_NAME))
        assert value is not None
        return bytes.fromhex(value)
