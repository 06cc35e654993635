"""``taskvision import-bundle``: an externally trained bundle becomes the next version of a task."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from api.auth import create_user
from api.main import create_app
from api.settings import Settings
from tests.serving.test_model_server import bundle  # noqa: F401 - the fixture
from tests.support.api import b64
from tests.support.images import shape_image
from tests.training.helpers import add_label

pytestmark = pytest.mark.slow
TASKVISION = str(Path(sys.executable).with_name("taskvision"))


def _import(path: Path, task_id: str, data_dir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [TASKVISION, "import-bundle", str(path), "--task", task_id, "--data-dir", str(data_dir)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_import_checks_the_bundle_then_serves_it(bundle: Path, tmp_path: Path) -> None:  # noqa: F811
    app = create_app(Settings(data_dir=tmp_path))
    with app.state.services.session_factory() as session:
        _, token = create_user(session, "importer")
    client = TestClient(app, headers={"Authorization": f"Token {token}"})
    task = client.post("/recognition/v2/task", json={"name": "shapes", "type": "multi_class"}).json()
    circle = add_label(client, task["id"], "circle", "category")
    add_label(client, task["id"], "square", "category")

    imported = _import(bundle, task["id"], tmp_path)
    assert imported.returncode == 0, imported.stderr
    assert imported.stdout.strip() == f"task {task['id']}: version 1 (production)"
    assert client.get(f"/recognition/v2/task/{task['id']}").json()["production_version"] == 1
    models = client.get(f"/recognition/v2/model/?task={task['id']}").json()["results"]
    assert [m["version"] for m in models] == [1] and "accuracy" in models[0]["metrics"]

    answer = client.post(
        "/recognition/v2/classify",
        json={"task_id": task["id"], "records": [{"_base64": b64(shape_image("circle", 321))}]},
    ).json()
    best = answer["records"][0]["best_label"]
    assert best["name"] == "circle" and best["id"] == circle  # the task's own label ids

    again = _import(bundle, task["id"], tmp_path)
    assert again.returncode == 0 and "version 2" in again.stdout
    assert client.get(f"/recognition/v2/task/{task['id']}").json()["production_version"] == 1
    app.state.services.engine.dispose()


def test_a_bundle_that_does_not_fit_the_task_is_refused(bundle: Path, tmp_path: Path) -> None:  # noqa: F811
    app = create_app(Settings(data_dir=tmp_path))
    with app.state.services.session_factory() as session:
        _, token = create_user(session, "importer")
    client = TestClient(app, headers={"Authorization": f"Token {token}"})
    colours = client.post("/recognition/v2/task", json={"name": "colours", "type": "multi_class"}).json()
    add_label(client, colours["id"], "red", "category")
    add_label(client, colours["id"], "blue", "category")
    refused = _import(bundle, colours["id"], tmp_path)
    assert refused.returncode == 1 and "labels ['circle', 'square']" in refused.stderr
    tags = client.post("/recognition/v2/task", json={"name": "tags", "type": "multi_label"}).json()
    wrong_type = _import(bundle, tags["id"], tmp_path)
    assert wrong_type.returncode == 1 and "multi_class model" in wrong_type.stderr
    assert _import(tmp_path / "nothing", colours["id"], tmp_path).returncode == 1
    assert client.get("/recognition/v2/model/").json()["count"] == 0
    app.state.services.engine.dispose()
