"""Pages: DRF shape, relative next/previous links, page size cap, bad page numbers."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from tests.support.api import create_task


def test_pages_link_with_relative_urls_and_cover_everything(client: TestClient) -> None:
    created = [create_task(client, name=f"t{i:02d}")["id"] for i in range(25)]
    first = client.get("/recognition/v2/task").json()
    assert first["count"] == 25 and len(first["results"]) == 20 and first["previous"] is None
    assert first["next"].startswith("/recognition/v2/task?") and "page=2" in first["next"]
    second = client.get(first["next"]).json()
    assert len(second["results"]) == 5 and second["next"] is None
    assert second["previous"].startswith("/recognition/v2/task?page=1")
    assert [t["id"] for t in first["results"] + second["results"]] == created


def test_page_size_is_capped_and_kept_in_links(client: TestClient) -> None:
    for i in range(5):
        create_task(client, name=f"t{i}")
    page = client.get("/recognition/v2/task/?page_size=2").json()
    assert len(page["results"]) == 2 and "page_size=2" in page["next"]
    huge = client.get("/recognition/v2/task/?page_size=100000").json()
    assert len(huge["results"]) == 5
    beyond = client.get("/recognition/v2/task/?page=9").json()
    assert beyond["results"] == [] and beyond["next"] is None


@pytest.mark.parametrize("page", ["-1", "0", "two"])
def test_bad_page_number_is_422(client: TestClient, page: str) -> None:
    response = client.get(f"/recognition/v2/task/?page={page}")
    # The schema says page is an integer of at least 1: FastAPI's validation answers.
    assert response.status_code == 422 and response.json()["code"] == "validation_error"
    assert "page" in response.json()["detail"]
