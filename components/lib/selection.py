"""Model selection for the CPU train step: quality presets, candidates, and choosing one by cross-validation.

A ``quality`` names a preset (:data:`PRESETS`) that trades training time (and
serving cost) for accuracy:

* ``fast``: Lite0's multi-scale features and a linear head; cross-validation
  only chooses the head's penalty (the default before presets existed);
* ``balanced`` (the default): that linear candidate against partially
  fine-tuning Lite0's last block on cached activations (see
  :mod:`components.lib.partial_finetune`; one augmented view besides the
  centre crop and its mirror, 6 epochs) and against the average of the two
  (:data:`ENSEMBLE`), checked on one held-out fold; all serve at about
  Lite0's cost;
* ``best``: linear heads over Lite0, Lite1, Lite2 and their concatenations,
  each also with a test-time mirror flip, against a longer partial fine-tune
  with more augmented views (and its average with Lite0's linear head), all
  by full k-fold cross-validation.

Every candidate is scored on the training split only, on the same
out-of-fold rows, with the task's metric (accuracy, mean AP, MAE). The best
score wins; a tie goes to the cheaper candidate to serve. Candidates not
started when the preset's time budget runs out are skipped (and reported so).
What was tried and how each scored goes into the bundle (``selection``).

A retrain of a dataset that barely changed (:func:`reusable_choice`: at most
10 % of the images new, removed or relabelled, same preset and labels) refits
the previous version's choice instead of scoring every candidate again: a
linear choice's head, or a partial fine-tune's last layer over its tuned
features (:mod:`components.lib.refit`; averaged with a distribution head, that
head too), the penalty still chosen by cross-validation. That is what makes a
retrain take seconds (the partial fine-tune's candidate alone costs a minute).
The bundle records it (``selection.reused``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import numpy.typing as npt

from components.lib import heads
from components.lib.partial_finetune import PartialFinetunePlan
from taskvision import backbone, features
from taskvision.bundle import BundleMeta
from taskvision.dataset import DatasetInfo, ManifestRow, read_snapshot
from taskvision.errors import NotFoundError
from taskvision.preprocess import DRAFT_FACTOR
from taskvision.storage import BlobStore
from taskvision.task_types import TaskType

logger = logging.getLogger(__name__)

Array = npt.NDArray[np.float32]
QUALITIES = ("fast", "balanced", "best")
LINEAR = "linear"
PARTIAL_FINETUNE = "partial_finetune"
# The partial fine-tune's logits averaged with those of the linear head over the same backbone's
# frozen multi-scale embedding: one network, one run of the shared early blocks (see
# PartialFinetunePlan docs); a few points of accuracy over either alone in cross-validation.
ENSEMBLE = "partial_finetune+linear"
ENSEMBLE_COST = 0.15  # the pretrained last block and head convolution run besides the tuned ones
# Regression only: a small network over a linear candidate's frozen features answering with a
# distribution over the targets' range (components.lib.distribution_head).
DISTRIBUTION = "distribution"
DISTRIBUTION_COST = 0.02  # two small matrix products after the backbone
# Regression only: the partial fine-tune averaged with the distribution head over the same
# backbone's frozen multi-scale embedding, one network like ENSEMBLE (its end is not one linear
# layer: a retrain after it refits both members and exports the network again).
ENSEMBLE_DISTRIBUTION = "partial_finetune+distribution"
ENSEMBLES = (ENSEMBLE, ENSEMBLE_DISTRIBUTION)

# Relative CPU cost of one image through each backbone (ONNX Runtime, one thread, batch 1:
# Lite0 6.0, Lite1 9.1, Lite2 12.3 ms on the 2-core benchmark machine).
BACKBONE_COST = {
    "tf_efficientnet_lite0.in1k": 1.0,
    "tf_efficientnet_lite1.in1k": 1.5,
    "tf_efficientnet_lite2.in1k": 2.0,
}
L0, L1, L2 = (features.feature_id(b) for b in backbone.BACKBONES)


@dataclass(frozen=True)
class QualityPreset:
    name: str
    linear: tuple[tuple[str, ...], ...]  # feature-id lists of the linear candidates
    test_time_flip: bool  # also score each linear candidate with +hflip features
    finetune: PartialFinetunePlan | None
    finetune_folds: int  # folds the partial fine-tune is scored on: 1 = the first fold only
    budget_s: float = 600.0  # selection stops starting candidates after this long
    # Regression: also a distribution head over the first linear candidate's features.
    distribution: bool = False


PRESETS: dict[str, QualityPreset] = {
    "fast": QualityPreset("fast", linear=((L0,),), test_time_flip=False, finetune=None, finetune_folds=0),
    "balanced": QualityPreset(
        "balanced",
        linear=((L0,),),
        test_time_flip=False,
        finetune=PartialFinetunePlan(extra_views=1, epochs=6),
        finetune_folds=1,
        budget_s=120.0,
        distribution=True,
    ),
    "best": QualityPreset(
        "best",
        linear=((L0,), (L1,), (L2,), (L1, L2), (L0, L1, L2)),
        test_time_flip=True,
        finetune=PartialFinetunePlan(extra_views=4, epochs=12),
        finetune_folds=3,
        budget_s=900.0,
        distribution=True,
    ),
}


def preset(quality: str) -> QualityPreset:
    if quality not in PRESETS:
        raise ValueError(f"Invalid quality {quality!r}. Only {', '.join(QUALITIES)} are supported.")
    return PRESETS[quality]


def serving_cost(feature_ids: Sequence[str]) -> float:
    """Relative CPU cost per image of computing ``feature_ids`` (Lite0's embedding = 1)."""
    return float(sum(BACKBONE_COST[b] * (1 + m) for b, m in features.views_needed(feature_ids)))


def short_name(feature_ids: Sequence[str]) -> str:
    return " + ".join(fid.replace("tf_efficientnet_", "").replace(".in1k", "") for fid in feature_ids)


@dataclass
class CandidateScore:
    """One candidate's cross-validated result."""

    name: str
    kind: str  # LINEAR, PARTIAL_FINETUNE, DISTRIBUTION or one of ENSEMBLES
    cv_score: float  # higher is better (regression: minus the MAE, in the targets' units)
    serving_cost: float
    seconds: float
    features: list[str] = field(default_factory=list)  # linear candidates
    head: str = ""  # linear candidates: the chosen head setting
    plan: dict[str, Any] = field(default_factory=dict)  # partial fine-tune
    oof: Array | None = None  # out-of-fold outputs of the training rows ``oof_rows``
    oof_rows: npt.NDArray[np.int64] | None = None
    setting: heads.HeadSetting | None = None
    oof_mirror: Array | None = None  # a partial fine-tune's out-of-fold outputs of the mirror images

    def report(self) -> dict[str, Any]:
        row: dict[str, Any] = {
            "name": self.name,
            "kind": self.kind,
            "cv_score": round(self.cv_score, 5),
            "serving_cost": round(self.serving_cost, 2),
            "seconds": round(self.seconds, 2),
        }
        if self.kind in (LINEAR, DISTRIBUTION):
            row.update(features=self.features, head=self.head)
        elif self.kind in ENSEMBLES:
            row.update(features=self.features, head=self.head, plan=self.plan)
        else:
            row.update(plan=self.plan)
        return row


def score_linear(
    task_type: TaskType,
    y: Array,
    scale: float,
    candidate: Sequence[str],
    centre: Array,
    mirrored: Array | None,
    fold_groups: Sequence[npt.NDArray[np.int64]],
    grid: Sequence[heads.HeadSetting],
    *,
    n_outputs: int,
    augment_with_mirror: bool,
    test_time_flip: bool,
    scored_rows: npt.NDArray[np.int64],
) -> list[CandidateScore]:
    """Cross-validate a linear candidate's head grid; one score for it (and one with +hflip when asked).

    ``centre`` / ``mirrored`` are its feature vectors of the training rows (as
    :func:`taskvision.features.assemble` builds them). ``scale`` turns a
    regression score back into the targets' units.
    """
    started = time.perf_counter()
    cv = heads.cross_validate(
        centre,
        y,
        task_type,
        grid,
        fold_groups,
        n_outputs=n_outputs,
        x_mirror=mirrored,
        augment_with_mirror=augment_with_mirror,
    )
    variants: list[tuple[list[str], list[Array]]] = [(list(candidate), cv.oof)]
    if test_time_flip and cv.oof_mirror is not None:
        flipped = [features.feature_spec(f + features.HFLIP).id for f in candidate]
        variants.append(
            (flipped, [(a + b) * np.float32(0.5) for a, b in zip(cv.oof, cv.oof_mirror, strict=True)])
        )
    seconds = time.perf_counter() - started
    results = []
    for ids, oofs in variants:
        scores = [heads.score(task_type, y[scored_rows], oof[scored_rows]) * scale for oof in oofs]
        best = int(np.argmax(scores))
        results.append(
            CandidateScore(
                name=short_name(ids),
                kind=LINEAR,
                cv_score=scores[best],
                serving_cost=serving_cost(ids),
                seconds=seconds / len(variants),
                features=ids,
                head=cv.settings[best].name,
                oof=oofs[best],
                oof_rows=np.arange(len(y)),
                setting=cv.settings[best],
            )
        )
        logger.info(
            "candidate %s: cross-validated score %.4f with %s (%s)",
            results[-1].name,
            scores[best],
            cv.settings[best].name,
            ", ".join(f"{s.name} {v:.4f}" for s, v in zip(cv.settings, scores, strict=True)),
        )
    return results


def ensemble(
    finetune: CandidateScore, partner: CandidateScore, task_type: TaskType, y: Array, scale: float
) -> CandidateScore | None:
    """The candidate averaging ``finetune``'s outputs with ``partner``'s: a linear head
    (:data:`ENSEMBLE`) or a distribution head (:data:`ENSEMBLE_DISTRIBUTION`) over the same
    backbone's frozen embedding. Scored on the fine-tune's out-of-fold rows from both candidates'
    out-of-fold outputs (no training of its own); None if ``partner`` lacks some of those rows.

    A distribution head scored on ``+hflip`` features (the centre and mirror image's averaged)
    is averaged with the fine-tune's answers of both images averaged: the whole network runs
    on the image and its mirror image, at twice the cost.
    """
    assert finetune.oof is not None and finetune.oof_rows is not None and partner.oof is not None
    partner_oof = _on_rows(partner, finetune.oof_rows)
    flipped = features.any_flipped(partner.features)
    if partner_oof is None or (flipped and finetune.oof_mirror is None):
        return None
    own = finetune.oof
    if flipped:
        assert finetune.oof_mirror is not None
        own = (own + finetune.oof_mirror) * np.float32(0.5)
    oof = ((own + partner_oof) * np.float32(0.5)).astype(np.float32)
    name = f"{finetune.name}{features.HFLIP if flipped else ''} + {partner.name}"
    value = heads.score(task_type, y[finetune.oof_rows], oof) * scale
    logger.info("candidate %s: cross-validated score %.4f", name, value)
    distribution = partner.kind == DISTRIBUTION
    return CandidateScore(
        name=name,
        kind=ENSEMBLE_DISTRIBUTION if distribution else ENSEMBLE,
        cv_score=value,
        serving_cost=(finetune.serving_cost + ENSEMBLE_COST) * (2 if flipped else 1)
        + (DISTRIBUTION_COST if distribution else 0.0),
        seconds=0.0,
        features=list(partner.features),
        head=partner.head,
        plan=finetune.plan,
        oof=oof,
        oof_rows=finetune.oof_rows,
        setting=finetune.setting if distribution else partner.setting,  # the tuned network's start head
    )


# An ensemble is kept unless another candidate beats it in at least this share of paired
# bootstrap resamples of the scored rows (about two standard errors): on one held-out fold of a
# few hundred images the scores' noise (a 160-image fold: +-3.5 points of accuracy) is larger than
# the gaps between candidates. In 5-fold cross-validation over every image (``bench/whole_set_cv.py``)
# the ensemble was 0.6 points better than the better of its members on the flowers (2.7 better
# than the linear head, which that fold once ranked first), and 0.9 points worse than the linear
# head on the satellite tiles: on balance the rule is kept, at that cost on satellite (README).
PREFER_ENSEMBLE_CONFIDENCE = 0.975
BOOTSTRAP_RESAMPLES = 200


def choose(
    candidates: Sequence[CandidateScore],
    *,
    task_type: TaskType | None = None,
    y: Array | None = None,
    seed: int = 0,
) -> CandidateScore:
    """The best cross-validated score; a tie goes to the cheaper one to serve.

    With ``task_type`` and the training targets ``y``, the best-scored of the :data:`ENSEMBLES`
    candidates is preferred: it gives way only to a candidate that beats it in at least
    :data:`PREFER_ENSEMBLE_CONFIDENCE` of bootstrap resamples of its scored rows.
    """
    if not candidates:
        raise ValueError("No candidate was scored.")
    best = min(candidates, key=_rank)
    preferred = min((c for c in candidates if c.kind in ENSEMBLES), key=_rank, default=None)
    if preferred is None or best is preferred or task_type is None or y is None:
        return best
    if _wins_share(best, preferred, task_type, y, seed) >= PREFER_ENSEMBLE_CONFIDENCE:
        return best
    logger.info(
        "keeping %s (%.4f) over %s (%.4f): the gap is within the noise of the scored rows",
        preferred.name,
        preferred.cv_score,
        best.name,
        best.cv_score,
    )
    return preferred


def _rank(candidate: CandidateScore) -> tuple[float, float]:
    """Sort key: the higher score first, then the cheaper to serve."""
    return (-round(candidate.cv_score, 9), candidate.serving_cost)


def _wins_share(
    challenger: CandidateScore, holder: CandidateScore, task_type: TaskType, y: Array, seed: int
) -> float:
    """In what share of bootstrap resamples of ``holder``'s scored rows ``challenger`` scores higher."""
    if challenger.oof is None or holder.oof is None or holder.oof_rows is None:
        return 1.0
    rows = holder.oof_rows
    challenger_oof = _on_rows(challenger, rows)
    if challenger_oof is None:
        return 1.0
    rng = np.random.default_rng(seed)
    wins = 0
    for _ in range(BOOTSTRAP_RESAMPLES):
        pick = rng.integers(0, len(rows), len(rows))
        truth = y[rows[pick]]
        if heads.score(task_type, truth, challenger_oof[pick]) > heads.score(
            task_type, truth, holder.oof[pick]
        ):
            wins += 1
    return wins / BOOTSTRAP_RESAMPLES


def _on_rows(candidate: CandidateScore, rows: npt.NDArray[np.int64]) -> Array | None:
    """``candidate``'s out-of-fold outputs of the training rows ``rows`` (None if it lacks some)."""
    assert candidate.oof is not None
    own = candidate.oof_rows if candidate.oof_rows is not None else np.arange(len(candidate.oof))
    where = {int(r): i for i, r in enumerate(own)}
    if any(int(r) not in where for r in rows):
        return None
    return candidate.oof[[where[int(r)] for r in rows]]


def selection_report(
    quality: QualityPreset,
    chosen: CandidateScore,
    candidates: Sequence[CandidateScore],
    *,
    metric: str,
    folds: int,
    scored_rows: int,
    skipped: Sequence[str],
    seconds: float,
) -> dict[str, Any]:
    """What goes into bundle.json's ``selection`` and the evaluation report."""
    return {
        "quality": quality.name,
        "chosen": chosen.name,
        "kind": chosen.kind,
        "metric": metric,
        "folds": folds,
        "scored_rows": scored_rows,
        "candidates": [c.report() for c in sorted(candidates, key=lambda c: -c.cv_score)],
        "skipped": list(skipped),
        "seconds": round(seconds, 2),
        "rule": (
            f"best score (a tie: cheaper to serve); the best of {' and '.join(ENSEMBLES)} kept unless "
            f"beaten in >= {PREFER_ENSEMBLE_CONFIDENCE:.0%} of {BOOTSTRAP_RESAMPLES} bootstrap resamples"
        ),
    }


def metric_name(task_type: TaskType) -> str:
    return {
        TaskType.MULTI_CLASS: "accuracy",
        TaskType.MULTI_LABEL: "mAP",
        TaskType.REGRESSION: "-MAE",
    }[task_type]


# A retrain refits the previous version's choice instead of scoring every candidate again
# when at most this share of the images (new, removed, relabelled) changed since.
REUSE_MAX_CHANGED = 0.1


@dataclass(frozen=True)
class Reuse:
    """The previous version's model choice, to refit on a dataset that barely changed."""

    chosen: str
    features: list[str]  # a linear choice's feature ids
    run_id: str
    selected_on: str  # the snapshot the choice was made on by a full selection
    changed_images: int  # since that snapshot
    images: int
    kind: str = LINEAR  # or PARTIAL_FINETUNE: its tuned network is kept, its last layer refitted
    bundle: str = ""  # the previous version's bundle prefix

    def report(self) -> dict[str, Any]:
        return {
            "from_run": self.run_id,
            "chosen": self.chosen,
            "selected_on": self.selected_on,
            "changed_images": self.changed_images,
            "images": self.images,
        }


def _row_key(row: ManifestRow) -> tuple[Any, ...]:
    return (row.sha256, tuple(sorted(row.labels)), tuple(sorted(row.values.items())), row.test_image)


def reusable_choice(
    store: BlobStore,
    previous_bundle: str,
    info: DatasetInfo,
    rows: Sequence[ManifestRow],
    *,
    quality: str,
    augment: str,
) -> Reuse | None:
    """The choice of the bundle at ``previous_bundle`` when a retrain may refit it without a new selection.

    Only a choice made with the same preset and augmentation, on the same labels, with at most
    :data:`REUSE_MAX_CHANGED` of the images new, removed or relabelled since the snapshot of the
    last full selection: a linear one, or a partial fine-tune (alone or averaged with a linear
    head: one last layer either way) whose bundle kept its images' features
    (:data:`components.lib.refit.FEATURES_FILE`), or a partial fine-tune averaged with a
    distribution head whose bundle kept those and its tuned weights
    (:data:`components.lib.refit.TAIL_FILE`). Anything else (or anything missing) gives None:
    a full selection.
    """
    from components.lib.refit import FEATURES_FILE, TAIL_FILE

    if not previous_bundle:
        return None
    try:
        previous = BundleMeta.from_json(store.get(f"{previous_bundle}/bundle.json"))
        chosen = previous.selection
        kind = chosen.get("kind")
        kept = [FEATURES_FILE, TAIL_FILE] if kind == ENSEMBLE_DISTRIBUTION else [FEATURES_FILE]
        if kind == LINEAR:
            refittable = bool(previous.features)
        else:
            refittable = kind in (PARTIAL_FINETUNE, *ENSEMBLES) and all(
                store.exists(f"{previous_bundle}/{name}") for name in kept
            )
        if (
            not refittable
            or previous.draft_factor != DRAFT_FACTOR  # its features came from other decodings
            or chosen.get("quality") != quality
            or previous.training.get("augment") != augment
            or not previous.dataset_snapshot
            or [label["id"] for label in previous.labels] != [label.id for label in info.output_labels]
        ):
            return None
        # Changes add up over reuses: compare with the snapshot of the last full selection.
        selected_on = str(chosen.get("reused", {}).get("selected_on") or previous.dataset_snapshot)
        _, before = read_snapshot(store, selected_on)
    except (NotFoundError, KeyError, ValueError):
        logger.info("no model choice to reuse from %s", previous_bundle)
        return None
    now = {r.image_id: _row_key(r) for r in rows}
    then = {r.image_id: _row_key(r) for r in before}
    changed = sum(1 for image_id in now.keys() | then.keys() if now.get(image_id) != then.get(image_id))
    if changed > REUSE_MAX_CHANGED * max(len(rows), 1):
        return None
    return Reuse(
        str(chosen.get("chosen", "")),
        list(previous.features),
        previous.run_id,
        selected_on,
        changed,
        len(rows),
        kind=str(kind),
        bundle=previous_bundle,
    )


def narrowed(preset: QualityPreset, feature_ids: Sequence[str]) -> QualityPreset:
    """``preset`` with the one linear candidate ``feature_ids`` (its +hflip variant scored with it).

    Nothing else: a distribution head alone is not reused (a retrain after it is a full selection;
    averaged with a partial fine-tune it is refitted, ``components.lib.train``).
    """
    base = tuple(fid.removesuffix(features.HFLIP) for fid in feature_ids)
    flip = features.any_flipped(feature_ids)
    return replace(
        preset, linear=(base,), test_time_flip=flip, finetune=None, finetune_folds=0, distribution=False
    )
