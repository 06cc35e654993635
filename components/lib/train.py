"""Train step: a model over pretrained EfficientNet-Lite backbones.

Two modes:

* ``embed`` (CPU default): candidates chosen by the ``quality`` preset
  (:mod:`components.lib.selection`) are scored by k-fold cross-validation on
  the training split only: linear heads over frozen-backbone features
  (ONNX Runtime embeddings, cached per image hash in the blob store, so
  retraining only embeds new images) and, from ``balanced`` on, a partial
  fine-tune of the backbone's last block (:mod:`components.lib.partial_finetune`),
  alone and averaged with the linear head on the frozen embedding.
  The winner is refitted on the whole training split. Its out-of-fold scores
  set multi_label thresholds. Seconds to a few minutes. A retrain of barely
  changed data refits the previous version's choice instead (for a partial
  fine-tune: its last layer only, :mod:`components.lib.refit`): seconds; averaged
  with a distribution head (regression), that head too: about half a minute.
* ``finetune`` (default when a GPU is present): train the whole network end
  to end with SGD, augmentation and a cosine schedule.

Losses by task type: softmax cross-entropy (multi_class), sigmoid BCE with the
negative label meaning "no tag" (multi_label), regression on standardized
targets (ridge or Huber, chosen by cross-validation). Regression answers are
clipped to the training values' range plus a margin (``value_range``).

The output is a model folder: ``bundle.json`` (without metrics yet),
``head.onnx`` + ``head.npz`` (a frozen-backbone head) or ``model.onnx`` (a
whole network; a partial fine-tune adds ``tuned_features.npz``, what its last
layer reads for each image, and when averaged with a distribution head
``tuned_tail.npz``, its tuned weights), ``test_inputs.npz`` (the test split's image ids,
embeddings, last-layer features or preprocessed images, and targets) and, when
model selection scored the
training split, ``train_oof.npz`` (each training image's out-of-fold raw
outputs and targets) for the evaluate step.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from components.lib import distribution_head, heads, selection
from components.lib.embeddings import View, embed_views
from components.lib.split import SplitResult
from taskvision import backbone, features
from taskvision.bundle import (
    HEAD_ARRAYS_FILE,
    HEAD_FILE,
    MODEL_FILE,
    BundleMeta,
    linear_head_onnx,
    value_range,
)
from taskvision.dataset import DatasetInfo, ManifestRow
from taskvision.metrics import best_f1_thresholds
from taskvision.preprocess import DEFAULT, PreprocessConfig, draft_side
from taskvision.storage import BlobStore
from taskvision.task_types import TaskType

logger = logging.getLogger(__name__)

TEST_INPUTS_FILE = "test_inputs.npz"
TRAIN_OOF_FILE = "train_oof.npz"

Array = npt.NDArray[np.float32]
MODES = ("auto", "embed", "finetune")
AUGMENTATIONS = ("none", "flip")
QUALITIES = selection.QUALITIES


@dataclass(frozen=True)
class TrainConfig:
    """Hyperparameters. ``weight_decay=None`` lets cross-validation choose the head's penalty (embed mode)."""

    mode: str = "auto"
    quality: str = "balanced"  # embed mode: fast | balanced | best (components.lib.selection)
    augment: str = "flip"
    weight_decay: float | None = None
    epochs: int = 25  # finetune mode
    learning_rate: float = 0.001  # finetune mode (SGD, momentum 0.9)
    batch_size: int = 32
    cv_folds: int = 3
    seed: int = 0
    cache_embeddings: bool = True
    max_image_pixels: int = 80_000_000
    previous_bundle: str = ""  # the task's current version (blob prefix): its choice may be reused

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"Invalid training mode {self.mode!r}. Only {', '.join(MODES)} are supported.")
        if self.augment not in AUGMENTATIONS:
            raise ValueError(
                f"Invalid augmentation {self.augment!r}. Only {', '.join(AUGMENTATIONS)} are supported."
            )
        if self.quality not in QUALITIES:
            raise ValueError(f"Invalid quality {self.quality!r}. Only {', '.join(QUALITIES)} are supported.")
        if self.epochs < 1 or self.learning_rate <= 0 or self.batch_size < 1:
            raise ValueError("epochs and batch_size must be >= 1 and learning_rate > 0.")
        if self.cv_folds < 2:
            raise ValueError("cv_folds must be >= 2.")

    def resolved_mode(self) -> str:
        if self.mode != "auto":
            return self.mode
        import torch

        return "finetune" if torch.cuda.is_available() else "embed"


# ---- targets -------------------------------------------------------------------


def targets(info: DatasetInfo, rows: list[ManifestRow]) -> Array:
    """Class indices (multi_class), multi-hot rows (multi_label) or values (regression)."""
    outputs = [label.id for label in info.output_labels]
    index = {lid: i for i, lid in enumerate(outputs)}
    if info.task_type is TaskType.MULTI_CLASS:
        return np.asarray([index[row.labels[0]] for row in rows], dtype=np.float32)
    if info.task_type is TaskType.MULTI_LABEL:
        y = np.zeros((len(rows), len(outputs)), dtype=np.float32)
        for i, row in enumerate(rows):
            for lid in row.labels:
                if lid in index:  # the negative label has no column: all zeros means "no tag"
                    y[i, index[lid]] = 1.0
        return y
    return np.asarray([[row.values[lid] for lid in outputs] for row in rows], dtype=np.float32)


# ---- the step ------------------------------------------------------------------------


def preprocess_record(config: PreprocessConfig) -> dict[str, Any]:
    return {
        "resize_to": config.resize_to,
        "crop_pct": config.crop_pct,
        "mean": list(config.mean),
        "std": list(config.std),
        "interpolation": config.interpolation,
    }


