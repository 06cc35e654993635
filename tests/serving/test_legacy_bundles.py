"""Bundles written before bundles named their features still load and answer the same; regression clipping."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from serving.model import BundlePredictor
from taskvision import features
from taskvision.bundle import BundleMeta
from tests.support.images import shape_image, size_image

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "bundles_6ce2135"


def probes() -> dict[str, bytes]:
    """The images ``expected.json`` has answers for (as tests/fixtures/bundles_6ce2135/make.py makes them)."""
    blank = io.BytesIO()
    Image.new("RGB", (96, 96), (255, 255, 255)).save(blank, format="PNG")
    return {
        "circle": shape_image("circle", 900),
        "square": shape_image("square", 901),
        "disc": size_image(20, 902),
        "blank": blank.getvalue(),
    }


def _numbers(answer: dict[str, Any]) -> dict[str, float]:
    return {label["name"]: label.get("prob", label.get("value")) for label in answer["labels"]}


@pytest.mark.parametrize("kind", ["multi_class", "regression"])
def test_a_bundle_written_before_features_existed_answers_as_it_did(kind: str) -> None:
    expected = json.loads((FIXTURES / "expected.json").read_text())[kind]
    assert "features" not in json.loads((FIXTURES / kind / "bundle.json").read_text())
    predictor = BundlePredictor(kind, FIXTURES / kind)
    predictor.load()
    assert predictor.bundle.meta.features == list(features.LEGACY_FEATURES)
    for name, data in probes().items():
        answer = predictor.predict_images([data])[0]
        assert answer["best_label"]["id"] == expected[name]["best_label"]["id"]
        assert _numbers(answer) == pytest.approx(
            _numbers(expected[name]), abs=2e-5 if kind == "multi_class" else 1e-3
        )
        assert "out_of_range" not in answer  # no value range recorded: answered unclipped, as before


@pytest.fixture
def ranged_regression(tmp_path: Path) -> Path:
    """The old regression bundle (radii 6-41 px) with the value range today's train step records."""
    folder = tmp_path / "regression"
    shutil.copytree(FIXTURES / "regression", folder)
    meta = BundleMeta.from_json((folder / "bundle.json").read_text())
    meta.value_range = [[4.25, 42.75]]  # 6..41 plus 5 % of the span on each side
    (folder / "bundle.json").write_text(meta.to_json())
    return folder


def test_regression_answers_are_clipped_to_the_value_range_and_say_when(ranged_regression: Path) -> None:
    expected = json.loads((FIXTURES / "expected.json").read_text())["regression"]
    assert expected["square"]["best_label"]["value"] > 42.75  # a square is no disc: far outside
    predictor = BundlePredictor("sizes", ranged_regression)
    predictor.load()
    images = probes()
    outside = predictor.predict_images([images["square"]])[0]
    assert outside["best_label"]["value"] == pytest.approx(42.75)
    assert outside["labels"][0]["value"] == pytest.approx(42.75)
    assert outside["out_of_range"] is True
    inside = predictor.predict_images([images["disc"]])[0]
    assert inside["best_label"]["value"] == pytest.approx(expected["disc"]["best_label"]["value"], abs=1e-3)
    assert "out_of_range" not in inside
