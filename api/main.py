"""Assemble the control-plane application: settings, database, blob store, routers, errors."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from api.db.migrate import upgrade
from api.db.session import make_engine, make_session_factory
from api.errors import register_error_handlers
from api.routes import account, health, labels, models, tasks, training_images
from api.settings import Settings
from api.signing import UrlSigner, load_signing_key
from taskvision import __version__
from taskvision.storage import open_blob_store

logger = logging.getLogger(__name__)


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app. The schema is migrated and the blob store opened before it serves."""
    settings = settings or Settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    engine = make_engine(settings.effective_database_url)
    upgrade(engine)
    blobs = open_blob_store(
        settings.effective_storage_url,
        access_key=settings.s3_access_key,
        secret_key=settings.s3_secret_key.get_secret_value() if settings.s3_secret_key else None,
    )

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
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
    app.state.session_factory = make_session_factory(engine)
    app.state.url_signer = UrlSigner(
        load_signing_key(app.state.session_factory), ttl_s=settings.download_url_ttl_s
    )
    app.state.blobs = blobs
    register_error_handlers(app)
    for module in (health, account, tasks, labels, training_images, models):
        app.include_router(module.router)
    return app