def train_model(
    info: DatasetInfo,
    rows: list[ManifestRow],
    split: SplitResult,
    store: BlobStore,
    out_dir: Path,
    config: TrainConfig,
    *,
    snapshot: str = "",
    run_id: str = "",
    progress: Callable[[float, str], None] | None = None,
) -> BundleMeta:
    """Train on the split's training side and write the model folder to ``out_dir``."""
    report = progress or (lambda fraction, message: None)
    by_id = {row.image_id: row for row in rows}
    train_rows = [by_id[i] for i in split.train]
    test_rows = [by_id[i] for i in split.test]
    y_train, y_test = targets(info, train_rows), targets(info, test_rows)
    outputs = info.output_labels
    mode = config.resolved_mode()
    out_dir.mkdir(parents=True, exist_ok=True)

    meta = BundleMeta(
        task_id=info.task_id,
        task_type=info.task_type,
        labels=[{"id": label.id, "name": label.name} for label in outputs],
        backbone=backbone.BACKBONE_ID,
        frozen_backbone=mode == "embed",
        input_size=DEFAULT.input_size,
        preprocess=preprocess_record(DEFAULT),
        negative_label=next(({"id": lb.id, "name": lb.name} for lb in info.labels if lb.negative), None),
        dataset_snapshot=snapshot,
        training={
            **asdict(config),
            "mode": mode,
            "train_images": len(train_rows),
            "test_images": len(test_rows),
        },
        run_id=run_id,
        created=datetime.now(UTC).isoformat(),
    )
    if info.task_type is TaskType.REGRESSION:
        meta.target_mean = y_train.mean(axis=0).tolist()
        meta.target_std = (y_train.std(axis=0) + 1e-6).tolist()
        meta.value_range = value_range(y_train)

    if mode == "embed":
        reuse = selection.reusable_choice(
            store, config.previous_bundle, info, rows, quality=config.quality, augment=config.augment
        )
        if reuse is not None and reuse.kind in (selection.PARTIAL_FINETUNE, selection.ENSEMBLE):
            _refit_partial_finetune(
                info, train_rows, test_rows, y_train, y_test, store, out_dir, config, meta, report, reuse
            )
        elif reuse is not None and reuse.kind == selection.ENSEMBLE_DISTRIBUTION:
            _refit_with_distribution(
                info, train_rows, test_rows, y_train, y_test, store, out_dir, config, meta, report, reuse
            )
        else:
            _select_and_train(
                info,
                train_rows,
                test_rows,
                y_train,
                y_test,
                store,
                out_dir,
                config,
                meta,
                report,
                reuse=reuse,
            )
    else:
        from components.lib.finetune import finetune

        meta.features = []
        finetune(info, train_rows, test_rows, y_train, y_test, store, out_dir, config, meta, report)
    (out_dir / "bundle.json").write_text(meta.to_json())
    return meta


def _standardized(meta: BundleMeta, y: Array) -> Array:
    if meta.task_type is not TaskType.REGRESSION:
        return y
    return ((y - np.asarray(meta.target_mean)) / np.asarray(meta.target_std)).astype(np.float32)


