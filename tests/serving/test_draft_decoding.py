"""A large JPEG is decoded at reduced scale as its bundle was trained: down to the resize for
bundles of today's code, down to twice it for bundles written before ``draft_factor`` existed."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from serving.repository import BundleRepository
from taskvision.bundle import BundleMeta
from taskvision.inference import BundleModel
from taskvision.preprocess import DEFAULT, DRAFT_FACTOR, LEGACY_DRAFT_FACTOR, decode_image
from tests.support.bundles import random_head, write_head_bundle


def _large_jpeg(seed: int) -> bytes:
    """1024 x 768, fine detail everywhere (so that decoding scales give different pictures)."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, size=(48, 64, 3), dtype=np.uint8)
    smooth = Image.fromarray(coarse).resize((1024, 768), Image.Resampling.BICUBIC)
    picture = np.asarray(smooth, dtype=np.int16)
    picture += rng.integers(-60, 60, size=picture.shape, dtype=np.int16)  # detail finer than a pixel at 256
    out = io.BytesIO()
    Image.fromarray(picture.clip(0, 255).astype(np.uint8)).save(out, format="JPEG", quality=92)
    return out.getvalue()


def _legacy(folder: Path) -> None:
    """Make ``folder``'s bundle.json one written before ``draft_factor`` was recorded."""
    data = json.loads((folder / "bundle.json").read_text())
    del data["draft_factor"]
    (folder / "bundle.json").write_text(json.dumps(data))


def test_the_decoding_scale_follows_the_bundle_and_old_bundles_keep_theirs(tmp_path: Path) -> None:
    assert (DRAFT_FACTOR, LEGACY_DRAFT_FACTOR) == (1, 2)
    weight, bias = random_head(3, seed=5)
    for name in ("new", "old"):
        write_head_bundle(tmp_path / name, weight=weight, bias=bias, npz=True)  # the same head
    _legacy(tmp_path / "old")
    assert BundleMeta.from_json((tmp_path / "old" / "bundle.json").read_text()).draft_factor == 2
    assert BundleMeta.from_json((tmp_path / "new" / "bundle.json").read_text()).draft_factor == 1

    data = _large_jpeg(7)
    # libjpeg scales by 1/2, 1/4 or 1/8 while the shorter side stays at least the asked one
    assert decode_image(data, max_pixels=10**7, min_side=DEFAULT.resize_to)[0].size == (512, 384)
    assert decode_image(data, max_pixels=10**7, min_side=2 * DEFAULT.resize_to)[0].size == (1024, 768)

    evaluated = {}
    for name, side in (("new", DEFAULT.resize_to), ("old", 2 * DEFAULT.resize_to)):
        model = BundleModel.load(tmp_path / name)  # the evaluate step's code path
        assert model.min_decode_side == side
        prepared = model.prepare(model.decode(data, max_pixels=10**7)[0])[None]
        evaluated[name] = model.outputs(model.logits_from_prepared(prepared))[0]
    assert np.abs(evaluated["new"] - evaluated["old"]).max() > 1e-4  # the two scales differ

    # Served: one process, one backbone and its embedding cache for both versions; the same
    # bytes asked of the new version first must not hand its embedding to the old one.
    repository = BundleRepository(tmp_path)
    for name in ("new", "old", "new"):
        (answer,) = repository.get_or_load(name).classify([data])
        probabilities = {label["id"]: label["prob"] for label in answer["labels"]}
        served = [probabilities[f"label-{i}"] for i in range(3)]
        assert served == pytest.approx(evaluated[name].tolist(), abs=1e-4)
