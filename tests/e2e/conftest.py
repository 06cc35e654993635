"""Fixtures that run the real ``taskvision serve`` as a subprocess on loopback."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.live_server import LiveServer, running_server


@pytest.fixture(scope="module")
def live_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """Start ``taskvision serve`` on a free loopback port with its own data dir; stop it afterwards."""
    with running_server(tmp_path_factory.mktemp("taskvision-e2e")) as server:
        yield server
