"""Two ways to run the training pipeline, behind one small interface.

* :class:`LocalRunner` (embedded mode): ``python -m pipelines.local_run`` as a
  child process that runs the pipeline with ``kfp.local``.
* :class:`KubeflowRunner` (cluster mode, ``TASKVISION_KFP_HOST``): the compiled
  pipeline submitted with ``kfp.Client`` as a run in a per-task experiment.

The control plane's run watcher only calls ``submit``, ``status`` and ``cancel``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol

logger = logging.getLogger(__name__)


class RunnerState(StrEnum):
    """What a runner says about a pipeline run it was given."""

    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"


@dataclass(frozen=True)
class RunnerStatus:
    state: RunnerState
    message: str = ""


class PipelineRunner(Protocol):
    def submit(self, run_id: str, task_id: str, arguments: dict[str, Any]) -> str:
        """Start a run; returns the runner's handle for it."""
        ...

    def status(self, handle: str) -> RunnerStatus: ...

    def cancel(self, handle: str) -> None: ...

    def forget(self, handle: str) -> None:
        """Drop local resources of a finished run."""
        ...


def _die_with_parent() -> None:
    """In the child: get SIGKILL when the control plane dies, so no run outlives it unseen."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass
    os.setsid()


class LocalRunner:
    """Runs each pipeline in a child process with kfp.local; handles are run ids."""

    def __init__(self, work_dir: Path, *, env: dict[str, str] | None = None) -> None:
        self.work_dir = work_dir
        self.env = env or {}
        self._children: dict[str, subprocess.Popen[bytes]] = {}

    def _root(self, handle: str) -> Path:
        return self.work_dir / handle

    def submit(self, run_id: str, task_id: str, arguments: dict[str, Any]) -> str:
        root = self._root(run_id)
        root.mkdir(parents=True, exist_ok=True)
        (root / "arguments.json").write_text(json.dumps(arguments))
        log = (root / "run.log").open("wb")
        env = {**os.environ, **self.env, "OMP_WAIT_POLICY": "PASSIVE", "PYTHONUNBUFFERED": "1"}
        self._children[run_id] = subprocess.Popen(
            [sys.executable, "-m", "pipelines.local_run", str(root / "arguments.json"), str(root)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            preexec_fn=_die_with_parent,
        )
        log.close()
        logger.info("run %s: started kfp.local pipeline (pid %d)", run_id, self._children[run_id].pid)
        return run_id

    def status(self, handle: str) -> RunnerStatus:
        child = self._children.get(handle)
        if child is None:
            return RunnerStatus(
                RunnerState.FAILED, "The training process is gone (the service was restarted)."
            )
        code = child.poll()
        if code is None:
            return RunnerStatus(RunnerState.RUNNING)
        if code == 0:
            return RunnerStatus(RunnerState.SUCCEEDED)
        return RunnerStatus(RunnerState.FAILED, self._failure_from_log(handle, code))

    def _failure_from_log(self, handle: str, code: int) -> str:
        if code < 0:
            return f"The training process was killed (signal {-code})."
        try:
            lines = (self._root(handle) / "run.log").read_text(errors="replace").strip().splitlines()
        except OSError:
            lines = []
        last = next((line for line in reversed(lines) if line.strip()), "")
        return f"The pipeline failed: {last[-500:]}" if last else f"The pipeline exited with code {code}."

    def cancel(self, handle: str) -> None:
        child = self._children.get(handle)
        if child is not None and child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait(timeout=10)

    def forget(self, handle: str) -> None:
        self._children.pop(handle, None)
        shutil.rmtree(self._root(handle), ignore_errors=True)


class KubeflowRunner:
    """Submits the compiled pipeline to Kubeflow Pipelines; handles are KFP run ids."""

    def __init__(
        self,
        host: str,
        *,
        namespace: str | None = None,
        gpu_count: int = 0,
        s3_secret: str | None = None,
        client: Any | None = None,
    ) -> None:
        from kfp import Client

        from pipelines.training import compile_pipeline

        self.client = client or Client(host=host, namespace=namespace)
        self.namespace = namespace
        self.package = Path(tempfile.mkdtemp(prefix="taskvision-kfp-")) / "training.yaml"
        compile_pipeline(self.package, gpu_count=gpu_count, s3_secret=s3_secret)

    def submit(self, run_id: str, task_id: str, arguments: dict[str, Any]) -> str:
        experiment = f"taskvision-task-{task_id}"
        try:
            experiment_id = self.client.get_experiment(
                experiment_name=experiment, namespace=self.namespace
            ).experiment_id
        except Exception:
            experiment_id = self.client.create_experiment(experiment, namespace=self.namespace).experiment_id
        result = self.client.create_run_from_pipeline_package(
            str(self.package),
            arguments=arguments,
            run_name=f"train-{run_id}",
            experiment_id=experiment_id,
            enable_caching=False,
        )
        logger.info("run %s: submitted to Kubeflow as %s", run_id, result.run_id)
        return str(result.run_id)

    def status(self, handle: str) -> RunnerStatus:
        run = self.client.get_run(handle)
        state = str(run.state or "").upper()
        if state == "SUCCEEDED":
            return RunnerStatus(RunnerState.SUCCEEDED)
        if state in ("FAILED", "CANCELED", "CANCELING", "SKIPPED"):
            error = getattr(run, "error", None)
            message = getattr(error, "message", None) or f"The Kubeflow run ended {state.lower()}."
            return RunnerStatus(RunnerState.FAILED, message)
        return RunnerStatus(RunnerState.RUNNING)

    def cancel(self, handle: str) -> None:
        self.client.terminate_run(handle)

    def forget(self, handle: str) -> None:
        pass
