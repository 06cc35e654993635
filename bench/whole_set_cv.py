"""Whole-set cross-validation of ``balanced``'s classification models, and how hard the test split is.

``bench/train.py`` judges a quality preset on one test split (the service's
80/20 split: 120 of the 600 flowers). One image there is 0.83 points of
accuracy, and one fine-tune's random start moves the result by a point or
two, so one run on that split cannot tell close models apart. This script
measures the same models two ways, with the service's own code and settings
(no HTTP service):

* the images of ``../shared/datasets/<name>/`` (a ``multi_class`` set: flowers or
  satellite) are put in a temporary local blob store, as an upload would;
* :func:`components.lib.partial_finetune.compute_activations` with the preset's
  fine-tune plan (``--quality``, default ``balanced``) gives every image's
  activations (centre crop, mirror image, augmented views) and its frozen Lite0
  multi-scale embedding, through the same ONNX network as the train step;
* models are trained as the train step trains them on its training split: the
  linear head's penalty chosen by 3-fold cross-validation (trained on the image
  and its mirror image, ``augment=flip``), the linear head fitted, and the
  partial fine-tune trained from the linear head on the final features
  (:func:`components.lib.partial_finetune.train_tail`); their answers and their
  average (``partial_finetune+linear``);
* ``--partners lite1,lite1+lite2`` adds, for each named backbone set, a linear
  head on those backbones' multi-scale embeddings (concatenated; chosen and
  trained the same way) and its average with the fine-tune
  (``partial_finetune+linear[lite1]``): an ensemble of two different
  backbones, which the service does not build (one network serves Lite0's
  fine-tune and its linear head); measured here to see whether it is worth building.
  A name with ``@224`` (``lite1@224``) feeds that backbone Lite0's own input (the
  224 px crop) instead of its native size: what one network with one input
  could run beside the fine-tune;

Each model is scored two ways:

1. **the service's split** (:func:`components.lib.split.split_dataset`, seed 0,
   as the train step calls it): trained on its training side, in the order the
   train step gets it, scored on its test side, once per ``--split-seeds`` seed
   (the inner folds and the fine-tune's start): the spread of what
   ``bench/train.py`` can measure; seed 0 is the train step's own;
2. **whole-set cross-validation**: for each ``--fold-seeds`` seed,
   ``--folds``-fold cross-validation over *all* images; accuracy over all
   images, over the service's test-split images and over the others.

Run it by hand (not collected by pytest; about 4 minutes for the flowers on 2 cores)::

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/whole_set_cv.py --dataset flowers \\
        [--quality balanced] [--split-seeds 0,1,2,3,4] [--fold-seeds 1000,1001,1002] [--folds 5] \\
        [--partners lite1,lite1+lite2,lite1@224]

Results: Markdown on stdout, JSON in ``--out`` (default
``bench/results/whole_set_cv_<dataset>[_<quality>][_partners].json``); progress on stderr.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import logging
import os
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch is imported (see README)

import numpy as np
from _common import DATASETS_ROOT, git_state, init_script, machine_info, write_report

from components.lib import heads, selection, split
from components.lib.embeddings import View, batches_of_images, embed_views, mirror
from components.lib.partial_finetune import PartialFinetunePlan, compute_activations, train_tail
from components.lib.train import TrainConfig, start_head
from taskvision import backbone, features
from taskvision.dataset import DatasetInfo, LabelInfo, ManifestRow
from taskvision.preprocess import DEFAULT, draft_side, resize_and_crop, to_array
from taskvision.storage import LocalBlobStore
from taskvision.task_types import TaskType

logger = logging.getLogger("bench.whole_set_cv")


RESULTS = Path(__file__).resolve().parent / "results"
TRAINING = TrainConfig()  # the train step's defaults: its cv_folds, seed and max_image_pixels
MODELS = ("linear", "partial_finetune", "partial_finetune+linear")
# The embeddings a partner linear head reads: backbone ids, each optionally with "@<px>" (that
# backbone fed Lite0's preprocessing at <px> instead of its own input; see the module docstring).
Partner = tuple[str, ...]
AT = "@"


def parse_partners(text: str) -> list[Partner]:
    """``lite1,lite1+lite2,lite1@224`` -> [(Lite1's id,), (Lite1's id, Lite2's id), (Lite1's id@224,)]."""
    by_short = {selection.short_name([b]): b for b in backbone.BACKBONES}
    partners = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        names = [n.partition(AT) for n in part.split("+")]
        unknown = [n for n, _, _ in names if n not in by_short]
        if unknown:
            sys.exit(f"unknown backbone {unknown[0]!r} in --partners (known: {', '.join(by_short)})")
        odd = [size for _, at, size in names if at and not size.isdigit()]
        if odd:
            sys.exit(f"{AT}{odd[0]} in --partners: give the input size in pixels (e.g. lite1@224)")
        partners.append(tuple(by_short[n] + at + size for n, at, size in names))
    return partners


def base_id(embedding: str) -> str:
    """The backbone id of a partner's embedding name (``<id>`` or ``<id>@<px>``)."""
    return embedding.partition(AT)[0]