def _select_and_train(
    info: DatasetInfo,
    train_rows: list[ManifestRow],
    test_rows: list[ManifestRow],
    y_train: Array,
    y_test: Array,
    store: BlobStore,
    out_dir: Path,
    config: TrainConfig,
    meta: BundleMeta,
    report: Callable[[float, str], None],
    *,
    reuse: selection.Reuse | None = None,
) -> None:
    """Embed, score the preset's candidates by cross-validation, refit the winner, write the model folder.

    With ``reuse``, the previous version's choice is the only candidate (its head still cross-validated).
    """
    started = time.perf_counter()
    preset = selection.preset(config.quality)
    if reuse is not None:
        logger.info(
            "%d of %d images changed since run %s: refitting its choice %s",
            reuse.changed_images,
            reuse.images,
            reuse.run_id,
            reuse.chosen,
        )
        preset = selection.narrowed(preset, reuse.features)
    task_type = info.task_type
    n_outputs = len(meta.labels)
    y_fit = _standardized(meta, y_train)
    # A regression score in the targets' units (years, not standard deviations) for the report.
    scale = float(np.mean(meta.target_std)) if task_type is TaskType.REGRESSION else 1.0
    flip = config.augment == "flip"
    fold_groups = heads.folds(len(train_rows), max(2, min(config.cv_folds, len(train_rows))), config.seed)
    grid = heads.default_grid(task_type, fixed_penalty=config.weight_decay)

    # 1. Activations for the partial fine-tune (its backbone's embeddings come with them) and embeddings.
    plan = preset.finetune
    maps = None
    known: dict[View, Array] = {}
    if plan is not None:
        from components.lib.partial_finetune import compute_activations

        report(0.0, "computing activations for fine-tuning")
        maps, known = compute_activations(
            store,
            train_rows,
            plan,
            seed=config.seed,
            use_cache=config.cache_embeddings,
            max_pixels=config.max_image_pixels,
            progress=lambda k: report(
                0.35 * k / max(len(train_rows), 1), f"preparing images ({k}/{len(train_rows)})"
            ),
        )
    linear_ids = [list(ids) for ids in preset.linear]
    need_mirror = flip or preset.test_time_flip
    views: list[View] = list(
        dict.fromkeys(
            (b, m)
            for ids in linear_ids
            for b in features.backbones_needed(ids)
            for m in ((False, True) if need_mirror else (False,))
        )
    )
    offset = 0.35 if plan is not None else 0.0
    vectors = embed_views(
        store,
        train_rows,
        views,
        use_cache=config.cache_embeddings,
        max_pixels=config.max_image_pixels,
        known=known,
        progress=lambda k: report(
            offset + (0.6 - offset) * k / max(len(train_rows), 1), f"embedding images ({k}/{len(train_rows)})"
        ),
    )

    # 2. Cross-validation of every candidate, on the training split only.
    report(0.6, "choosing a model by cross-validation")
    deadline = started + preset.budget_s
    scored_rows = np.arange(len(train_rows))
    scored_folds = fold_groups
    if plan is not None and preset.finetune_folds < len(fold_groups):
        # The fine-tune is checked on the first folds only: every candidate is scored on those rows.
        scored_folds = fold_groups[: preset.finetune_folds]
        scored_rows = np.sort(np.concatenate(scored_folds))
    candidates: list[selection.CandidateScore] = []
    skipped: list[str] = []
    for ids in linear_ids:
        if time.perf_counter() > deadline and candidates:
            skipped.append(selection.short_name(ids))
            continue
        centre = features.assemble(vectors, ids)
        mirrored = (
            features.assemble({(b, False): vectors[(b, True)] for b in features.backbones_needed(ids)}, ids)
            if need_mirror
            else None
        )
        candidates += selection.score_linear(
            task_type,
            y_fit,
            scale,
            ids,
            centre,
            mirrored,
            fold_groups,
            grid,
            n_outputs=n_outputs,
            augment_with_mirror=flip,
            test_time_flip=preset.test_time_flip,
            scored_rows=scored_rows,
        )
    distributions: list[selection.CandidateScore] = []
    if preset.distribution and task_type is TaskType.REGRESSION and linear_ids:
        if time.perf_counter() > deadline and candidates:
            skipped.append(distribution_head.NAME)
        else:
            distributions, _ = _score_distribution(
                linear_ids[0],
                vectors,
                y_fit,
                scored_folds,
                scored_rows,
                flip=flip,
                test_time_flip=need_mirror,
                scale=scale,
                seed=config.seed,
            )
            candidates += distributions
    if plan is not None and maps is not None:
        if time.perf_counter() > deadline and candidates:
            skipped.append(plan.name)
        else:
            tuned_candidate = _score_partial_finetune(
                plan,
                maps,
                known,
                y_fit,
                task_type,
                _start_setting(task_type, candidates, plan.backbone_id),
                fold_groups[: preset.finetune_folds],
                scored_rows,
                n_outputs=n_outputs,
                scale=scale,
                seed=config.seed,
                report=report,
                mirrored=any(features.any_flipped(c.features) for c in distributions),
            )
            candidates.append(tuned_candidate)
            own = _own_linear(candidates, plan.backbone_id)
            for partner in ([own] if own is not None else []) + _own_distributions(distributions, plan):
                averaged = selection.ensemble(tuned_candidate, partner, task_type, y_fit, scale)
                if averaged is not None:
                    candidates.append(averaged)
    chosen = selection.choose(candidates, task_type=task_type, y=y_fit, seed=config.seed)
    logger.info("chose %s (cross-validated score %.4f)", chosen.name, chosen.cv_score)
    meta.selection = selection.selection_report(
        preset,
        chosen,
        candidates,
        metric=selection.metric_name(task_type),
        folds=len(fold_groups),
        scored_rows=len(scored_rows),
        skipped=skipped,
        seconds=time.perf_counter() - started,
    )
    if reuse is not None:
        meta.selection["reused"] = reuse.report()
    _keep_out_of_fold(chosen, train_rows, y_train, out_dir, meta)

    # 3. The winner, refitted on the whole training split.
    report(0.85, f"training {chosen.name}")
    if chosen.kind in (selection.LINEAR, selection.DISTRIBUTION):
        meta.features = list(chosen.features)
        base_ids = [f.removesuffix(features.HFLIP) for f in chosen.features]
        x_fit, y_all = _frozen_training_set(vectors, base_ids, y_fit, flip=flip)
        if chosen.kind == selection.LINEAR:
            assert chosen.setting is not None
            w, b = heads.fit_head(x_fit, y_all, task_type, chosen.setting, n_outputs=n_outputs)
            meta.training["head"] = chosen.setting.name
            meta.training["weight_decay"] = chosen.setting.penalty
            (out_dir / HEAD_FILE).write_bytes(linear_head_onnx(w, b))
            np.savez(out_dir / HEAD_ARRAYS_FILE, weight=w, bias=b)
        else:  # not one linear layer: no head.npz, so serving runs head.onnx in its own session
            distribution_head.fit(x_fit, y_all, seed=config.seed).export(out_dir / HEAD_FILE)
            meta.training["head"] = distribution_head.NAME
        report(0.9, "embedding the test images")
        test_views = features.views_needed(chosen.features)
        test_vectors = embed_views(
            store,
            test_rows,
            test_views,
            use_cache=config.cache_embeddings,
            max_pixels=config.max_image_pixels,
        )
        np.savez(
            out_dir / TEST_INPUTS_FILE,
            image_ids=np.asarray([row.image_id for row in test_rows]),
            embeddings=features.assemble(test_vectors, chosen.features)
            if test_rows
            else np.zeros((0, features.feature_dim(chosen.features)), dtype=np.float32),
            targets=y_test,
        )
    else:
        assert plan is not None and maps is not None
        assert chosen.setting is not None
        _train_partial_finetune(
            plan,
            maps,
            known,
            y_fit,
            task_type,
            chosen.setting,
            train_rows,
            test_rows,
            y_test,
            store,
            out_dir,
            config,
            meta,
            n_outputs=n_outputs,
            report=report,
            partner=chosen.kind,
            flip=flip,
            test_time_flip=features.any_flipped(chosen.features),
        )


