"""Blob storage: a local directory (embedded mode) or any S3 endpoint (cluster mode).

Both stores speak in keys such as ``images/<workspace>/<sha256>``; ``uri(key)``
gives the absolute location (``file:///...`` or ``s3://bucket/key``) that other
deployable units (pipeline steps, model servers) can open with
:func:`open_blob_store` without the control plane in between.

Writes are durable when ``put`` returns: the local store writes a temporary
file, fsyncs it and renames it into place; S3 acknowledges a PUT only once it
has stored the object.
"""

from __future__ import annotations

import io
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol
from urllib.parse import parse_qs, urlparse

from taskvision.errors import NotFoundError

logger = logging.getLogger(__name__)


class BlobStore(Protocol):
    """What the rest of the code needs from a blob store."""

    def put(self, key: str, data: bytes, *, content_type: str = "application/octet-stream") -> None: ...

    def get(self, key: str) -> bytes: ...

    def exists(self, key: str) -> bool: ...

    def delete(self, key: str) -> None: ...

    def delete_prefix(self, prefix: str) -> int: ...

    def list_keys(self, prefix: str = "") -> list[str]: ...

    def uri(self, key: str) -> str: ...


def _check_key(key: str) -> str:
    parts = key.split("/")
    if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"Invalid blob key {key!r}")
    return key


class LocalBlobStore:
    """Blobs as files under one directory."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        return self.root / _check_key(key)

    def put(self, key: str, data: bytes, *, content_type: str = "application/octet-stream") -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # make the rename itself durable
        finally:
            os.close(dir_fd)

    def get(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError as exc:
            raise NotFoundError(f"Blob {key!r} does not exist.") from exc

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def delete_prefix(self, prefix: str) -> int:
        base = self._path(prefix.rstrip("/"))
        if base.is_file():
            base.unlink()
            return 1
        count = 0
        if base.is_dir():
            for path in sorted(base.rglob("*"), reverse=True):
                if path.is_file():
                    path.unlink()
                    count += 1
                else:
                    path.rmdir()
            base.rmdir()
        return count

    def list_keys(self, prefix: str = "") -> list[str]:
        """Keys under ``prefix`` (a folder-like prefix such as ``images/``), sorted."""
        base = self.root / prefix if prefix else self.root
        if not base.is_dir():
            return []
        return sorted(
            p.relative_to(self.root).as_posix()
            for p in base.rglob("*")
            if p.is_file() and not p.name.startswith(".tmp-")
        )

    def uri(self, key: str) -> str:
        return self._path(key).as_uri()


@dataclass(frozen=True)
class S3Location:
    """Where an S3 bucket is and how to reach it."""

    bucket: str
    endpoint: str  # host:port, as the minio client wants it
    secure: bool
    region: str | None
    prefix: str = ""


def parse_s3_url(url: str) -> S3Location:
    """Parse ``s3://bucket[/prefix]?endpoint=http://host:port[&region=...]``.

    Without ``endpoint`` the AWS endpoint is used.
    """
    parsed = urlparse(url)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise ValueError(f"Not an s3:// URL with a bucket: {url!r}")
    params = {k: v[-1] for k, v in parse_qs(parsed.query).items()}
    endpoint = params.get("endpoint", "https://s3.amazonaws.com")
    if "://" not in endpoint:
        endpoint = "https://" + endpoint
    ep = urlparse(endpoint)
    return S3Location(
        bucket=parsed.netloc,
        endpoint=ep.netloc,
        secure=ep.scheme == "https",
        region=params.get("region"),
        prefix=parsed.path.strip("/"),
    )


class S3BlobStore:
    """Blobs as objects in one S3 bucket (MinIO, SeaweedFS, AWS...)."""

    def __init__(self, location: S3Location, *, access_key: str | None, secret_key: str | None) -> None:
        from minio import Minio  # imported here: only cluster mode needs it

        self.location = location
        self.client = Minio(
            location.endpoint,
            access_key=access_key,
            secret_key=secret_key,
            secure=location.secure,
            region=location.region,
        )
        if not self.client.bucket_exists(location.bucket):
            logger.info("creating bucket %s", location.bucket)
            self.client.make_bucket(location.bucket)

    def _name(self, key: str) -> str:
        _check_key(key)
        return f"{self.location.prefix}/{key}" if self.location.prefix else key

    def put(self, key: str, data: bytes, *, content_type: str = "application/octet-stream") -> None:
        self.client.put_object(
            self.location.bucket, self._name(key), io.BytesIO(data), len(data), content_type=content_type
        )

    def get(self, key: str) -> bytes:
        from minio.error import S3Error

        try:
            response = self.client.get_object(self.location.bucket, self._name(key))
        except S3Error as exc:
            if exc.code in ("NoSuchKey", "NoSuchObject"):
                raise NotFoundError(f"Blob {key!r} does not exist.") from exc
            raise
        try:
            return response.read()
        finally:
            response.close()
            response.release_conn()

    def exists(self, key: str) -> bool:
        from minio.error import S3Error

        try:
            self.client.stat_object(self.location.bucket, self._name(key))
        except S3Error as exc:
            if exc.code in ("NoSuchKey", "NoSuchObject", "NotFound"):
                return False
            raise
        return True

    def delete(self, key: str) -> None:
        self.client.remove_object(self.location.bucket, self._name(key))

    def delete_prefix(self, prefix: str) -> int:
        from minio.deleteobjects import DeleteObject

        name = self._name(prefix.rstrip("/"))
        objects = [
            DeleteObject(str(obj.object_name))
            for obj in self.client.list_objects(self.location.bucket, prefix=name + "/", recursive=True)
        ]
        if self.exists(prefix.rstrip("/")):
            objects.append(DeleteObject(name))
        errors = list(self.client.remove_objects(self.location.bucket, objects))
        if errors:
            raise OSError(f"Could not delete {len(errors)} objects under {prefix!r}: {errors[0]}")
        return len(objects)

    def list_keys(self, prefix: str = "") -> list[str]:
        """Keys under ``prefix``, sorted, relative to the store's own prefix."""
        base = f"{self.location.prefix}/" if self.location.prefix else ""
        names = (
            str(obj.object_name)
            for obj in self.client.list_objects(self.location.bucket, prefix=base + prefix, recursive=True)
        )
        return sorted(name[len(base) :] for name in names)

    def uri(self, key: str) -> str:
        return f"s3://{self.location.bucket}/{self._name(key)}"


def open_blob_store(url: str, *, access_key: str | None = None, secret_key: str | None = None) -> BlobStore:
    """Open the store named by ``url``: a directory path, ``file:///dir`` or ``s3://bucket?endpoint=...``."""
    if url.startswith("s3://"):
        return S3BlobStore(parse_s3_url(url), access_key=access_key, secret_key=secret_key)
    if url.startswith("file://"):
        return LocalBlobStore(Path(urlparse(url).path))
    if "://" in url:
        raise ValueError(f"Unsupported storage URL {url!r}: use a directory, file:// or s3://")
    return LocalBlobStore(Path(url))
