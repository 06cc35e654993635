"""Fetch images from user-given URLs without becoming an SSRF proxy or a way to stall the server.

Where a URL may lead: the check happens where it cannot be dodged, in the
network backend, at connect time, on the IP address actually dialled. A host
name that resolves (or re-resolves, DNS rebinding) to a refused network is
never connected to, and every redirect hop goes through the same check
(:func:`is_blocked` is the policy; the default refused networks are in
``api/settings.py``).

How long and how many: fetching is asynchronous, so a remote host that
accepts and never answers holds no worker thread and no database connection.
All the URLs of one request are fetched concurrently under ONE deadline
(``timeout_s``), so ten hanging URLs cost the deadline once, not ten times.
At most ``max_in_flight`` fetches run in the process and
``max_in_flight_per_workspace`` for one workspace (:class:`FetchSlots`); a
fetch beyond them waits for a slot until the request's deadline. Each fetch
also has a byte cap.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urljoin, urlsplit

import anyio
import httpcore

from taskvision.errors import (
    ImageFetchError,
    PayloadTooLargeError,
    TaskVisionError,
    TooManyRequestsError,
)

logger = logging.getLogger(__name__)

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
_SLOT_POLL_S = 0.02


@dataclass(frozen=True)
class FetchPolicy:
    timeout_s: float  # deadline for all the URLs of one request together
    max_bytes: int
    max_redirects: int
    blocked_networks: Sequence[Network]


def is_blocked(ip: str, blocked: Iterable[Network]) -> bool:
    """Whether connecting to ``ip`` is refused (an IPv4-mapped IPv6 address counts as its IPv4)."""
    addr = ipaddress.ip_address(ip.split("%")[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        mapped = addr.ipv4_mapped
        if any(mapped in net for net in blocked):
            return True
    return any(addr in net for net in blocked)


class FetchSlots:
    """Caps on fetches in flight, for the process and per workspace (thread-safe, loop-agnostic)."""

    def __init__(self, *, total: int, per_workspace: int) -> None:
        self.total = total
        self.per_workspace = per_workspace
        self._active = 0
        self._by_workspace: dict[str, int] = {}
        self._lock = threading.Lock()

    def try_acquire(self, workspace: str) -> bool:
        with self._lock:
            mine = self._by_workspace.get(workspace, 0)
            if self._active >= self.total or mine >= self.per_workspace:
                return False
            self._active += 1
            self._by_workspace[workspace] = mine + 1
            return True

    def release(self, workspace: str) -> None:
        with self._lock:
            self._active -= 1
            left = self._by_workspace[workspace] - 1
            if left:
                self._by_workspace[workspace] = left
            else:
                del self._by_workspace[workspace]

    def in_flight(self, workspace: str | None = None) -> int:
        with self._lock:
            return self._active if workspace is None else self._by_workspace.get(workspace, 0)


class _GuardedBackend(httpcore.AnyIOBackend):
    """Resolves the host itself and refuses to dial any address in a blocked network."""

    def __init__(self, blocked: Sequence[Network]) -> None:
        self.blocked = blocked

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        try:
            infos = await anyio.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError, ValueError) as exc:  # gaierror, bad IDNA names
            raise ImageFetchError(f"Cannot resolve host {host!r}.") from exc
        addresses = [str(info[4][0]) for info in infos]
        refused = [a for a in addresses if is_blocked(a, self.blocked)]
        if refused:
            # Refuse when *any* address is internal: the client library could pick it.
            raise ImageFetchError(
                f"Refusing to fetch from {host}: it resolves to a loopback, private, link-local "
                f"or otherwise internal address ({refused[0]})."
            )
        last: Exception | None = None
        for address in addresses:
            try:
                return await super().connect_tcp(address, port, timeout, local_address, socket_options)
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                last = exc
        raise ImageFetchError(f"Cannot connect to {host}:{port}: {last}")


async def fetch_many(
    urls: Sequence[str], policy: FetchPolicy, slots: FetchSlots, *, workspace: str
) -> list[bytes | TaskVisionError]:
    """Fetch every URL concurrently under one deadline; each result is the bytes or the error."""
    deadline = time.monotonic() + policy.timeout_s
    results: list[bytes | TaskVisionError] = [
        ImageFetchError(f"Fetching {url} timed out after {policy.timeout_s:g} s.") for url in urls
    ]

    async def one(index: int, url: str) -> None:
        try:
            results[index] = await _fetch_in_slot(url, policy, slots, workspace, deadline)
        except TaskVisionError as exc:
            results[index] = exc

    # The deadline bounds the whole group: what is unfinished then keeps its "timed out" error.
    with anyio.move_on_after(max(0.0, deadline - time.monotonic())):
        async with anyio.create_task_group() as group:
            for index, url in enumerate(urls):
                group.start_soon(one, index, url)
    return results


async def fetch_image(url: str, policy: FetchPolicy, slots: FetchSlots, *, workspace: str) -> bytes:
    """One URL under the policy's deadline (raises its error)."""
    [result] = await fetch_many([url], policy, slots, workspace=workspace)
    if isinstance(result, TaskVisionError):
        raise result
    return result


async def _fetch_in_slot(
    url: str, policy: FetchPolicy, slots: FetchSlots, workspace: str, deadline: float
) -> bytes:
    while not slots.try_acquire(workspace):
        if time.monotonic() + _SLOT_POLL_S >= deadline:
            raise TooManyRequestsError(
                f"Not fetched: too many image URLs are being fetched right now (at most "
                f"{slots.per_workspace} for a workspace, {slots.total} in all); retry later.",
                code="fetch_capacity",
            )
        await anyio.sleep(_SLOT_POLL_S)
    try:
        return await _fetch(url, policy, deadline)
    finally:
        slots.release(workspace)


