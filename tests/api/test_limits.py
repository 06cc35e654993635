"""Per-token request rates, per-workspace classify concurrency, and the networks URLs never reach."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from api.auth import create_user
from api.main import create_app
from api.services.rate_limits import ConcurrencyLimit, TokenBuckets
from api.services.url_fetch import is_blocked
from api.settings import Settings
from taskvision.errors import TooManyRequestsError
from tests.support.api import b64
from tests.support.images import image_bytes

TASKS = "/recognition/v2/task"


def test_a_token_bucket_allows_a_burst_then_the_rate() -> None:
    buckets = TokenBuckets(rate=2.0, burst=3)
    for _ in range(3):
        buckets.take("t", now=100.0)
    with pytest.raises(TooManyRequestsError) as refused:
        buckets.take("t", now=100.0)
    assert refused.value.status == 429 and refused.value.retry_after == 1
    buckets.take("other", now=100.0)  # tokens do not share an allowance
    buckets.take("t", now=100.5)  # half a second at 2/s: one more
    with pytest.raises(TooManyRequestsError):
        buckets.take("t", now=100.5)


def test_the_bucket_table_is_bounded() -> None:
    buckets = TokenBuckets(rate=1.0, burst=1, max_keys=10)
    for i in range(1000):
        buckets.take(f"t{i}", now=0.0)
    assert len(buckets._buckets) == 10


def test_a_concurrency_limit_refuses_the_one_too_many_and_frees_its_slot() -> None:
    limit = ConcurrencyLimit(limit=2, what="classify requests")
    with limit.hold("w"), limit.hold("w"):
        with pytest.raises(TooManyRequestsError, match="2 classify requests in progress"), limit.hold("w"):
            pass
        with limit.hold("other"):
            assert limit.active("other") == 1
    assert limit.active("w") == 0


@pytest.fixture
def limited(tmp_path: Path) -> Iterator[FastAPI]:
    app = create_app(
        Settings(
            data_dir=tmp_path, rate_limit_per_s=0.5, rate_limit_burst=3, classify_concurrency_per_workspace=1
        )
    )
    yield app
    app.state.services.engine.dispose()


@pytest.fixture
def one_classify(tmp_path: Path) -> Iterator[FastAPI]:
    app = create_app(Settings(data_dir=tmp_path, classify_concurrency_per_workspace=1))
    yield app
    app.state.services.engine.dispose()


def _client(app: FastAPI, name: str) -> TestClient:
    with app.state.services.session_factory() as session:
        _, token = create_user(session, name)
    return TestClient(app, headers={"Authorization": f"Token {token}"})


def test_too_many_requests_with_one_token_answer_429_with_retry_after(limited: FastAPI) -> None:
    alice, bob = _client(limited, "alice"), _client(limited, "bob")
    assert [alice.get(TASKS).status_code for _ in range(3)] == [200, 200, 200]
    refused = alice.get(TASKS)
    assert refused.status_code == 429
    assert int(refused.headers["Retry-After"]) >= 1
    assert refused.json()["code"] == "rate_limited" and "per second" in refused.json()["detail"]
    assert bob.get(TASKS).status_code == 200  # another token has its own allowance
    assert alice.get("/healthz").status_code == 200  # probes need no token and are not limited


def test_a_workspace_has_a_cap_on_classify_requests_in_progress(one_classify: FastAPI) -> None:
    limited = one_classify
    alice = _client(limited, "alice")
    task = alice.post(TASKS, json={"name": "t"}).json()
    user_workspace = alice.get("/account/v2/user").json()["workspace"]
    body = {"task_id": task["id"], "records": [{"_base64": b64(image_bytes(1))}]}
    with limited.state.services.classify_slots.hold(user_workspace):  # one request of alice's in progress
        refused = alice.post("/recognition/v2/classify", json=body)
    assert refused.status_code == 429 and refused.json()["code"] == "too_many_concurrent"
    assert refused.headers["Retry-After"] == "1"
    # With the slot free again the request goes through (to its own 400: the task is untrained).
    assert alice.post("/recognition/v2/classify", json=body).json()["code"] == "not_trained"


@pytest.mark.parametrize(
    "address",
    [
        "64:ff9b::7f00:1",  # NAT64 of 127.0.0.1
        "64:ff9b::a9fe:a9fe",  # NAT64 of 169.254.169.254
        "64:ff9b:1::a00:1",  # local-use NAT64
        "::7f00:1",  # IPv4-compatible 127.0.0.1
        "::a00:1",  # IPv4-compatible 10.0.0.1
        "2002:7f00:1::1",  # 6to4 of 127.0.0.1
        "2002:a9fe:a9fe::",  # 6to4 of 169.254.169.254
        "2001:0:4136:e378:8000:63bf:3fff:fdd2",  # Teredo
        "::ffff:127.0.0.1",  # IPv4-mapped (already refused)
    ],
)
def test_ipv6_forms_of_ipv4_addresses_are_refused_by_default(address: str) -> None:
    blocked = Settings().blocked_networks
    assert is_blocked(address, blocked)


@pytest.mark.parametrize("address", ["2606:4700:4700::1111", "2a00:1450:4001:80b::200e", "8.8.8.8"])
def test_public_addresses_stay_allowed(address: str) -> None:
    assert not is_blocked(address, Settings().blocked_networks)


def test_every_default_refused_network_is_valid() -> None:
    for network in Settings().url_blocked_networks:
        ipaddress.ip_network(network)


@pytest.mark.parametrize("host", ["[64:ff9b::7f00:1]", "[2002:7f00:1::1]", "[::7f00:1]"])
def test_an_image_url_at_such_an_address_is_refused_before_connecting(client: TestClient, host: str) -> None:
    # The literal resolves to itself, and the guard refuses it before any connection is made.
    response = client.post("/recognition/v2/training-image", json={"url": f"http://{host}:9/a.png"})
    assert response.status_code == 400 and "Refusing" in response.json()["detail"]
