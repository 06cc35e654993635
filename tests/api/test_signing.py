"""Signed download links: bounded lifetime, and where the signing key lives in each mode."""

from __future__ import annotations

import stat
import time
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import select

from api.db.models import InstanceSecret
from api.main import create_app
from api.services.signing import CLOCK_SKEW_S, KEY_FILE, SigningKeyMissing, UrlSigner
from api.settings import Settings
from tests.support.api import b64
from tests.support.images import image_bytes

IMAGES = "/recognition/v2/training-image"


def _link(image_id: str, signer: UrlSigner, expires: int) -> str:
    return f"{IMAGES}/{image_id}/file?expires={expires}&signature={signer.sign(image_id, 'file', expires)}"


def test_a_link_expiring_beyond_the_lifetime_is_refused(
    app: FastAPI, client: TestClient, anonymous: TestClient
) -> None:
    image = client.post(IMAGES, json={"base64": b64(image_bytes(1))}).json()
    signer: UrlSigner = app.state.services.url_signer
    now = int(time.time())
    assert anonymous.get(image["img_path"]).status_code == 200  # what the API hands out works
    listed_expiry = int(image["img_path"].split("expires=")[1].split("&")[0])
    assert now < listed_expiry <= now + signer.ttl_s
    assert anonymous.get(_link(image["id"], signer, now + signer.ttl_s)).status_code == 200
    # A correctly signed link from further ahead (a leaked key minting long-lived links) is not.
    far = now + signer.ttl_s + CLOCK_SKEW_S + 120
    refused = anonymous.get(_link(image["id"], signer, far))
    assert refused.status_code == 401 and refused.json()["code"] == "not_authenticated"


def test_links_handed_out_within_the_hour_are_the_same() -> None:
    signer = UrlSigner(b"k" * 32, ttl_s=24 * 3600)
    start = 1_700_000_000 // 3600 * 3600
    assert signer.expiry(start + 1) == signer.expiry(start + 3599)
    assert signer.expiry(start + 1) <= start + 1 + signer.ttl_s
    short = UrlSigner(b"k" * 32, ttl_s=60)  # a short lifetime is not rounded away
    assert start + 59 < short.expiry(start) <= start + 60


def test_embedded_mode_keeps_the_key_in_the_data_dir_readable_by_the_owner_only(tmp_path: Path) -> None:
    first = create_app(Settings(data_dir=tmp_path))
    key_file = tmp_path / KEY_FILE
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    with first.state.services.session_factory() as session:
        assert session.scalars(select(InstanceSecret)).all() == []  # not in the database
    signature = first.state.services.url_signer.sign("image", "file", 123)
    first.state.services.engine.dispose()
    again = create_app(Settings(data_dir=tmp_path))  # a restart signs with the same key
    assert again.state.services.url_signer.sign("image", "file", 123) == signature
    again.state.services.engine.dispose()


def test_a_key_kept_in_the_database_by_an_earlier_version_moves_to_the_file(tmp_path: Path) -> None:
    app = create_app(Settings(data_dir=tmp_path))
    (tmp_path / KEY_FILE).unlink()
    legacy = "ab" * 32
    with app.state.services.session_factory() as session:
        session.add(InstanceSecret(name="download-url-signing", value=legacy))
        session.commit()
    app.state.services.engine.dispose()
    restarted = create_app(Settings(data_dir=tmp_path))
    assert (tmp_path / KEY_FILE).read_text().strip() == legacy
    with restarted.state.services.session_factory() as session:
        assert session.scalars(select(InstanceSecret)).all() == []
    # Links signed with the old key (already handed out) keep working.
    signer = UrlSigner(bytes.fromhex(legacy), ttl_s=restarted.state.services.url_signer.ttl_s)
    assert restarted.state.services.url_signer.sign("i", "file", 7) == signer.sign("i", "file", 7)
    restarted.state.services.engine.dispose()


@pytest.mark.postgres
def test_cluster_mode_needs_the_secret_and_replicas_share_it(postgres_url: str, tmp_path: Path) -> None:
    with pytest.raises(SigningKeyMissing, match="TASKVISION_SECRET_KEY"):
        create_app(Settings(data_dir=tmp_path / "a", database_url=postgres_url))
    replicas = [
        create_app(Settings(data_dir=tmp_path / name, database_url=postgres_url, secret_key="s3cr3t"))
        for name in ("b", "c")
    ]
    signatures = {app.state.services.url_signer.sign("image", "file", 123) for app in replicas}
    assert len(signatures) == 1
    assert not (tmp_path / "b" / KEY_FILE).exists()
    with replicas[0].state.services.session_factory() as session:
        assert session.scalars(select(InstanceSecret)).all() == []
    for app in replicas:
        app.state.services.engine.dispose()
