"""Cluster mode: keep each task's InferenceService serving its production version.

A reconcile loop rather than one-shot calls: whenever a task's production
version or canary share differs from what its InferenceService was last set
to, the loop creates or patches the service. If the Kubernetes API is down,
the task records the error (``serving_error``) and the loop retries with a
back-off, while everything else in the control plane keeps working. Deleted
tasks' services are removed the same way. And a sweep (on the first pass, then
every ``SWEEP_S``) deletes services whose task no longer exists: one whose
deletion was still being retried when the control plane stopped is not left behind.
The sweep only touches services labelled ``app.kubernetes.io/managed-by=taskvision``
in its namespace, so one namespace holds one TaskVision installation (as the
overlays in ``manifests/`` do).
"""

from __future__ import annotations

import logging
import threading
import time

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from api.db.models import Model, Task
from api.services.inference_services import Endpoint, InferenceServiceManager, KubernetesUnavailable
from taskvision.storage import BlobStore

logger = logging.getLogger(__name__)

RETRY_S = 5.0
SWEEP_S = 60.0


def desired_spec(task: Task) -> str:
    if task.production_version < 1:
        return ""
    return f"{task.production_version}:{task.canary_percent or ''}"


class ServingReconciler:
    def __init__(
        self, session_factory: sessionmaker[Session], blobs: BlobStore, manager: InferenceServiceManager
    ) -> None:
        self.session_factory = session_factory
        self.blobs = blobs
        self.manager = manager
        self._retry_at: dict[str, float] = {}
        self._pending_deletes: set[str] = set()
        self._next_sweep = 0.0  # the first pass sweeps
        self._endpoints: dict[str, tuple[float, Endpoint]] = {}
        self._lock = threading.Lock()

    def tick(self) -> None:
        now = time.monotonic()
        with self.session_factory() as session:
            for task in session.scalars(select(Task).where(Task.production_version > 0)):
                wanted = desired_spec(task)
                if task.served_spec == wanted or self._retry_at.get(task.id, 0.0) > now:
                    continue
                self._deploy(session, task, wanted)
        for task_id in list(self._pending_deletes):
            self.delete(task_id)
        if now >= self._next_sweep:
            self.sweep()

    def sweep(self) -> None:
        """Delete the InferenceServices of tasks that no longer exist."""
        try:
            served = self.manager.managed_task_ids()
        except KubernetesUnavailable as exc:
            logger.warning("cannot list InferenceServices yet: %s", exc)
            self._next_sweep = time.monotonic() + RETRY_S
            return
        self._next_sweep = time.monotonic() + SWEEP_S
        if not served:
            return
        # Listed before the query: a service exists only after its task was committed,
        # so a task missing here was deleted (by this replica or another).
        with self.session_factory() as session:
            existing = set(session.scalars(select(Task.id).where(Task.id.in_(served))))
        for task_id in sorted(served - existing):
            logger.info("task %s no longer exists: deleting its InferenceService", task_id)
            self.delete(task_id)

    def _deploy(self, session: Session, task: Task, wanted: str) -> None:
        model = session.scalar(
            select(Model).where(Model.task_id == task.id, Model.version == task.production_version)
        )
        if model is None:
            return
        try:
            self.manager.deploy(
                task.id, model.version, self.blobs.uri(model.bundle_uri), canary_percent=task.canary_percent
            )
        except KubernetesUnavailable as exc:
            logger.warning("task %s: cannot update its InferenceService yet: %s", task.id, exc)
            task.serving_error = f"Serving is being updated; the Kubernetes API answered: {exc}"
            self._retry_at[task.id] = time.monotonic() + RETRY_S
            session.commit()
            return
        task.served_spec, task.serving_error = wanted, ""
        self._retry_at.pop(task.id, None)
        with self._lock:
            self._endpoints.pop(task.id, None)
        session.commit()

    def delete(self, task_id: str) -> None:
        """Remove a deleted task's InferenceService (retried until the API answers)."""
        try:
            self.manager.delete(task_id)
        except KubernetesUnavailable as exc:
            logger.warning("task %s: cannot delete its InferenceService yet: %s", task_id, exc)
            self._pending_deletes.add(task_id)
            return
        self._pending_deletes.discard(task_id)

    def endpoint(self, task_id: str, *, max_age_s: float = 5.0) -> Endpoint:
        """The task's service address (cached for a few seconds: classify calls it per request)."""
        with self._lock:
            cached = self._endpoints.get(task_id)
        if cached and time.monotonic() - cached[0] < max_age_s and cached[1].ready:
            return cached[1]
        found = self.manager.endpoint(task_id)
        with self._lock:
            self._endpoints[task_id] = (time.monotonic(), found)
        return found
