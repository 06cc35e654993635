"""The compiled pipeline: valid KFP IR that loads back into PipelineSpec, with the GPU request."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from google.protobuf import json_format
from kfp.pipeline_spec import pipeline_spec_pb2

TASKVISION = str(Path(sys.executable).with_name("taskvision"))


def _compile(tmp_path: Path, *args: str) -> pipeline_spec_pb2.PipelineSpec:
    out = tmp_path / "training.yaml"
    result = subprocess.run(
        [TASKVISION, "pipeline", "compile", str(out), *args], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    documents = list(yaml.safe_load_all(out.read_text()))
    return json_format.ParseDict(documents[0], pipeline_spec_pb2.PipelineSpec())


@pytest.mark.parametrize(("args", "gpus"), [((), 0), (("--gpus", "2", "--gpu-type", "nvidia.com/gpu"), 2)])
def test_compiled_pipeline_loads_back_with_its_steps_and_gpu_request(
    tmp_path: Path, args: tuple[str, ...], gpus: int
) -> None:
    spec = _compile(tmp_path, *args)
    assert spec.pipeline_info.name == "taskvision-training"
    tasks = spec.root.dag.tasks
    assert set(tasks) == {"validate", "split", "train", "evaluate", "register"}
    assert list(tasks["split"].dependent_tasks) == ["validate"]
    assert "split" in tasks["train"].dependent_tasks
    assert "train" in tasks["evaluate"].dependent_tasks
    assert set(tasks["register"].dependent_tasks) == {"train", "evaluate"}
    # Only small parameters go in: URIs and numbers, never data.
    inputs = set(spec.root.input_definitions.parameters)
    assert {"storage_url", "snapshot_prefix", "run_prefix", "bundle_prefix", "mode", "epochs"} <= inputs
    executors = spec.deployment_spec.fields["executors"].struct_value.fields
    train = executors[tasks["train"].component_ref.name.replace("comp-", "exec-")].struct_value
    container = train.fields["container"].struct_value.fields
    image = container["image"].string_value
    assert image.startswith("ghcr.io/taskvision/taskvision-train")
    resources = container["resources"].struct_value.fields
    accelerator = resources.get("accelerator")
    if gpus:
        assert accelerator is not None
        assert accelerator.struct_value.fields["resourceType"].string_value == "nvidia.com/gpu"
        assert accelerator.struct_value.fields["resourceCount"].string_value == str(gpus)
    else:
        assert accelerator is None
    # No component installs packages at run time: they run in the training image.
    for executor in executors.values():
        command = " ".join(
            v.string_value
            for v in executor.struct_value.fields["container"]
            .struct_value.fields["command"]
            .list_value.values
        )
        assert "pip install" not in command
