"""Image URLs at a host that accepts connections and never answers cannot stall the server.

Before: the records of a classify request were fetched one after another, each
with its own 10 s timeout, in a worker thread that also held a database
connection; ten such URLs took 100 s, and 16 such requests in flight made
``GET /task/`` take 6.6 s for everybody else. Now a request's URLs are fetched
concurrently under one deadline, asynchronously (no thread, no connection
held), with caps on fetches in flight.

The server under test is the real app on uvicorn (in this process, on a free
loopback port), so the event loop, the thread pool and the connection pool are
the production ones.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
import uvicorn

from api.auth import create_user
from api.db.models import Task
from api.main import create_app
from api.services.versions import import_bundle
from api.settings import DEFAULT_BLOCKED_NETWORKS, Settings
from taskvision.task_types import TaskType
from tests.support.bundles import linear_bundle

pytestmark = pytest.mark.slow
DEADLINE_S = 2.0


class BlackHole:
    """A TCP server that accepts every connection and never sends a byte."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(1024)
        self.port = self.sock.getsockname()[1]
        self.accepted: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted.append(conn)

    def close(self) -> None:
        self.sock.close()
        for conn in self.accepted:
            conn.close()


@dataclass
class Live:
    url: str
    token: str  # owns a task with a servable version
    other_token: str  # another workspace
    task_id: str


@pytest.fixture(scope="module")
def hole() -> Iterator[BlackHole]:
    server = BlackHole()
    yield server
    server.close()


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    data_dir = tmp_path_factory.mktemp("deadlines")
    blocked = [n for n in DEFAULT_BLOCKED_NETWORKS if n != "127.0.0.0/8"]
    settings = Settings(data_dir=data_dir, url_blocked_networks=blocked, url_fetch_timeout_s=DEADLINE_S)
    app = create_app(settings)
    with app.state.services.session_factory() as session:
        owner, token = create_user(session, "owner")
        _, other_token = create_user(session, "other")
        task = Task(workspace_id=owner.workspace_id, name="t", type="multi_class")
        session.add(task)
        session.commit()
        task_id = task.id
        # A servable version without training: a bundle with a random head over the backbone.
        labels = ["a", "b"]
        from api.db.models import Label, TaskLabel

        for name in labels:
            label = Label(workspace_id=owner.workspace_id, name=name, type="category")
            session.add(label)
            session.flush()
            session.add(TaskLabel(task_id=task_id, label_id=label.id))
        session.commit()
        bundle = linear_bundle(Path(data_dir) / "bundle", TaskType.MULTI_CLASS, labels)
        import_bundle(session, app.state.services.blobs, session.get(Task, task_id), bundle, production=True)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    yield Live(f"http://127.0.0.1:{port}", token, other_token, task_id)
    server.should_exit = True
    thread.join(timeout=10)
    app.state.services.engine.dispose()


def _classify_hanging(live: Live, hole: BlackHole, n: int = 10) -> tuple[float, dict]:
    records = [{"_url": f"http://127.0.0.1:{hole.port}/img{i}.jpg"} for i in range(n)]
    started = time.monotonic()
    response = requests.post(
        f"{live.url}/recognition/v2/classify",
        json={"task_id": live.task_id, "records": records},
        headers={"Authorization": f"Token {live.token}"},
        timeout=60,
    )
    assert response.status_code == 200, response.text
    return time.monotonic() - started, response.json()


def test_ten_hanging_urls_cost_one_deadline_not_ten(live: Live, hole: BlackHole) -> None:
    elapsed, answer = _classify_hanging(live, hole)
    assert elapsed < DEADLINE_S + 1.5, elapsed  # before: 10 x the timeout, one after another
    statuses = [record["_status"] for record in answer["records"]]
    assert all(s["code"] == 400 and "timed out after 2 s" in s["text"] for s in statuses), statuses


def test_sixteen_stalled_requests_slow_nobody_else(live: Live, hole: BlackHole) -> None:
    other = {"Authorization": f"Token {live.other_token}"}
    with ThreadPoolExecutor(max_workers=16) as pool:
        stalled = [pool.submit(_classify_hanging, live, hole) for _ in range(16)]
        time.sleep(0.5)  # all 16 are now waiting on the black hole (or for a fetch slot)
        timings = []
        for path in ("/healthz", "/recognition/v2/task/", "/recognition/v2/training-image/", "/readyz"):
            started = time.monotonic()
            response = requests.get(f"{live.url}{path}", headers=other, timeout=30)
            timings.append(time.monotonic() - started)
            assert response.status_code == 200, (path, response.text)
        # The owner's own light requests are not held up either.
        started = time.monotonic()
        own = requests.get(
            f"{live.url}/recognition/v2/task/", headers={"Authorization": f"Token {live.token}"}, timeout=30
        )
        timings.append(time.monotonic() - started)
        assert own.status_code == 200
        results = [future.result() for future in stalled]
    assert max(timings) < 0.5, timings  # before: 6.6 s for GET /task/
    assert max(elapsed for elapsed, _ in results) < DEADLINE_S + 3, [e for e, _ in results]
    codes = {record["_status"]["code"] for _, answer in results for record in answer["records"]}
    # 160 URLs against a cap of 16 fetches per workspace: the rest wait for a slot, then are refused.
    assert codes <= {400, 429} and 429 in codes, codes
