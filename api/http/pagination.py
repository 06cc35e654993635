"""DRF-style pages: ``{"count", "next", "previous", "results"}`` with relative next/previous URLs.

ximilar-client strips its endpoint from ``next`` and joins the rest to it, so
a path relative to the server root works behind any host name or proxy.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlencode

from fastapi import Request
from sqlalchemy import Select, func, select
from sqlalchemy.orm import Session

from api.http.query import strict_int
from api.settings import Settings

Row = TypeVar("Row")


# The deepest page anyone can ask for: its offset must fit a SQL integer with room to spare.
MAX_PAGE = 1_000_000


@dataclass(frozen=True)
class PageRequest:
    page: int
    page_size: int


def page_request(request: Request, settings: Settings) -> PageRequest:
    """Read ``page`` (from 1) and ``page_size`` (capped at ``max_page_size``) from the query."""

    def _int(name: str, default: int, high: int) -> int:
        raw = request.query_params.get(name)
        if raw is None or raw == "":
            return default
        return strict_int(raw, name=name, low=1, high=high, code="invalid_page")

    return PageRequest(
        page=_int("page", 1, MAX_PAGE),
        page_size=min(_int("page_size", settings.page_size, 1_000_000), settings.max_page_size),
    )


def _page_url(request: Request, page: int) -> str:
    params = [(k, v) for k, v in request.query_params.multi_items() if k != "page"]
    params.insert(0, ("page", str(page)))
    return f"{request.url.path}?{urlencode(params)}"


def paginate(
    session: Session,
    stmt: Select[Any],
    *,
    request: Request,
    settings: Settings,
    serialize: Callable[[Sequence[Any]], list[dict[str, Any]]],
) -> dict[str, Any]:
    """Run ``stmt`` (already filtered and ordered) for the requested page."""
    pr = page_request(request, settings)
    count = session.scalar(select(func.count()).select_from(stmt.order_by(None).subquery())) or 0
    rows = session.scalars(stmt.offset((pr.page - 1) * pr.page_size).limit(pr.page_size)).unique().all()
    has_next = pr.page * pr.page_size < count
    return {
        "count": count,
        "next": _page_url(request, pr.page + 1) if has_next else None,
        "previous": _page_url(request, pr.page - 1) if pr.page > 1 else None,
        "results": serialize(rows),
    }