async def _fetch(url: str, policy: FetchPolicy, deadline: float) -> bytes:
    """GET ``url`` (http or https), following up to ``max_redirects`` redirects, before ``deadline``."""
    backend = _GuardedBackend(policy.blocked_networks)
    async with httpcore.AsyncConnectionPool(network_backend=backend, retries=0) as pool:
        current = url
        for _hop in range(policy.max_redirects + 1):
            check_url(current)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ImageFetchError(f"Fetching {url} timed out after {policy.timeout_s:g} s.")
            timeouts = {"connect": remaining, "read": remaining, "write": remaining, "pool": remaining}
            try:
                async with pool.stream(
                    "GET",
                    current,
                    headers={"User-Agent": "TaskVision/1 image fetcher", "Accept": "image/*"},
                    extensions={"timeout": timeouts},
                ) as response:
                    if response.status in (301, 302, 303, 307, 308):
                        location = _header(response.headers, b"location")
                        if not location:
                            raise ImageFetchError(f"{current} redirected without a Location.")
                        current = urljoin(current, location)
                        continue
                    if response.status != 200:
                        raise ImageFetchError(f"Fetching {current} answered HTTP {response.status}.")
                    declared = _header(response.headers, b"content-length")
                    if _declared_size(declared) > policy.max_bytes:
                        raise PayloadTooLargeError(
                            f"The image at {current} is {declared} bytes; the cap is {policy.max_bytes}."
                        )
                    return await _read_capped(response, policy, deadline, url)
            except TaskVisionError:
                raise  # a refused address, a too large answer: already in the user's words
            except (httpcore.TimeoutException, TimeoutError) as exc:
                raise ImageFetchError(f"Fetching {url} timed out after {policy.timeout_s:g} s.") from exc
            except (httpcore.NetworkError, httpcore.ProtocolError, httpcore.UnsupportedProtocol) as exc:
                raise ImageFetchError(f"Fetching {current} failed: {exc}") from exc
            except (ValueError, UnicodeError) as exc:  # e.g. an unparseable URL or Location
                raise ImageFetchError(f"Fetching {current} failed: {exc}") from exc
        raise ImageFetchError(f"Fetching {url} was redirected more than {policy.max_redirects} times.")


def check_url(url: str) -> None:
    """Refuse anything but an http(s) URL with a host (400)."""
    try:
        parts = urlsplit(url)
        ok = parts.scheme in ("http", "https") and bool(parts.hostname) and parts.port != 0
    except ValueError as exc:  # "Invalid IPv6 URL", a port out of range
        raise ImageFetchError(f"{url[:200]!r} is not a valid URL: {exc}") from exc
    if not ok:
        raise ImageFetchError(f"Only http and https image URLs are supported, not {url[:200]!r}.")


def _declared_size(value: str | None) -> int:
    """A Content-Length (0 when absent or malformed: the streamed size is capped anyway)."""
    if value and value.isascii() and value.isdigit():
        return int(value) if len(value) < 20 else 2**63
    return 0


def _header(headers: list[tuple[bytes, bytes]], name: bytes) -> str | None:
    for key, value in headers:
        if key.lower() == name:
            return value.decode("latin-1").strip()
    return None


async def _read_capped(response: httpcore.Response, policy: FetchPolicy, deadline: float, url: str) -> bytes:
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.aiter_stream():
        size += len(chunk)
        if size > policy.max_bytes:
            raise PayloadTooLargeError(
                f"The image at {url} is larger than the cap of {policy.max_bytes} bytes."
            )
        if time.monotonic() > deadline:
            raise ImageFetchError(f"Fetching {url} timed out after {policy.timeout_s:g} s.")
        chunks.append(chunk)
    return b"".join(chunks)


async def post_json(
    url: str, body: bytes, headers: dict[str, str], *, timeout_s: float, blocked_networks: Sequence[Network]
) -> int:
    """POST ``body`` to ``url`` under the same address rules as fetches; returns the HTTP status.

    Redirects are not followed (a webhook target answers itself). Raises
    :class:`ImageFetchError` for a refused address, a timeout or a network error.
    """
    check_url(url)
    backend = _GuardedBackend(blocked_networks)
    timeouts = {"connect": timeout_s, "read": timeout_s, "write": timeout_s, "pool": timeout_s}
    try:
        with anyio.fail_after(timeout_s):
            async with httpcore.AsyncConnectionPool(network_backend=backend, retries=0) as pool:
                response = await pool.request(
                    "POST",
                    url,
                    headers=[(b"User-Agent", b"TaskVision/1 webhooks")]
                    + [(key.encode(), value.encode()) for key, value in headers.items()],
                    content=body,
                    extensions={"timeout": timeouts},
                )
                return int(response.status)
    except TaskVisionError:
        raise  # a refused address: already in the user's words
    except TimeoutError as exc:
        raise ImageFetchError(f"{url} did not answer within {timeout_s:g} s.") from exc
    except httpcore.TimeoutException as exc:
        raise ImageFetchError(f"{url} did not answer within {timeout_s:g} s.") from exc
    except (httpcore.NetworkError, httpcore.ProtocolError, httpcore.UnsupportedProtocol, ValueError) as exc:
        raise ImageFetchError(f"Posting to {url} failed: {exc}") from exc
