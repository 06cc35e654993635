"""The training pipeline: validate -> split -> train -> evaluate -> register.

It receives only small parameters: where the blob store is, the dataset
snapshot's key prefix and where the run reports and puts its bundle (KFP
parameters are limited to about 128 KB). The same pipeline runs locally
through ``kfp.local`` and on Kubeflow Pipelines from its compiled YAML.

S3 credentials are never parameters. Locally the steps inherit them from the
runner's environment; on Kubeflow every step gets them from a Kubernetes
Secret (``s3_secret``, keys ``TASKVISION_S3_ACCESS_KEY`` and
``TASKVISION_S3_SECRET_KEY``) in the namespace its pods run in, through
kfp-kubernetes' ``use_secret_as_env``.
"""

from pathlib import Path

from kfp import compiler, dsl, kubernetes

from components.evaluate import evaluate
from components.register import register
from components.split import split
from components.train import train
from components.validate import validate

PIPELINE_NAME = "taskvision-training"
S3_CREDENTIAL_KEYS = ("TASKVISION_S3_ACCESS_KEY", "TASKVISION_S3_SECRET_KEY")


def build_pipeline(
    *, gpu_count: int = 0, gpu_type: str = "nvidia.com/gpu", s3_secret: str | None = None
) -> "dsl.graph_component.GraphComponent":
    """The pipeline, with ``gpu_count`` GPUs requested for the train step (0: CPU only).

    ``s3_secret``: the Kubernetes Secret whose S3 credentials every step gets
    as environment variables (None: the steps' environment has them, as with kfp.local).
    """

    def with_credentials(task: dsl.PipelineTask) -> dsl.PipelineTask:
        if s3_secret:
            kubernetes.use_secret_as_env(
                task, secret_name=s3_secret, secret_key_to_env={key: key for key in S3_CREDENTIAL_KEYS}
            )
        return task

    @dsl.pipeline(
        name=PIPELINE_NAME, description="Validate, split 80/20, train, evaluate and register a model."
    )
    def training_pipeline(
        storage_url: str,
        snapshot_prefix: str,
        run_prefix: str,
        run_id: str,
        bundle_prefix: str,
        min_images_per_label: int = 20,
        test_fraction: float = 0.2,
        mode: str = "auto",
        quality: str = "balanced",
        augment: str = "flip",
        epochs: int = 25,
        learning_rate: float = 0.001,
        batch_size: int = 32,
        seed: int = 0,
        previous_bundle: str = "",
    ) -> str:
        checked = with_credentials(
            validate(
                storage_url=storage_url,
                snapshot_prefix=snapshot_prefix,
                run_prefix=run_prefix,
                min_images_per_label=min_images_per_label,
            ).set_display_name("validate")
        )
        parts = with_credentials(
            split(
                storage_url=storage_url,
                snapshot_prefix=snapshot_prefix,
                run_prefix=run_prefix,
                test_fraction=test_fraction,
                seed=seed,
            )
            .after(checked)
            .set_display_name("split 80/20")
        )
        trained = with_credentials(
            train(
                storage_url=storage_url,
                snapshot_prefix=snapshot_prefix,
                run_prefix=run_prefix,
                run_id=run_id,
                split_in=parts.outputs["split_out"],
                mode=mode,
                quality=quality,
                augment=augment,
                epochs=epochs,
                learning_rate=learning_rate,
                batch_size=batch_size,
                seed=seed,
                previous_bundle=previous_bundle,
            ).set_display_name("train")
        )
        trained.set_memory_request("4G").set_cpu_request("2")
        if gpu_count > 0:
            trained.set_accelerator_type(gpu_type).set_accelerator_limit(gpu_count)
        scored = with_credentials(
            evaluate(
                storage_url=storage_url, run_prefix=run_prefix, model=trained.outputs["model"]
            ).set_display_name("evaluate")
        )
        registered = with_credentials(
            register(
                storage_url=storage_url,
                run_prefix=run_prefix,
                bundle_prefix=bundle_prefix,
                model=trained.outputs["model"],
                evaluation=scored.outputs["evaluation"],
                predictions=scored.outputs["predictions"],
                report=scored.outputs["report"],
            ).set_display_name("register")
        )
        return registered.output

    return training_pipeline


def compile_pipeline(
    path: Path, *, gpu_count: int = 0, gpu_type: str = "nvidia.com/gpu", s3_secret: str | None = None
) -> Path:
    """Write the pipeline's KFP IR YAML (and its Kubernetes platform spec) to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pipeline = build_pipeline(gpu_count=gpu_count, gpu_type=gpu_type, s3_secret=s3_secret)
    compiler.Compiler().compile(pipeline, str(path))
    return path
