"""Assemble the control-plane application: settings, database, blob store, routers, errors."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from api.db.migrate import upgrade
from api.db.session import make_engine, make_session_factory
from api.deployments import ServingReconciler
from api.errors import register_error_handlers
from api.inference_services import InferenceServiceManager
from api.routes import account, classify, health, labels, models, tasks, training_images, training_runs
from api.serving import EmbeddedServing
from api.settings import Settings
from api.signing import UrlSigner, load_signing_key
from api.training import TrainingService
from pipelines.runners import KubeflowRunner, LocalRunner, PipelineRunner
from taskvision import __version__

logger = logging.getLogger(__name__)


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app. The schema is migrated and the blob store opened before it serves."""
    settings = settings or Settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    engine = make_engine(settings.effective_database_url)
    upgrade(engine)
    blobs = settings.open_blob_store()

    session_factory = make_session_factory(engine)
    reconciler = None
    if settings.serving_backend == "kserve":
        manager = InferenceServiceManager(
            namespace=settings.k8s_namespace,
            runtime=settings.isvc_runtime,
            service_account=settings.isvc_service_account,
            min_replicas=settings.isvc_min_replicas,
            max_replicas=settings.isvc_max_replicas,
            kubeconfig=settings.kubeconfig,
        )
        reconciler = ServingReconciler(session_factory, blobs, manager)
    training = TrainingService(settings, session_factory, blobs, *_runner(settings), reconciler=reconciler)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        training.start()
        yield
        training.stop()
        engine.dispose()

    app = FastAPI(
        title="TaskVision",
        version=__version__,
        description="Custom image recognition, wire-compatible with the Ximilar recognition v2 API.",
        redirect_slashes=False,
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.engine = engine
    app.state.session_factory = session_factory
    app.state.training = training
    app.state.reconciler = reconciler
    app.state.serving = EmbeddedServing(
        blobs,
        settings.data_dir.resolve() / "serving-cache",
        memory_mb=settings.serving_memory_mb,
        max_image_pixels=settings.max_image_pixels,
        int8=settings.serving_int8,
        batch_window_ms=settings.serving_batch_window_ms,
    )
    app.state.url_signer = UrlSigner(
        load_signing_key(app.state.session_factory), ttl_s=settings.download_url_ttl_s
    )
    app.state.blobs = blobs
    register_error_handlers(app)
    for module in (health, account, tasks, labels, training_images, models, training_runs, classify):
        app.include_router(module.router)
    return app


def _runner(settings: Settings) -> tuple[PipelineRunner, str]:
    """Kubeflow when TASKVISION_KFP_HOST is set, else kfp.local in child processes."""
    if settings.kfp_host:
        on_s3 = settings.effective_storage_url.startswith("s3://")
        return KubeflowRunner(
            settings.kfp_host,
            namespace=settings.kfp_namespace,
            gpu_count=settings.train_gpu_count,
            s3_secret=settings.kfp_s3_secret if on_s3 else None,
        ), "kubeflow"
    env = {}
    if settings.s3_access_key:
        env["TASKVISION_S3_ACCESS_KEY"] = settings.s3_access_key
    if settings.s3_secret_key:
        env["TASKVISION_S3_SECRET_KEY"] = settings.s3_secret_key.get_secret_value()
    return LocalRunner(settings.data_dir.resolve() / "pipeline-runs", env=env), "local"