def _frozen_training_set(
    vectors: dict[View, Array], feature_ids: list[str], y: Array, *, flip: bool
) -> tuple[Array, Array]:
    """A frozen-feature head's training rows: centre crops' features, with ``flip`` mirror images' too."""
    centre = features.assemble(vectors, feature_ids)
    if not flip:
        return centre, y
    mirrored = features.assemble(
        {(b, False): vectors[(b, True)] for b in features.backbones_needed(feature_ids)}, feature_ids
    )
    return np.concatenate([centre, mirrored]), np.concatenate([y, y])


def _score_distribution(
    feature_ids: list[str],
    vectors: dict[View, Array],
    y: Array,
    fold_groups: Sequence[npt.NDArray[np.int64]],
    scored_rows: npt.NDArray[np.int64],
    *,
    flip: bool,
    test_time_flip: bool,
    scale: float,
    seed: int,
    final: tuple[Array, Array] | None = None,
) -> tuple[list[selection.CandidateScore], distribution_head.DistributionHead | None]:
    """A distribution head over ``feature_ids``, fitted without each of ``fold_groups`` in turn
    (side by side, :func:`distribution_head.fit_many`); with ``final`` (training rows and targets),
    also the head fitted on those, alongside.

    With ``test_time_flip`` (the mirror images' vectors are at hand) the same fitted heads are
    also scored on each held-out image's centre and mirror vectors averaged (``+hflip``
    features): a second candidate at no extra training, which serving pays for with a second
    backbone run. On the ``ages`` faces it was 0.1-0.3 years better (README, "Quality presets").
    """
    started = time.perf_counter()
    variants = [list(feature_ids)]
    if test_time_flip:
        variants.append([features.feature_spec(f + features.HFLIP).id for f in feature_ids])
    inputs = [features.assemble(vectors, ids) for ids in variants]
    oofs = [np.zeros(y.shape, dtype=np.float32) for _ in variants]
    jobs = []
    for fold in fold_groups:
        rest = np.setdiff1d(np.arange(len(y)), fold)
        jobs.append(
            _frozen_training_set(
                {view: rows[rest] for view, rows in vectors.items()}, feature_ids, y[rest], flip=flip
            )
        )
    fitted = distribution_head.fit_many([*jobs, *([final] if final is not None else [])], seed=seed)
    for fold, head in zip(fold_groups, fitted, strict=False):
        for x, oof in zip(inputs, oofs, strict=True):
            oof[fold] = head.predict(x[fold])
    seconds = time.perf_counter() - started
    results = []
    for ids, oof in zip(variants, oofs, strict=True):
        value = heads.score(TaskType.REGRESSION, y[scored_rows], oof[scored_rows]) * scale
        name = f"{selection.short_name(ids)}, {distribution_head.NAME}"
        logger.info("candidate %s: cross-validated score %.4f", name, value)
        results.append(
            selection.CandidateScore(
                name=name,
                kind=selection.DISTRIBUTION,
                cv_score=value,
                serving_cost=selection.serving_cost(ids) + selection.DISTRIBUTION_COST,
                seconds=seconds / len(variants),
                features=ids,
                head=distribution_head.NAME,
                oof=oof[scored_rows],
                oof_rows=scored_rows,
            )
        )
    return results, fitted[-1] if final is not None else None


def _own_linear(
    candidates: list[selection.CandidateScore], backbone_id: str
) -> selection.CandidateScore | None:
    """The linear candidate over the backbone's own multi-scale embedding (what an ensemble averages in)."""
    own = [features.feature_id(backbone_id)]
    return next(
        (c for c in candidates if c.kind == selection.LINEAR and c.features == own and c.oof is not None),
        None,
    )


def _own_distributions(
    distributions: list[selection.CandidateScore], plan: Any
) -> list[selection.CandidateScore]:
    """The distribution heads over the fine-tuned backbone's own multi-scale embedding (the centre
    crop's, and with the mirror image's averaged in): what :data:`selection.ENSEMBLE_DISTRIBUTION`
    averages in."""
    own = features.feature_id(plan.backbone_id)
    return [c for c in distributions if c.features in ([own], [own + features.HFLIP]) and c.oof is not None]


def _keep_out_of_fold(
    chosen: selection.CandidateScore,
    train_rows: list[ManifestRow],
    y_train: Array,
    out_dir: Path,
    meta: BundleMeta,
) -> None:
    """The chosen candidate's out-of-fold outputs: multi_label thresholds, and ``train_oof.npz``."""
    if chosen.oof is None or chosen.oof_rows is None:
        return
    if meta.task_type is TaskType.MULTI_LABEL:
        # Thresholds from out-of-fold scores on the training split: never from the test split.
        probs = 1.0 / (1.0 + np.exp(-chosen.oof))
        meta.thresholds = best_f1_thresholds(y_train[chosen.oof_rows].astype(np.int64), probs)
    # Each training image as answered by a model that did not see it: the evaluate step's
    # per-image predictions of the training split (likely label errors).
    np.savez(
        out_dir / TRAIN_OOF_FILE,
        image_ids=np.asarray([train_rows[i].image_id for i in chosen.oof_rows]),
        logits=chosen.oof,
        targets=y_train[chosen.oof_rows],
    )


def start_head(
    known: dict[View, Array],
    backbone_id: str,
    rows: npt.NDArray[np.int64],
    y: Array,
    task_type: TaskType,
    setting: heads.HeadSetting,
    n_outputs: int,
) -> tuple[tuple[Array, Array], Array]:
    """The linear head on the frozen final features (centre + mirror) to start fine-tuning from, and those."""
    final = slice(0, backbone.FINAL_DIM)
    x = np.concatenate([known[(backbone_id, False)][rows, final], known[(backbone_id, True)][rows, final]])
    from components.lib.partial_finetune import STD_FLOOR

    start = heads.fit_head(
        x, np.concatenate([y[rows], y[rows]]), task_type, setting, n_outputs=n_outputs, std_floor=STD_FLOOR
    )
    return start, x


