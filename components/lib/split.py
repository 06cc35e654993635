"""Split step: a deterministic, stratified 80/20 train/test split of a snapshot.

Rules, in order:
1. images the user flagged ``test_image`` go to the test side;
2. identical images (same SHA-256) always land on the same side;
3. the rest is split per stratum (the label for multi_class, the rarest tag or
   "negative" for multi_label, a value quantile for regression) so that each
   label keeps about ``test_fraction`` of its images for testing. The order
   inside a stratum comes from a hash of (seed, sha256): the same snapshot and
   seed always give the same split, and adding images moves few others.

Both sides list their image ids in content order (SHA-256, then image id), and
the train step builds its cross-validation folds from that order. So the same
photos give the same folds, the same model selection and, up to the floating
point of the machine, the same model, whatever ids they got and in whatever
order they were uploaded (ids are random UUIDs, and uploads run in parallel).
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter, defaultdict
from dataclasses import dataclass

from taskvision.dataset import DatasetInfo, ManifestRow
from taskvision.task_types import TaskType


@dataclass(frozen=True)
class SplitResult:
    train: list[str]  # image ids
    test: list[str]

    def to_json(self) -> str:
        return json.dumps({"train": self.train, "test": self.test})

    @staticmethod
    def from_json(text: str) -> SplitResult:
        data = json.loads(text)
        return SplitResult(train=list(data["train"]), test=list(data["test"]))


def _strata(info: DatasetInfo, rows: list[ManifestRow], bins: int = 5) -> dict[str, str]:
    """Stratum key per sha256."""
    keys: dict[str, str] = {}
    if info.task_type is TaskType.REGRESSION:
        first = info.output_labels[0].id if info.output_labels else ""
        values = sorted(row.values.get(first, 0.0) for row in rows)
        edges = [values[int(len(values) * q / bins)] for q in range(1, bins)] if values else []
        for row in rows:
            value = row.values.get(first, 0.0)
            keys[row.sha256] = f"bin{sum(value >= edge for edge in edges)}"
        return keys
    frequency = Counter(label for row in rows for label in row.labels)
    for row in rows:
        labels = sorted(row.labels, key=lambda lid: (frequency[lid], lid))
        keys[row.sha256] = labels[0] if labels else "none"
    return keys


def split_dataset(
    info: DatasetInfo, rows: list[ManifestRow], *, test_fraction: float = 0.2, seed: int = 0
) -> SplitResult:
    """Split ``rows`` into train and test image ids (see the module docstring for the rules)."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be between 0 and 1, not {test_fraction}")
    groups: dict[str, list[ManifestRow]] = defaultdict(list)
    for row in rows:
        groups[row.sha256].append(row)
    forced_test = {sha for sha, members in groups.items() if any(r.test_image for r in members)}
    strata = _strata(info, [members[0] for members in groups.values()])
    by_stratum: dict[str, list[str]] = defaultdict(list)
    for sha in groups:
        by_stratum[strata[sha]].append(sha)

    def rank(sha: str) -> str:
        return hashlib.sha256(f"{seed}:{sha}".encode()).hexdigest()

    test_groups = set(forced_test)
    for shas in by_stratum.values():
        wanted = round(len(shas) * test_fraction)
        if len(shas) >= 2:
            wanted = max(wanted, 1)  # every stratum with two or more images is tested
        already = sum(sha in forced_test for sha in shas)
        free = sorted((sha for sha in shas if sha not in forced_test), key=rank)
        # Keep at least one image of the stratum for training.
        take = max(0, min(wanted - already, len(free) - 1))
        test_groups.update(free[:take])
    train = [(sha, r.image_id) for sha, members in groups.items() if sha not in test_groups for r in members]
    test = [(sha, r.image_id) for sha, members in groups.items() if sha in test_groups for r in members]
    return SplitResult(train=[i for _, i in sorted(train)], test=[i for _, i in sorted(test)])
