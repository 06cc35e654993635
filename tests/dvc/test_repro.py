"""`dvc repro` end to end in a temporary git copy of the repository.

One module-scoped workspace: the repository's files (tracked, plus new untracked
ones) copied into a fresh git repo and committed, then `dvc repro` once. The tests
check what it produced, that a second run does nothing, that a param change reruns
only the stages that read it, and that `dvc exp run -S` works. Stage commands run
`python` from the venv (first on PATH) with the copy as working directory, so
`python -m pipelines.dvc_stages` runs the copied project code.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from taskvision.bundle import BundleMeta
from taskvision.dataset import read_snapshot
from taskvision.storage import LocalBlobStore
from taskvision.task_types import TaskType

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
DVC = str(BIN / "dvc")
DATASETS = ("shapes", "tags", "sizes")
STAGES = ("generate", "snapshot", "validate", "split", "train", "evaluate", "export")
# Read before the autouse fixture strips TASKVISION_* from the environment.
CACHE_DIR = os.environ.get("TASKVISION_CACHE_DIR")
NEVER_COPIED: tuple[str, ...] = ()  # paths never copied into the workspace


@dataclass
class Workspace:
    path: Path
    env: dict[str, str]
    first_repro: str
    seconds: float

    def run(self, *args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            list(args), cwd=self.path, env=self.env, capture_output=True, text=True, timeout=timeout
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"{' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
            )
        return result

    def dvc(self, *args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return self.run(DVC, *args, check=check, timeout=timeout)

    def reset(self) -> None:
        """Back to the committed state: params, lock file and metrics from git, outputs from DVC's cache."""
        self.run("git", "reset", "--hard", "-q")
        self.dvc("checkout", "--force")


def _environment(home: Path) -> dict[str, str]:
    from taskvision.backbone import cache_dir

    env = {k: v for k, v in os.environ.items() if not k.startswith(("TASKVISION_", "GIT_", "DVC_"))}
    env.update(
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        OMP_WAIT_POLICY="PASSIVE",
        TASKVISION_CACHE_DIR=CACHE_DIR or str(cache_dir()),  # shared: the backbone's ONNX export
        DVC_NO_ANALYTICS="1",
        GIT_CONFIG_NOSYSTEM="1",
        GIT_CONFIG_GLOBAL=str(home / "gitconfig"),  # no user's git settings (hooks, signing)
    )
    env.pop("VIRTUAL_ENV", None)
    env.pop("PYTHONPATH", None)
    return env


def _project_files() -> list[str]:
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    if listed.returncode != 0:
        pytest.skip(f"not a git checkout: {listed.stderr.strip()}")
    return [name for name in listed.stdout.split("\0") if name and not name.startswith(NEVER_COPIED)]


def _ran(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


def _all(*stages: str) -> set[str]:
    return {f"{stage}@{name}" for stage in stages for name in DATASETS}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Workspace]:
    repo = tmp_path_factory.mktemp("dvc-repo")
    home = tmp_path_factory.mktemp("dvc-home")
    for name in _project_files():
        source = ROOT / name
        if source.is_file():
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, repo / name)
    # Outputs of a `dvc repro` in the source checkout (untracked, not ignored) are not project files.
    for leftover in ("dvc.lock", "data/metrics", "data/plots", "data/reports"):
        path = repo / leftover
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    ws = Workspace(repo, _environment(home), "", 0.0)
    ws.run("git", "init", "-q")
    ws.run("git", "config", "user.name", "dvc test")
    ws.run("git", "config", "user.email", "dvc-test@example.com")
    ws.run("git", "config", "commit.gpgsign", "false")
    if not (repo / ".dvc" / "config").exists():
        ws.dvc("init", "-q")
    ws.run("git", "add", "-A")
    ws.run("git", "commit", "-q", "-m", "the project")

    started = time.monotonic()
    ws.first_repro = ws.dvc("repro", timeout=600).stdout
    ws.seconds = time.monotonic() - started
    print(f"first dvc repro: {ws.seconds:.1f} s")
    ws.run("git", "add", "-A")
    ws.run("git", "commit", "-q", "-m", "dvc repro")
    yield ws


