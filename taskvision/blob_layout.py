"""Where everything lives in the blob store: the one place the key layout is spelled out.

The control plane, the pipeline steps, the DVC stages and the tests all build
keys with these functions (a local directory and an S3 bucket use the same keys)::

    images/<workspace>/<sha[:2]>/<sha>             an uploaded image (content-addressed)
    thumbs/<workspace>/<sha[:2]>/<sha>.jpg         its JPEG thumbnail
    datasets/<task>/<snapshot>/                    a frozen training set: dataset.json + manifest.jsonl
    runs/<task>/<run>/                             a training run's reports: progress.json, failure.json,
                                                   run_info.json
    models/<task>/<run>/                           a model bundle: bundle.json + weights
    embeddings/<embedding>/<variant>/<sha[:2]>/<sha>.npy   cached backbone embeddings of an image

Content-addressed keys mean an identical upload writes the same keys, and a
snapshot stays valid after later edits. Everything of a task is under its
three per-task prefixes (:func:`task_prefixes`), so deleting a task is three
prefix deletions.
"""

from __future__ import annotations

IMAGES = "images"
THUMBS = "thumbs"
DATASETS = "datasets"
RUNS = "runs"
MODELS = "models"
EMBEDDINGS = "embeddings"

PROGRESS_FILE = "progress.json"
FAILURE_FILE = "failure.json"
RUN_INFO_FILE = "run_info.json"


def image_key(workspace_id: str, sha256: str) -> str:
    return f"{IMAGES}/{workspace_id}/{sha256[:2]}/{sha256}"


def thumb_key(workspace_id: str, sha256: str) -> str:
    return f"{THUMBS}/{workspace_id}/{sha256[:2]}/{sha256}.jpg"


def dataset_prefix(task_id: str, snapshot_id: str) -> str:
    return f"{DATASETS}/{task_id}/{snapshot_id}"


def run_prefix(task_id: str, run_id: str) -> str:
    return f"{RUNS}/{task_id}/{run_id}"


def bundle_prefix(task_id: str, run_id: str) -> str:
    """A bundle is keyed by the run (or import) that made it; its version number is assigned later."""
    return f"{MODELS}/{task_id}/{run_id}"


def progress_key(run_prefix: str) -> str:
    return f"{run_prefix}/{PROGRESS_FILE}"


def failure_key(run_prefix: str) -> str:
    return f"{run_prefix}/{FAILURE_FILE}"


def run_info_key(run_prefix: str) -> str:
    """What a run's steps decided (its effective parameters)."""
    return f"{run_prefix}/{RUN_INFO_FILE}"


def embedding_key(embedding_id: str, variant: str, sha256: str) -> str:
    return f"{EMBEDDINGS}/{embedding_id}/{variant}/{sha256[:2]}/{sha256}.npy"


def task_prefixes(task_id: str) -> tuple[str, str, str]:
    """Every prefix that holds a task's files (snapshots, run reports, bundles)."""
    return f"{DATASETS}/{task_id}", f"{RUNS}/{task_id}", f"{MODELS}/{task_id}"
