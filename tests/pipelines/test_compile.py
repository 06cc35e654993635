"""The compiled pipeline: valid KFP IR that loads back into PipelineSpec, with the GPU request."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from google.protobuf import json_format
from kfp.kubernetes import kubernetes_executor_config_pb2
from kfp.pipeline_spec import pipeline_spec_pb2

TASKVISION = str(Path(sys.executable).with_name("taskvision"))


def _documents(tmp_path: Path, *args: str) -> list[dict[str, Any]]:
    out = tmp_path / "training.yaml"
    result = subprocess.run(
        [TASKVISION, "pipeline", "compile", str(out), *args], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    return list(yaml.safe_load_all(out.read_text()))


def _compile(tmp_path: Path, *args: str) -> pipeline_spec_pb2.PipelineSpec:
    return json_format.ParseDict(_documents(tmp_path, *args)[0], pipeline_spec_pb2.PipelineSpec())


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


def test_every_step_gets_the_s3_credentials_from_the_named_secret(tmp_path: Path) -> None:
    documents = _documents(tmp_path, "--s3-secret", "taskvision-secrets")
    assert len(documents) == 2  # the PipelineSpec, then its Kubernetes platform spec
    spec = json_format.ParseDict(documents[0], pipeline_spec_pb2.PipelineSpec())
    platform = json_format.ParseDict(documents[1], pipeline_spec_pb2.PlatformSpec())
    executors = platform.platforms["kubernetes"].deployment_spec.executors
    step_executors = {
        task.component_ref.name.replace("comp-", "exec-") for task in spec.root.dag.tasks.values()
    }
    assert set(executors) == step_executors  # all five steps read or write the blob store
    for name in step_executors:
        config = json_format.ParseDict(
            json_format.MessageToDict(executors[name]),
            kubernetes_executor_config_pb2.KubernetesExecutorConfig(),
        )
        (secret,) = config.secret_as_env
        assert secret.secret_name == "taskvision-secrets" and not secret.optional
        assert {(k.secret_key, k.env_var) for k in secret.key_to_env} == {
            ("TASKVISION_S3_ACCESS_KEY", "TASKVISION_S3_ACCESS_KEY"),
            ("TASKVISION_S3_SECRET_KEY", "TASKVISION_S3_SECRET_KEY"),
        }
    # Without a secret (kfp.local, or a file blob store) there is no platform spec at all.
    assert len(_documents(tmp_path, "--gpus", "0")) == 1


def test_the_warm_runner_wires_the_steps_as_the_pipeline_does(tmp_path: Path) -> None:
    """pipelines/in_process.py runs the same components; its wiring must be the compiled DAG's."""
    from pipelines.in_process import COMPONENTS, WIRING

    tasks = _compile(tmp_path).root.dag.tasks
    assert list(COMPONENTS) == ["validate", "split", "train", "evaluate", "register"] and set(tasks) == set(
        COMPONENTS
    )
    for step, task in tasks.items():
        artifacts = {
            name: f"{spec.task_output_artifact.producer_task}.{spec.task_output_artifact.output_artifact_key}"
            for name, spec in task.inputs.artifacts.items()
        }
        assert artifacts == WIRING[step], step
        # Every step runs after the steps it follows in the pipeline.
        order = list(COMPONENTS)
        assert all(order.index(before) < order.index(step) for before in task.dependent_tasks), step
