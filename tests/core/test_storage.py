"""Blob stores: the local directory and S3 behave the same."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from taskvision.errors import NotFoundError
from taskvision.storage import BlobStore, LocalBlobStore, open_blob_store, parse_s3_url
from tests.conftest import s3_storage_settings


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.s3)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[BlobStore]:
    if request.param == "local":
        yield open_blob_store(str(tmp_path / "blobs"))
        return
    endpoint = request.getfixturevalue("s3_server")
    cfg = s3_storage_settings(endpoint, f"store-{uuid.uuid4().hex[:8]}")
    yield open_blob_store(
        cfg["storage_url"], access_key=cfg["s3_access_key"], secret_key=cfg["s3_secret_key"]
    )


def test_put_get_exists_delete(store: BlobStore) -> None:
    store.put("images/ws/ab/abc", b"hello", content_type="text/plain")
    assert store.get("images/ws/ab/abc") == b"hello"
    assert store.exists("images/ws/ab/abc") and not store.exists("images/ws/ab/nope")
    store.put("images/ws/ab/abc", b"again")
    assert store.get("images/ws/ab/abc") == b"again"
    store.delete("images/ws/ab/abc")
    assert not store.exists("images/ws/ab/abc")
    with pytest.raises(NotFoundError):
        store.get("images/ws/ab/abc")
    store.delete("images/ws/ab/abc")  # deleting twice is fine


def test_list_and_delete_prefix(store: BlobStore) -> None:
    for key in ("models/t1/1/a", "models/t1/1/b", "models/t1/2/a", "models/t2/1/a"):
        store.put(key, key.encode())
    assert store.list_keys("models/t1/") == ["models/t1/1/a", "models/t1/1/b", "models/t1/2/a"]
    assert store.delete_prefix("models/t1") == 3
    assert store.list_keys() == ["models/t2/1/a"]


@pytest.mark.parametrize("key", ["", "/abs", "a/../b", "a//b", "./a"])
def test_unsafe_keys_are_refused(store: BlobStore, key: str) -> None:
    with pytest.raises(ValueError):
        store.put(key, b"x")


def test_uris_name_the_location(tmp_path: Path) -> None:
    local = LocalBlobStore(tmp_path)
    assert local.uri("a/b") == (tmp_path / "a" / "b").resolve().as_uri()
    location = parse_s3_url("s3://bucket/pre/fix?endpoint=http://127.0.0.1:9000&region=eu-1")
    assert (location.bucket, location.endpoint, location.secure, location.region, location.prefix) == (
        "bucket",
        "127.0.0.1:9000",
        False,
        "eu-1",
        "pre/fix",
    )
    assert parse_s3_url("s3://b").endpoint == "s3.amazonaws.com"
    with pytest.raises(ValueError):
        open_blob_store("gs://bucket")