def partner_name(partner: Partner) -> str:
    return "+".join(
        selection.short_name([base_id(b)]) + b.partition(AT)[1] + b.partition(AT)[2] for b in partner
    )


def embed_at(
    store: LocalBlobStore, rows: list[ManifestRow], embedding: str, folder: Path
) -> dict[View, np.ndarray]:
    """``<id>@<px>``'s embeddings of ``rows`` and of their mirror images: the backbone's multi-scale
    embedding network (exported to ONNX for that input size) on Lite0's preprocessing at ``px``."""
    size = int(embedding.partition(AT)[2])
    config = replace(DEFAULT, input_size=size, crop_pct=size / DEFAULT.resize_to)
    path = folder / f"{selection.short_name([base_id(embedding)])}-{size}.onnx"
    backbone.export_onnx(backbone.build_embedding_model(base_id(embedding)), path, input_size=size)
    session = backbone.onnx_session(path)
    arrays = []
    for _, images in batches_of_images(
        store, rows, max_pixels=TRAINING.max_image_pixels, min_side=draft_side(config.resize_to)
    ):
        arrays.append(np.stack([to_array(resize_and_crop(image, config), config) for image in images]))
    centre = np.concatenate(arrays)

    def run(batch: np.ndarray) -> np.ndarray:
        return np.concatenate(
            [session.run(None, {"input": batch[i : i + 32]})[0] for i in range(0, len(batch), 32)]
        )

    return {(embedding, False): run(centre), (embedding, True): run(mirror(centre))}


def model_names(partners: list[Partner]) -> list[str]:
    extra = [f"{kind}[{partner_name(p)}]" for p in partners for kind in ("linear", "partial_finetune+linear")]
    return [*MODELS, *extra]


def load_dataset(name: str, store: LocalBlobStore) -> tuple[DatasetInfo, list[ManifestRow], list[str]]:
    """Every image of a ``multi_class`` set into ``store``: the split's inputs and the label names."""
    folder = DATASETS_ROOT / name
    if not (folder / "labels.csv").is_file():
        sys.exit(f"{folder / 'labels.csv'} not found: the shared data sets are not on this machine")
    with open(folder / "labels.csv", newline="") as fh:
        records = list(csv.DictReader(fh))
    if "label" not in records[0]:
        sys.exit(f"{name} is not a multi_class set (labels.csv has no 'label' column)")
    names = sorted({r["label"] for r in records})
    rows = []
    for index, record in enumerate(records):
        data = (folder / record["path"]).read_bytes()
        sha = hashlib.sha256(data).hexdigest()
        store.put(f"images/{sha}", data)
        rows.append(ManifestRow(f"img{index:05d}", f"images/{sha}", sha, [record["label"]]))
    info = DatasetInfo(
        task_id=name,
        task_type=TaskType.MULTI_CLASS,
        labels=[LabelInfo(id=n, name=n) for n in names],
        snapshot_id="whole-set-cv",
        created=datetime.now(UTC).isoformat(),
        count=len(rows),
    )
    return info, rows, names


