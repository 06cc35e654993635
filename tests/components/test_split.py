"""The split step: deterministic, stratified 80/20; user test flags win; duplicates stay together."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import pytest

from components.lib.split import SplitResult, split_dataset
from taskvision.dataset import LabelInfo, ManifestRow, write_snapshot
from taskvision.storage import LocalBlobStore
from taskvision.task_types import TaskType
from tests.support.snapshots import FakeArtifact, RowMaker, info

FLOWERS = [LabelInfo("l-rose", "rose"), LabelInfo("l-tulip", "tulip"), LabelInfo("l-iris", "iris")]


def flowers(counts: dict[str, int]) -> tuple[RowMaker, list[ManifestRow]]:
    maker = RowMaker()
    for label_id, count in counts.items():
        maker.many(count, [label_id])
    return maker, maker.rows


def per_label(rows: list[ManifestRow], ids: list[str]) -> Counter[str]:
    """Images per label id among ``ids``."""
    chosen = set(ids)
    return Counter(label for row in rows if row.image_id in chosen for label in row.labels)


def test_split_is_deterministic_and_depends_on_the_seed() -> None:
    _, rows = flowers({"l-rose": 50, "l-tulip": 30, "l-iris": 10})
    task = info(TaskType.MULTI_CLASS, FLOWERS)

    first = split_dataset(task, rows, seed=7)
    assert split_dataset(task, rows, seed=7) == first
    # The order of the manifest does not matter, only its content.
    assert split_dataset(task, list(reversed(rows)), seed=7) == first
    assert split_dataset(task, rows, seed=8).test != first.test
    # Every image is on exactly one side.
    assert sorted(first.train + first.test) == sorted(r.image_id for r in rows)
    assert not set(first.train) & set(first.test)


def test_multi_class_keeps_20_percent_of_each_label_for_testing() -> None:
    _, rows = flowers({"l-rose": 50, "l-tulip": 30, "l-iris": 10})
    result = split_dataset(info(TaskType.MULTI_CLASS, FLOWERS), rows, seed=3)
    assert per_label(rows, result.test) == {"l-rose": 10, "l-tulip": 6, "l-iris": 2}


def test_test_fraction_is_honoured() -> None:
    _, rows = flowers({"l-rose": 50, "l-tulip": 50})
    result = split_dataset(info(TaskType.MULTI_CLASS, FLOWERS[:2]), rows, test_fraction=0.5)
    assert per_label(rows, result.test) == {"l-rose": 25, "l-tulip": 25}


def test_multi_label_keeps_about_20_percent_of_each_tag_and_of_the_negative_label() -> None:
    labels = [LabelInfo("t-red", "red"), LabelInfo("t-stripes", "stripes"), LabelInfo("t-none", "none", True)]
    maker = RowMaker()
    rng = random.Random(1)
    for _ in range(300):
        tags = [t for t in ("t-red", "t-stripes") if rng.random() < 0.4] or ["t-none"]
        maker.add(tags)
    rows = maker.rows
    totals = per_label(rows, [r.image_id for r in rows])
    for seed in range(3):
        tested = per_label(rows, split_dataset(info(TaskType.MULTI_LABEL, labels), rows, seed=seed).test)
        for label_id, total in totals.items():
            assert abs(tested[label_id] / total - 0.2) < 0.04, (seed, label_id, tested[label_id], total)


def test_regression_keeps_about_20_percent_of_each_value_range() -> None:
    rng = random.Random(2)
    maker = RowMaker()
    for _ in range(200):
        maker.add(["v-size"], values={"v-size": rng.uniform(0.0, 50.0)})
    rows = maker.rows
    result = split_dataset(info(TaskType.REGRESSION, [LabelInfo("v-size", "size")]), rows, seed=0)
    ranked = sorted(rows, key=lambda r: r.values["v-size"])
    test = set(result.test)
    for q in range(5):  # each fifth of the value range (40 images) keeps about 8 for testing
        quintile = ranked[q * 40 : (q + 1) * 40]
        assert 7 <= sum(r.image_id in test for r in quintile) <= 9, q


def test_user_test_flags_always_go_to_test_and_count_towards_the_quota() -> None:
    maker = RowMaker()
    flagged = maker.many(4, ["l-rose"], test_image=True)
    maker.many(46, ["l-rose"])
    maker.many(30, ["l-tulip"])
    # A label whose images are mostly flagged: the flags still win.
    flagged += maker.many(8, ["l-iris"], test_image=True)
    maker.many(2, ["l-iris"])
    rows = maker.rows
    for seed in range(5):
        result = split_dataset(info(TaskType.MULTI_CLASS, FLOWERS), rows, seed=seed)
        assert {r.image_id for r in flagged} <= set(result.test)
        assert per_label(rows, result.test) == {"l-rose": 10, "l-tulip": 6, "l-iris": 8}


def test_identical_images_never_land_on_both_sides() -> None:
    maker = RowMaker()
    for i in range(40):
        label = "l-rose" if i % 2 else "l-tulip"
        maker.add([label], digest=f"{i:064x}")
        maker.add([label], digest=f"{i:064x}")  # the same picture uploaded twice
    # A duplicate of a user-flagged test image is tested too.
    maker.add(["l-rose"], digest="f" * 64, test_image=True)
    twin = maker.add(["l-rose"], digest="f" * 64)
    rows = maker.rows
    for seed in range(10):
        result = split_dataset(info(TaskType.MULTI_CLASS, FLOWERS[:2]), rows, seed=seed)
        side = {image_id: "train" for image_id in result.train} | {i: "test" for i in result.test}
        by_hash: dict[str, set[str]] = {}
        for row in rows:
            by_hash.setdefault(row.sha256, set()).add(side[row.image_id])
        assert all(len(sides) == 1 for sides in by_hash.values()), seed
        assert twin.image_id in result.test
        assert 0 < len(result.test) < len(rows)


@pytest.mark.parametrize("seed", range(5))
def test_every_label_keeps_a_training_image_and_labels_of_two_are_tested(seed: int) -> None:
    _, rows = flowers({"l-rose": 1, "l-tulip": 2, "l-iris": 3})
    result = split_dataset(info(TaskType.MULTI_CLASS, FLOWERS), rows, seed=seed)
    trained = per_label(rows, result.train)
    assert trained == {"l-rose": 1, "l-tulip": 1, "l-iris": 2}
    assert per_label(rows, result.test) == {"l-tulip": 1, "l-iris": 1}


def test_a_tag_keeps_a_training_image() -> None:
    labels = [LabelInfo("t-red", "red"), LabelInfo("t-stripes", "stripes")]
    maker = RowMaker()
    maker.many(2, ["t-red", "t-stripes"])
    maker.many(30, ["t-stripes"])
    rows = maker.rows
    for seed in range(10):
        result = split_dataset(info(TaskType.MULTI_LABEL, labels), rows, seed=seed)
        assert per_label(rows, result.train)["t-red"] >= 1


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.2, 1.5])
def test_a_test_fraction_outside_0_1_is_refused(fraction: float) -> None:
    _, rows = flowers({"l-rose": 10, "l-tulip": 10})
    with pytest.raises(ValueError, match="test_fraction must be between 0 and 1"):
        split_dataset(info(TaskType.MULTI_CLASS, FLOWERS[:2]), rows, test_fraction=fraction)


def test_split_result_json_round_trip() -> None:
    result = SplitResult(train=["a", "b"], test=["c"])
    assert json.loads(result.to_json()) == {"train": ["a", "b"], "test": ["c"]}
    assert SplitResult.from_json(result.to_json()) == result


def test_split_component_writes_the_split_and_reports_progress(tmp_path: Path) -> None:
    from components.split import split

    store = LocalBlobStore(tmp_path / "blobs")
    _, rows = flowers({"l-rose": 25, "l-tulip": 15})
    task = info(TaskType.MULTI_CLASS, FLOWERS[:2], count=len(rows))
    write_snapshot(store, "datasets/task-1/snap-1", task, rows)
    out = FakeArtifact(str(tmp_path / "split.json"))

    split.python_func(
        storage_url=str(tmp_path / "blobs"),
        snapshot_prefix="datasets/task-1/snap-1",
        run_prefix="runs/run-1",
        test_fraction=0.2,
        seed=4,
        split_out=out,
    )

    written = json.loads(Path(out.path).read_text())
    expected = split_dataset(task, rows, seed=4)
    assert written == {"train": expected.train, "test": expected.test}
    assert len(written["test"]) == 8
    assert out.metadata == {"train": 32, "test": 8}
    progress = json.loads(store.get("runs/run-1/progress.json"))
    assert (progress["step"], progress["progress"], progress["message"]) == ("split", 1.0, "split done")
    assert not store.exists("runs/run-1/failure.json")
