"""The test helpers in tests/services.py start real, working servers and clean up after themselves."""

from __future__ import annotations

import io
import socket
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from tests.support.servers import S3Endpoint, start_postgres, start_seaweedfs


def _accepts_connections(port: int) -> bool:
    """True if something accepts TCP connections on 127.0.0.1:port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.slow
@pytest.mark.postgres
def test_start_postgres_serves_a_fresh_database(tmp_path: Path) -> None:
    with start_postgres(tmp_path) as url:
        parsed = make_url(url)
        assert parsed.drivername == "postgresql+psycopg"
        assert parsed.host == "127.0.0.1"
        assert parsed.port and parsed.username and parsed.password and parsed.database

        engine = create_engine(url)
        try:
            with engine.begin() as conn:
                tables = conn.execute(
                    text("SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'")
                ).scalar_one()
                assert tables == 0  # fresh and empty
                conn.execute(text("CREATE TABLE item (id serial PRIMARY KEY, name text NOT NULL)"))
                conn.execute(text("INSERT INTO item (name) VALUES (:name)"), {"name": "zebra"})
            with engine.connect() as conn:
                assert conn.execute(text("SELECT name FROM item")).scalars().all() == ["zebra"]
                assert conn.execute(text("SHOW listen_addresses")).scalar_one() == "127.0.0.1"
                assert conn.execute(text("SELECT current_user")).scalar_one() == parsed.username

            wrong = create_engine(parsed.set(password="not-the-password"))
            with pytest.raises(Exception, match="password authentication failed"):
                wrong.connect()
            wrong.dispose()
        finally:
            engine.dispose()

    assert not _accepts_connections(parsed.port)
    assert not list(tmp_path.glob("postgres-*/data"))


@pytest.mark.slow
@pytest.mark.s3
def test_start_seaweedfs_serves_authenticated_s3(tmp_path: Path) -> None:
    from minio import Minio
    from minio.error import S3Error

    with start_seaweedfs(tmp_path) as s3:
        assert isinstance(s3, S3Endpoint)
        assert s3.endpoint.startswith("http://127.0.0.1:")
        host = s3.endpoint.removeprefix("http://")
        client = Minio(
            host, access_key=s3.access_key, secret_key=s3.secret_key, secure=False, region=s3.region
        )

        assert client.bucket_exists(s3.bucket)
        payload = b"\x89PNG fake image bytes " * 100
        client.put_object(s3.bucket, "images/a.png", io.BytesIO(payload), len(payload))

        response = client.get_object(s3.bucket, "images/a.png")
        try:
            assert response.read() == payload
        finally:
            response.close()
            response.release_conn()
        listed = [obj.object_name for obj in client.list_objects(s3.bucket, prefix="images/", recursive=True)]
        assert listed == ["images/a.png"]

        wrong = Minio(
            host, access_key=s3.access_key, secret_key="wrong-secret", secure=False, region=s3.region
        )
        with pytest.raises(S3Error) as refused:
            wrong.get_object(s3.bucket, "images/a.png")
        assert refused.value.code == "SignatureDoesNotMatch"

        anonymous = Minio(host, secure=False, region=s3.region)
        with pytest.raises(S3Error) as refused:
            anonymous.get_object(s3.bucket, "images/a.png")
        assert refused.value.code == "AccessDenied"

        client.remove_object(s3.bucket, "images/a.png")
        assert list(client.list_objects(s3.bucket, recursive=True)) == []
        s3_port = int(host.rsplit(":", 1)[1])

    assert not _accepts_connections(s3_port)
    assert not list(tmp_path.glob("seaweedfs-*/data"))
    assert not list(Path("/tmp").glob(f"seaweedfs-*-{s3_port}.sock"))


@pytest.mark.slow
@pytest.mark.s3
def test_two_seaweedfs_instances_run_side_by_side(tmp_path: Path) -> None:
    from minio import Minio

    with start_seaweedfs(tmp_path / "one") as first, start_seaweedfs(tmp_path / "two") as second:
        assert first.endpoint != second.endpoint
        for s3 in (first, second):
            host = s3.endpoint.removeprefix("http://")
            client = Minio(
                host, access_key=s3.access_key, secret_key=s3.secret_key, secure=False, region=s3.region
            )
            client.put_object(s3.bucket, "k", io.BytesIO(s3.endpoint.encode()), len(s3.endpoint))
            assert client.get_object(s3.bucket, "k").read() == s3.endpoint.encode()