def fit_linear(
    y: np.ndarray,
    embeddings: dict[View, np.ndarray],
    partner: Partner,
    rest: np.ndarray,
    held: np.ndarray,
    seed: int,
) -> tuple[np.ndarray, heads.HeadSetting]:
    """A linear head on ``partner``'s multi-scale embeddings, its setting chosen and the head trained
    as the train step does (3-fold CV on rows ``rest``, image and mirror image): its logits of ``held``."""
    task = TaskType.MULTI_CLASS
    n_outputs = int(y.max()) + 1
    centre = np.concatenate([embeddings[(b, False)] for b in partner], axis=1)
    mirrored = np.concatenate([embeddings[(b, True)] for b in partner], axis=1)
    (linear,) = selection.score_linear(
        task, y[rest], 1.0, [features.feature_id(base_id(b)) for b in partner], centre[rest], mirrored[rest],
        heads.folds(len(rest), TRAINING.cv_folds, seed), heads.default_grid(task), n_outputs=n_outputs,
        augment_with_mirror=True, test_time_flip=False, scored_rows=np.arange(len(rest)),
    )  # fmt: skip
    setting = linear.setting
    assert setting is not None
    w, b = heads.fit_head(
        np.concatenate([centre[rest], mirrored[rest]]),
        np.concatenate([y[rest], y[rest]]),
        task,
        setting,
        n_outputs=n_outputs,
    )
    return heads.predict(centre[held], w, b), setting


def fit_and_answer(
    y: np.ndarray,
    embeddings: dict[View, np.ndarray],
    data: Any,
    pretrained: Any,
    rest: np.ndarray,
    held: np.ndarray,
    seed: int,
    plan: PartialFinetunePlan,
    partners: list[Partner],
) -> tuple[dict[str, np.ndarray], str]:
    """The linear head, the fine-tune (and the partners' linear heads) trained on rows ``rest`` as the
    train step trains them (``seed``: inner folds and the fine-tune's start); each model's logits
    of rows ``held``."""
    task = TaskType.MULTI_CLASS
    n_outputs = int(y.max()) + 1
    linear, setting = fit_linear(y, embeddings, (plan.backbone_id,), rest, held, seed)
    start, frozen = start_head(embeddings, plan.backbone_id, rest, y, task, setting, n_outputs)
    tuned = train_tail(pretrained, data.subset(rest), start, frozen, y[rest], task, plan, seed=seed).logits(
        data.subset(held)
    )
    half = np.float32(0.5)
    logits = {"linear": linear, "partial_finetune": tuned, "partial_finetune+linear": (linear + tuned) * half}
    for partner in partners:
        other, _ = fit_linear(y, embeddings, partner, rest, held, seed)
        logits[f"linear[{partner_name(partner)}]"] = other
        logits[f"partial_finetune+linear[{partner_name(partner)}]"] = (other + tuned) * half
    return logits, setting.name


def out_of_fold(
    y: np.ndarray,
    embeddings: dict[View, np.ndarray],
    data: Any,
    pretrained: Any,
    fold_seed: int,
    k: int,
    plan: PartialFinetunePlan,
    partners: list[Partner],
) -> dict[str, np.ndarray]:
    """Each model's out-of-fold logits over all images."""
    oof = {m: np.zeros((len(y), int(y.max()) + 1), dtype=np.float32) for m in model_names(partners)}
    for index, fold in enumerate(heads.folds(len(y), k, fold_seed)):
        started = time.perf_counter()
        rest = np.setdiff1d(np.arange(len(y)), fold)
        logits, head = fit_and_answer(
            y, embeddings, data, pretrained, rest, fold, TRAINING.seed, plan, partners
        )
        for model, values in logits.items():
            oof[model][fold] = values
        logger.info(
            "fold seed %d, fold %d/%d: head %s, %.1f s", fold_seed, index + 1, k, head,
            time.perf_counter() - started,
        )  # fmt: skip
    return oof


