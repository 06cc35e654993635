"""What the in-process stand-ins for the Kubernetes and Kubeflow APIs share.

Both record every request they receive (``requests``, guarded by ``_lock``) so a
test can check what a real client sent, and both are used in a ``with`` block.
"""

from __future__ import annotations

import threading
from types import TracebackType
from typing import Generic, Protocol, Self, TypeVar


class _Request(Protocol):
    @property
    def method(self) -> str: ...

    @property
    def path(self) -> str: ...


RequestT = TypeVar("RequestT", bound=_Request)


class RequestLog(Generic[RequestT]):
    """Mixin: the recorded requests, looked up by method and path; ``with`` starts and stops."""

    requests: list[RequestT]
    _lock: threading.RLock

    def start(self) -> Self:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def requests_to(self, method: str, path: str) -> list[RequestT]:
        """The recorded requests with this method and path (path without the query)."""
        with self._lock:
            return [r for r in self.requests if r.method == method and r.path == path]

    def last_request(self, method: str, path: str) -> RequestT:
        """The most recent request with this method and path."""
        matching = self.requests_to(method, path)
        if not matching:
            seen = [f"{r.method} {r.path}" for r in self.requests]
            raise AssertionError(f"no {method} {path} was received; requests: {seen}")
        return matching[-1]
