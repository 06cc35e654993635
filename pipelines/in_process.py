"""The training pipeline's steps run in order in the current process (what the warm worker does).

The same KFP components as the pipeline (``components/*.py``), called through
their Python functions with real KFP artifact objects whose files live under
``work_dir``: validate -> split -> train -> evaluate -> register, wired as in
:func:`pipelines.training.build_pipeline` (a test compares the two). Each step
reports progress and failures to the blob store exactly as under kfp.local or
Kubeflow, so the control plane follows a run the same way whichever runner ran it.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

from kfp import dsl

from components.evaluate import evaluate
from components.register import register
from components.split import split
from components.train import train
from components.validate import validate

# step -> {parameter: the upstream step output it takes}, as in pipelines/training.py
WIRING: dict[str, dict[str, str]] = {
    "validate": {},
    "split": {},
    "train": {"split_in": "split.split_out"},
    "evaluate": {"model": "train.model"},
    "register": {
        "model": "train.model",
        "evaluation": "evaluate.evaluation",
        "predictions": "evaluate.predictions",
        "report": "evaluate.report",
    },
}
COMPONENTS = {
    "validate": validate,
    "split": split,
    "train": train,
    "evaluate": evaluate,
    "register": register,
}


def _artifact_parameters(component: Any) -> dict[str, type[dsl.Artifact]]:
    """The component's artifact parameters (inputs and outputs) and their artifact classes."""
    found: dict[str, type[dsl.Artifact]] = {}
    for name, parameter in inspect.signature(component.python_func).parameters.items():
        annotation = parameter.annotation
        for candidate in getattr(annotation, "__args__", ()) + getattr(annotation, "__metadata__", ()):
            if isinstance(candidate, type) and issubclass(candidate, dsl.Artifact):
                found[name] = candidate
    return found


def _parameters(component: Any, arguments: dict[str, Any]) -> dict[str, Any]:
    """The pipeline parameters the component takes (every one must be given)."""
    names = set(inspect.signature(component.python_func).parameters) - set(_artifact_parameters(component))
    missing = sorted(names - set(arguments))
    if missing:
        raise ValueError(f"Step {component.name} needs {', '.join(missing)}.")
    return {name: arguments[name] for name in names}


def run_steps(arguments: dict[str, Any], work_dir: Path) -> str:
    """Run the five steps for one training; returns what the register step returns (the bundle URI)."""
    work_dir.mkdir(parents=True, exist_ok=True)
    outputs: dict[str, dsl.Artifact] = {}
    result: Any = None
    for step, component in COMPONENTS.items():
        kwargs = _parameters(component, arguments)
        for name, kind in _artifact_parameters(component).items():
            upstream = WIRING[step].get(name)
            if upstream is not None:
                kwargs[name] = outputs[upstream]
            else:
                artifact = kind(name=name, uri=str(work_dir / step / name), metadata={})
                Path(artifact.path).parent.mkdir(parents=True, exist_ok=True)
                outputs[f"{step}.{name}"] = kwargs[name] = artifact
        result = component.python_func(**kwargs)
    return str(result)
