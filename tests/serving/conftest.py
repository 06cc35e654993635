"""A running service with trained tasks of each type, shared by the serving tests (training is slow)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from api.auth import create_user
from api.main import create_app
from api.settings import DEFAULT_BLOCKED_NETWORKS, Settings
from tests.training.helpers import make_task, train, wait


@dataclass
class Trained:
    client: TestClient
    tasks: dict[str, dict[str, Any]]  # task type -> task JSON
    settings: Settings


@pytest.fixture(scope="package")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Trained]:
    # Loopback is allowed for image URLs so that tests can serve images; 127.0.0.2/31 stays refused.
    blocked = [n for n in DEFAULT_BLOCKED_NETWORKS if n != "127.0.0.0/8"] + ["127.0.0.2/31"]
    settings = Settings(
        data_dir=Path(tmp_path_factory.mktemp("serving")),
        train_poll_interval_s=0.2,
        url_fetch_timeout_s=1.0,
        url_blocked_networks=blocked,
    )
    app = create_app(settings)
    with app.state.services.session_factory() as session:
        _, token = create_user(session, "server-user")
    with TestClient(app, headers={"Authorization": f"Token {token}"}) as client:
        tasks = {
            kind: make_task(client, kind, per_label=20)
            for kind in ("multi_class", "multi_label", "regression")
        }
        # fast: frozen-backbone heads over the shared embedder (what most of these tests are about).
        # Whole-network bundles: tests/components/test_partial_finetune.py and the training tests.
        runs = {kind: train(client, task["id"], quality="fast") for kind, task in tasks.items()}
        for kind, run in runs.items():
            assert wait(client, run["id"])["status"] == "SUCCEEDED", kind
        yield Trained(client=client, tasks=tasks, settings=settings)
