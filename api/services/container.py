"""Every service of one control-plane process, built once from the settings (:func:`build_services`).

The routes get them through the typed dependencies in ``api/deps.py``; tests
and the CLI reach them as ``app.state.services``. :meth:`Services.start` and
:meth:`Services.stop` run with the app's lifespan.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from api.db.migrate import upgrade
from api.db.session import make_engine, make_session_factory
from api.services.background import BackgroundJobs
from api.services.blob_gc import BlobCollector
from api.services.classifiers import Classifier, EmbeddedClassifier, InferenceServiceClassifier
from api.services.inference_services import InferenceServiceManager
from api.services.rate_limits import ConcurrencyLimit, TokenBuckets
from api.services.run_watcher import RunWatcher
from api.services.serving_reconciler import ServingReconciler
from api.services.signing import UrlSigner, load_signing_key
from api.services.training import TrainingQueue
from api.services.url_fetch import FetchSlots
from api.services.webhooks import WebhookDispatcher
from api.settings import Settings
from pipelines.runners import KubeflowRunner, LocalRunner, PipelineRunner, WarmRunner
from taskvision.storage import BlobStore

logger = logging.getLogger(__name__)


@dataclass
class Services:
    settings: Settings
    engine: Engine
    session_factory: sessionmaker[Session]
    blobs: BlobStore
    training: TrainingQueue
    watcher: RunWatcher
    blob_collector: BlobCollector
    reconciler: ServingReconciler | None  # cluster mode only
    classifier: Classifier
    url_signer: UrlSigner
    rate_limits: TokenBuckets
    classify_slots: ConcurrencyLimit
    fetch_slots: FetchSlots
    jobs: BackgroundJobs
    webhooks: WebhookDispatcher
    # Webhook deliveries run in a thread of their own: a slow target never delays the other jobs.
    webhook_jobs: BackgroundJobs

    def start(self) -> None:
        self.watcher.recover()
        self.jobs.start()
        self.webhook_jobs.start()

    def stop(self) -> None:
        self.jobs.stop()
        self.webhook_jobs.stop()
        close = getattr(self.training.runner, "close", None)
        if close is not None:
            close()  # warm workers
        self.engine.dispose()


def build_services(settings: Settings) -> Services:
    """Migrate the schema, open the stores, and wire every service (nothing starts yet)."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    engine = make_engine(settings.effective_database_url)
    upgrade(engine)
    blobs = settings.open_blob_store()
    session_factory = make_session_factory(engine)
    jobs = BackgroundJobs(poll_interval_s=settings.train_poll_interval_s)
    runner, runner_name = _runner(settings, on_done=jobs.wake)

    embedded = EmbeddedClassifier(
        blobs,
        settings.data_dir.resolve() / "serving-cache",
        memory_mb=settings.serving_memory_mb,
        max_image_pixels=settings.max_image_pixels,
        int8=settings.serving_int8,
        int8_backbones=settings.int8_backbones,
        batch_window_ms=settings.serving_batch_window_ms,
    )
    classifier: Classifier = embedded
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
        classifier = InferenceServiceClassifier(
            reconciler,
            embedded,
            max_image_pixels=settings.max_image_pixels,
            timeout_s=settings.isvc_timeout_s,
        )

    watcher = RunWatcher(settings, session_factory, blobs, runner, runner_name)
    collector = BlobCollector(session_factory, blobs, grace_s=settings.blob_gc_grace_s)
    jobs.add("run watcher", watcher.tick)
    if reconciler is not None:
        jobs.add("serving reconciler", reconciler.tick)
    jobs.add("blob collection", collector.tick, interval_s=settings.blob_gc_interval_s)

    webhooks = WebhookDispatcher(
        session_factory,
        blocked_networks=settings.blocked_networks,
        timeout_s=settings.webhook_timeout_s,
        retry_base_s=settings.webhook_retry_base_s,
        retry_window_s=settings.webhook_retry_window_s,
        max_in_flight=settings.webhook_max_in_flight,
    )
    webhook_jobs = BackgroundJobs(poll_interval_s=settings.webhook_poll_interval_s, name="webhooks")
    webhook_jobs.add("webhook deliveries", webhooks.tick)

    return Services(
        settings=settings,
        engine=engine,
        session_factory=session_factory,
        blobs=blobs,
        training=TrainingQueue(
            blobs, runner, runner_name, wake=jobs.wake, min_images_per_label=settings.min_images_per_label
        ),
        watcher=watcher,
        blob_collector=collector,
        reconciler=reconciler,
        classifier=classifier,
        url_signer=UrlSigner(load_signing_key(settings, session_factory), ttl_s=settings.download_url_ttl_s),
        rate_limits=TokenBuckets(rate=settings.rate_limit_per_s, burst=settings.rate_limit_burst),
        classify_slots=ConcurrencyLimit(
            limit=settings.classify_concurrency_per_workspace, what="classify requests"
        ),
        fetch_slots=FetchSlots(
            total=settings.url_fetch_max_in_flight,
            per_workspace=settings.url_fetch_max_in_flight_per_workspace,
        ),
        jobs=jobs,
        webhooks=webhooks,
        webhook_jobs=webhook_jobs,
    )


def _runner(settings: Settings, *, on_done: Callable[[], None] = lambda: None) -> tuple[PipelineRunner, str]:
    """Kubeflow when TASKVISION_KFP_HOST is set; else a warm worker, or kfp.local in child processes."""
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
    work_dir = settings.data_dir.resolve() / "pipeline-runs"
    if settings.pipeline_runner == "warm":
        warm = WarmRunner(
            work_dir,
            workers=settings.train_workers,
            idle_s=settings.warm_worker_idle_s,
            env=env,
            on_done=on_done,
        )
        return warm, "local"
    return LocalRunner(work_dir, env=env), "local"
