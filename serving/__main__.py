"""``python -m serving --model-dir DIR [--model-name NAME] --http-port PORT``: a KServe ModelServer.

The container entrypoint on the cluster (the InferenceService's ServingRuntime
passes KServe's usual flags). ``--model-dir`` is either one bundle (it holds
bundle.json; served as ``--model-name``) or a folder of bundles, loaded on
demand through ``/v2/repository/models/<name>/load``. An ``s3://`` model dir
is copied locally first (credentials from TASKVISION_S3_* or AWS_* variables)
into one scratch folder of the process, removed when the server exits.

The same repository as the embedded server: frozen-backbone heads in one head
bank over shared backbones, loads that never block other requests, loaded
versions within ``--memory-mb``, optional batching across requests
(``--batch-window-ms``) and INT8 (``--int8-calibration URI``: a blob store
whose ``images/`` it calibrates on). Their defaults come from the
TASKVISION_SERVING_MEMORY_MB / _BATCH_WINDOW_MS variables, as for the control plane.
"""

import argparse
import atexit
import logging
import os
import shutil
import tempfile
from pathlib import Path

import kserve
from kserve import model_server

from serving.extractors import Extractors
from serving.int8 import DEFAULT_BACKBONES, start_int8
from serving.repository import DEFAULT_MEMORY_MB, BundleRepository
from taskvision.malloc import limit_arenas
from taskvision.storage import BlobStore


def fetch_bundle(uri: str, into: Path) -> Path:
    """A local folder with the bundle at ``uri`` (a path, file:// URL, or s3://bucket/prefix?endpoint=...)."""
    if not uri.startswith("s3://"):
        return Path(uri.removeprefix("file://"))
    from urllib.parse import urlparse, urlunparse

    from taskvision.bundle import BundleMeta

    parsed = urlparse(uri)
    prefix = parsed.path.strip("/")
    store = _open_store(urlunparse(parsed._replace(path="")))
    meta = BundleMeta.from_json(store.get(f"{prefix}/bundle.json"))
    into.mkdir(parents=True, exist_ok=True)
    (into / meta.weights_file).write_bytes(store.get(f"{prefix}/{meta.weights_file}"))
    (into / "bundle.json").write_text(meta.to_json())
    return into


def _open_store(url: str) -> BlobStore:
    """A blob store (a folder, or S3 with credentials from TASKVISION_S3_* or AWS_* variables)."""
    from taskvision.storage import open_blob_store

    return open_blob_store(
        url,
        access_key=os.environ.get("TASKVISION_S3_ACCESS_KEY") or os.environ.get("AWS_ACCESS_KEY_ID"),
        secret_key=os.environ.get("TASKVISION_S3_SECRET_KEY") or os.environ.get("AWS_SECRET_ACCESS_KEY"),
    )


def main() -> None:
    parser = argparse.ArgumentParser(parents=[model_server.parser], description=__doc__)
    parser.add_argument("--model-dir", required=True, help="a bundle, a folder of bundles, or s3://...")
    parser.add_argument("--http-port", dest="http_port", type=int, help="alias of --http_port")
    parser.add_argument(
        "--memory-mb",
        type=float,
        default=float(os.environ.get("TASKVISION_SERVING_MEMORY_MB", DEFAULT_MEMORY_MB)),
        help="memory for loaded versions; least recently used ones are unloaded beyond it",
    )
    parser.add_argument(
        "--batch-window-ms",
        type=float,
        default=float(os.environ.get("TASKVISION_SERVING_BATCH_WINDOW_MS", 0)),
        help="concurrent requests share backbone runs within this window (0: off)",
    )
    parser.add_argument(
        "--int8-calibration",
        metavar="URI",
        help="serve an INT8 backbone calibrated on the stored training images of this blob store",
    )
    parser.add_argument(
        "--int8-backbones",
        default=",".join(DEFAULT_BACKBONES),
        help="with --int8-calibration: the backbones to quantize (comma-separated ids; default Lite0's)",
    )
    args, _ = parser.parse_known_args()
    logging.basicConfig(level=logging.INFO)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    limit_arenas()  # before the server's threads exist; see taskvision/malloc.py

    # The s3:// bundle's copy and the INT8 backbones: this process's own, gone when it exits
    # (KServe's ModelServer returns on SIGTERM, so the exit handlers run).
    scratch = Path(tempfile.mkdtemp(prefix="taskvision-serving-"))
    atexit.register(shutil.rmtree, scratch, ignore_errors=True)
    local = fetch_bundle(args.model_dir, scratch / "bundle")
    extractors = Extractors(batch_window_ms=args.batch_window_ms)
    if args.int8_calibration:
        start_int8(
            extractors,
            _open_store(args.int8_calibration),
            scratch / "int8",
            backbone_ids=[part.strip() for part in args.int8_backbones.split(",") if part.strip()],
        )
    if (local / "bundle.json").is_file():  # one bundle: serve it under --model-name
        repository = BundleRepository(
            local.parent, locate=lambda name: local, memory_mb=args.memory_mb, extractors=extractors
        )
        repository.load_model(args.model_name)
    else:  # a folder of bundles, loaded on demand
        repository = BundleRepository(local, memory_mb=args.memory_mb, extractors=extractors)
    models = list(repository.get_models().values())
    kserve.ModelServer(
        http_port=args.http_port, enable_grpc=args.enable_grpc, registered_models=repository
    ).start(models)


if __name__ == "__main__":
    main()
