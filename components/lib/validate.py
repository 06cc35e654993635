"""Validate step: is this snapshot fit to train on? Every problem is listed in words a user can act on.

Three layers:
* the task's rules on the labels (:func:`taskvision.dataset.trainability`: enough
  labels, enough images per label, one category per image for multi_class, a
  value on every regression image), the same rules the API applies when a
  training is requested, so that a request that cannot pass is refused at once;
* a great-expectations suite over the manifest as a table (required columns,
  no nulls, unique ids, well-formed hashes, known labels, finite regression values);
* every image decodable within the size limits (the image bytes are read).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from taskvision import imaging
from taskvision.dataset import DatasetInfo, ManifestRow, trainability
from taskvision.errors import TaskVisionError
from taskvision.storage import BlobStore

logger = logging.getLogger(__name__)

MIN_SIDE = 16  # smaller images carry no usable signal at 224 px


@dataclass
class ValidationReport:
    problems: list[str] = field(default_factory=list)
    checks: list[dict[str, Any]] = field(default_factory=list)  # every check, passed or not
    counts: dict[str, int] = field(default_factory=dict)  # images per label name

    @property
    def ok(self) -> bool:
        return not self.problems

    def markdown(self) -> str:
        lines = ["# Training data validation", "", f"**{'passed' if self.ok else 'failed'}**", ""]
        if self.problems:
            lines += ["## Problems", *(f"- {p}" for p in self.problems), ""]
        lines += ["## Images per label", "", "| label | images |", "|---|---:|"]
        lines += [f"| {name} | {count} |" for name, count in self.counts.items()]
        lines += ["", "## Checks", "", "| check | column | passed |", "|---|---|---|"]
        lines += [
            f"| {c['check']} | {c.get('column', '')} | {'yes' if c['success'] else 'no'} |"
            for c in self.checks
        ]
        return "\n".join(lines) + "\n"


def _table_suite(info: DatasetInfo, rows: list[ManifestRow], report: ValidationReport) -> None:
    """The great-expectations suite over the manifest table."""
    import great_expectations as gx
    import pandas as pd

    known = {label.id for label in info.labels}
    records = []
    for row in rows:
        record: dict[str, Any] = {
            "image_id": row.image_id,
            "blob_key": row.blob_key,
            "sha256": row.sha256,
            "n_labels": len(row.labels),
            "test_image": row.test_image,
        }
        records.append(record)
    table = pd.DataFrame.from_records(records)
    label_ids: list[str | None] = [lid for row in rows for lid in row.labels]
    labels = pd.DataFrame({"label_id": label_ids or [None]})

    context = gx.get_context(mode="ephemeral")
    source = context.data_sources.add_pandas("snapshot")
    E = gx.expectations
    suites: list[tuple[str, pd.DataFrame, list[Any]]] = []
    manifest_checks: list[Any] = [
        *(
            E.ExpectColumnToExist(column=c)
            for c in ("image_id", "blob_key", "sha256", "n_labels", "test_image")
        ),
        *(E.ExpectColumnValuesToNotBeNull(column=c) for c in ("image_id", "blob_key", "sha256")),
        E.ExpectColumnValuesToBeUnique(column="image_id"),
        E.ExpectColumnValuesToMatchRegex(column="sha256", regex=r"^[0-9a-f]{64}$"),
        E.ExpectColumnValuesToBeBetween(column="n_labels", min_value=1),
    ]
    suites.append(("manifest", table, manifest_checks))
    suites.append(
        ("labels", labels, [E.ExpectColumnValuesToBeInSet(column="label_id", value_set=sorted(known))])
    )

    names = {label.id: label.name for label in info.labels}
    for name, frame, expectations in suites:
        if frame.empty:
            continue
        asset = source.add_dataframe_asset(name)
        batch = asset.add_batch_definition_whole_dataframe("all").get_batch(
            batch_parameters={"dataframe": frame}
        )
        suite = gx.ExpectationSuite(name=f"taskvision-{name}")
        for expectation in expectations:
            suite.add_expectation(expectation)
        result = batch.validate(suite, result_format="SUMMARY")
        for item in result.results:
            config = item.expectation_config
            if config is None:
                continue
            column = config.kwargs.get("column", "")
            report.checks.append({"check": config.type, "column": column, "success": bool(item.success)})
            if not item.success:
                examples = (item.result or {}).get("partial_unexpected_list", [])[:3]
                report.problems.append(_explain(config.type, column, examples, info, names))


def _explain(check: str, column: str, examples: list[Any], info: DatasetInfo, names: dict[str, str]) -> str:
    shown = ", ".join(str(e) for e in examples)
    if column == "label_id":
        return f"The snapshot refers to labels that are not on the task ({shown})."
    return f"Check {check} failed on column '{column}'" + (f" (for example {shown})." if shown else ".")


def validate_dataset(
    info: DatasetInfo,
    rows: list[ManifestRow],
    store: BlobStore,
    *,
    min_images_per_label: int = 20,
    max_image_pixels: int = 80_000_000,
    check_images: bool = True,
) -> ValidationReport:
    """Check a snapshot before training; the report lists every problem found."""
    report = ValidationReport()
    rules = trainability(info, rows, min_images_per_label=min_images_per_label)
    report.problems.extend(rules.problems)
    report.counts = rules.counts
    if not rows:
        return report
    _table_suite(info, rows, report)

    if check_images:
        bad: list[str] = []
        for row in rows:
            try:
                info_ = imaging.probe(store.get(row.blob_key), max_pixels=max_image_pixels)
                if min(info_.width, info_.height) < MIN_SIDE:
                    bad.append(
                        f"{row.image_id} is {info_.width}x{info_.height} px (at least {MIN_SIDE} px a side)"
                    )
            except TaskVisionError as exc:
                bad.append(f"{row.image_id}: {exc}")
        if bad:
            more = f" (and {len(bad) - 5} more)" if len(bad) > 5 else ""
            report.problems.append("Unusable images: " + "; ".join(bad[:5]) + more)
    return report