def markdown(report: dict[str, Any]) -> str:
    lines = [
        f"Whole-set {report['folds']}-fold cross-validation, {report['dataset']} ({report['images']} images; "
        f"the service's test split: {report['test_images']}), `{report['quality']}`'s fine-tune plan",
        "",
        "| fold seed | model | all images | the service's test-split images | the other images |",
        "|---|---|---:|---:|---:|",
    ]
    for seed, models in report["by_seed"].items():
        for model, a in models.items():
            lines.append(f"| {seed} | {model} | {a['all']:.3f} | {a['test_split']:.3f} | {a['others']:.3f} |")
    for model, a in report["mean"].items():
        lines.append(f"| mean | {model} | {a['all']:.3f} | {a['test_split']:.3f} | {a['others']:.3f} |")
    seeds = list(report["service_split"])
    lines += [
        "",
        "Trained on the service's training split, scored on its test split (as `bench/train.py` "
        "measures), by seed (inner folds and the fine-tune's start):",
        "",
        "| model | " + " | ".join(f"seed {s}" for s in seeds) + " | median |",
        "|---|" + "---:|" * (len(seeds) + 1),
    ]
    for model in report["models"]:
        values = [report["service_split"][s][model] for s in seeds]
        cells = " | ".join(f"{v:.3f}" for v in values)
        lines.append(f"| {model} | {cells} | {statistics.median(values):.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--dataset", default="flowers")
    parser.add_argument("--fold-seeds", default="1000,1001,1002")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--quality", default="balanced", help="whose fine-tune plan: balanced or best")
    parser.add_argument("--split-seeds", default="0,1,2,3,4")
    parser.add_argument(
        "--partners",
        default="",
        help="backbone sets for extra linear heads averaged with the fine-tune, e.g. lite1,lite1+lite2",
    )
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    init_script()
    partners = parse_partners(args.partners)
    models = model_names(partners)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="taskvision-wscv-") as tmp:
        store = LocalBlobStore(Path(tmp))
        info, rows, names = load_dataset(args.dataset, store)
        plan = selection.preset(args.quality).finetune
        assert plan is not None, f"{args.quality} has no partial fine-tune"
        data, embeddings = compute_activations(
            store, rows, plan, seed=TRAINING.seed, use_cache=False, max_pixels=TRAINING.max_image_pixels
        )
        others = sorted({b for partner in partners for b in partner} - {plan.backbone_id})
        native = [b for b in others if AT not in b]
        if native:
            views = [(b, mirrored) for b in native for mirrored in (False, True)]
            embeddings.update(
                embed_views(store, rows, views, use_cache=False, max_pixels=TRAINING.max_image_pixels)
            )
        for embedding in (b for b in others if AT in b):
            embeddings.update(embed_at(store, rows, embedding, Path(tmp)))
    y = np.array([names.index(row.labels[0]) for row in rows])
    service = split.split_dataset(info, rows)
    test = np.isin([row.image_id for row in rows], service.test)
    groups = {"all": np.arange(len(y)), "test_split": np.flatnonzero(test), "others": np.flatnonzero(~test)}
    pretrained = backbone.build_torch_model(num_classes=0, backbone_id=plan.backbone_id)
    # In the order the train step gets them (the split's content order): its folds follow it.
    position = {row.image_id: index for index, row in enumerate(rows)}
    train_rows = np.asarray([position[i] for i in service.train])
    test_rows = np.asarray([position[i] for i in service.test])
    service_split: dict[str, dict[str, float]] = {}
    for seed in (int(s) for s in args.split_seeds.split(",")):
        answers, head = fit_and_answer(
            y, embeddings, data, pretrained, train_rows, test_rows, seed, plan, partners
        )
        service_split[str(seed)] = {
            model: heads.score(TaskType.MULTI_CLASS, y[test_rows], logits)
            for model, logits in answers.items()
        }
        logger.info("service split, seed %d (head %s): %s", seed, head, service_split[str(seed)])
    by_seed: dict[str, dict[str, dict[str, float]]] = {}
    for fold_seed in (int(s) for s in args.fold_seeds.split(",")):
        logits = out_of_fold(y, embeddings, data, pretrained, fold_seed, args.folds, plan, partners)
        by_seed[str(fold_seed)] = {
            model: {
                group: heads.score(TaskType.MULTI_CLASS, y[rows_], logits[model][rows_])
                for group, rows_ in groups.items()
            }
            for model in models
        }
        logger.info("fold seed %d: %s", fold_seed, by_seed[str(fold_seed)])
    mean = {
        model: {group: statistics.fmean(s[model][group] for s in by_seed.values()) for group in groups}
        for model in models
    }
    commit, dirty = git_state()
    report = {
        "dataset": args.dataset,
        "images": len(y),
        "test_images": int(test.sum()),
        "folds": args.folds,
        "quality": args.quality,
        "plan": plan.describe(),
        "models": models,
        "by_seed": by_seed,
        "mean": mean,
        "service_split": service_split,
        "seconds": round(time.perf_counter() - started, 1),
        "commit": commit,
        "dirty": dirty,
        "machine": machine_info(),
        "load_average_end": Path("/proc/loadavg").read_text().split()[:3],
    }
    suffix = ("" if args.quality == "balanced" else f"_{args.quality}") + ("_partners" if partners else "")
    default = RESULTS / f"whole_set_cv_{args.dataset}{suffix}.json"
    write_report(report, args.out or default, markdown)


if __name__ == "__main__":
    main()
