"""``python -m pipelines.warm_worker``: a process that keeps the training steps' libraries loaded.

Importing great-expectations, torch and ONNX Runtime and opening the backbone
sessions takes seconds, which a kfp.local run pays again for every step of
every training. This process pays it once, then runs trainings one after
another (:func:`pipelines.in_process.run_steps`, the same components) as the
control plane sends them:

* stdin, one JSON object a line: ``{"run_id": ..., "arguments": {...}, "work_dir": ...}``;
* stdout, one JSON object a line per finished run:
  ``{"run_id": ..., "state": "SUCCEEDED" | "FAILED", "message": ...}``,
  and ``{"ready": true}`` once the libraries are loaded.

Logs go to stderr. The control plane (:class:`pipelines.runners.WarmRunner`)
starts it, stops it when idle, and kills and replaces it to cancel a run.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

logger = logging.getLogger("pipelines.warm_worker")


def preload() -> None:
    """Import what the steps use and open the backbone sessions, before the first run asks."""
    started = time.perf_counter()
    import great_expectations  # noqa: F401  (the validate step's suite)
    import onnxruntime  # noqa: F401
    import torch  # noqa: F401  (the head fitting)

    import pipelines.in_process  # noqa: F401  (every component and its library)

    logger.info("warm worker ready in %.1f s", time.perf_counter() - started)


_PROTOCOL = sys.stdout


def _reply(message: dict[str, Any]) -> None:
    _PROTOCOL.write(json.dumps(message) + "\n")
    _PROTOCOL.flush()


def main() -> int:
    global _PROTOCOL
    # Replies get the real stdout; anything a library prints (to fd 1, even from C) goes to stderr.
    _PROTOCOL = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # Torch and ONNX Runtime share the machine's cores with the API: don't spin on idle cores.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    preload()
    from pipelines.in_process import run_steps

    _reply({"ready": True})
    for line in sys.stdin:
        if not line.strip():
            continue
        job = json.loads(line)
        work_dir = Path(job["work_dir"])
        try:
            run_steps(job["arguments"], work_dir)
            _reply({"run_id": job["run_id"], "state": "SUCCEEDED", "message": ""})
        except Exception as exc:  # the step recorded the reason in the blob store
            logger.exception("run %s failed", job["run_id"])
            _reply({"run_id": job["run_id"], "state": "FAILED", "message": f"{type(exc).__name__}: {exc}"})
        finally:
            shutil.rmtree(work_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
