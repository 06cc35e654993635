"""The `dvc repro` stage code without DVC: the generator, the snapshot stage, parameters, errors."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from pipelines import dvc_stages
from pipelines.dvc_stages import EmbeddingCacheStore, Paths, StageError
from taskvision.dataset import read_snapshot
from taskvision.storage import LocalBlobStore
from taskvision.task_types import TaskType

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("dvc_generate", ROOT / "data" / "generate.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _draw(generator: ModuleType, out: Path, dataset: str, seed: int = 1) -> dict[str, Any]:
    meta: dict[str, Any] = generator.generate(dataset, out, seed=seed, images_per_label=3, image_size=64)
    return meta


def test_generator_is_deterministic_from_its_seed(generator: ModuleType, tmp_path: Path) -> None:
    for dataset in ("shapes", "tags", "sizes"):
        first = _draw(generator, tmp_path / "a" / dataset, dataset)
        again = _draw(generator, tmp_path / "b" / dataset, dataset)
        _draw(generator, tmp_path / "c" / dataset, dataset, seed=2)
        assert first == again and len(first["images"]) == 9
        files = [entry["file"] for entry in first["images"]]
        assert all(
            (tmp_path / "a" / dataset / f).read_bytes() == (tmp_path / "b" / dataset / f).read_bytes()
            for f in files
        )
        assert any(
            (tmp_path / "a" / dataset / f).read_bytes() != (tmp_path / "c" / dataset / f).read_bytes()
            for f in files
        )


def test_generated_labels_fit_the_task_types(generator: ModuleType, tmp_path: Path) -> None:
    shapes = _draw(generator, tmp_path / "shapes", "shapes")
    assert {tuple(e["labels"]) for e in shapes["images"]} == {("circle",), ("square",), ("triangle",)}
    tags = _draw(generator, tmp_path / "tags", "tags")
    assert ["none"] in [e["labels"] for e in tags["images"]]  # no tag -> the negative label
    assert ["red", "striped"] in [e["labels"] for e in tags["images"]]
    sizes = _draw(generator, tmp_path / "sizes", "sizes")
    values = [e["values"]["size"] for e in sizes["images"]]
    assert all(5 <= v <= 90 for v in values) and len(set(values)) == len(values)


def test_snapshot_stage_writes_the_control_plane_format_deterministically(
    generator: ModuleType, tmp_path: Path
) -> None:
    _draw(generator, tmp_path / "data" / "generated" / "tags", "tags")
    paths = Paths(tmp_path / "data", "tags")
    dvc_stages.snapshot(paths, {})
    store = LocalBlobStore(paths.store)
    prefix = dvc_stages.find_snapshot(store)
    info, rows = read_snapshot(store, prefix)
    assert prefix == f"datasets/tags/{info.snapshot_id}" and info.task_type is TaskType.MULTI_LABEL
    assert [label.name for label in info.labels] == ["red", "blue", "striped", "dotted", "none"]
    assert len(rows) == info.count == 9
    for row in rows:
        assert row.blob_key == f"images/sample/{row.sha256[:2]}/{row.sha256}" and store.exists(row.blob_key)
        assert (row.width, row.height) == (64, 64)
    manifest = store.get(f"{prefix}/manifest.jsonl")
    meta = store.get(f"{prefix}/dataset.json")
    dvc_stages.snapshot(Paths(tmp_path / "data", "tags"), {})  # again: byte for byte the same
    assert store.get(f"{prefix}/manifest.jsonl") == manifest and store.get(f"{prefix}/dataset.json") == meta


def test_find_snapshot_wants_exactly_one(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path)
    with pytest.raises(StageError, match="found none"):
        dvc_stages.find_snapshot(store)
    assert dvc_stages.find_snapshot(store, "/datasets/t/s/") == "datasets/t/s"


def test_train_params_are_checked() -> None:
    config = dvc_stages.train_config(
        {"train": {"mode": "embed", "quality": "best", "augment": "none", "epochs": 2}}
    )
    assert (config.mode, config.quality, config.augment, config.epochs) == ("embed", "best", "none", 2)
    assert dvc_stages.train_config({"train": {}}).quality == "balanced"
    with pytest.raises(
        StageError, match=r"train.backbone is gone: the backbones are chosen by cross-validation"
    ):
        dvc_stages.train_config({"train": {"backbone": "resnet50"}})
    with pytest.raises(StageError, match="Invalid quality 'fastest'"):
        dvc_stages.train_config({"train": {"quality": "fastest"}})
    with pytest.raises(StageError, match="Invalid training mode"):
        dvc_stages.train_config({"train": {"mode": "fast"}})
    with pytest.raises(StageError, match="no 'train' section"):
        dvc_stages.train_config({})


def test_embeddings_are_cached_outside_the_snapshot(tmp_path: Path) -> None:
    base, cache = LocalBlobStore(tmp_path / "snapshot"), LocalBlobStore(tmp_path / "cache")
    store = EmbeddingCacheStore(base, cache)
    store.put("embeddings/b/center/ab/abc.npy", b"vector")
    store.put("images/x", b"image")
    assert cache.list_keys() == ["embeddings/b/center/ab/abc.npy"] and base.list_keys() == ["images/x"]
    assert store.exists("embeddings/b/center/ab/abc.npy") and store.get("images/x") == b"image"


def test_a_failing_stage_says_why(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    params = tmp_path / "params.yaml"
    params.write_text(json.dumps({"train": {"quality": "perfect"}}))
    code = dvc_stages.main(["train", "shapes", "--params", str(params), "--data-dir", str(tmp_path)])
    assert (
        code == 1
        and "train shapes: error: params.yaml train: Invalid quality 'perfect'" in capsys.readouterr().err
    )