def _start_setting(
    task_type: TaskType, candidates: list[selection.CandidateScore], backbone_id: str
) -> heads.HeadSetting:
    """The head setting chosen for the backbone's own linear candidate (a default without one)."""
    own = [features.feature_id(backbone_id)]
    for candidate in candidates:
        if candidate.kind == selection.LINEAR and candidate.features == own and candidate.setting is not None:
            return candidate.setting
    if task_type is TaskType.REGRESSION:
        return heads.HeadSetting(heads.RIDGE, 1.0)
    return heads.HeadSetting(heads.LOGISTIC, 0.1)


def _score_partial_finetune(
    plan: Any,
    data: Any,
    known: dict[View, Array],
    y: Array,
    task_type: TaskType,
    setting: heads.HeadSetting,
    fold_groups: list[npt.NDArray[np.int64]],
    scored_rows: npt.NDArray[np.int64],
    *,
    n_outputs: int,
    scale: float,
    seed: int,
    report: Callable[[float, str], None],
    mirrored: bool = False,
) -> selection.CandidateScore:
    """The fine-tune trained without each of ``fold_groups`` in turn; with ``mirrored`` its answers
    of the held-out mirror images are kept too (``oof_mirror``, for a flipped average)."""
    from components.lib.partial_finetune import train_tail

    started = time.perf_counter()
    pretrained = backbone.build_torch_model(num_classes=0, backbone_id=plan.backbone_id)
    oof = np.zeros((len(y), n_outputs), dtype=np.float32)
    oof_mirror = np.zeros_like(oof) if mirrored else None
    for index, fold in enumerate(fold_groups):
        report(
            0.6 + 0.25 * index / len(fold_groups),
            f"cross-validating {plan.name} (fold {index + 1}/{len(fold_groups)})",
        )
        held = np.zeros(len(y), dtype=bool)
        held[fold] = True
        rest = np.flatnonzero(~held)
        start, frozen = start_head(known, plan.backbone_id, rest, y, task_type, setting, n_outputs)
        tuned = train_tail(pretrained, data.subset(rest), start, frozen, y[rest], task_type, plan, seed=seed)
        oof[fold] = tuned.logits(data.subset(fold))
        if oof_mirror is not None:
            oof_mirror[fold] = tuned.logits(data.subset(fold), view=1)
    value = heads.score(task_type, y[scored_rows], oof[scored_rows]) * scale
    logger.info("candidate %s: cross-validated score %.4f", plan.name, value)
    return selection.CandidateScore(
        name=plan.name,
        kind=selection.PARTIAL_FINETUNE,
        cv_score=value,
        serving_cost=selection.BACKBONE_COST[plan.backbone_id],
        seconds=time.perf_counter() - started,
        plan=plan.describe(),
        oof=oof[scored_rows],
        oof_rows=scored_rows,
        setting=setting,
        oof_mirror=oof_mirror[scored_rows] if oof_mirror is not None else None,
    )


