"""Parsers that never raise a 500: bodies, query strings and classify records.

First the probes that answered 500 before (deep JSON, integers beyond the
database's range, a malformed ``expires``), then property-based tests
(hypothesis) that throw arbitrary bodies, query strings and records at the
routes that parse them, on both deployments (SQLite and PostgreSQL, whose
rules for text differ: PostgreSQL refuses NUL characters).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from api.db.models import Task
from api.http.body import MAX_JSON_DEPTH, parse_json
from api.services.versions import import_bundle
from taskvision.errors import BadRequestError
from taskvision.task_types import TaskType
from tests.support.api import b64, create_label, create_task
from tests.support.bundles import linear_bundle
from tests.support.images import image_bytes

TASKS = "/recognition/v2/task"
IMAGES = "/recognition/v2/training-image"
CLASSIFY = "/recognition/v2/classify"
DEEP = b"[" * 10_000


# ---- the probes that answered 500 ------------------------------------------------------------------


@pytest.mark.parametrize("path", [TASKS, "/recognition/v2/label", CLASSIFY, IMAGES])
def test_deeply_nested_json_is_a_400(client: TestClient, path: str) -> None:
    response = client.post(path, content=DEEP, headers={"Content-Type": "application/json"})
    assert response.status_code == 400, response.text
    assert response.json()["code"] == "invalid_json" and "nested" in response.json()["detail"]


@pytest.mark.parametrize("body", [b"\r", b" ", b"\n\t "])
def test_a_body_of_only_whitespace_is_not_json(client: TestClient, body: bytes) -> None:
    """schemathesis found PUT training-image accepting ``\r`` as an empty body (200): it is not JSON."""
    created = client.post(IMAGES, json={"base64": b64(image_bytes(3))}).json()
    for method, path in (("PUT", f"{IMAGES}/{created['id']}"), ("POST", TASKS)):
        response = client.request(method, path, content=body, headers={"Content-Type": "application/json"})
        assert response.status_code == 400, response.text
        assert response.json()["code"] == "invalid_json"
    empty = client.request("PUT", f"{IMAGES}/{created['id']}", content=b"")  # no body at all: no changes
    assert empty.status_code == 200, empty.text


def test_a_form_field_given_twice_is_a_400(client: TestClient) -> None:
    """schemathesis found a multipart upload with ``meta_data`` repeated 14 times accepted, the last kept."""
    upload = {"img_path": ("a.png", image_bytes(4), "image/png")}
    twice = client.post(IMAGES, data={"meta_data": ['{"a": 1}', "null"]}, files=upload)
    assert twice.status_code == 400, twice.text
    assert twice.json()["code"] == "invalid_form" and "'meta_data'" in twice.json()["detail"]
    fields = [("name", b"first"), ("name", b"second"), ("type", b"multi_class")]
    as_multipart = client.post(TASKS, files=[(key, (None, value)) for key, value in fields])
    as_urlencoded = client.post(
        TASKS,
        content=b"&".join(key.encode() + b"=" + value for key, value in fields),
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    for response in (as_multipart, as_urlencoded):
        assert response.status_code == 400, response.text
        assert response.json()["detail"] == "Form field 'name' is given more than once."
    assert client.get(IMAGES).json()["count"] == 0 and client.get(TASKS).json()["count"] == 0
    once = client.post(IMAGES, data={"meta_data": '{"a": 1}'}, files=upload)
    assert once.status_code == 201 and once.json()["meta_data"] == {"a": 1}


@pytest.mark.parametrize("tail", ["%0A", "%0D", "%09", "x%0Ay", "%7F", "%1B"])
def test_a_control_character_in_the_path_is_a_400(client: TestClient, tail: str) -> None:
    """schemathesis found GET ``/webhook/%0A`` answered with the webhook list: Starlette's ``$``
    matches before a final newline, so ``/webhook/\n`` routed to ``/webhook/``."""
    for prefix in ("/recognition/v2/webhook/", f"{TASKS}/", f"{IMAGES}/"):
        response = client.get(prefix + tail)
        assert response.status_code == 400, (prefix + tail, response.text)
        assert "control character" in response.json()["detail"]
    assert client.get("/recognition/v2/webhook/").status_code == 200  # the list itself still answers


def test_deeply_nested_meta_data_is_a_400(client: TestClient) -> None:
    nested: Any = 0
    for _ in range(200):
        nested = {"x": nested}
    as_json = client.post(IMAGES, json={"base64": b64(image_bytes(1)), "meta_data": nested})
    assert as_json.status_code == 400 and "nested" in as_json.json()["detail"]
    as_form = client.post(
        IMAGES, data={"meta_data": "[" * 10_000}, files={"img_path": ("a.png", image_bytes(2), "image/png")}
    )
    assert as_form.status_code == 400 and as_form.json()["code"] == "invalid_meta_data"
    assert client.get(IMAGES).json()["count"] == 0


def test_json_depth_limit_is_exact() -> None:
    def nest(depth: int) -> str:
        return "[" * depth + "]" * depth

    assert parse_json(nest(MAX_JSON_DEPTH)) is not None
    with pytest.raises(BadRequestError, match="nested more than 64"):
        parse_json(nest(MAX_JSON_DEPTH + 1))


@pytest.mark.parametrize(
    "text",
    ['{"a": NaN}', '{"a": Infinity}', '{"a": "\\ud800"}', '{"\\udc00": 1}', "1" * 5000],
)
def test_json_that_no_answer_or_database_could_hold_is_refused(text: str) -> None:
    with pytest.raises(BadRequestError):
        parse_json(text)


@pytest.mark.parametrize(
    "query",
    [
        f"{TASKS}/?page=9223372036854775807",
        f"{IMAGES}/?page=9223372036854775807",
        f"{IMAGES}/?page_size=99999999999999999999",
        f"{IMAGES}/?verified=100000000000000000000000",
        f"{IMAGES}/?verified=²",
        f"{IMAGES}/?label_value_x__gte=nan",
        f"{IMAGES}/?label_value_x__gte=1e999",
        f"{IMAGES}/?labels=" + ",".join(["x"] * 1001),
        f"{TASKS}/%00",
        f"{IMAGES}/?labels=%00",
    ],
)
def test_out_of_range_query_values_are_a_400(client: TestClient, query: str) -> None:
    response = client.get(query)
    # 422 where the schema declares the parameter (FastAPI validates it), 400 from our own parsers.
    assert response.status_code in (400, 422), response.text
    assert response.json()["detail"]


def test_nul_is_refused_in_text_that_reaches_a_column_and_kept_in_meta_data(client: TestClient) -> None:
    for body in ({"name": "a\x00b"}, {"name": "ok", "description": "x\x00"}):
        response = client.post(TASKS, json=body)
        assert response.status_code == 422, response.text
    image = client.post(IMAGES, json={"base64": b64(image_bytes(8)), "meta_data": {"k\x00": "v\x00"}})
    assert image.status_code == 201, image.text
    assert client.get(f"{IMAGES}/{image.json()['id']}").json()["meta_data"] == {"k\x00": "v\x00"}


def test_versions_beyond_the_database_range_are_refused(client: TestClient) -> None:
    task = create_task(client)
    patched = client.patch(f"{TASKS}/{task['id']}", json={"production_version": 2**70})
    assert patched.status_code == 422, patched.text
    classified = client.post(
        CLASSIFY,
        json={"task_id": task["id"], "version": 2**70, "records": [{"_base64": b64(image_bytes(3))}]},
    )
    assert classified.status_code == 422, classified.text
    seeded = client.post(f"{TASKS}/{task['id']}/train", json={"seed": 2**70})
    assert seeded.status_code == 422, seeded.text


@pytest.mark.parametrize("expires", ["²", "1" * 5000, "\u0661\u0662", "-1", "", "9" * 13, "9" * 12])
def test_a_malformed_expires_is_an_invalid_link(
    anonymous: TestClient, client: TestClient, expires: str
) -> None:
    image = client.post(IMAGES, json={"base64": b64(image_bytes(4))}).json()
    response = anonymous.get(f"{IMAGES}/{image['id']}/file", params={"expires": expires, "signature": "x"})
    # 422 where it does not match the schema's pattern (digits, at most 12), else an invalid link.
    assert response.status_code in (401, 422), response.text
    assert response.json()["code"] in ("not_authenticated", "validation_error")


# ---- property-based: no input gives a 5xx -------------------------------------------------------

# Text with what trips parsers and databases: NUL, lone surrogates, non-ASCII digits, long runs.
_text = st.one_of(
    st.text(max_size=30),
    st.sampled_from(["\x00", "\ud800", "²", "\u0661", "9" * 30, "-1", "nan", "1e999", " 1 ", "true", ""]),
)
_number = st.one_of(
    st.integers(min_value=-(2**80), max_value=2**80),
    st.floats(allow_nan=True, allow_infinity=True),
)
_json = st.recursive(
    st.none() | st.booleans() | _number | _text,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(_text, children, max_size=4),
    max_leaves=20,
)
_field_names = [
    "name", "type", "description", "label_id", "task_id", "task", "value", "base64", "url", "meta_data",
    "noresize", "test_image", "real", "production_version", "canary_percent", "records", "version",
    "store_images", "mode", "augment", "epochs", "seed", "images", "labels", "labels-add", "mark-test",
]  # fmt: skip
_bodies = st.one_of(
    st.dictionaries(st.sampled_from(_field_names), _json, max_size=6),
    _json,
    st.binary(max_size=64),
    st.integers(min_value=1, max_value=3000).map(lambda n: "[" * n),
)
_hypothesis = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def _encode(body: Any) -> bytes:
    if isinstance(body, bytes):
        return body
    if isinstance(body, str) and body.startswith("["):
        return body.encode()
    return json.dumps(body, allow_nan=True).encode("utf-8", "surrogatepass")


@pytest.fixture
def servable(app: FastAPI, client: TestClient, tmp_path: Path) -> dict[str, Any]:
    """A task with a servable version (a random head: what it answers does not matter here)."""
    task = create_task(client)
    for name in ("a", "b"):
        label = create_label(client, name=name)
        client.post(f"{TASKS}/{task['id']}/add-label", json={"label_id": label["id"]})
    bundle = linear_bundle(tmp_path / "bundle", TaskType.MULTI_CLASS, ["a", "b"])
    with app.state.services.session_factory() as session:
        import_bundle(
            session, app.state.services.blobs, session.get(Task, task["id"]), bundle, production=True
        )
    image = client.post(IMAGES, json={"base64": b64(image_bytes(5))}).json()
    return {"task": task, "image": image, "label": task["labels"][0] if task["labels"] else None}


@_hypothesis
@given(
    body=_bodies, route=st.sampled_from(["task", "label", "image", "patch", "add-label", "classify", "bulk"])
)
def test_no_body_gives_a_5xx(client: TestClient, servable: dict[str, Any], body: Any, route: str) -> None:
    task_id, image_id = servable["task"]["id"], servable["image"]["id"]
    method, path = {
        "task": ("POST", TASKS),
        "label": ("POST", "/recognition/v2/label"),
        "image": ("POST", IMAGES),
        "patch": ("PATCH", f"{TASKS}/{task_id}"),
        "add-label": ("POST", f"{IMAGES}/{image_id}/add-label"),
        "classify": ("POST", CLASSIFY),
        "bulk": ("POST", f"{IMAGES}/update"),
    }[route]
    response = client.request(
        method, path, content=_encode(body), headers={"Content-Type": "application/json"}
    )
    assert response.status_code < 500, (route, body, response.text)
    response.json()  # every answer is JSON


_query_keys = [
    "page", "page_size", "verified", "test", "real", "labels", "label", "not_labels", "task", "search",
    "label_value_x__gte", "label_value_x__lte", "workspace",
]  # fmt: skip


@_hypothesis
@given(
    query=st.lists(st.tuples(st.sampled_from(_query_keys), _text), max_size=5),
    path=st.sampled_from(
        [TASKS, IMAGES, "/recognition/v2/label", "/recognition/v2/model", "/recognition/v2/training-run"]
    ),
)
def test_no_query_string_gives_a_5xx(client: TestClient, query: list[tuple[str, str]], path: str) -> None:
    response = client.get(path, params=[(k, v.encode("utf-8", "surrogatepass")) for k, v in query])
    assert response.status_code < 500, (path, query, response.text)
    response.json()


_records = st.lists(
    st.one_of(
        st.dictionaries(st.sampled_from(["_base64", "_url", "_id", "meta_data", "x"]), _json, max_size=3),
        st.fixed_dictionaries({"_base64": st.sampled_from([b64(image_bytes(6)), "!!", "", "data:,"])}),
        st.fixed_dictionaries(
            {"_url": st.sampled_from(["http://127.0.0.1:1/x", "ftp://x", "http://[::1", ""])}
        ),
        _json,
    ),
    max_size=12,
)


@_hypothesis
@given(records=_records, store=st.booleans())
def test_no_record_gives_a_5xx(
    client: TestClient, servable: dict[str, Any], records: list[Any], store: bool
) -> None:
    body = {"task_id": servable["task"]["id"], "records": records, "store_images": store}
    response = client.post(CLASSIFY, content=_encode(body), headers={"Content-Type": "application/json"})
    assert response.status_code < 500, (records, response.text)
    if response.status_code == 200:
        for record in response.json()["records"]:
            assert record["_status"]["code"] in (200, 400, 413, 429), record
            if record["_status"]["code"] == 200:
                assert all(math.isfinite(label["prob"]) for label in record["labels"])


@_hypothesis
@given(
    fields=st.dictionaries(st.sampled_from(_field_names), _text, max_size=5),
    file=st.one_of(st.none(), st.binary(max_size=64), st.just(image_bytes(7))),
    route=st.sampled_from([TASKS, "/recognition/v2/label", IMAGES]),
)
def test_no_form_body_gives_a_5xx(
    client: TestClient, fields: dict[str, str], file: bytes | None, route: str
) -> None:
    data = {k: v.encode("utf-8", "surrogatepass") for k, v in fields.items()}
    files = {"img_path": ("x.png", file, "image/png")} if file is not None else None
    response = client.post(route, data=data, files=files)  # type: ignore[arg-type]
    assert response.status_code < 500, (route, fields, response.text)
    response.json()
