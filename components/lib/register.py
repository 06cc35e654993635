"""Register step: write the model bundle (weights + bundle.json with metrics) to the blob store.

``bundle.json`` is written last: a bundle folder that has it is complete, so
the control plane's run watcher never registers a half-written bundle.
"""

from __future__ import annotations

from pathlib import Path

from taskvision.bundle import BundleMeta
from taskvision.storage import BlobStore


def register_bundle(model_dir: Path, metrics: dict[str, object], store: BlobStore, bundle_prefix: str) -> str:
    """Copy the model's weight files and its bundle.json (with ``metrics``) to ``bundle_prefix``."""
    meta = BundleMeta.from_json((model_dir / "bundle.json").read_text())
    meta.metrics = dict(metrics)
    for name in meta.files:
        if name == meta.weights_file or (model_dir / name).is_file():  # the weights file must exist
            store.put(f"{bundle_prefix}/{name}", (model_dir / name).read_bytes())
    store.put(f"{bundle_prefix}/bundle.json", meta.to_json().encode(), content_type="application/json")
    return store.uri(f"{bundle_prefix}/bundle.json")
