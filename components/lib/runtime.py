"""What every pipeline step shares: opening the blob store, progress reports, readable failures.

A step reports to ``<run_prefix>/progress.json`` and, when it fails,
``<run_prefix>/failure.json`` in the blob store. The control plane's run
watcher reads them the same way whichever runner (kfp.local or Kubeflow) ran
the step, so a user sees "label 'rose' has 12 images; at least 20 are needed"
rather than a stack trace.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from typing import Any

from taskvision import blob_layout
from taskvision.storage import BlobStore, open_blob_store

# The container image the steps run in on Kubeflow (it has this project installed,
# so no packages are installed at run time). Read when pipelines are compiled.
TRAINING_IMAGE = os.environ.get("TASKVISION_TRAINING_IMAGE", "ghcr.io/taskvision/taskvision-train:0.1.0")

logger = logging.getLogger(__name__)


class StepFailed(Exception):
    """A step failed for a reason the user can act on; the message is shown as it is."""


def open_store(storage_url: str) -> BlobStore:
    """Open the run's blob store; S3 credentials come from the environment (never pipeline parameters)."""
    return open_blob_store(
        storage_url,
        access_key=os.environ.get("TASKVISION_S3_ACCESS_KEY") or os.environ.get("AWS_ACCESS_KEY_ID"),
        secret_key=os.environ.get("TASKVISION_S3_SECRET_KEY") or os.environ.get("AWS_SECRET_ACCESS_KEY"),
    )


class Progress:
    """Writes ``{"step", "progress", "message", "updated"}`` to the run's progress.json.

    :meth:`note` records what a step decided (the mode ``auto`` became, the split sizes,
    the chosen model) in the run's run_info.json; the control plane shows it as the run's
    effective parameters.
    """

    def __init__(self, store: BlobStore, run_prefix: str, step: str) -> None:
        self.store, self.key, self.step = store, blob_layout.progress_key(run_prefix), step
        self.info_key = blob_layout.run_info_key(run_prefix)
        self._last = 0.0

    def note(self, **values: Any) -> None:
        """Add ``values`` to the run's effective parameters (JSON-serialisable)."""
        try:
            current = json.loads(self.store.get(self.info_key))
        except (LookupError, ValueError):
            current = {}
        current.update(values)
        self.store.put(self.info_key, json.dumps(current).encode(), content_type="application/json")

    def __call__(self, fraction: float, message: str = "", *, force: bool = False) -> None:
        now = time.time()
        if not force and now - self._last < 1.0 and fraction < 1.0:
            return  # at most one write a second
        self._last = now
        body = {
            "step": self.step,
            "progress": round(min(max(fraction, 0.0), 1.0), 3),
            "message": message,
            "updated": now,
        }
        self.store.put(self.key, json.dumps(body).encode(), content_type="application/json")


def run_step(storage_url: str, run_prefix: str, step: str, work: Callable[[Progress], Any]) -> Any:
    """Run one step's work with progress and failure reporting."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    store = open_store(storage_url)
    progress = Progress(store, run_prefix, step)
    progress(0.0, f"{step} started", force=True)
    try:
        result = work(progress)
    except StepFailed as exc:
        _record_failure(store, run_prefix, step, str(exc))
        raise
    except Exception as exc:
        _record_failure(store, run_prefix, step, f"The {step} step failed: {type(exc).__name__}: {exc}")
        raise
    progress(1.0, f"{step} done", force=True)
    return result


def _record_failure(store: BlobStore, run_prefix: str, step: str, message: str) -> None:
    body = {"step": step, "message": message, "time": time.time()}
    try:
        store.put(
            blob_layout.failure_key(run_prefix), json.dumps(body).encode(), content_type="application/json"
        )
    except Exception:  # the original error matters more than the report
        logger.exception("could not record the failure of step %s", step)
