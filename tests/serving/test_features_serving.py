"""Heads over any features (several backbones, mirror images) are served from the head bank, as evaluated."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from serving.extractors import Extractors
from serving.model import BundlePredictor
from serving.repository import BundleRepository
from taskvision import backbone, explain, features
from taskvision.inference import BundleModel
from taskvision.preprocess import DEFAULT, preprocess_bytes
from tests.support.bundles import write_head_bundle
from tests.support.images import shape_image

LITE0, LITE1 = "tf_efficientnet_lite0.in1k", "tf_efficientnet_lite1.in1k"
MIXED = [features.feature_id(LITE0), features.feature_id(LITE1, kind="final", hflip=True)]
IMAGES = [shape_image("circle", 31), shape_image("square", 32)]


def _evaluated(directory: Path, images: list[bytes]) -> np.ndarray:
    """What the evaluate step's code path answers (taskvision.inference, no head bank)."""
    model = BundleModel.load(directory)
    prepared = np.stack([model.prepare(model.decode(data, max_pixels=10**7)[0]) for data in images])
    return model.outputs(model.logits_from_prepared(prepared))


def _probabilities(answer: object, n_labels: int) -> list[float]:
    assert isinstance(answer, dict)
    probs = {label["id"]: label["prob"] for label in answer["labels"]}
    return [probs[f"label-{i}"] for i in range(n_labels)]


def test_a_head_over_two_backbones_and_a_mirror_image_is_served_from_the_bank(tmp_path: Path) -> None:
    write_head_bundle(tmp_path / "mixed", n_labels=4, seed=3, features=MIXED, npz=True)
    repository = BundleRepository(tmp_path)
    predictor = repository.get_or_load("mixed")
    assert predictor.head is not None and predictor.network is None and "mixed" in repository.bank
    assert predictor.head.weight.shape == (4, 1856 + 1280) and predictor.head.features == tuple(MIXED)
    answers = predictor.classify(IMAGES)
    for answer, row in zip(answers, _evaluated(tmp_path / "mixed", IMAGES), strict=True):
        assert _probabilities(answer, 4) == pytest.approx(row.tolist(), abs=1e-4)


def test_a_head_over_another_backbone_is_served_and_explained(tmp_path: Path) -> None:
    write_head_bundle(tmp_path / "lite1", n_labels=3, seed=4, features=[features.feature_id(LITE1)])
    predictor = BundlePredictor("lite1", tmp_path / "lite1")
    predictor.load()
    assert predictor.head is not None
    (answer,) = predictor.classify(IMAGES[:1])
    assert _probabilities(answer, 3) == pytest.approx(_evaluated(tmp_path / "lite1", IMAGES[:1])[0], abs=1e-4)
    (explained,) = predictor.classify(IMAGES[:1], explain=True)
    assert _probabilities(explained, 3) == pytest.approx(_probabilities(answer, 3), abs=1e-4)
    assert isinstance(explained, dict)
    (heat,) = explained["_explanations"]
    lite1 = backbone.backbone_spec(LITE1).preprocess
    box = explain.crop_box(explained["_width"], explained["_height"], lite1)
    assert heat["heatmap_box"] == [round(v) for v in box]


def test_an_unknown_feature_fails_at_load(tmp_path: Path) -> None:
    write_head_bundle(tmp_path / "odd", n_labels=2, weight=np.ones((2, 4), np.float32), bias=np.zeros(2))
    bundle = tmp_path / "odd" / "bundle.json"
    bundle.write_text(bundle.read_text().replace(features.feature_id(LITE0), "resnet50-ms1"))
    with pytest.raises(ValueError, match="resnet50-ms1"):
        BundlePredictor("odd", tmp_path / "odd").load()


@pytest.mark.slow
def test_explanations_of_lite0_features_are_exact_mirror_images_included() -> None:
    """Each map sums to the head's product with the served input, for final, multi-scale and +hflip parts."""
    fids = [features.feature_id(LITE0, kind="final"), features.feature_id(LITE0, hflip=True)]
    rows = np.random.default_rng(0).standard_normal((3, features.feature_dim(fids))).astype(np.float32)
    arrays = np.stack([preprocess_bytes(data, max_pixels=10**7)[0] for data in IMAGES])
    head_input, grids = explain.linear_head_cam(arrays, fids, rows)
    np.testing.assert_allclose(head_input, Extractors().embed(fids, {DEFAULT: arrays}), atol=2e-4)
    assert grids.shape == (2, 3, 14, 14)
    np.testing.assert_allclose(grids.sum(axis=(2, 3)), head_input @ rows.T, rtol=1e-4, atol=1e-3)