def _train_partial_finetune(
    plan: Any,
    data: Any,
    known: dict[View, Array],
    y: Array,
    task_type: TaskType,
    setting: heads.HeadSetting,
    train_rows: list[ManifestRow],
    test_rows: list[ManifestRow],
    y_test: Array,
    store: BlobStore,
    out_dir: Path,
    config: TrainConfig,
    meta: BundleMeta,
    *,
    n_outputs: int,
    report: Callable[[float, str], None],
    partner: str = selection.PARTIAL_FINETUNE,
    flip: bool = True,
    test_time_flip: bool = False,
) -> None:
    """Fine-tune on every training row and export the network, alone or (``partner``, the chosen
    candidate's kind) averaged with a linear or distribution head on the frozen embedding.

    A network that ends in one linear layer keeps that layer's features of every image (what a
    retrain refits, and the evaluate step's test inputs); the one averaged with a distribution
    head (``test_time_flip``: each member on the image and its mirror image) keeps its test
    images' outputs."""
    import onnx

    from components.lib import refit
    from components.lib.partial_finetune import train_tail

    spec = backbone.backbone_spec(plan.backbone_id)
    pretrained = backbone.build_torch_model(num_classes=0, backbone_id=plan.backbone_id)
    start, frozen = start_head(known, plan.backbone_id, np.arange(len(y)), y, task_type, setting, n_outputs)
    tuned = train_tail(
        pretrained,
        data,
        start,
        frozen,
        y,
        task_type,
        plan,
        seed=config.seed,
        report=lambda epoch: report(0.85 + 0.1 * epoch / plan.epochs, f"fine-tuning ({epoch}/{plan.epochs})"),
    )
    centre = known[(plan.backbone_id, False)]
    x_fit, y_all = centre, y
    if flip:
        x_fit = np.concatenate([centre, known[(plan.backbone_id, True)]])
        y_all = np.concatenate([y, y])
    ensemble = partner == selection.ENSEMBLE
    if partner == selection.ENSEMBLE_DISTRIBUTION:
        report(0.95, "training the distribution head")
        tuned.export_with_distribution(
            out_dir / MODEL_FILE,
            pretrained,
            distribution_head.fit(x_fit, y_all, seed=config.seed),
            tap_block=plan.tap_block,
            input_size=spec.preprocess.input_size,
            test_time_flip=test_time_flip,
        )
        own = features.feature_id(plan.backbone_id)
        meta.training["ensemble_distribution"] = {
            "features": [own + features.HFLIP if test_time_flip else own],
            "head": distribution_head.NAME,
            "test_time_flip": test_time_flip,
        }
    elif ensemble:
        linear = heads.fit_head(x_fit, y_all, task_type, setting, n_outputs=n_outputs)
        frozen_mean, frozen_std = tuned.export_ensemble(
            out_dir / MODEL_FILE,
            pretrained,
            linear,
            x_fit,
            tap_block=plan.tap_block,
            input_size=spec.preprocess.input_size,
        )
        meta.training["ensemble_linear"] = {"features": [features.feature_id(plan.backbone_id)]}
    else:
        tuned.export(out_dir / MODEL_FILE, input_size=spec.preprocess.input_size)
    meta.frozen_backbone = False
    meta.features = []
    meta.backbone = spec.id
    meta.input_size = spec.preprocess.input_size
    meta.preprocess = preprocess_record(spec.preprocess)
    meta.training["partial_finetune"] = plan.describe()
    meta.training["head"] = setting.name
    test_arrays = _test_arrays(store, test_rows, spec.preprocess, config)
    kept = refit.TunedFeatures.empty()
    train_features = [tuned.features(data, view=view) for view in (0, 1)]
    if partner == selection.ENSEMBLE_DISTRIBUTION:
        _save_test_outputs(out_dir, test_rows, test_arrays, y_test)
        # What a retrain of barely changed data refits from: the tuned layer's features of the
        # training images and the tuned weights (_refit_with_distribution).
        kept.add([row.sha256 for row in train_rows], *train_features, exact=False)
        kept.write(out_dir / refit.FEATURES_FILE)
        tuned.save(out_dir / refit.TAIL_FILE)
        return
    # What the last layer reads, for every image: the evaluate step's test inputs, and what a
    # retrain of barely changed data refits that layer on (components.lib.refit).
    network = onnx.load(str(out_dir / MODEL_FILE))
    test_features = refit.run_features(refit.features_session(network), test_arrays)
    if ensemble:
        # The averaged network's last layer also reads the standardized frozen embedding.
        train_features = [
            np.concatenate(
                [part, (known[(plan.backbone_id, view == 1)] - frozen_mean) / frozen_std], axis=1
            ).astype(np.float32)
            for view, part in enumerate(train_features)
        ]
    kept.add([row.sha256 for row in train_rows], *train_features, exact=False)
    kept.add([row.sha256 for row in test_rows], test_features, exact=True)
    kept.write(out_dir / refit.FEATURES_FILE)
    np.savez(
        out_dir / TEST_INPUTS_FILE,
        image_ids=np.asarray([row.image_id for row in test_rows]),
        features=test_features,
        targets=y_test,
    )


def _test_arrays(
    store: BlobStore, test_rows: list[ManifestRow], preprocess: PreprocessConfig, config: TrainConfig
) -> Array:
    """The test images, preprocessed for a whole network: (N, 3, size, size)."""
    from components.lib.embeddings import decode_row
    from taskvision.preprocess import resize_and_crop, to_array

    size = preprocess.input_size
    arrays = np.zeros((len(test_rows), 3, size, size), dtype=np.float32)
    for i, row in enumerate(test_rows):
        image = decode_row(
            store, row, max_pixels=config.max_image_pixels, min_side=draft_side(preprocess.resize_to)
        )
        arrays[i] = to_array(resize_and_crop(image, preprocess), preprocess)
    return arrays


def _save_test_outputs(
    out_dir: Path, test_rows: list[ManifestRow], test_arrays: Array, y_test: Array
) -> None:
    """The exported network's own outputs of the test images: the evaluate step's test inputs for a
    network that does not end in one linear layer."""
    from components.lib import refit

    np.savez(
        out_dir / TEST_INPUTS_FILE,
        image_ids=np.asarray([row.image_id for row in test_rows]),
        logits=refit.run_batches(backbone.onnx_session(out_dir / MODEL_FILE), test_arrays, output=0),
        targets=y_test,
    )


def _tuned_layer_cv(
    x: Array,
    x_mirror: Array | None,
    y_fit: Array,
    task_type: TaskType,
    fold_groups: Sequence[npt.NDArray[np.int64]],
    config: TrainConfig,
    n_outputs: int,
) -> heads.CrossValidation:
    """A refit's last-layer settings cross-validated on the kept features (with ``augment=flip``
    the mirror images join each training side).

    Standardized with spreads floored at the median one, as the fine-tune's own head was: a tuned
    feature (nearly) constant on the training images would otherwise get a weight of up to 1e6
    on raw features, and the training features (from float16 activations) differ from the
    network's own by ~0.01, so a new image's answer flipped to the wrong label at 100 %.
    """
    from components.lib.partial_finetune import STD_FLOOR

    return heads.cross_validate(
        x,
        y_fit,
        task_type,
        heads.default_grid(task_type, fixed_penalty=config.weight_decay),
        fold_groups,
        n_outputs=n_outputs,
        x_mirror=x_mirror,
        augment_with_mirror=config.augment == "flip",
        std_floor=STD_FLOOR,
    )


def _fit_tuned_layer(
    x: Array,
    x_mirror: Array | None,
    y_fit: Array,
    task_type: TaskType,
    setting: heads.HeadSetting,
    n_outputs: int,
    *,
    flip: bool,
) -> tuple[Array, Array]:
    """A refit's last layer ``(W, b)`` on every training image (with ``flip``, their mirror images too)."""
    from components.lib.partial_finetune import STD_FLOOR

    x_fit, y_all = (x, y_fit)
    if flip and x_mirror is not None:
        x_fit, y_all = np.concatenate([x, x_mirror]), np.concatenate([y_fit, y_fit])
    return heads.fit_head(x_fit, y_all, task_type, setting, n_outputs=n_outputs, std_floor=STD_FLOOR)


