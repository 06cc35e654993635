"""Register step: write the model bundle (weights + bundle.json with metrics) to the blob store.

Beside the bundle go the evaluation's per-image predictions
(``predictions.jsonl``) and its Markdown report (``report.md``), which the
API serves for the version (``api/services/evaluations.py``), and a partial
fine-tune's per-image features (``tuned_features.npz``) and, for a network that does not end in
one linear layer, its tuned weights (``tuned_tail.npz``): what the next retrain refits from.

``bundle.json`` is written last: a bundle folder that has it is complete, so
the control plane's run watcher never registers a half-written bundle.
"""

from __future__ import annotations

from pathlib import Path

from components.lib.refit import RETRAIN_FILES
from taskvision.bundle import BundleMeta
from taskvision.storage import BlobStore

PREDICTIONS_FILE = "predictions.jsonl"
REPORT_FILE = "report.md"


def register_bundle(
    model_dir: Path,
    metrics: dict[str, object],
    store: BlobStore,
    bundle_prefix: str,
    *,
    predictions: Path | None = None,
    report: Path | None = None,
) -> str:
    """Copy the model's weight files and its bundle.json (with ``metrics``) to ``bundle_prefix``,
    with the evaluation's per-image ``predictions`` and Markdown ``report`` when given."""
    meta = BundleMeta.from_json((model_dir / "bundle.json").read_text())
    if predictions is not None and predictions.is_file():
        store.put(
            f"{bundle_prefix}/{PREDICTIONS_FILE}",
            predictions.read_bytes(),
            content_type="application/x-ndjson",
        )
    if report is not None and report.is_file():
        store.put(f"{bundle_prefix}/{REPORT_FILE}", report.read_bytes(), content_type="text/markdown")
    meta.metrics = dict(metrics)
    # A partial fine-tune's per-image features (and tuned weights): what a later retrain refits from.
    for name in RETRAIN_FILES:
        if (model_dir / name).is_file():
            store.put(f"{bundle_prefix}/{name}", (model_dir / name).read_bytes())
    for name in meta.files:
        if name == meta.weights_file or (model_dir / name).is_file():  # the weights file must exist
            store.put(f"{bundle_prefix}/{name}", (model_dir / name).read_bytes())
    store.put(f"{bundle_prefix}/bundle.json", meta.to_json().encode(), content_type="application/json")
    return store.uri(f"{bundle_prefix}/bundle.json")
