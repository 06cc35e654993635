"""Training orchestration: the queue, the pipeline runner, and the run watcher.

A train request freezes a dataset snapshot and queues a run (202 at once).
One background thread then, in a loop:
* starts queued runs while fewer than ``train_workers`` are running;
* polls running ones: copies the steps' progress into the run row, and when a
  run ends, registers its bundle as the task's next version (max + 1, made
  production by default) or records why it failed, in the user's words.

Embedded mode runs pipelines with kfp.local in child processes; with
``TASKVISION_KFP_HOST`` they are submitted to Kubeflow Pipelines. A run that a
restart interrupted is marked failed on the next start (Kubeflow runs keep
running in the cluster, so those are watched again instead).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from api import blob_gc
from api.bundles import next_version
from api.db.models import Model, Task, TrainingRun, User
from api.deployments import ServingReconciler
from api.settings import Settings
from api.snapshots import create_snapshot
from pipelines.runners import FAILED, RUNNING, SUCCEEDED, PipelineRunner
from taskvision.bundle import BundleMeta
from taskvision.errors import ConflictError, NotFoundError
from taskvision.storage import BlobStore

logger = logging.getLogger(__name__)

QUEUED = "QUEUED"
# STARTING and FINISHING are held while one control-plane replica submits or registers a run.
ACTIVE = (QUEUED, "STARTING", RUNNING, "FINISHING")


def run_prefix(task_id: str, run_id: str) -> str:
    return f"runs/{task_id}/{run_id}"


def bundle_prefix(task_id: str, run_id: str) -> str:
    return f"models/{task_id}/{run_id}"


def _now() -> datetime:
    return datetime.now(UTC)


class TrainingService:
    """Owns the runner and the watcher thread of one control-plane process."""

    def __init__(
        self,
        settings: Settings,
        session_factory: sessionmaker[Session],
        blobs: BlobStore,
        runner: PipelineRunner,
        runner_name: str,
        reconciler: ServingReconciler | None = None,
    ) -> None:
        self.settings = settings
        self.session_factory = session_factory
        self.blobs = blobs
        self.runner = runner
        self.runner_name = runner_name
        self.reconciler = reconciler
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._next_blob_gc = 0.0

    # ---- requests ------------------------------------------------------------

    def request_training(
        self, session: Session, user: User, task: Task, params: dict[str, Any]
    ) -> TrainingRun:
        """Snapshot the task's data and queue a run. 409 while the task is already training."""
        active = session.scalar(
            select(TrainingRun).where(TrainingRun.task_id == task.id, TrainingRun.status.in_(ACTIVE))
        )
        if active is not None:
            raise ConflictError(f"Task '{task.name}' is already training (run {active.id}, {active.status}).")
        run = TrainingRun(
            workspace_id=user.workspace_id,
            task_id=task.id,
            status=QUEUED,
            runner=self.runner_name,
            snapshot_prefix="",
            params=params,
            message="queued",
        )
        session.add(run)
        session.flush()
        run.snapshot_prefix = create_snapshot(session, self.blobs, task, run.id)
        task.last_train_status = "IN_TRAINING"
        task.last_train_error = ""
        session.commit()
        self._wake.set()
        return run

    def cancel_task_runs(self, session: Session, task_id: str) -> None:
        """Stop the task's active runs (before the task is deleted)."""
        for run in session.scalars(
            select(TrainingRun).where(TrainingRun.task_id == task_id, TrainingRun.status.in_(ACTIVE))
        ):
            if run.handle:
                try:
                    self.runner.cancel(run.handle)
                    self.runner.forget(run.handle)
                except Exception:
                    logger.warning("could not cancel run %s", run.id, exc_info=True)
            run.status, run.finished, run.error = "CANCELED", _now(), "The task was deleted."
        session.commit()

    # ---- the watcher thread ------------------------------------------------------

    def start(self) -> None:
        self.recover()
        self._thread = threading.Thread(target=self._loop, name="training-watcher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def recover(self) -> None:
        """After a restart: local runs that were running died with the old process."""
        if self.runner_name != "local":
            return
        with self.session_factory() as session:
            for run in session.scalars(select(TrainingRun).where(TrainingRun.status.in_(ACTIVE[1:]))):
                self._fail(
                    session, run, "The training was interrupted by a restart of the service; train again."
                )
            session.commit()

    def wake(self) -> None:
        self._wake.set()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception:
                logger.exception("training watcher iteration failed; retrying")
            if self.reconciler is not None:
                try:
                    self.reconciler.tick()
                except Exception:
                    logger.exception("serving reconciliation failed; retrying")
            if time.monotonic() >= self._next_blob_gc:
                self._next_blob_gc = time.monotonic() + self.settings.blob_gc_interval_s
                try:
                    self.collect_blobs()
                except Exception:
                    logger.exception("collecting deleted images' blobs failed; retrying")
            self._wake.wait(self.settings.train_poll_interval_s)
            self._wake.clear()

    def collect_blobs(self, *, grace_s: float | None = None) -> int:
        """Delete deleted images' blobs that nothing needs any more (api/blob_gc.py).

        A workspace with a training queued or running keeps them: its snapshot reads them.
        """
        with self.session_factory() as session:
            busy = set(
                session.scalars(
                    select(TrainingRun.workspace_id).where(TrainingRun.status.in_(ACTIVE)).distinct()
                )
            )
            return blob_gc.collect(
                session,
                self.blobs,
                grace_s=self.settings.blob_gc_grace_s if grace_s is None else grace_s,
                busy_workspaces=busy,
            )

    def tick(self) -> None:
        """One pass: poll running runs, then start queued ones if there is room."""
        with self.session_factory() as session:
            running = session.scalars(select(TrainingRun).where(TrainingRun.status == RUNNING)).all()
            for run in running:
                self._poll(session, run)
            busy = session.scalar(select(func.count()).where(TrainingRun.status == RUNNING)) or 0
            if busy < self.settings.train_workers:
                queued = session.scalars(
                    select(TrainingRun)
                    .where(TrainingRun.status == QUEUED)
                    .order_by(TrainingRun.created)
                    .limit(self.settings.train_workers - busy)
                ).all()
                for run in queued:
                    if self._claim(session, run, QUEUED, "STARTING"):
                        self._start(session, run)

    def _claim(self, session: Session, run: TrainingRun, expected: str, new: str) -> bool:
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

    def _arguments(self, run: TrainingRun) -> dict[str, Any]:
        params = {
            **self.settings.training_defaults(),
            **{k: v for k, v in run.params.items() if k != "production"},
        }
        return {
            "storage_url": self.settings.effective_storage_url,
            "snapshot_prefix": run.snapshot_prefix,
            "run_prefix": run_prefix(run.task_id, run.id),
            "run_id": run.id,
            "bundle_prefix": bundle_prefix(run.task_id, run.id),
            **params,
        }

    def _start(self, session: Session, run: TrainingRun) -> None:
        try:
            run.handle = self.runner.submit(run.id, run.task_id, self._arguments(run))
        except Exception as exc:
            logger.exception("could not start run %s", run.id)
            self._fail(session, run, f"The training could not be started: {exc}")
            session.commit()
            return
        run.status, run.started, run.message = RUNNING, _now(), "started"
        session.commit()

    def _progress(self, run: TrainingRun) -> None:
        try:
            data = json.loads(self.blobs.get(f"{run_prefix(run.task_id, run.id)}/progress.json"))
        except (NotFoundError, ValueError):
            return
        run.step = str(data.get("step", ""))[:32]
        run.progress = float(data.get("progress", 0.0))
        run.message = str(data.get("message", ""))

    def _poll(self, session: Session, run: TrainingRun) -> None:
        try:
            status = self.runner.status(run.handle)
        except Exception as exc:  # e.g. the Kubeflow API is unreachable: keep the run, try again later
            logger.warning("cannot read the state of run %s: %s", run.id, exc)
            return
        self._progress(run)
        if status.state == RUNNING:
            session.commit()
            return
        if not self._claim(session, run, RUNNING, "FINISHING"):
            return  # another replica is registering this run
        if status.state == SUCCEEDED:
            self._register(session, run)
        else:
            self._fail(session, run, self._failure_reason(run, status.message))
        session.commit()
        try:
            self.runner.forget(run.handle)
        except Exception:
            logger.warning("could not clean up after run %s", run.id, exc_info=True)

    def _failure_reason(self, run: TrainingRun, fallback: str) -> str:
        try:
            report = json.loads(self.blobs.get(f"{run_prefix(run.task_id, run.id)}/failure.json"))
            return str(report["message"])
        except (NotFoundError, ValueError, KeyError):
            return fallback or "The training failed."

    def _fail(self, session: Session, run: TrainingRun, reason: str) -> None:
        logger.info("run %s failed: %s", run.id, reason)
        run.status, run.finished, run.error = FAILED, _now(), reason
        task = session.get(Task, run.task_id)
        if task is not None:
            task.last_train_status = "TRAINING_FAILED"
            task.last_train_error = reason

    def _register(self, session: Session, run: TrainingRun) -> None:
        prefix = bundle_prefix(run.task_id, run.id)
        try:
            meta = BundleMeta.from_json(self.blobs.get(f"{prefix}/bundle.json"))
        except (NotFoundError, ValueError) as exc:
            self._fail(session, run, f"The pipeline finished without a usable model bundle ({exc}).")
            return
        task = session.scalar(select(Task).where(Task.id == run.task_id).with_for_update())
        if task is None:
            return
        version = next_version(session, task.id)
        session.add(
            Model(
                workspace_id=task.workspace_id,
                task_id=task.id,
                version=version,
                train_status="TRAINED",
                metrics=meta.metrics,
                bundle_uri=prefix,
            )
        )
        if run.params.get("production", True) or task.production_version == -1:
            task.production_version = version
        task.last_train_status, task.last_train_error = "TRAINED", ""
        run.status, run.finished, run.model_version = SUCCEEDED, _now(), version
        run.step, run.progress, run.message = "register", 1.0, f"version {version} registered"
        logger.info("run %s: task %s version %d registered", run.id, task.id, version)
