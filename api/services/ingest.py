"""Turn uploaded bytes into a stored training image, durably and without leftovers.

Order of work, and why:
1. size cap, header check (decompression bombs stop here), optional downscale;
2. content hash; an identical image in the workspace is answered with its id;
3. original and thumbnail written to the blob store (content-addressed, so a
   concurrent upload of the same image writes the same keys);
4. the row is committed; only then does the API answer 201.
If step 4 loses a race against an identical upload, the unique constraint
says so and the caller gets the winner's id. If it fails otherwise, the blobs
written in step 3 are removed unless a row references them.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from api.db.models import TrainingImage, User
from api.settings import Settings
from taskvision import blob_layout, imaging
from taskvision.errors import DuplicateImageError, PayloadTooLargeError
from taskvision.storage import BlobStore

logger = logging.getLogger(__name__)

CONTENT_TYPES = {
    "JPEG": "image/jpeg",
    "PNG": "image/png",
    "WEBP": "image/webp",
    "GIF": "image/gif",
    "BMP": "image/bmp",
    "TIFF": "image/tiff",
}


@dataclass(frozen=True)
class PreparedImage:
    """Checked bytes ready to store, with everything the row needs."""

    data: bytes
    sha256: str
    content_type: str
    width: int
    height: int
    thumbnail: bytes


def prepare_image(raw: bytes, *, noresize: bool, settings: Settings) -> PreparedImage:
    """Check and (unless ``noresize``) downscale an upload; make its thumbnail.

    Raises:
        PayloadTooLargeError: more bytes than ``max_upload_bytes``.
        ImageTooLargeError: more pixels than ``max_image_pixels``.
        InvalidImageError: not a decodable image.
    """
    if not raw:
        raise imaging.InvalidImageError("The image is empty.")
    if len(raw) > settings.max_upload_bytes:
        raise PayloadTooLargeError(
            f"The image is {len(raw)} bytes; at most {settings.max_upload_bytes} bytes are accepted."
        )
    info = imaging.probe(raw, max_pixels=settings.max_image_pixels)
    data = raw
    if not noresize:
        smaller = imaging.downscale(
            raw, max_shorter_side=settings.resize_shorter_side, max_pixels=settings.max_image_pixels
        )
        if smaller is not None:
            data = smaller
            info = imaging.probe(data, max_pixels=settings.max_image_pixels)
    # Decoding the thumbnail also proves the pixel data (not only the header) is readable.
    thumbnail = imaging.thumbnail_jpeg(
        data, max_side=settings.thumbnail_size, max_pixels=settings.max_image_pixels
    )
    width, height = imaging.upright_size(data, max_pixels=settings.max_image_pixels)
    return PreparedImage(
        data=data,
        sha256=hashlib.sha256(data).hexdigest(),
        content_type=CONTENT_TYPES[info.format],
        width=width,
        height=height,
        thumbnail=thumbnail,
    )


def existing_image_id(session: Session, workspace_id: str, sha256: str) -> str | None:
    """The id of the workspace's image with this content, if there is one."""
    return session.scalar(
        select(TrainingImage.id).where(
            TrainingImage.workspace_id == workspace_id, TrainingImage.sha256 == sha256
        )
    )


def store_image(
    session: Session,
    blobs: BlobStore,
    user: User,
    image: PreparedImage,
    *,
    test_image: bool = False,
    real: bool = False,
    meta_data: dict[str, Any] | None = None,
) -> TrainingImage:
    """Store a prepared image for ``user`` and commit its row.

    Raises:
        DuplicateImageError: the workspace already has this exact image (carries its id).
    """
    workspace = user.workspace_id
    existing = existing_image_id(session, workspace, image.sha256)
    if existing is not None:
        raise DuplicateImageError(existing)
    # Content-addressed within the workspace: a concurrent identical upload writes the same keys.
    image_key = blob_layout.image_key(workspace, image.sha256)
    thumb_key = blob_layout.thumb_key(workspace, image.sha256)
    blobs.put(image_key, image.data, content_type=image.content_type)
    blobs.put(thumb_key, image.thumbnail, content_type="image/jpeg")
    row = TrainingImage(
        workspace_id=workspace,
        sha256=image.sha256,
        blob_key=image_key,
        thumb_key=thumb_key,
        content_type=image.content_type,
        size_bytes=len(image.data),
        width=image.width,
        height=image.height,
        meta_data=meta_data or {},
        test_image=test_image,
        real=real,
    )
    session.add(row)
    try:
        session.commit()
    except IntegrityError:
        # A concurrent upload of the same bytes won; the blobs are the same keys, keep them.
        session.rollback()
        winner = existing_image_id(session, workspace, image.sha256)
        if winner is None:
            raise
        raise DuplicateImageError(winner) from None
    except BaseException:
        session.rollback()
        if existing_image_id(session, workspace, image.sha256) is None:
            for key in (image_key, thumb_key):
                try:
                    blobs.delete(key)
                except Exception:
                    logger.warning("could not remove blob %s after a failed upload", key, exc_info=True)
        raise
    return row
