"""``python -m serving --model-dir DIR [--model-name NAME] --http-port PORT``: a KServe ModelServer.

The container entrypoint on the cluster (the InferenceService's ServingRuntime
passes KServe's usual flags). ``--model-dir`` is either one bundle (it holds
bundle.json; served as ``--model-name``) or a folder of bundles, loaded on
demand through ``/v2/repository/models/<name>/load``. An ``s3://`` model dir
is copied locally first (credentials from TASKVISION_S3_* or AWS_* variables).
"""

import argparse
import logging
import os
import tempfile
from pathlib import Path

import kserve
from kserve import model_server

from serving.repository import BundleRepository
from taskvision.malloc import limit_arenas


def fetch_bundle(uri: str, into: Path) -> Path:
    """A local folder with the bundle at ``uri`` (a path, file:// URL, or s3://bucket/prefix?endpoint=...)."""
    if not uri.startswith("s3://"):
        return Path(uri.removeprefix("file://"))
    from urllib.parse import urlparse, urlunparse

    from taskvision.bundle import BundleMeta
    from taskvision.storage import open_blob_store

    parsed = urlparse(uri)
    prefix = parsed.path.strip("/")
    store = open_blob_store(
        urlunparse(parsed._replace(path="")),
        access_key=os.environ.get("TASKVISION_S3_ACCESS_KEY") or os.environ.get("AWS_ACCESS_KEY_ID"),
        secret_key=os.environ.get("TASKVISION_S3_SECRET_KEY") or os.environ.get("AWS_SECRET_ACCESS_KEY"),
    )
    meta = BundleMeta.from_json(store.get(f"{prefix}/bundle.json"))
    into.mkdir(parents=True, exist_ok=True)
    (into / meta.weights_file).write_bytes(store.get(f"{prefix}/{meta.weights_file}"))
    (into / "bundle.json").write_text(meta.to_json())
    return into


def main() -> None:
    parser = argparse.ArgumentParser(parents=[model_server.parser], description=__doc__)
    parser.add_argument("--model-dir", required=True, help="a bundle, a folder of bundles, or s3://...")
    parser.add_argument("--http-port", dest="http_port", type=int, help="alias of --http_port")
    parser.add_argument("--max-loaded-models", type=int, default=16)
    args, _ = parser.parse_known_args()
    logging.basicConfig(level=logging.INFO)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    limit_arenas()  # before the server's threads exist; see taskvision/malloc.py

    local = fetch_bundle(args.model_dir, Path(tempfile.mkdtemp(prefix="taskvision-bundle-")))
    if (local / "bundle.json").is_file():  # one bundle: serve it under --model-name
        repository = BundleRepository(
            local.parent, locate=lambda name: local, capacity=args.max_loaded_models
        )
        repository.load_model(args.model_name)
    else:  # a folder of bundles, loaded on demand
        repository = BundleRepository(local, capacity=args.max_loaded_models)
    models = list(repository.get_models().values())
    kserve.ModelServer(
        http_port=args.http_port, enable_grpc=args.enable_grpc, registered_models=repository
    ).start(models)


if __name__ == "__main__":
    main()
