"""The account page: the user, the workspace, the token's first characters, this session.

Phase 2 adds the workspace's webhooks (add, test, last deliveries) in the
template's ``webhooks`` block.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from api.console.deps import ViewerDep
from api.console.rendering import render

router = APIRouter()


@router.get("/account")
def account(request: Request, viewer: ViewerDep) -> Response:
    site = f"{request.url.scheme}://{request.url.netloc}"
    return render(request, "account.html", {"site": site}, viewer=viewer)