def _record_refit(
    meta: BundleMeta,
    previous: BundleMeta,
    chosen: selection.CandidateScore,
    reuse: selection.Reuse,
    new_images: int,
    folds: int,
    train_rows: list[ManifestRow],
    y_train: Array,
    out_dir: Path,
    config: TrainConfig,
    started: float,
) -> None:
    """What a refit of a tuned network records: the previous version's network, the refitted
    layer's setting, the selection report of its one candidate, and its out-of-fold answers."""
    assert chosen.setting is not None
    meta.frozen_backbone = False
    meta.features = []
    meta.backbone = previous.backbone
    meta.input_size = previous.input_size
    meta.preprocess = previous.preprocess
    meta.training["partial_finetune"] = chosen.plan
    meta.training["head"] = chosen.setting.name
    meta.training["refit"] = {"from_run": reuse.run_id, "new_images": new_images}
    meta.selection = selection.selection_report(
        selection.preset(config.quality),
        chosen,
        [chosen],
        metric=selection.metric_name(meta.task_type),
        folds=folds,
        scored_rows=len(train_rows),
        skipped=[],
        seconds=time.perf_counter() - started,
    )
    meta.selection["reused"] = reuse.report()
    _keep_out_of_fold(chosen, train_rows, y_train, out_dir, meta)


def _refit_partial_finetune(
    info: DatasetInfo,
    train_rows: list[ManifestRow],
    test_rows: list[ManifestRow],
    y_train: Array,
    y_test: Array,
    store: BlobStore,
    out_dir: Path,
    config: TrainConfig,
    meta: BundleMeta,
    report: Callable[[float, str], None],
    reuse: selection.Reuse,
) -> None:
    """The previous version's tuned network with its last layer refitted (components.lib.refit)."""
    import functools

    import onnx

    from components.lib import refit

    started = time.perf_counter()
    logger.info(
        "%d of %d images changed since run %s: refitting the last layer of its %s",
        reuse.changed_images,
        reuse.images,
        reuse.run_id,
        reuse.chosen,
    )
    previous = BundleMeta.from_json(store.get(f"{reuse.bundle}/bundle.json"))
    serialized = store.get(f"{reuse.bundle}/{MODEL_FILE}")
    network = onnx.load_from_string(serialized)
    kept = refit.TunedFeatures.from_bytes(store.get(f"{reuse.bundle}/{refit.FEATURES_FILE}"))
    flip = config.augment == "flip"
    session = functools.cache(lambda: refit.features_session(network))
    report(0.1, "computing the features of new images")
    # Test images' features must be the network's own: the metrics are computed from them.
    new = kept.complete(
        store,
        train_rows,
        session,
        previous.backbone,
        with_mirror=flip,
        exact=False,
        max_pixels=config.max_image_pixels,
    )
    new += kept.complete(
        store,
        test_rows,
        session,
        previous.backbone,
        with_mirror=False,
        exact=True,
        max_pixels=config.max_image_pixels,
    )

    report(0.5, "choosing the last layer's penalty by cross-validation")
    task_type = info.task_type
    n_outputs = len(meta.labels)
    y_fit = _standardized(meta, y_train)
    scale = float(np.mean(meta.target_std)) if task_type is TaskType.REGRESSION else 1.0
    x = kept.matrix(train_rows)
    x_mirror = kept.matrix(train_rows, mirrored=True) if flip else None
    fold_groups = heads.folds(len(train_rows), max(2, min(config.cv_folds, len(train_rows))), config.seed)
    cv = _tuned_layer_cv(x, x_mirror, y_fit, task_type, fold_groups, config, n_outputs)
    scores = [heads.score(task_type, y_fit, oof) * scale for oof in cv.oof]
    best = int(np.argmax(scores))
    setting = cv.settings[best]
    chosen = selection.CandidateScore(
        name=reuse.chosen,
        kind=reuse.kind,  # an averaged network's one last layer is refitted over both feature sets
        cv_score=scores[best],
        serving_cost=selection.BACKBONE_COST[previous.backbone]
        + (selection.ENSEMBLE_COST if reuse.kind == selection.ENSEMBLE else 0.0),
        seconds=time.perf_counter() - started,
        plan=dict(previous.training.get("partial_finetune", {})),
        head=setting.name,
        oof=cv.oof[best],
        oof_rows=np.arange(len(train_rows)),
        setting=setting,
    )

    report(0.8, "refitting the last layer")
    w, b = _fit_tuned_layer(x, x_mirror, y_fit, task_type, setting, n_outputs, flip=flip)
    (out_dir / MODEL_FILE).write_bytes(refit.with_layer(network, serialized, w, b))
    kept.keep_only(row.sha256 for row in [*train_rows, *test_rows])  # not the removed images'
    kept.write(out_dir / refit.FEATURES_FILE)
    _record_refit(
        meta, previous, chosen, reuse, new, len(fold_groups), train_rows, y_train, out_dir, config, started
    )
    np.savez(
        out_dir / TEST_INPUTS_FILE,
        image_ids=np.asarray([row.image_id for row in test_rows]),
        features=kept.matrix(test_rows) if test_rows else np.zeros((0, x.shape[1]), dtype=np.float32),
        targets=y_test,
    )
    logger.info(
        "refitted %s on %d images (%d new) in %.2f s",
        reuse.chosen,
        len(train_rows),
        new,
        time.perf_counter() - started,
    )


