"""DRF-style pages: ``{"count", "next", "previous", "results"}`` with relative next/previous URLs.

ximilar-client strips its endpoint from ``next`` and joins the rest to it, so
a path relative to the server root works behind any host name or proxy.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar
from urllib.parse import urlencode

from fastapi import Depends, Query, Request
from sqlalchemy import Select, func, select
from sqlalchemy.orm import Session

from api.deps import SettingsDep

Row = TypeVar("Row")


# The deepest page anyone can ask for: its offset must fit a SQL integer with room to spare.
MAX_PAGE = 1_000_000


@dataclass(frozen=True)
class PageRequest:
    page: int
    page_size: int


def page_params(
    settings: SettingsDep,
    page: Annotated[int, Query(ge=1, le=MAX_PAGE, description="Page number, from 1.")] = 1,
    page_size: Annotated[
        int | None,
        Query(ge=1, le=MAX_PAGE, description="Items per page (capped by the server's maximum)."),
    ] = None,
) -> PageRequest:
    """``page`` (from 1) and ``page_size`` (capped at ``max_page_size``) from the query."""
    size = settings.page_size if page_size is None else page_size
    return PageRequest(page=page, page_size=min(size, settings.max_page_size))


PageDep = Annotated[PageRequest, Depends(page_params)]


def _page_url(request: Request, page: int) -> str:
    params = [(k, v) for k, v in request.query_params.multi_items() if k != "page"]
    params.insert(0, ("page", str(page)))
    return f"{request.url.path}?{urlencode(params)}"


def _page(request: Request, page: PageRequest, count: int, results: list[Any]) -> dict[str, Any]:
    """The page as answered: the count on all pages, links to its neighbours, its items."""
    return {
        "count": count,
        "next": _page_url(request, page.page + 1) if page.page * page.page_size < count else None,
        "previous": _page_url(request, page.page - 1) if page.page > 1 else None,
        "results": results,
    }


def _count(session: Session, stmt: Select[Any]) -> int:
    return session.scalar(select(func.count()).select_from(stmt.order_by(None).subquery())) or 0


def paginate(
    session: Session,
    stmt: Select[Any],
    *,
    request: Request,
    page: PageRequest,
    serialize: Callable[[Sequence[Any]], list[Any]],
) -> dict[str, Any]:
    """Run ``stmt`` (already filtered and ordered) for the requested page."""
    count = _count(session, stmt)
    rows = session.scalars(stmt.offset((page.page - 1) * page.page_size).limit(page.page_size)).unique().all()
    return _page(request, page, count, serialize(rows))


def paginate_rows(
    session: Session,
    stmt: Select[Any],
    *,
    request: Request,
    page: PageRequest,
    serialize: Callable[[Sequence[Any]], list[Any]],
) -> dict[str, Any]:
    """As :func:`paginate`, for a statement of several columns (rows are tuples)."""
    count = _count(session, stmt)
    rows = session.execute(stmt.offset((page.page - 1) * page.page_size).limit(page.page_size)).all()
    return _page(request, page, count, serialize(rows))


def paginate_list(
    items: Sequence[Row],
    *,
    request: Request,
    page: PageRequest,
    serialize: Callable[[Sequence[Row]], list[Any]],
) -> dict[str, Any]:
    """As :func:`paginate`, for items already in memory (filtered and ordered)."""
    start = (page.page - 1) * page.page_size
    return _page(request, page, len(items), serialize(items[start : start + page.page_size]))
