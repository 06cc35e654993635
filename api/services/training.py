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

from api.db.models import RunStatus, Task, TrainingRun, TrainStatus, User, new_id, utcnow
from api.services.snapshots import task_dataset
from pipelines.runners import PipelineRunner
from taskvision import blob_layout
from taskvision.dataset import trainability, write_snapshot
from taskvision.errors import ConflictError, NotTrainableError
from taskvision.storage import BlobStore

logger = logging.getLogger(__name__)


class TrainingQueue:
    def __init__(
        self,
        blobs: BlobStore,
        runner: PipelineRunner,
        runner_name: str,
        *,
        wake: Callable[[], None],
        min_images_per_label: int,
    ) -> None:
        self.blobs = blobs
        self.min_images_per_label = min_images_per_label
        self.runner = runner
        self.runner_name = runner_name
        self._wake = wake  # tells the run watcher to look now rather than at its next poll

    def request_training(
        self, session: Session, user: User, task: Task, params: dict[str, Any]
    ) -> TrainingRun:
        """Snapshot the task's data and queue a run.

        409 while the task is already training; 400 (``not_trainable``) at once when its labels
        cannot pass validation (the same rules as the pipeline's validate step, which stays the
        authority and also checks the images themselves).
        """
        active = session.scalar(
            select(TrainingRun).where(
                TrainingRun.task_id == task.id, TrainingRun.status.in_(RunStatus.active())
            )
        )
        if active is not None:
            raise ConflictError(f"Task '{task.name}' is already training (run {active.id}, {active.status}).")
        run_id = new_id()
        info, rows = task_dataset(session, task, run_id)
        minimum = int(params.get("min_images_per_label") or self.min_images_per_label)
        rules = trainability(info, rows, min_images_per_label=minimum)
        if not rules.ok:
            raise NotTrainableError(rules.problems, counts=rules.counts, image_ids=rules.image_ids)
        prefix = blob_layout.dataset_prefix(task.id, run_id)
        write_snapshot(self.blobs, prefix, info, rows)
        run = TrainingRun(
            id=run_id,
            workspace_id=user.workspace_id,
            task_id=task.id,
            status=RunStatus.QUEUED,
            runner=self.runner_name,
            snapshot_prefix=prefix,
            params=params,
            message="queued",
        )
        session.add(run)
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