def _refit_with_distribution(
    info: DatasetInfo,
    train_rows: list[ManifestRow],
    test_rows: list[ManifestRow],
    y_train: Array,
    y_test: Array,
    store: BlobStore,
    out_dir: Path,
    config: TrainConfig,
    meta: BundleMeta,
    report: Callable[[float, str], None],
    reuse: selection.Reuse,
) -> None:
    """The previous version's tuned blocks with both members of the average refitted: the tuned
    layer (its penalty chosen by the average's cross-validated score) and the distribution head,
    on every training image; the network is then exported again (components.lib.refit)."""
    from dataclasses import replace

    from components.lib import refit
    from components.lib.partial_finetune import PartialFinetunePlan, compute_activations, load_tail

    started = time.perf_counter()
    logger.info(
        "%d of %d images changed since run %s: refitting both members of its %s",
        reuse.changed_images,
        reuse.images,
        reuse.run_id,
        reuse.chosen,
    )
    previous = BundleMeta.from_json(store.get(f"{reuse.bundle}/bundle.json"))
    plan = PartialFinetunePlan(**previous.training["partial_finetune"])
    averaged = dict(previous.training["ensemble_distribution"])
    test_time_flip = bool(averaged["test_time_flip"])
    spec = backbone.backbone_spec(plan.backbone_id)
    flip = config.augment == "flip"
    pretrained = backbone.build_torch_model(num_classes=0, backbone_id=plan.backbone_id)
    tuned = load_tail(pretrained, plan, store.get(f"{reuse.bundle}/{refit.TAIL_FILE}"))
    kept = refit.TunedFeatures.from_bytes(store.get(f"{reuse.bundle}/{refit.FEATURES_FILE}"))

    report(0.1, "computing the features of new images")
    # The tuned layer's features of images the previous version did not train on, made as the
    # fine-tune's own were: from the activations entering the tuned blocks (centre, mirror image).
    new = list(
        {
            r.sha256: r for r in train_rows if r.sha256 not in kept.centre or r.sha256 not in kept.mirrored
        }.values()
    )
    if new:
        data, _ = compute_activations(
            store,
            new,
            replace(plan, extra_views=0),
            seed=config.seed,
            use_cache=config.cache_embeddings,
            max_pixels=config.max_image_pixels,
        )
        kept.add([r.sha256 for r in new], *(tuned.features(data, view=v) for v in (0, 1)), exact=False)
    own = [features.feature_id(plan.backbone_id)]
    vectors = embed_views(
        store,
        train_rows,
        [(plan.backbone_id, False), (plan.backbone_id, True)],
        use_cache=config.cache_embeddings,
        max_pixels=config.max_image_pixels,
    )

    task_type = info.task_type
    n_outputs = len(meta.labels)
    y_fit = _standardized(meta, y_train)
    scale = float(np.mean(meta.target_std))
    every = np.arange(len(train_rows))
    fold_groups = heads.folds(len(train_rows), max(2, min(config.cv_folds, len(train_rows))), config.seed)
    report(0.3, "training the distribution head (and cross-validating it)")
    distributions, refitted = _score_distribution(
        own,
        vectors,
        y_fit,
        fold_groups,
        every,
        flip=flip,
        test_time_flip=test_time_flip,
        scale=scale,
        seed=config.seed,
        final=_frozen_training_set(vectors, own, y_fit, flip=flip),
    )
    distribution = distributions[-1 if test_time_flip else 0]
    assert distribution.oof is not None and refitted is not None

    report(0.6, "choosing the tuned layer's penalty by cross-validation")
    x, x_mirror = kept.matrix(train_rows), kept.matrix(train_rows, mirrored=True)
    cv = _tuned_layer_cv(x, x_mirror, y_fit, task_type, fold_groups, config, n_outputs)
    assert cv.oof_mirror is not None
    averages = [
        ((0.5 * (oof + mirrored) if test_time_flip else oof) + distribution.oof) * np.float32(0.5)
        for oof, mirrored in zip(cv.oof, cv.oof_mirror, strict=True)
    ]
    scores = [heads.score(task_type, y_fit, average) * scale for average in averages]
    best = int(np.argmax(scores))
    setting = cv.settings[best]
    chosen = selection.CandidateScore(
        name=reuse.chosen,
        kind=selection.ENSEMBLE_DISTRIBUTION,
        cv_score=scores[best],
        serving_cost=(selection.BACKBONE_COST[plan.backbone_id] + selection.ENSEMBLE_COST)
        * (2 if test_time_flip else 1)
        + selection.DISTRIBUTION_COST,
        seconds=time.perf_counter() - started,
        features=list(averaged["features"]),
        head=distribution_head.NAME,
        plan=plan.describe(),
        oof=averages[best].astype(np.float32),
        oof_rows=every,
        setting=setting,
    )

    report(0.8, "refitting the tuned layer")
    tuned.replace_head(*_fit_tuned_layer(x, x_mirror, y_fit, task_type, setting, n_outputs, flip=flip))
    tuned.export_with_distribution(
        out_dir / MODEL_FILE,
        pretrained,
        refitted,
        tap_block=plan.tap_block,
        input_size=spec.preprocess.input_size,
        test_time_flip=test_time_flip,
    )
    kept.keep_only(row.sha256 for row in [*train_rows, *test_rows])  # not the removed images'
    kept.write(out_dir / refit.FEATURES_FILE)
    tuned.save(out_dir / refit.TAIL_FILE)
    meta.training["ensemble_distribution"] = averaged
    _record_refit(
        meta,
        previous,
        chosen,
        reuse,
        len(new),
        len(fold_groups),
        train_rows,
        y_train,
        out_dir,
        config,
        started,
    )
    report(0.95, "answering the test images")
    _save_test_outputs(out_dir, test_rows, _test_arrays(store, test_rows, spec.preprocess, config), y_test)
    logger.info(
        "refitted %s on %d images (%d new) in %.2f s",
        reuse.chosen,
        len(train_rows),
        len(new),
        time.perf_counter() - started,
    )
