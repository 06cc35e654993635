"""Three ways to run the training pipeline, behind one small interface.

* :class:`WarmRunner` (embedded mode, the default): a long-lived child process
  (``python -m pipelines.warm_worker``) that has the steps' libraries loaded and
  runs the same components in order, so a retrain takes seconds, not the
  imports of five fresh processes.
* :class:`LocalRunner` (embedded, ``TASKVISION_PIPELINE_RUNNER=kfp-local``):
  ``python -m pipelines.local_run`` as a child process that runs the pipeline
  with ``kfp.local``, every step in a subprocess, exactly as KFP does.
* :class:`KubeflowRunner` (cluster mode, ``TASKVISION_KFP_HOST``): the compiled
  pipeline submitted with ``kfp.Client`` as a run in a per-task experiment.

The control plane's run watcher only calls ``submit``, ``status``, ``cancel`` and ``forget``.
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
import threading
import time
from collections.abc import Callable
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
        (root / "tmp").mkdir(exist_ok=True)
        log = (root / "run.log").open("wb")
        env = {**os.environ, **self.env, "OMP_WAIT_POLICY": "PASSIVE", "PYTHONUNBUFFERED": "1"}
        # Each KFP step's command writes its code into a `mktemp -d` folder it never removes:
        # temporary files go into the run's folder, which forget() deletes.
        env["TMPDIR"] = str(root / "tmp")
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

    def pid_of(self, handle: str) -> int | None:
        """The process running this run, if it is running (for tests and operators)."""
        child = self._children.get(handle)
        return child.pid if child is not None and child.poll() is None else None

    def cancel(self, handle: str) -> None:
        child = self._children.get(handle)
        if child is not None and child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait(timeout=10)

    def forget(self, handle: str) -> None:
        self._children.pop(handle, None)
        shutil.rmtree(self._root(handle), ignore_errors=True)


class WarmRunner:
    """Runs trainings in warm worker processes (``python -m pipelines.warm_worker``); handles are run ids.

    Up to ``workers`` processes, started when a run needs one and stopped after
    ``idle_s`` without work (each holds the steps' libraries: about 1 GB). A run is
    cancelled by killing its worker; the next run starts a fresh one. ``on_done`` is
    called when a run ends, so the run watcher registers it at once.
    """

    def __init__(
        self,
        work_dir: Path,
        *,
        workers: int = 1,
        idle_s: float = 1800.0,
        env: dict[str, str] | None = None,
        on_done: Callable[[], None] | None = None,
    ) -> None:
        self.work_dir = work_dir
        self.workers = workers
        self.idle_s = idle_s
        self.env = env or {}
        self.on_done = on_done or (lambda: None)
        self._lock = threading.Lock()
        self._procs: list[_Worker] = []
        self._states: dict[str, RunnerStatus] = {}
        self._owner: dict[str, _Worker] = {}
        self._waiting: list[tuple[str, dict[str, Any]]] = []

    def submit(self, run_id: str, task_id: str, arguments: dict[str, Any]) -> str:
        with self._lock:
            self._states[run_id] = RunnerStatus(RunnerState.RUNNING)
            self._waiting.append((run_id, arguments))
            self._dispatch()
        logger.info("run %s: queued for a warm worker", run_id)
        return run_id

    def _dispatch(self) -> None:
        """Give waiting runs to idle workers, starting workers up to the limit (lock held)."""
        self._procs = [worker for worker in self._procs if worker.alive()]
        while self._waiting:
            idle = next((w for w in self._procs if w.current is None), None)
            if idle is None and len(self._procs) < self.workers:
                idle = _Worker(self.env, self._finished)
                self._procs.append(idle)
            if idle is None:
                return
            run_id, arguments = self._waiting.pop(0)
            self._owner[run_id] = idle
            idle.send(run_id, arguments, self.work_dir / run_id)

    def _finished(self, worker: _Worker, run_id: str, status: RunnerStatus) -> None:
        with self._lock:
            current = self._states.get(run_id)
            if current is not None and current.state == RunnerState.RUNNING:  # not cancelled meanwhile
                self._states[run_id] = status
            self._owner.pop(run_id, None)
            self._dispatch()
        self.on_done()

    def status(self, handle: str) -> RunnerStatus:
        with self._lock:
            self._stop_idle()
            return self._states.get(
                handle,
                RunnerStatus(RunnerState.FAILED, "The training process is gone (the service was restarted)."),
            )

    def _stop_idle(self) -> None:
        now = time.monotonic()
        for worker in self._procs:
            if worker.current is None and now - worker.idle_since > self.idle_s:
                worker.stop()
        self._procs = [worker for worker in self._procs if worker.alive()]

    def cancel(self, handle: str) -> None:
        with self._lock:
            self._waiting = [(run_id, args) for run_id, args in self._waiting if run_id != handle]
            worker = self._owner.pop(handle, None)
            self._states[handle] = RunnerStatus(RunnerState.FAILED, "The training was cancelled.")
        if worker is not None:
            worker.kill()  # the next run gets a fresh worker
        with self._lock:
            self._dispatch()

    def forget(self, handle: str) -> None:
        with self._lock:
            self._states.pop(handle, None)
        shutil.rmtree(self.work_dir / handle, ignore_errors=True)

    def pid_of(self, handle: str) -> int | None:
        """The process running this run, if it is running (for tests and operators)."""
        with self._lock:
            worker = self._owner.get(handle)
            return worker.proc.pid if worker is not None and worker.current == handle else None

    def close(self) -> None:
        with self._lock:
            for worker in self._procs:
                worker.stop()
            self._procs = []


class _Worker:
    """One warm worker process and the thread that reads its answers."""

    def __init__(self, env: dict[str, str], finished: Callable[[_Worker, str, RunnerStatus], None]) -> None:
        self.finished = finished
        self.current: str | None = None
        self.idle_since = time.monotonic()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pipelines.warm_worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=None,  # the worker's logs go where the control plane's go
            env={**os.environ, **env, "OMP_WAIT_POLICY": "PASSIVE", "PYTHONUNBUFFERED": "1"},
            text=True,
            preexec_fn=_die_with_parent,
        )
        logger.info("started a warm training worker (pid %d)", self.proc.pid)
        threading.Thread(target=self._read, name=f"warm-worker-{self.proc.pid}", daemon=True).start()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def send(self, run_id: str, arguments: dict[str, Any], work_dir: Path) -> None:
        self.current = run_id
        assert self.proc.stdin is not None
        job = {"run_id": run_id, "arguments": arguments, "work_dir": str(work_dir)}
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            message = json.loads(line)
            if "run_id" not in message:
                continue  # {"ready": true}
            run_id = message["run_id"]
            state = RunnerState.SUCCEEDED if message["state"] == "SUCCEEDED" else RunnerState.FAILED
            self.current, self.idle_since = None, time.monotonic()
            self.finished(self, run_id, RunnerStatus(state, message.get("message", "")))
        # The process ended: a run it had is lost (killed, out of memory).
        code = self.proc.wait()
        if self.current is not None:
            run_id, self.current = self.current, None
            reason = f"was killed (signal {-code})" if code < 0 else f"exited with code {code}"
            self.finished(self, run_id, RunnerStatus(RunnerState.FAILED, f"The training process {reason}."))

    def stop(self) -> None:
        if self.alive() and self.proc.stdin is not None:
            self.proc.stdin.close()  # the worker ends after its current run
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()

    def kill(self) -> None:
        if self.alive():
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)


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
        with tempfile.TemporaryDirectory(prefix="taskvision-kfp-") as scratch:  # compiled once, into memory
            package = Path(scratch) / "training.yaml"
            compile_pipeline(package, gpu_count=gpu_count, s3_secret=s3_secret)
            self.package = package.read_text()

    def submit(self, run_id: str, task_id: str, arguments: dict[str, Any]) -> str:
        experiment = f"taskvision-task-{task_id}"
        try:
            experiment_id = self.client.get_experiment(
                experiment_name=experiment, namespace=self.namespace
            ).experiment_id
        except Exception:
            experiment_id = self.client.create_experiment(experiment, namespace=self.namespace).experiment_id
        with tempfile.TemporaryDirectory(prefix="taskvision-kfp-") as scratch:  # the client reads a file
            package = Path(scratch) / "training.yaml"
            package.write_text(self.package)
            result = self.client.create_run_from_pipeline_package(
                str(package),
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
