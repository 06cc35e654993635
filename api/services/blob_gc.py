"""Deleting training images' blobs later, and only once nothing needs them.

Deleting an image removes its row and, in the same transaction, records its
content (workspace, sha256) as pending (:func:`schedule`). The training
watcher's loop runs :func:`collect` every ``blob_gc_interval_s``: it deletes
the original and the thumbnail of an entry pending for ``blob_gc_grace_s`` or
longer, unless

* an image of the workspace has that content again (re-uploaded): the entry
  is dropped and the blobs stay;
* a training of the workspace is queued or running: its dataset snapshot
  refers to images by blob key and must stay readable until the run ends, so
  the entry waits.

Why not delete at once: blobs are content-addressed, so an upload of the same
bytes writes the same keys. Deleting right after the row let a re-upload
racing the deletion lose its blob, and deleted an image that a queued
training's snapshot was about to read. The grace period leaves a re-upload
ample time to commit its row before the collector looks. A residual window
remains: an upload of exactly those bytes that writes its blobs between the
collector's check and its delete (milliseconds, after the grace period). The
store offers no conditional delete to close it.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from datetime import datetime, timedelta

from sqlalchemy import delete, select
from sqlalchemy.orm import Session, sessionmaker

from api.db.models import PendingBlobDeletion, RunStatus, TrainingRun, utcnow
from api.services.ingest import existing_image_id
from taskvision import blob_layout
from taskvision.storage import BlobStore

logger = logging.getLogger(__name__)


def schedule(session: Session, workspace_id: str, sha256: str) -> None:
    """Record that the workspace no longer has this content (in the caller's transaction)."""
    session.merge(PendingBlobDeletion(workspace_id=workspace_id, sha256=sha256, requested=utcnow()))


def collect(
    session: Session,
    blobs: BlobStore,
    *,
    grace_s: float,
    busy_workspaces: Collection[str] = (),
    now: datetime | None = None,
) -> int:
    """Delete the blobs of pending entries older than ``grace_s``; returns how many images' blobs went.

    ``busy_workspaces``: workspaces with a training queued or running (their entries wait).
    """
    cutoff = (now or utcnow()) - timedelta(seconds=grace_s)
    due = session.execute(
        select(PendingBlobDeletion.workspace_id, PendingBlobDeletion.sha256)
        .where(PendingBlobDeletion.requested <= cutoff)
        .order_by(PendingBlobDeletion.requested)
    ).all()
    deleted = 0
    for workspace_id, sha256 in due:
        if workspace_id in busy_workspaces:
            continue
        if existing_image_id(session, workspace_id, sha256) is None:
            try:
                for key in (
                    blob_layout.image_key(workspace_id, sha256),
                    blob_layout.thumb_key(workspace_id, sha256),
                ):
                    blobs.delete(key)
            except Exception:
                logger.warning("could not delete the blobs of %s; retrying later", sha256, exc_info=True)
                continue
            deleted += 1
        # A statement, not session.delete: another replica may have removed the entry meanwhile.
        session.execute(
            delete(PendingBlobDeletion).where(
                PendingBlobDeletion.workspace_id == workspace_id,
                PendingBlobDeletion.sha256 == sha256,
                PendingBlobDeletion.requested <= cutoff,  # not one scheduled again since
            )
        )
        session.commit()
    return deleted


class BlobCollector:
    """The background job: collect due entries, sparing workspaces with a training queued or running."""

    def __init__(self, session_factory: sessionmaker[Session], blobs: BlobStore, *, grace_s: float) -> None:
        self.session_factory = session_factory
        self.blobs = blobs
        self.grace_s = grace_s

    def tick(self, *, grace_s: float | None = None) -> int:
        with self.session_factory() as session:
            busy = set(
                session.scalars(
                    select(TrainingRun.workspace_id)
                    .where(TrainingRun.status.in_(RunStatus.active()))
                    .distinct()
                )
            )
            return collect(
                session,
                self.blobs,
                grace_s=self.grace_s if grace_s is None else grace_s,
                busy_workspaces=busy,
            )