def _metrics(ws: Workspace, name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((ws.path / "data" / "metrics" / f"{name}.json").read_text())
    return data


def test_repro_runs_every_stage_and_writes_metrics_plots_and_bundles(workspace: Workspace) -> None:
    ws = workspace
    assert _ran(ws.first_repro) == _all(*STAGES), ws.first_repro

    shapes, tags, sizes = (_metrics(ws, name) for name in DATASETS)
    assert (
        shapes["test_images"] >= 15 and sum(map(sum, shapes["confusion_matrix"]["actual_by_predicted"])) == 18
    )
    assert set(shapes["per_label"]) == {"circle", "square", "triangle"}
    assert 0.5 < shapes["accuracy"] <= 1.0  # chance is 1/3
    assert set(tags["per_label"]) == {"red", "blue", "striped", "dotted"}  # not the negative label
    assert 0.6 < tags["mAP"] <= 1.0
    assert all(0.0 < v["threshold"] < 1.0 for v in tags["per_label"].values())
    assert 0.3 < sizes["r2"] <= 1.0 and 0.0 < sizes["mae"] < 20 and math.isfinite(sizes["rmse"])

    # The snapshot is the control plane's format, with content-addressed images.
    store = LocalBlobStore(ws.path / "data" / "snapshots" / "tags")
    (prefix,) = {k.rsplit("/", 1)[0] for k in store.list_keys("datasets/") if k.endswith("dataset.json")}
    info, rows = read_snapshot(store, prefix)
    assert prefix.startswith("datasets/tags/dvc-") and info.task_type is TaskType.MULTI_LABEL
    assert len(rows) == 90 and [label.name for label in info.labels if label.negative] == ["none"]
    assert all(row.blob_key.endswith(row.sha256) and store.exists(row.blob_key) for row in rows)
    assert "**passed**" in (ws.path / "data" / "reports" / "tags.md").read_text()

    # The exported bundles are complete (what `taskvision import-bundle` reads).
    for name in DATASETS:
        bundle = ws.path / "data" / "bundles" / name
        meta = BundleMeta.from_json((bundle / "bundle.json").read_text())
        assert sorted(p.name for p in bundle.iterdir()) == sorted(["bundle.json", *meta.files])
        assert meta.task_id == name and meta.dataset_snapshot.startswith(f"datasets/{name}/dvc-")
        assert meta.metrics == _metrics(ws, name) and meta.training["mode"] == "embed"
        assert meta.selection["quality"] == "fast" and meta.selection["chosen"] == "lite0-ms1"
    assert BundleMeta.from_json((ws.path / "data/bundles/tags/bundle.json").read_text()).negative_label == {
        "id": "none",
        "name": "none",
    }

    # DVC reads the metrics and the plots.
    shown = json.loads(ws.dvc("metrics", "show", "--json").stdout)
    files = next(iter(shown.values()))["data"]
    assert files["data/metrics/shapes.json"]["data"]["accuracy"] == shapes["accuracy"]
    assert files["data/metrics/sizes.json"]["data"]["r2"] == sizes["r2"]
    plots = json.loads(ws.dvc("plots", "show", "--json").stdout)["data"]
    assert set(plots) == {f"data/plots/{name}.json" for name in DATASETS}
    confusion = plots["data/plots/shapes.json"][0]["content"]
    assert '"rect"' in json.dumps(confusion)  # the confusion template draws a heat map
    values = confusion["data"]["values"]
    assert len(values) == shapes["test_images"] and {"actual", "predicted"} <= set(values[0])
    html = ws.path.parent / "dvc-plots-html"
    ws.dvc("plots", "show", "-o", str(html))
    assert (html / "index.html").stat().st_size > 1000


def test_second_repro_does_nothing(workspace: Workspace) -> None:
    again = workspace.dvc("repro")
    assert "Data and pipelines are up to date." in again.stdout
    assert not _ran(again.stdout)
    assert json.loads(workspace.dvc("status", "--json").stdout) == {}


def _set_param(ws: Workspace, key: str, old: str, new: str) -> None:
    params = ws.path / "params.yaml"
    text, count = re.subn(rf"(?m)^(  {key}: ){re.escape(old)}\b", rf"\g<1>{new}", params.read_text())
    assert count == 1, f"params.yaml has no '{key}: {old}'"
    params.write_text(text)


@pytest.mark.parametrize(
    ("section", "key", "old", "new"),
    [
        ("generate", "seed", "7", "8"),
        ("validate", "min_images_per_label", "20", "10"),
        ("split", "test_fraction", "0.2", "0.25"),
        ("train", "epochs", "5", "3"),
    ],
)
def test_each_param_makes_only_its_stages_stale(
    workspace: Workspace, section: str, key: str, old: str, new: str
) -> None:
    try:
        _set_param(workspace, key, old, new)
        stale = json.loads(workspace.dvc("status", "--json").stdout)
        assert set(stale) == _all(section), stale
    finally:
        workspace.reset()


def test_a_train_param_change_reruns_only_train_evaluate_and_export(workspace: Workspace) -> None:
    ws = workspace
    before = _metrics(ws, "shapes")
    try:
        _set_param(ws, "augment", "flip", "none")
        rerun = ws.dvc("repro").stdout
        assert _ran(rerun) == _all("train", "evaluate", "export"), rerun
        for stage in ("generate", "snapshot", "validate", "split"):
            assert f"Stage '{stage}@shapes' didn't change, skipping" in rerun
        meta = BundleMeta.from_json((ws.path / "data/bundles/shapes/bundle.json").read_text())
        assert meta.training["augment"] == "none" and meta.training["train_images"] == 72
        assert _metrics(ws, "shapes")["test_images"] == before["test_images"]
        assert json.loads(ws.dvc("status", "--json").stdout) == {}
    finally:
        ws.reset()
    assert ws.dvc("status", "--json").stdout.strip() == "{}"


def test_exp_run_with_a_param(workspace: Workspace) -> None:
    ws = workspace
    try:
        result = ws.dvc("exp", "run", "-S", "train.epochs=2", timeout=600)
        assert "Ran experiment" in result.stdout, result.stdout
        assert _ran(result.stdout) == _all("train", "evaluate", "export"), result.stdout
        shown = json.loads(ws.dvc("exp", "show", "--json").stdout)
        experiments = [
            rev["data"]
            for baseline in shown
            for experiment in baseline.get("experiments") or []
            for rev in experiment["revs"]
        ]
        assert len(experiments) == 1
        params = experiments[0]["params"]["params.yaml"]["data"]
        assert params["train"]["epochs"] == 2
        metrics = experiments[0]["metrics"]["data/metrics/shapes.json"]["data"]
        assert 0.5 < metrics["accuracy"] <= 1.0
    finally:
        ws.reset()


def test_the_exported_bundle_serves_in_a_running_service(workspace: Workspace, tmp_path: Path) -> None:
    """``taskvision import-bundle`` registers the export; /classify then answers like evaluate did."""
    import base64
    import json

    from fastapi.testclient import TestClient

    from api.auth import create_user
    from api.main import create_app
    from api.settings import Settings

    ws = workspace
    app = create_app(Settings(data_dir=tmp_path))
    with app.state.services.session_factory() as session:
        _, token = create_user(session, "dvc-user")
    with TestClient(app, headers={"Authorization": f"Token {token}"}) as client:
        task = client.post("/recognition/v2/task", json={"name": "shapes", "type": "multi_class"}).json()
        for name in ("circle", "square", "triangle"):
            label = client.post("/recognition/v2/label", json={"name": name, "type": "category"}).json()
            client.post(f"/recognition/v2/task/{task['id']}/add-label", json={"label_id": label["id"]})
        imported = subprocess.run(
            [
                str(Path(sys.executable).with_name("taskvision")),
                "import-bundle",
                str(ws.path / "data" / "bundles" / "shapes"),
                "--task",
                task["id"],
                "--data-dir",
                str(tmp_path),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert imported.returncode == 0, imported.stderr
        assert client.get(f"/recognition/v2/task/{task['id']}").json()["production_version"] == 1

        labels = json.loads((ws.path / "data" / "generated" / "shapes" / "labels.json").read_text())
        truth = {Path(e["file"]).stem: (e["file"], e["labels"][0]) for e in labels["images"]}
        test_ids = json.loads((ws.path / "data" / "splits" / "shapes.json").read_text())["test"]
        correct = 0
        for start in range(0, len(test_ids), 10):
            batch = test_ids[start : start + 10]
            records = [
                {
                    "_base64": base64.b64encode(
                        (ws.path / "data" / "generated" / "shapes" / truth[i][0]).read_bytes()
                    ).decode(),
                    "_id": i,
                }
                for i in batch
            ]
            answer = client.post("/recognition/v2/classify", json={"task_id": task["id"], "records": records})
            assert answer.status_code == 200, answer.text
            correct += sum(r["best_label"]["name"] == truth[r["_id"]][1] for r in answer.json()["records"])
        # The service and the evaluate stage run the same preprocessing and model: same accuracy.
        assert correct / len(test_ids) == pytest.approx(_metrics(ws, "shapes")["accuracy"])
    app.state.services.engine.dispose()
