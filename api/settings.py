"""The one settings object of the control plane.

Every option can be set by an environment variable ``TASKVISION_<NAME>``
(for example ``TASKVISION_DATABASE_URL``). Defaults give the embedded mode:
SQLite at ``<data_dir>/taskvision.db`` and blobs under ``<data_dir>/blobs``.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from taskvision.storage import BlobStore, open_blob_store

if TYPE_CHECKING:
    from api.services.url_fetch import FetchPolicy

# Where a server-side URL fetch must never go unless the operator allows it:
# loopback, private (RFC 1918, ULA), link-local (cloud metadata lives there),
# carrier-grade NAT, "this network", multicast and reserved ranges.
DEFAULT_BLOCKED_NETWORKS = (
    "0.0.0.0/8",
    "10.0.0.0/8",
    "100.64.0.0/10",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "172.16.0.0/12",
    "192.0.0.0/24",
    "192.168.0.0/16",
    "198.18.0.0/15",
    "224.0.0.0/4",
    "240.0.0.0/4",
    "::/96",  # IPv4-compatible IPv6 (::a.b.c.d), ::1 and :: included
    "::ffff:0:0/96",
    "64:ff9b::/96",  # NAT64 (RFC 6052): reaches the embedded IPv4 address through a gateway
    "64:ff9b:1::/48",  # local-use NAT64 (RFC 8215)
    "2001::/32",  # Teredo: IPv4 server and client addresses inside
    "2002::/16",  # 6to4: an IPv4 address in bits 16-47
    "fc00::/7",
    "fe80::/10",
    "ff00::/8",
)


class Settings(BaseSettings):
    """Configuration of the control plane (read once, at start-up)."""

    model_config = SettingsConfigDict(env_prefix="TASKVISION_", extra="ignore")

    data_dir: Path = Field(default=Path("var"), description="Where embedded mode keeps its DB and blobs.")
    database_url: str | None = Field(default=None, description="SQLAlchemy URL; default SQLite in data_dir.")
    storage_url: str | None = Field(
        default=None,
        description="Blob store: a directory, file:///dir or s3://bucket?endpoint=http://host:port",
    )
    s3_access_key: str | None = None
    s3_secret_key: SecretStr | None = None
    secret_key: SecretStr | None = Field(
        default=None,
        description="Signs download links. Required with a shared database (cluster mode: from the "
        "Secret); embedded mode keeps a generated key in <data_dir>/signing.key (0600).",
    )

    # Uploads
    max_upload_bytes: int = Field(default=20 * 1024 * 1024, gt=0, description="Cap on one image's bytes.")
    max_image_pixels: int = Field(default=80_000_000, gt=0, description="Cap on declared width*height.")
    resize_shorter_side: int = Field(
        default=1024, gt=0, description="Uploads without noresize are downscaled to this shorter side."
    )
    thumbnail_size: int = Field(default=256, gt=0)
    download_url_ttl_s: int = Field(
        default=24 * 3600, gt=0, description="How long the signed img_path/thumb_img_path links work."
    )

    # Server-side fetching of image URLs
    url_fetch_timeout_s: float = Field(
        default=10.0, gt=0, description="Deadline for all of one request's image URLs together."
    )
    url_fetch_max_redirects: int = Field(default=3, ge=0)
    url_fetch_max_in_flight: int = Field(
        default=64, ge=1, description="Image URL fetches in progress at once in this process."
    )
    url_fetch_max_in_flight_per_workspace: int = Field(
        default=16, ge=1, description="... and for one workspace; more wait for a slot until the deadline."
    )

    # Webhooks
    webhook_timeout_s: float = Field(default=5.0, gt=0, description="How long one delivery may take.")
    webhook_retry_base_s: float = Field(
        default=10.0, gt=0, description="First retry after this; each next one 3x later (at most an hour)."
    )
    webhook_retry_window_s: float = Field(
        default=24 * 3600.0, gt=0, description="A delivery not answered 2xx by then is recorded as failed."
    )
    webhook_max_in_flight: int = Field(default=8, ge=1, description="Deliveries sent at once per process.")
    webhook_poll_interval_s: float = Field(default=1.0, gt=0)

    # Per-token and per-workspace limits (per process)
    rate_limit_per_s: float = Field(
        default=200.0, ge=0, description="Requests per second per API token (0: no limit)."
    )
    rate_limit_burst: int = Field(default=400, ge=1, description="Requests a token may send at once.")
    classify_concurrency_per_workspace: int = Field(
        default=16, ge=1, description="Classify requests of one workspace served at the same time."
    )
    url_blocked_networks: list[str] = Field(default=list(DEFAULT_BLOCKED_NETWORKS))

    # Training
    kfp_host: str | None = Field(
        default=None, description="Kubeflow Pipelines API; unset = run with kfp.local."
    )
    kfp_namespace: str | None = None
    kfp_s3_secret: str = Field(
        default="taskvision-secrets",
        description="Kubernetes Secret (in the namespace KFP runs pods in) whose "
        "TASKVISION_S3_ACCESS_KEY / TASKVISION_S3_SECRET_KEY every pipeline step gets, "
        "when the blob store is S3.",
    )
    train_workers: int = Field(default=1, ge=1, description="Pipelines run at the same time; the rest queue.")
    pipeline_runner: Literal["warm", "kfp-local"] = Field(
        default="warm",
        description="Embedded mode: 'warm' runs the steps in a worker that keeps their libraries loaded "
        "(a retrain takes seconds); 'kfp-local' runs the pipeline with kfp.local, each step a subprocess.",
    )
    warm_worker_idle_s: float = Field(
        default=1800.0, gt=0, description="A warm training worker without work stops after this long."
    )
    train_poll_interval_s: float = Field(default=1.0, gt=0)
    blob_gc_grace_s: float = Field(
        default=300.0, ge=0, description="A deleted image's blobs are kept at least this long."
    )
    blob_gc_interval_s: float = Field(
        default=60.0, gt=0, description="How often deleted images' blobs are collected."
    )
    train_gpu_count: int = Field(default=0, ge=0, description="GPUs the train step requests on Kubeflow.")
    train_mode: str = "auto"
    train_quality: Literal["fast", "balanced", "best"] = Field(
        default="balanced", description="CPU training preset: fast, balanced or best (model selection)."
    )
    train_augment: str = "flip"
    train_epochs: int = Field(default=25, ge=1)
    train_learning_rate: float = Field(default=0.001, gt=0)
    train_batch_size: int = Field(default=32, ge=1)
    min_images_per_label: int = Field(default=20, ge=1)
    test_fraction: float = Field(default=0.2, gt=0, lt=1)

    # Serving
    serving_memory_mb: float = Field(
        default=256.0,
        gt=0,
        description="Memory for loaded model versions (heads, fine-tuned sessions); least recently used "
        "versions are unloaded beyond it and load again on their next request.",
    )
    serving_int8: bool = Field(
        default=False,
        description="Serve frozen-backbone heads over an INT8 backbone, calibrated on stored training "
        "images at start-up; each head uses it only if its answers stay within tolerance.",
    )
    serving_int8_backbones: str = Field(
        default="tf_efficientnet_lite0.in1k",
        description="With serving_int8: the backbones quantized, each calibrated on its own preprocessing "
        "of the stored images (comma-separated ids; a head is served INT8 only when every backbone it "
        "reads is). Lite0 carries the fast and balanced presets' linear heads; add "
        "tf_efficientnet_lite1.in1k and tf_efficientnet_lite2.in1k for heads over those.",
    )
    serving_batch_window_ms: float = Field(
        default=0.0,
        ge=0,
        le=50,
        description="Concurrent classify requests share backbone runs within this window (0: off).",
    )
    serving_backend: Literal["embedded", "kserve"] = Field(
        default="embedded", description="kserve: one InferenceService per task (cluster mode)."
    )
    k8s_namespace: str = "default"
    kubeconfig: str | None = Field(
        default=None, description="Path of a kubeconfig; unset: in-cluster config."
    )
    isvc_runtime: str = "taskvision-predictor"
    isvc_service_account: str | None = "taskvision-predictor"
    isvc_min_replicas: int = Field(default=0, ge=0, description="0 lets KServe scale an idle task to zero.")
    isvc_max_replicas: int = Field(default=1, ge=1)
    isvc_timeout_s: float = Field(default=30.0, gt=0)

    # Web console
    console_session_ttl_s: int = Field(
        default=8 * 3600, ge=60, description="How long a console sign-in lasts (the cookie expires then)."
    )

    # Listing
    page_size: int = Field(default=20, gt=0)
    max_page_size: int = Field(default=100, gt=0)

    @field_validator("serving_int8_backbones")
    @classmethod
    def _known_backbones(cls, value: str) -> str:
        from taskvision.backbone import backbone_spec

        for backbone_id in _split(value):
            backbone_spec(backbone_id)  # ValueError naming the supported ones
        return value

    @property
    def int8_backbones(self) -> tuple[str, ...]:
        """:attr:`serving_int8_backbones` as a tuple of backbone ids."""
        return _split(self.serving_int8_backbones)

    @field_validator("url_blocked_networks")
    @classmethod
    def _check_networks(cls, value: list[str]) -> list[str]:
        for net in value:
            ipaddress.ip_network(net, strict=False)
        return value

    @property
    def blocked_networks(self) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
        return tuple(ipaddress.ip_network(n, strict=False) for n in self.url_blocked_networks)

    def training_defaults(self) -> dict[str, object]:
        """Pipeline parameters a train request does not set itself."""
        return {
            "mode": self.train_mode,
            "quality": self.train_quality,
            "augment": self.train_augment,
            "epochs": self.train_epochs,
            "learning_rate": self.train_learning_rate,
            "batch_size": self.train_batch_size,
            "min_images_per_label": self.min_images_per_label,
            "test_fraction": self.test_fraction,
            "seed": 0,
        }

    def public_view(self) -> dict[str, object]:
        """The effective configuration with every secret masked (for ``taskvision config show``)."""
        from sqlalchemy.engine import make_url

        data: dict[str, object] = {}
        for name in type(self).model_fields:
            value = getattr(self, name)
            if isinstance(value, SecretStr):
                value = "********" if value.get_secret_value() else ""
            elif isinstance(value, Path):
                value = str(value)
            data[name] = value
        data["s3_access_key"] = "********" if self.s3_access_key else None
        data["database_url"] = make_url(self.effective_database_url).render_as_string(hide_password=True)
        data["storage_url"] = self.effective_storage_url
        data["pipeline_runner"] = "kubeflow" if self.kfp_host else self.pipeline_runner
        return data

    def open_blob_store(self) -> BlobStore:
        """The configured blob store (a directory, or S3 with the configured keys)."""
        return open_blob_store(
            self.effective_storage_url,
            access_key=self.s3_access_key,
            secret_key=self.s3_secret_key.get_secret_value() if self.s3_secret_key else None,
        )

    def fetch_policy(self) -> FetchPolicy:
        """Limits for fetching a user-given image URL."""
        from api.services.url_fetch import FetchPolicy

        return FetchPolicy(
            timeout_s=self.url_fetch_timeout_s,
            max_bytes=self.max_upload_bytes,
            max_redirects=self.url_fetch_max_redirects,
            blocked_networks=self.blocked_networks,
        )

    @property
    def effective_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'taskvision.db').resolve()}"

    @property
    def effective_storage_url(self) -> str:
        return self.storage_url or str((self.data_dir / "blobs").resolve())


def _split(ids: str) -> tuple[str, ...]:
    return tuple(dict.fromkeys(part.strip() for part in ids.split(",") if part.strip()))
