"""The validate step: every problem with the training data, in words a user can act on."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from components.lib.runtime import StepFailed
from components.lib.validate import validate_dataset
from taskvision.dataset import LabelInfo, write_snapshot
from taskvision.storage import LocalBlobStore
from taskvision.task_types import TaskType
from tests.support.snapshots import FakeArtifact, RowMaker, info

ROSE, TULIP = LabelInfo("l-rose", "rose"), LabelInfo("l-tulip", "tulip")
SIZE = LabelInfo("v-size", "size")


@pytest.fixture
def store(tmp_path: Path) -> LocalBlobStore:
    return LocalBlobStore(tmp_path / "blobs")


@pytest.fixture
def maker(store: LocalBlobStore) -> RowMaker:
    return RowMaker(store=store)


def test_a_label_whose_images_are_all_test_images_cannot_be_trained(
    store: LocalBlobStore, maker: RowMaker
) -> None:
    maker.many(20, ["l-rose"])
    maker.many(25, ["l-tulip"], test_image=True)
    report = validate_dataset(info(TaskType.MULTI_CLASS, [ROSE, TULIP]), maker.rows, store)
    assert report.problems == ["label 'tulip' has no training images: all 25 are marked as test images"]


def test_a_good_dataset_passes(store: LocalBlobStore, maker: RowMaker) -> None:
    maker.many(20, ["l-rose"])
    maker.many(20, ["l-tulip"])
    maker.many(5, ["l-tulip"], test_image=True)
    report = validate_dataset(info(TaskType.MULTI_CLASS, [ROSE, TULIP]), maker.rows, store)
    assert report.problems == []
    assert report.ok
    assert report.counts == {"rose": 20, "tulip": 25}
    assert report.checks and all(check["success"] for check in report.checks)
    assert "**passed**" in report.markdown()


def test_a_good_regression_dataset_passes(store: LocalBlobStore, maker: RowMaker) -> None:
    for i in range(20):
        maker.add(["v-size"], values={"v-size": float(i) - 5.5})
    report = validate_dataset(info(TaskType.REGRESSION, [SIZE]), maker.rows, store)
    assert report.problems == []


def test_a_label_with_too_few_images(store: LocalBlobStore, maker: RowMaker) -> None:
    maker.many(12, ["l-rose"])
    maker.many(20, ["l-tulip"])
    report = validate_dataset(info(TaskType.MULTI_CLASS, [ROSE, TULIP]), maker.rows, store)
    assert report.problems == ["label 'rose' has 12 images; at least 20 are needed"]
    assert not report.ok


def test_a_label_without_images_and_a_custom_minimum(store: LocalBlobStore, maker: RowMaker) -> None:
    maker.many(5, ["l-rose"])
    report = validate_dataset(
        info(TaskType.MULTI_CLASS, [ROSE, TULIP]), maker.rows, store, min_images_per_label=5
    )
    assert report.problems == ["label 'tulip' has 0 images; at least 5 are needed"]
    assert report.counts == {"rose": 5, "tulip": 0}


def test_classification_needs_two_labels(store: LocalBlobStore, maker: RowMaker) -> None:
    maker.many(20, ["l-rose"])
    report = validate_dataset(info(TaskType.MULTI_CLASS, [ROSE]), maker.rows, store)
    assert report.problems == ["The task has 1 label(s); at least 2 are needed to train."]


def test_two_categories_on_one_image_of_a_categorization_task(store: LocalBlobStore, maker: RowMaker) -> None:
    maker.many(20, ["l-rose"])
    maker.many(19, ["l-tulip"])
    maker.add(["l-rose", "l-tulip"])
    report = validate_dataset(info(TaskType.MULTI_CLASS, [ROSE, TULIP]), maker.rows, store)
    assert report.problems == [
        "1 image has more than one category of this task; a categorization image needs exactly one."
    ]


def test_two_tags_on_one_image_of_a_tagging_task_are_fine(store: LocalBlobStore, maker: RowMaker) -> None:
    maker.many(20, ["l-rose", "l-tulip"])
    report = validate_dataset(info(TaskType.MULTI_LABEL, [ROSE, TULIP]), maker.rows, store)
    assert report.problems == []


@pytest.mark.parametrize(
    ("values", "shown"),
    [
        ({"v-size": math.nan}, "nan"),
        ({"v-size": math.inf}, "inf"),
        ({"v-size": -math.inf}, "-inf"),
    ],
    ids=["nan", "inf", "-inf"],
)
def test_a_regression_row_without_a_finite_value(
    store: LocalBlobStore, maker: RowMaker, values: dict[str, float], shown: str
) -> None:
    for i in range(20):
        maker.add(["v-size"], values={"v-size": float(i)})
    maker.add(["v-size"], values=values)
    report = validate_dataset(info(TaskType.REGRESSION, [SIZE]), maker.rows, store)
    assert report.problems == ["1 image has no finite value for 'size'."]


def test_a_regression_image_without_a_value(store: LocalBlobStore, maker: RowMaker) -> None:
    for i in range(20):
        maker.add(["v-size"], values={"v-size": float(i)})
    maker.add(["v-size"], values={})
    report = validate_dataset(info(TaskType.REGRESSION, [SIZE]), maker.rows, store)
    assert report.problems == ["1 image has no finite value for 'size'."]


def test_a_regression_task_needs_images_with_values(store: LocalBlobStore, maker: RowMaker) -> None:
    for i in range(3):
        maker.add(["v-size"], values={"v-size": float(i)})
    report = validate_dataset(info(TaskType.REGRESSION, [SIZE]), maker.rows, store)
    assert report.problems == ["label 'size' has 3 images with a value; at least 20 are needed"]


def test_a_label_that_is_not_on_the_task(store: LocalBlobStore, maker: RowMaker) -> None:
    maker.many(20, ["l-rose"])
    maker.many(20, ["l-tulip"])
    maker.add(["l-ghost"])
    report = validate_dataset(info(TaskType.MULTI_CLASS, [ROSE, TULIP]), maker.rows, store)
    assert report.problems == ["The snapshot refers to labels that are not on the task (l-ghost)."]


def test_an_undecodable_image(store: LocalBlobStore, maker: RowMaker) -> None:
    maker.many(20, ["l-rose"])
    maker.many(19, ["l-tulip"])
    broken = maker.add(["l-tulip"], data=b"this is not an image")
    report = validate_dataset(info(TaskType.MULTI_CLASS, [ROSE, TULIP]), maker.rows, store)
    assert report.problems == [
        f"Unusable images: {broken.image_id}: The data is not an image in a supported format."
    ]


def test_a_tiny_image(store: LocalBlobStore, maker: RowMaker) -> None:
    maker.many(20, ["l-rose"])
    maker.many(19, ["l-tulip"])
    tiny = RowMaker(store=store, size=(15, 40), _n=1000).add(["l-tulip"])
    edge = RowMaker(store=store, size=(16, 16), _n=2000).add(["l-tulip"])  # 16 px is enough
    report = validate_dataset(info(TaskType.MULTI_CLASS, [ROSE, TULIP]), [*maker.rows, tiny, edge], store)
    assert report.problems == [f"Unusable images: {tiny.image_id} is 15x40 px (at least 16 px a side)"]


def test_many_unusable_images_are_summarised(store: LocalBlobStore, maker: RowMaker) -> None:
    maker.many(20, ["l-rose"])
    maker.many(20, ["l-tulip"])
    broken = [maker.add(["l-tulip"], data=f"garbage {i}".encode()) for i in range(7)]
    report = validate_dataset(info(TaskType.MULTI_CLASS, [ROSE, TULIP]), maker.rows, store)
    assert len(report.problems) == 1
    problem = report.problems[0]
    assert problem.endswith(" (and 2 more)")
    assert all(row.image_id in problem for row in broken[:5])
    assert broken[5].image_id not in problem


def test_an_empty_dataset(store: LocalBlobStore) -> None:
    report = validate_dataset(info(TaskType.MULTI_CLASS, [ROSE, TULIP]), [], store)
    assert report.problems == ["The task has no labelled training images."]
    assert "**failed**" in report.markdown()


def test_the_negative_label_of_a_tagging_task_needs_no_minimum(
    store: LocalBlobStore, maker: RowMaker
) -> None:
    negative = LabelInfo("l-none", "nothing", negative=True)
    maker.many(20, ["l-rose"])
    maker.many(20, ["l-tulip"])
    maker.many(3, ["l-none"])
    report = validate_dataset(info(TaskType.MULTI_LABEL, [ROSE, TULIP, negative]), maker.rows, store)
    assert report.problems == []
    assert report.counts["nothing"] == 3
    # Without any negative image at all it is still fine.
    report = validate_dataset(info(TaskType.MULTI_LABEL, [ROSE, TULIP, negative]), maker.rows[:40], store)
    assert report.problems == []


def test_the_markdown_report_lists_every_check_and_problem(store: LocalBlobStore, maker: RowMaker) -> None:
    maker.many(12, ["l-rose"])
    maker.many(20, ["l-tulip"])
    maker.add(["l-rose", "l-tulip"])
    report = validate_dataset(info(TaskType.MULTI_CLASS, [ROSE, TULIP]), maker.rows, store)
    text = report.markdown()
    assert "**failed**" in text
    for problem in report.problems:
        assert f"- {problem}" in text
    checked = {(c["check"], c["column"]) for c in report.checks}
    assert ("expect_column_values_to_be_unique", "image_id") in checked
    assert ("expect_column_values_to_be_in_set", "label_id") in checked
    for check in report.checks:
        passed = "yes" if check["success"] else "no"
        assert f"| {check['check']} | {check['column']} | {passed} |" in text
    assert any("more than one category" in p for p in report.problems)  # the two-category image
    assert "| rose | 13 |" in text and "| tulip | 21 |" in text


def test_validate_component_fails_the_run_with_the_problems(tmp_path: Path, store: LocalBlobStore) -> None:
    from components.validate import validate

    maker = RowMaker(store=store)
    maker.many(12, ["l-rose"])
    maker.many(20, ["l-tulip"])
    write_snapshot(store, "datasets/task-1/snap-1", info(TaskType.MULTI_CLASS, [ROSE, TULIP]), maker.rows)
    report = FakeArtifact(str(tmp_path / "report.md"))

    message = "Training data did not pass validation: label 'rose' has 12 images; at least 20 are needed."
    with pytest.raises(StepFailed) as caught:
        validate.python_func(
            storage_url=str(store.root),
            snapshot_prefix="datasets/task-1/snap-1",
            run_prefix="runs/run-1",
            min_images_per_label=20,
            report=report,
        )
    assert str(caught.value) == message
    failure = json.loads(store.get("runs/run-1/failure.json"))
    assert (failure["step"], failure["message"]) == ("validate", message)
    assert "label 'rose' has 12 images" in Path(report.path).read_text()
