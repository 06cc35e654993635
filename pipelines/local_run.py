"""Run the training pipeline once with ``kfp.local`` (the embedded mode's runner).

``python -m pipelines.local_run ARGS.json PIPELINE_ROOT`` runs every step as a
subprocess of the current interpreter (``SubprocessRunner(use_venv=False)``:
the project is installed in this environment, nothing is pip-installed) and
exits 0 when the pipeline succeeded. The control plane starts it as a child
process, so a run can be stopped, and a crash cannot take the API down.
"""

import json
import logging
import os
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m pipelines.local_run ARGS.json PIPELINE_ROOT", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    arguments = json.loads(Path(argv[0]).read_text())
    root = Path(argv[1])
    # Torch and ONNX Runtime share the machine's cores with the API: don't spin on idle cores.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

    from kfp import local

    from pipelines.training import build_pipeline

    local.init(
        runner=local.SubprocessRunner(use_venv=False),
        pipeline_root=str(root / "outputs"),
        workspace_root=str(root / "workspace"),
        raise_on_error=True,
    )
    pipeline = build_pipeline()
    task = pipeline(**arguments)
    print(json.dumps({"bundle": task.output}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
