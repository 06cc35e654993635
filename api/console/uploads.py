"""Uploads from the images page: one image or a zip of many, into training images, with a summary.

Each image goes through the ingest service (:mod:`api.services.ingest`: size
and pixel caps, decode check, content hash, durable store), exactly as a REST
upload does. A zip is read entry by entry, each entry's bytes capped like an
upload (its declared size is not trusted), and at most :data:`MAX_ZIP_ENTRIES`
entries. Inside a zip, an image in a folder named like one of the task's
labels gets that label (when the page did not choose one for all).

The summary says what happened to each file: "600 uploaded, 12 were already
there, 1 was not an image".
"""

from __future__ import annotations

import logging
import posixpath
import zipfile
from collections import defaultdict
from dataclasses import dataclass, field
from typing import IO, Any

from sqlalchemy.orm import Session

from api.db.models import User
from api.services.ingest import prepare_image, store_image
from api.settings import Settings
from taskvision.errors import (
    DuplicateImageError,
    InvalidImageError,
    PayloadTooLargeError,
    TaskVisionError,
)
from taskvision.storage import BlobStore

logger = logging.getLogger(__name__)

MAX_ZIP_ENTRIES = 10_000
MAX_REQUEST_BYTES = 2 * 1024**3  # one zip; single images are capped by max_upload_bytes
MAX_PROBLEMS = 5
ZIP_MAGIC = b"PK\x03\x04"


@dataclass
class UploadSummary:
    """What became of the files of one upload request."""

    uploaded: int = 0
    duplicates: int = 0
    not_images: int = 0
    too_large: int = 0
    failed: int = 0
    problems: list[str] = field(default_factory=list)
    # The stored images (new or already there), by the label name their zip folder gave them ("" none).
    images_by_folder: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))

    def note(self, name: str, message: str) -> None:
        if len(self.problems) < MAX_PROBLEMS:
            self.problems.append(f"{name}: {message}")

    def public(self) -> dict[str, Any]:
        return {
            "uploaded": self.uploaded,
            "duplicates": self.duplicates,
            "not_images": self.not_images,
            "too_large": self.too_large,
            "failed": self.failed,
            "problems": self.problems,
        }


def _clean_name(name: str) -> str:
    """A file name fit for the image's meta data: no control characters, valid UTF-8, at most 255."""
    text = "".join(ch for ch in name if ch >= " " and ch != "\x7f")
    return text.encode("utf-8", "replace").decode("utf-8")[-255:] or "upload"


def _store_one(
    session: Session,
    blobs: BlobStore,
    user: User,
    settings: Settings,
    name: str,
    data: bytes,
    folder: str,
    summary: UploadSummary,
) -> None:
    try:
        prepared = prepare_image(data, noresize=False, settings=settings)
        image = store_image(session, blobs, user, prepared, meta_data={"file_name": _clean_name(name)})
    except DuplicateImageError as exc:
        summary.duplicates += 1
        summary.images_by_folder[folder].append(exc.image_id)
        return
    except PayloadTooLargeError as exc:
        summary.too_large += 1
        summary.note(name, exc.detail)
        return
    except InvalidImageError as exc:
        summary.not_images += 1
        summary.note(name, exc.detail)
        return
    except TaskVisionError as exc:
        summary.failed += 1
        summary.note(name, exc.detail)
        return
    summary.uploaded += 1
    summary.images_by_folder[folder].append(image.id)


def _folder(entry_name: str) -> str:
    parent = posixpath.dirname(entry_name.rstrip("/"))
    return posixpath.basename(parent)


def _skipped(entry: zipfile.ZipInfo) -> bool:
    base = posixpath.basename(entry.filename)
    return entry.is_dir() or entry.filename.startswith("__MACOSX/") or not base or base.startswith(".")


def ingest_file(
    session: Session,
    blobs: BlobStore,
    user: User,
    settings: Settings,
    *,
    name: str,
    stream: IO[bytes],
    summary: UploadSummary | None = None,
) -> UploadSummary:
    """Store the uploaded file (an image, or a zip of images) and say what became of it."""
    summary = summary or UploadSummary()
    head = stream.read(len(ZIP_MAGIC))
    stream.seek(0)
    if head != ZIP_MAGIC:
        data = stream.read(settings.max_upload_bytes + 1)
        _store_one(session, blobs, user, settings, name, data, "", summary)
        return summary
    try:
        archive = zipfile.ZipFile(stream)
    except (zipfile.BadZipFile, OSError) as exc:
        summary.not_images += 1
        summary.note(name, f"not a readable zip ({exc})")
        return summary
    with archive:
        entries = [entry for entry in archive.infolist() if not _skipped(entry)]
        if len(entries) > MAX_ZIP_ENTRIES:
            summary.failed += len(entries)
            summary.note(name, f"{len(entries)} files; at most {MAX_ZIP_ENTRIES} per zip")
            return summary
        for entry in entries:
            try:
                with archive.open(entry) as member:
                    data = member.read(settings.max_upload_bytes + 1)
            except (zipfile.BadZipFile, NotImplementedError, RuntimeError, OSError, EOFError) as exc:
                summary.failed += 1
                summary.note(entry.filename, f"cannot be read from the zip ({exc})")
                continue
            _store_one(session, blobs, user, settings, entry.filename, data, _folder(entry.filename), summary)
    return summary
