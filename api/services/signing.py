"""Signed, expiring download links for stored images.

``img_path`` works with the API token like every other endpoint, and also
carries an HMAC signature so that a plain ``GET`` (a browser ``<img>``, or
ximilar-client's ``Image.download()``, which sends no token) can fetch it
until it expires.

A link is refused when its ``expires`` is not a plain number of at most 12
ASCII digits, lies in the past, or lies further ahead than the configured
lifetime plus a minute of clock skew (a leaked key could otherwise mint links
that never expire, and a link from the future would outlive a lifetime cut).

Where the signing key comes from (:func:`load_signing_key`):

* ``TASKVISION_SECRET_KEY`` when set: the cluster's Secret, the same in every
  replica. It is required whenever the database is not the embedded SQLite file.
* otherwise (embedded mode) a random key in ``<data_dir>/signing.key``, created
  on first start with permissions 0600. A key that an earlier version kept in
  the database is moved into that file, so links already handed out stay valid.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import secrets
import time
from pathlib import Path

from sqlalchemy import delete, select
from sqlalchemy.orm import Session, sessionmaker

from api.db.models import InstanceSecret
from api.settings import Settings
from taskvision.errors import TaskVisionError

logger = logging.getLogger(__name__)

KEY_FILE = "signing.key"
_LEGACY_KEY_NAME = "download-url-signing"
# A link's expiry is rounded down to the hour, so that it stays the same (and cacheable)
# within the hour and never lies more than the lifetime ahead.
_ROUND_S = 3600
CLOCK_SKEW_S = 60
_EXPIRES = re.compile(r"[0-9]{1,12}")


class SigningKeyMissing(TaskVisionError, RuntimeError):
    """The service cannot start: replicas sharing a database need one signing key."""


class UrlSigner:
    def __init__(self, key: bytes, *, ttl_s: int) -> None:
        self._key = key
        self.ttl_s = ttl_s

    def expiry(self, now: float | None = None) -> int:
        """When links made now expire: within the last hour of the lifetime, the same all hour."""
        now = time.time() if now is None else now
        step = _ROUND_S if self.ttl_s >= 2 * _ROUND_S else 1
        return int((now + self.ttl_s) // step * step)

    def sign(self, image_id: str, kind: str, expires: int) -> str:
        message = f"{image_id}:{kind}:{expires}".encode()
        return hmac.new(self._key, message, hashlib.sha256).hexdigest()[:40]

    def verify(
        self, image_id: str, kind: str, expires: int, signature: str, *, now: float | None = None
    ) -> bool:
        now = time.time() if now is None else now
        if expires < now or expires > now + self.ttl_s + CLOCK_SKEW_S:
            return False
        return hmac.compare_digest(self.sign(image_id, kind, expires), signature)

    def verify_text(
        self, image_id: str, kind: str, expires: str, signature: str, *, now: float | None = None
    ) -> bool:
        """:meth:`verify` for the raw query values of a link (anything malformed is just invalid)."""
        if not _EXPIRES.fullmatch(expires) or not signature.isascii():
            return False
        return self.verify(image_id, kind, int(expires), signature, now=now)


def load_signing_key(settings: Settings, session_factory: sessionmaker[Session]) -> bytes:
    """The key download links are signed with (see the module docstring for where it comes from)."""
    if settings.secret_key is not None and settings.secret_key.get_secret_value():
        return hashlib.sha256(settings.secret_key.get_secret_value().encode()).digest()
    if not settings.effective_database_url.startswith("sqlite"):
        raise SigningKeyMissing(
            "Set TASKVISION_SECRET_KEY: with a shared database (cluster mode) every replica must sign "
            "download links with the same key, which comes from the Secret (manifests/README.md)."
        )
    return _key_file(settings.data_dir / KEY_FILE, session_factory)


def _key_file(path: Path, session_factory: sessionmaker[Session]) -> bytes:
    if not path.exists():
        with session_factory() as session:
            legacy = session.scalar(
                select(InstanceSecret.value).where(InstanceSecret.name == _LEGACY_KEY_NAME)
            )
        _create(path, legacy or secrets.token_hex(32))
        if legacy is not None:
            with session_factory() as session:
                session.execute(delete(InstanceSecret).where(InstanceSecret.name == _LEGACY_KEY_NAME))
                session.commit()
            logger.info("moved the link-signing key from the database to %s", path)
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        logger.warning("%s is readable by others (mode %o); setting 0600", path, mode)
        path.chmod(0o600)
    return bytes.fromhex(path.read_text().strip())


def _create(path: Path, hex_key: str) -> None:
    """Write the key file with 0600 from the start; a concurrent first start keeps the first key."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    with os.fdopen(fd, "w") as handle:
        handle.write(hex_key + "\n")
        handle.flush()
        os.fsync(handle.fileno())
