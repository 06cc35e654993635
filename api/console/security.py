"""Console sessions and what protects the pages: signed cookies, CSRF tokens, security headers.

Signing in exchanges the API token for a session cookie (``tv_session``):
``<payload>.<signature>``, where the payload names the token's row (not the
token), a random session id and the expiry, and the signature is an
HMAC-SHA256 under a key derived from the service's signing key. The cookie is
``HttpOnly``, ``SameSite=Strict``, ``Secure`` when the page came over HTTPS,
and scoped to ``/console``: the REST API never receives it, and never reads
cookies anyway (token auth only).

A session ends when it expires, when its token is rotated (the row it names
is gone), or when the user signs out: the cookie is deleted, and its session
id is refused by this process until the expiry (replicas behind a load
balancer each keep their own list; see SECURITY.md).

Every state-changing request from a page carries a CSRF token, an HMAC of the
session id (a form field ``csrf_token`` or the ``X-CSRF-Token`` header that
htmx and console.js send); the sign-in form, which has no session yet, uses a
double-submit cookie. A request whose ``Origin`` is another site is refused too.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import threading
import time
from dataclasses import dataclass

SESSION_COOKIE = "tv_session"
SIGN_IN_COOKIE = "tv_sign_in"  # the sign-in form's double-submit CSRF value
FLASH_COOKIE = "tv_flash"
COOKIE_PATH = "/console"
CSRF_FIELD = "csrf_token"
CSRF_HEADER = "x-csrf-token"

# No inline script or style anywhere: scripts and style sheets come from /console/static.
# Images may be data: or blob: URLs (the try-it preview of a dropped file).
CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data: blob:",
        "connect-src 'self'",
        "font-src 'self'",
        "form-action 'self'",
        "frame-ancestors 'none'",
        "base-uri 'none'",
        "object-src 'none'",
    ]
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    "Cross-Origin-Opener-Policy": "same-origin",
}


@dataclass(frozen=True)
class SessionClaims:
    """What a valid session cookie says."""

    token_id: str  # the ApiToken row signed in with
    session_id: str
    expires: int  # Unix time


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class SessionCodec:
    """Issues and checks session cookies and the CSRF tokens tied to them."""

    def __init__(self, signing_key: bytes, *, ttl_s: int) -> None:
        # A key of its own, so that no console value can be replayed as a download signature.
        self._key = hmac.new(signing_key, b"taskvision console session v1", hashlib.sha256).digest()
        self.ttl_s = ttl_s
        self._revoked: dict[str, int] = {}  # session id -> its expiry
        self._lock = threading.Lock()

    def _sign(self, message: str) -> str:
        return hmac.new(self._key, message.encode(), hashlib.sha256).hexdigest()

    def issue(self, token_id: str, *, now: float | None = None) -> tuple[str, SessionClaims]:
        """A new session for the token's row: the cookie value and what it says."""
        now = time.time() if now is None else now
        claims = SessionClaims(token_id, secrets.token_urlsafe(18), int(now) + self.ttl_s)
        payload = _b64(
            json.dumps({"t": claims.token_id, "s": claims.session_id, "e": claims.expires}).encode()
        )
        return f"{payload}.{self._sign(payload)}", claims

    def read(self, value: str, *, now: float | None = None) -> SessionClaims | None:
        """The claims of a cookie, or None when it is forged, malformed, expired or signed out."""
        now = time.time() if now is None else now
        payload, _, signature = value.partition(".")
        if not payload or not signature.isascii() or not payload.isascii():
            return None
        if not hmac.compare_digest(self._sign(payload), signature):
            return None
        try:
            data = json.loads(_unb64(payload))
            claims = SessionClaims(str(data["t"]), str(data["s"]), int(data["e"]))
        except (ValueError, KeyError, TypeError):
            return None
        if claims.expires <= now or self.is_revoked(claims.session_id):
            return None
        return claims

    def revoke(self, claims: SessionClaims, *, now: float | None = None) -> None:
        """Refuse this session from now on (sign-out); forgotten once it would have expired anyway."""
        now = time.time() if now is None else now
        with self._lock:
            self._revoked = {sid: exp for sid, exp in self._revoked.items() if exp > now}
            self._revoked[claims.session_id] = claims.expires

    def is_revoked(self, session_id: str) -> bool:
        with self._lock:
            return session_id in self._revoked

    def csrf_token(self, session_id: str) -> str:
        return self._sign(f"csrf:{session_id}")[:32]

    def csrf_ok(self, session_id: str, presented: str | None) -> bool:
        return bool(presented) and hmac.compare_digest(self.csrf_token(session_id), str(presented))


def new_sign_in_value() -> str:
    """The random value the sign-in form and its cookie both carry (double submit)."""
    return secrets.token_urlsafe(18)


def same_value(a: str | None, b: str | None) -> bool:
    return bool(a) and bool(b) and hmac.compare_digest(str(a), str(b))


def origin_allowed(origin: str | None, host_url: str) -> bool:
    """A request with no Origin (old browsers, same-origin GET) or our own passes; another site does not."""
    if not origin or origin == "null":
        return origin is None
    return origin.rstrip("/") == host_url.rstrip("/")


def safe_next(target: str | None, default: str) -> str:
    """Where to go after signing in: only a console path of this site (no open redirect)."""
    if not target or not target.startswith(COOKIE_PATH + "/") or target.startswith("//") or "\\" in target:
        return default
    if any(ord(ch) < 0x20 for ch in target):
        return default
    return target
