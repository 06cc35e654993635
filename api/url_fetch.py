"""Fetch an image from a user-given URL without becoming an SSRF proxy.

The check happens where it cannot be dodged: in the network backend, at
connect time, on the IP address actually dialled. A host name that resolves
(or re-resolves, DNS rebinding) to a refused network is never connected to,
and every redirect hop goes through the same check. The whole fetch has a
deadline and a byte cap.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urljoin, urlsplit

import httpcore

from taskvision.errors import ImageFetchError, PayloadTooLargeError

logger = logging.getLogger(__name__)

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class FetchPolicy:
    timeout_s: float
    max_bytes: int
    max_redirects: int
    blocked_networks: Sequence[Network]


def _is_blocked(ip: str, blocked: Iterable[Network]) -> bool:
    addr = ipaddress.ip_address(ip.split("%")[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        mapped = addr.ipv4_mapped
        if any(mapped in net for net in blocked):
            return True
    return any(addr in net for net in blocked)


class _GuardedBackend(httpcore.SyncBackend):
    """Resolves the host itself and refuses to dial any address in a blocked network."""

    def __init__(self, blocked: Sequence[Network]) -> None:
        self.blocked = blocked

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            raise ImageFetchError(f"Cannot resolve host {host!r}.") from exc
        addresses = [str(info[4][0]) for info in infos]
        refused = [a for a in addresses if _is_blocked(a, self.blocked)]
        if refused:
            # Refuse when *any* address is internal: the client library could pick it.
            raise ImageFetchError(
                f"Refusing to fetch from {host}: it resolves to a loopback, private or link-local "
                f"address ({refused[0]})."
            )
        last: Exception | None = None
        for address in addresses:
            try:
                return super().connect_tcp(address, port, timeout, local_address, socket_options)
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                last = exc
        raise ImageFetchError(f"Cannot connect to {host}:{port}: {last}")


def fetch_image_bytes(url: str, policy: FetchPolicy) -> bytes:
    """GET ``url`` (http or https), following up to ``max_redirects`` redirects.

    Raises:
        ImageFetchError: refused target, bad scheme, timeout, HTTP error.
        PayloadTooLargeError: the body is larger than ``max_bytes``.
    """
    deadline = time.monotonic() + policy.timeout_s
    backend = _GuardedBackend(policy.blocked_networks)
    with httpcore.ConnectionPool(network_backend=backend, retries=0) as pool:
        current = url
        for _hop in range(policy.max_redirects + 1):
            parts = urlsplit(current)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ImageFetchError(f"Only http and https image URLs are supported, not {current!r}.")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ImageFetchError(f"Fetching {url} timed out after {policy.timeout_s:g} s.")
            timeouts = {"connect": remaining, "read": remaining, "write": remaining, "pool": remaining}
            try:
                with pool.stream(
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
                    if declared and declared.isdigit() and int(declared) > policy.max_bytes:
                        raise PayloadTooLargeError(
                            f"The image at {current} is {declared} bytes; the cap is {policy.max_bytes}."
                        )
                    return _read_capped(response, policy.max_bytes, deadline, url, policy.timeout_s)
            except (httpcore.TimeoutException, TimeoutError) as exc:
                raise ImageFetchError(f"Fetching {url} timed out after {policy.timeout_s:g} s.") from exc
            except (httpcore.NetworkError, httpcore.ProtocolError, httpcore.UnsupportedProtocol) as exc:
                raise ImageFetchError(f"Fetching {current} failed: {exc}") from exc
        raise ImageFetchError(f"Fetching {url} was redirected more than {policy.max_redirects} times.")


def _header(headers: list[tuple[bytes, bytes]], name: bytes) -> str | None:
    for key, value in headers:
        if key.lower() == name:
            return value.decode("latin-1").strip()
    return None


def _read_capped(
    response: httpcore.Response, max_bytes: int, deadline: float, url: str, timeout: float
) -> bytes:
    chunks: list[bytes] = []
    size = 0
    for chunk in response.iter_stream():
        size += len(chunk)
        if size > max_bytes:
            raise PayloadTooLargeError(f"The image at {url} is larger than the cap of {max_bytes} bytes.")
        if time.monotonic() > deadline:
            raise ImageFetchError(f"Fetching {url} timed out after {timeout:g} s.")
        chunks.append(chunk)
    return b"".join(chunks)
