"""The run watcher (a background job): starts queued runs, follows running ones, registers their models.

Each pass (:meth:`RunWatcher.tick`):
* polls running runs: copies the steps' progress into the run row, and when a
  run ends, registers its bundle as the task's next version
  (:func:`api.services.versions.register_version`) or records why it failed,
  in the user's words (the step's ``failure.json``);
* starts queued runs while fewer than ``train_workers`` are running.

Runs change state with conditional UPDATEs (:meth:`RunWatcher._claim`), so two
control-plane replicas never start or register the same run twice. After a
restart, embedded (kfp.local) runs that were running died with the old process
and are marked failed (:meth:`RunWatcher.recover`); Kubeflow runs keep running
in the cluster and are simply watched again.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from api.db.models import Model, RunStatus, Task, TrainingRun, TrainStatus, utcnow
from api.services import webhooks
from api.services.versions import register_version
from api.settings import Settings
from pipelines.runners import PipelineRunner, RunnerState
from taskvision import blob_layout
from taskvision.bundle import BundleMeta
from taskvision.errors import NotFoundError
from taskvision.storage import BlobStore

logger = logging.getLogger(__name__)


class RunWatcher:
    def __init__(
        self,
        settings: Settings,
        session_factory: sessionmaker[Session],
        blobs: BlobStore,
        runner: PipelineRunner,
        runner_name: str,
    ) -> None:
        self.settings = settings
        self.session_factory = session_factory
        self.blobs = blobs
        self.runner = runner
        self.runner_name = runner_name

    def recover(self) -> None:
        """After a restart: local runs that were running died with the old process."""
        if self.runner_name != "local":
            return
        in_flight = (RunStatus.STARTING, RunStatus.RUNNING, RunStatus.FINISHING)
        with self.session_factory() as session:
            for run in session.scalars(select(TrainingRun).where(TrainingRun.status.in_(in_flight))):
                self._fail(
                    session, run, "The training was interrupted by a restart of the service; train again."
                )
            session.commit()

    def tick(self) -> None:
        """One pass: poll running runs, then start queued ones if there is room."""
        with self.session_factory() as session:
            running = session.scalars(
                select(TrainingRun).where(TrainingRun.status == RunStatus.RUNNING)
            ).all()
            for run in running:
                self._poll(session, run)
            busy = session.scalar(select(func.count()).where(TrainingRun.status == RunStatus.RUNNING)) or 0
            if busy < self.settings.train_workers:
                queued = session.scalars(
                    select(TrainingRun)
                    .where(TrainingRun.status == RunStatus.QUEUED)
                    .order_by(TrainingRun.created)
                    .limit(self.settings.train_workers - busy)
                ).all()
                for run in queued:
                    if self._claim(session, run, RunStatus.QUEUED, RunStatus.STARTING):
                        self._start(session, run)

    def _claim(self, session: Session, run: TrainingRun, expected: RunStatus, new: RunStatus) -> bool:
        """Move a run from ``expected`` to ``new`` only if no other replica did first."""
        result = session.execute(
            update(TrainingRun)
            .where(TrainingRun.id == run.id, TrainingRun.status == expected)
            .values(status=new)
            .execution_options(synchronize_session=False)
        )
        session.commit()
        if getattr(result, "rowcount", 0) != 1:
            return False
        session.refresh(run)
        return True

    def _parameters(self, run: TrainingRun) -> dict[str, Any]:
        """The training parameters the pipeline gets: the request's over the service's defaults."""
        return {
            **self.settings.training_defaults(),
            **{k: v for k, v in run.params.items() if k != "production"},
        }

    def _arguments(self, session: Session, run: TrainingRun) -> dict[str, Any]:
        params = self._parameters(run)
        task = session.get(Task, run.task_id)
        current = (
            session.scalar(
                select(Model).where(Model.task_id == run.task_id, Model.version == task.production_version)
            )
            if task is not None and task.production_version is not None
            else None
        )
        return {
            # The version the retrain starts from: its model choice may be refitted (selection reuse).
            "previous_bundle": current.bundle_uri if current is not None else "",
            "storage_url": self.settings.effective_storage_url,
            "snapshot_prefix": run.snapshot_prefix,
            "run_prefix": blob_layout.run_prefix(run.task_id, run.id),
            "run_id": run.id,
            "bundle_prefix": blob_layout.bundle_prefix(run.task_id, run.id),
            **params,
        }

    def _start(self, session: Session, run: TrainingRun) -> None:
        try:
            run.handle = self.runner.submit(run.id, run.task_id, self._arguments(session, run))
        except Exception as exc:
            logger.exception("could not start run %s", run.id)
            self._fail(session, run, f"The training could not be started: {exc}")
            session.commit()
            return
        run.status, run.started, run.message = RunStatus.RUNNING, utcnow(), "started"
        run.effective_params = {**self._parameters(run), "production": run.params.get("production", True)}
        webhooks.emit(session, run.workspace_id, "training.started", _event(session, run))
        session.commit()

    def _progress(self, run: TrainingRun) -> None:
        prefix = blob_layout.run_prefix(run.task_id, run.id)
        key = blob_layout.progress_key(prefix)
        try:
            data = json.loads(self.blobs.get(key))
        except (NotFoundError, ValueError):
            return
        run.step = str(data.get("step", ""))[:32]
        run.progress = float(data.get("progress", 0.0))
        run.message = str(data.get("message", ""))
        try:
            decided = json.loads(self.blobs.get(blob_layout.run_info_key(prefix)))
        except (NotFoundError, ValueError):
            return
        if isinstance(decided, dict):
            run.effective_params = {**run.effective_params, **decided}

    def _poll(self, session: Session, run: TrainingRun) -> None:
        try:
            status = self.runner.status(run.handle)
        except Exception as exc:  # e.g. the Kubeflow API is unreachable: keep the run, try again later
            logger.warning("cannot read the state of run %s: %s", run.id, exc)
            return
        self._progress(run)
        if status.state == RunnerState.RUNNING:
            session.commit()
            return
        if not self._claim(session, run, RunStatus.RUNNING, RunStatus.FINISHING):
            return  # another replica is registering this run
        if status.state == RunnerState.SUCCEEDED:
            self._register(session, run)
        else:
            self._fail(session, run, self._failure_reason(run, status.message))
        session.commit()
        try:
            self.runner.forget(run.handle)
        except Exception:
            logger.warning("could not clean up after run %s", run.id, exc_info=True)

    def _failure_reason(self, run: TrainingRun, fallback: str) -> str:
        key = blob_layout.failure_key(blob_layout.run_prefix(run.task_id, run.id))
        try:
            return str(json.loads(self.blobs.get(key))["message"])
        except (NotFoundError, ValueError, KeyError):
            return fallback or "The training failed."

    def _fail(self, session: Session, run: TrainingRun, reason: str) -> None:
        logger.info("run %s failed: %s", run.id, reason)
        run.status, run.finished, run.error = RunStatus.FAILED, utcnow(), reason
        task = session.get(Task, run.task_id)
        if task is not None:
            task.last_train_status = TrainStatus.TRAINING_FAILED
            task.last_train_error = reason
            webhooks.emit(session, run.workspace_id, "training.failed", _event(session, run))

    def _register(self, session: Session, run: TrainingRun) -> None:
        prefix = blob_layout.bundle_prefix(run.task_id, run.id)
        try:
            meta = BundleMeta.from_json(self.blobs.get(f"{prefix}/bundle.json"))
        except (NotFoundError, ValueError) as exc:
            self._fail(session, run, f"The pipeline finished without a usable model bundle ({exc}).")
            return
        task = session.scalar(select(Task).where(Task.id == run.task_id).with_for_update())
        if task is None:
            return
        model = register_version(
            session,
            task,
            bundle_uri=prefix,
            metrics=meta.metrics,
            production=run.params.get("production", True),
            run_id=run.id,
        )
        run.status, run.finished, run.model_version = RunStatus.SUCCEEDED, utcnow(), model.version
        run.step, run.progress, run.message = "register", 1.0, f"version {model.version} registered"
        session.flush()
        webhooks.emit(
            session,
            run.workspace_id,
            "training.succeeded",
            {**_event(session, run), "model_id": model.id, "metrics": model.metrics},
        )
        logger.info("run %s: task %s version %d registered", run.id, task.id, model.version)


def _event(session: Session, run: TrainingRun) -> dict[str, Any]:
    """What a training webhook says about the run."""
    task = session.get(Task, run.task_id)
    return {
        "task": {"id": run.task_id, "name": task.name if task else ""},
        "run": {"id": run.id, "status": str(run.status), "error": run.error, "params": run.params},
        "version": run.model_version,
    }
