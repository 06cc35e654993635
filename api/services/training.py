"""The training queue: a train request freezes a snapshot and queues a run; a task deletion cancels.

A request answers at once (202) with a QUEUED run; the run watcher
(:mod:`api.services.run_watcher`, a background job) starts it when a worker
is free, follows it and registers its model. One training per task at a time.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from api.db.models import RunStatus, Task, TrainingRun, TrainStatus, User, utcnow
from api.services.snapshots import create_snapshot
from pipelines.runners import PipelineRunner
from taskvision.errors import ConflictError
from taskvision.storage import BlobStore

logger = logging.getLogger(__name__)


class TrainingQueue:
    def __init__(
        self, blobs: BlobStore, runner: PipelineRunner, runner_name: str, *, wake: Callable[[], None]
    ) -> None:
        self.blobs = blobs
        self.runner = runner
        self.runner_name = runner_name
        self._wake = wake  # tells the run watcher to look now rather than at its next poll

    def request_training(
        self, session: Session, user: User, task: Task, params: dict[str, Any]
    ) -> TrainingRun:
        """Snapshot the task's data and queue a run. 409 while the task is already training."""
        active = session.scalar(
            select(TrainingRun).where(
                TrainingRun.task_id == task.id, TrainingRun.status.in_(RunStatus.active())
            )
        )
        if active is not None:
            raise ConflictError(f"Task '{task.name}' is already training (run {active.id}, {active.status}).")
        run = TrainingRun(
            workspace_id=user.workspace_id,
            task_id=task.id,
            status=RunStatus.QUEUED,
            runner=self.runner_name,
            snapshot_prefix="",
            params=params,
            message="queued",
        )
        session.add(run)
        session.flush()
        run.snapshot_prefix = create_snapshot(session, self.blobs, task, run.id)
        task.last_train_status = TrainStatus.IN_TRAINING
        task.last_train_error = ""
        session.commit()
        self._wake()
        return run

    def cancel_task_runs(self, session: Session, task_id: str) -> None:
        """Stop the task's active runs (before the task is deleted)."""
        for run in session.scalars(
            select(TrainingRun).where(
                TrainingRun.task_id == task_id, TrainingRun.status.in_(RunStatus.active())
            )
        ):
            if run.handle:
                try:
                    self.runner.cancel(run.handle)
                    self.runner.forget(run.handle)
                except Exception:
                    logger.warning("could not cancel run %s", run.id, exc_info=True)
            run.status, run.finished, run.error = RunStatus.CANCELED, utcnow(), "The task was deleted."
        session.commit()
