"""Geometry before pixels: an elongated image is refused on every decode path, cheaply.

Resizing scales the *shorter* side, so before the guard a 254-byte PNG of
60000x1 pixels became a 15,000,000x256 picture (72 s, 16 GiB peak RSS) on its
way to the model. Every path that decodes an image (classify, training upload,
thumbnails, validation, the train and evaluate steps) now refuses an aspect
ratio beyond 1:50 from the header.

Each probe runs in a fresh child process, after a warm-up with a normal image
on the same path, with the peak-RSS counter reset (``/proc/self/clear_refs``)
just before it: the assertion is on ``VmHWM`` growth, not on wall time.
"""

from __future__ import annotations

import multiprocessing
import re
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.support.api import b64
from tests.support.images import image_bytes, solid_png

SIZES = {"8000x1": (8000, 1), "1x8000": (1, 8000), "60000x1": (60000, 1)}
PATHS = ["classify", "upload", "thumbnail", "downscale", "validation", "train_step", "evaluate_step"]
# A normal 512 px request grows the peak by a few MiB; the unguarded 8000x1 case by over 1 GiB.
MAX_GROWTH_MIB = 48


def _kib(field: str) -> int:
    status = Path("/proc/self/status").read_text()
    match = re.search(rf"{field}:\s+(\d+) kB", status)
    assert match is not None
    return int(match.group(1))


def _measure(run: Callable[[], Any]) -> dict[str, Any]:
    """Run ``run`` with the peak-RSS counter reset first; its outcome, peak growth and time."""
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = _kib("VmRSS")
    started = time.perf_counter()
    try:
        outcome: Any = run()
    except Exception as exc:
        outcome = f"{type(exc).__name__}: {exc}"
    return {
        "outcome": outcome,
        "growth_mib": (_kib("VmHWM") - before) / 1024,
        "seconds": time.perf_counter() - started,
    }


def _probe_all(data_dir: str) -> dict[str, dict[str, Any]]:
    """In the child: every path with a normal image (warm-up) and then each elongated one."""
    from fastapi.testclient import TestClient

    from api.auth import create_user
    from api.db.models import Task
    from api.main import create_app
    from api.services.versions import import_bundle
    from api.settings import Settings
    from components.lib import finetune, validate
    from components.lib.embeddings import embed_views
    from taskvision import backbone, imaging
    from taskvision.dataset import DatasetInfo, LabelInfo, ManifestRow
    from taskvision.storage import LocalBlobStore
    from taskvision.task_types import TaskType
    from tests.support.bundles import linear_bundle

    settings = Settings(data_dir=Path(data_dir))
    app = create_app(settings)
    with app.state.services.session_factory() as session:
        _, token = create_user(session, "geometry")
    client = TestClient(app, headers={"Authorization": f"Token {token}"})
    task = client.post("/recognition/v2/task", json={"name": "t", "type": "multi_class"}).json()
    labels = [
        client.post("/recognition/v2/label", json={"name": name, "type": "category"}).json()
        for name in ("a", "b")
    ]
    for label in labels:
        client.post(f"/recognition/v2/task/{task['id']}/add-label", json={"label_id": label["id"]})
    bundle_dir = Path(data_dir) / "bundle"
    linear_bundle(bundle_dir, TaskType.MULTI_CLASS, [lb["name"] for lb in labels])
    with app.state.services.session_factory() as session:
        import_bundle(
            session, app.state.services.blobs, session.get(Task, task["id"]), bundle_dir, production=True
        )

    store = LocalBlobStore(Path(data_dir) / "steps")
    info = DatasetInfo(
        task_id="t",
        task_type=TaskType.MULTI_CLASS,
        labels=[LabelInfo(id="a", name="a"), LabelInfo(id="b", name="b")],
        snapshot_id="s",
        created="",
        count=1,
    )
    view = (backbone.BACKBONE_ID, False)

    def row_for(data: bytes, name: str) -> ManifestRow:
        store.put(f"images/{name}", data)
        return ManifestRow(image_id=name, blob_key=f"images/{name}", sha256="0" * 64, labels=["a"])

    def classify(data: bytes) -> Any:
        answer = client.post(
            "/recognition/v2/classify", json={"task_id": task["id"], "records": [{"_base64": b64(data)}]}
        ).json()
        return answer["records"][0]["_status"]

    seq = iter(range(10**6))

    def upload(data: bytes) -> Any:
        # A distinct image each time (a duplicate would be refused before decoding).
        response = client.post(
            "/recognition/v2/training-image",
            json={"base64": b64(data), "meta_data": {"n": next(seq)}},
        )
        return {"status": response.status_code, "detail": response.json().get("detail", "")}

    def validation(data: bytes) -> Any:
        report = validate.validate_dataset(info, [row_for(data, "v")], store, min_images_per_label=1)
        return report.problems

    paths: dict[str, Callable[[bytes], Any]] = {
        "classify": classify,
        "upload": upload,
        "thumbnail": lambda d: len(imaging.thumbnail_jpeg(d, max_side=256, max_pixels=80_000_000)),
        "downscale": lambda d: imaging.downscale(d, max_shorter_side=1024, max_pixels=80_000_000),
        "validation": validation,
        "train_step": lambda d: embed_views(store, [row_for(d, "t")], [view], use_cache=False)[view].shape,
        # The evaluate step's inputs are decoded by the train step's loaders (fine-tune: test images).
        "evaluate_step": lambda d: finetune._load(store, row_for(d, "e"), 80_000_000).size,
    }
    results: dict[str, dict[str, Any]] = {}
    for path, run in paths.items():
        normal = image_bytes(next(seq), size=(512, 384), fmt="JPEG")
        results[f"{path}/normal"] = _measure(lambda run=run, normal=normal: run(normal))
        for size_name, (width, height) in SIZES.items():
            data = solid_png(width, height)
            results[f"{path}/{size_name}"] = _measure(lambda run=run, data=data: run(data))
    client.close()
    return results


@pytest.fixture(scope="module")
def probes() -> dict[str, dict[str, Any]]:
    context = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory() as data_dir, context.Pool(1) as pool:
        return dict(pool.apply(_probe_all, (data_dir,)))


@pytest.mark.slow
@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("path", PATHS)
def test_an_elongated_image_is_refused_without_a_memory_spike(
    probes: dict[str, dict[str, Any]], path: str, size: str
) -> None:
    normal, probe = probes[f"{path}/normal"], probes[f"{path}/{size}"]
    assert "aspect ratio" not in str(normal["outcome"]), normal  # the path works for a normal photo
    assert "aspect ratio of 1:" in str(probe["outcome"]), probe  # refused, saying why
    if path == "classify":
        assert probe["outcome"]["code"] == 400
    if path == "upload":
        assert probe["outcome"]["status"] == 400
    assert probe["growth_mib"] < MAX_GROWTH_MIB, probe
