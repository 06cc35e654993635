"""Feature ids and computing them: what a frozen-backbone head's input is, for training and serving alike."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageOps

from taskvision import backbone, features
from taskvision.preprocess import decode_image, resize_and_crop, to_array
from tests.support.images import shape_image

LITE0, LITE1 = "tf_efficientnet_lite0.in1k", "tf_efficientnet_lite1.in1k"


def test_feature_ids_name_a_backbone_its_part_and_a_test_time_flip() -> None:
    ms1 = features.feature_spec(f"{LITE1}-ms1")
    assert (ms1.backbone_id, ms1.start, ms1.stop, ms1.hflip_mean) == (LITE1, 0, 1856, False)
    final = features.feature_spec(f"{LITE1}-final+hflip")
    assert (final.dim, final.hflip_mean) == (1280, True)
    assert features.LEGACY_FEATURES == (backbone.EMBEDDING_ID,) == (f"{LITE0}-ms1",)
    assert features.feature_dim([f"{LITE0}-ms1", "tf_efficientnet_lite2.in1k-ms1"]) == 1856 + 1904
    ids = [f"{LITE0}-ms1", f"{LITE1}-final+hflip", f"{LITE1}-ms1"]
    assert features.backbones_needed(ids) == [LITE0, LITE1]
    assert features.views_needed(ids) == [(LITE0, False), (LITE1, False), (LITE1, True)]
    with pytest.raises(ValueError, match=r"Invalid feature id 'resnet50-ms1'\. Only tf_efficientnet_lite0"):
        features.feature_spec("resnet50-ms1")


def test_assemble_takes_columns_and_averages_the_mirror_image() -> None:
    rng = np.random.default_rng(0)
    vectors = {
        (LITE0, False): rng.normal(size=(2, 1856)).astype(np.float32),
        (LITE1, False): rng.normal(size=(2, 1856)).astype(np.float32),
        (LITE1, True): rng.normal(size=(2, 1856)).astype(np.float32),
    }
    out = features.assemble(vectors, [f"{LITE1}-final+hflip", f"{LITE0}-ms1"])
    assert out.shape == (2, 1280 + 1856)
    np.testing.assert_allclose(
        out[:, :1280], (vectors[(LITE1, False)] + vectors[(LITE1, True)])[:, :1280] / 2
    )
    np.testing.assert_array_equal(out[:, 1280:], vectors[(LITE0, False)])


def pictures() -> list[Image.Image]:
    return [
        decode_image(shape_image(kind, 7), max_pixels=10**7, min_side=600)[0] for kind in ("circle", "square")
    ]


def test_embed_images_runs_each_backbone_at_its_own_size_once_per_view() -> None:
    images = pictures()
    ids = [f"{LITE0}-ms1", f"{LITE0}-final+hflip"]
    lite0 = backbone.Embedder()
    got = features.embed_images(images, ids, embedder=lambda b: lite0)
    assert got.shape == (2, 1856 + 1280)
    assert lite0.images_embedded == 4  # each picture and its mirror image, though two ids use Lite0
    config = backbone.BACKBONES[LITE0].preprocess
    centre = np.stack([to_array(resize_and_crop(im, config), config) for im in images])
    mirrored = np.stack([to_array(resize_and_crop(ImageOps.mirror(im), config), config) for im in images])
    direct = backbone.Embedder()
    np.testing.assert_allclose(got[:, :1856], direct.embed_arrays(centre), atol=1e-5)
    # The mirror of the centre crop is the crop of the mirror image here (even margins): the same vectors.
    expected_flip = (direct.embed_arrays(centre)[:, :1280] + direct.embed_arrays(mirrored)[:, :1280]) / 2
    np.testing.assert_allclose(got[:, 1856:], expected_flip, atol=1e-4)


def test_prepare_then_embed_prepared_is_embed_images() -> None:
    images = pictures()
    ids = list(features.LEGACY_FEATURES)
    prepared = np.stack([features.prepare(image, ids) for image in images])
    assert prepared.shape == (2, features.prepared_size(ids)) == (2, 3 * 224 * 224)
    np.testing.assert_allclose(
        features.embed_prepared(prepared, ids), features.embed_images(images, ids), atol=1e-6
    )
    with pytest.raises(ValueError, match="values each"):
        features.embed_prepared(prepared[:, :100], ids)


@pytest.mark.slow
@pytest.mark.parametrize("backbone_id", ["tf_efficientnet_lite1.in1k", "tf_efficientnet_lite2.in1k"])
def test_lite1_and_lite2_load_their_weights_and_onnx_matches_torch(backbone_id: str) -> None:
    import torch

    spec = backbone.BACKBONES[backbone_id]
    model = backbone.build_torch_model(num_classes=1000, backbone_id=backbone_id)
    config = spec.preprocess
    images = pictures()
    arrays = np.stack([to_array(resize_and_crop(im, config), config) for im in images])
    with torch.inference_mode():
        logits = model(torch.from_numpy(arrays)).numpy()
        eager = backbone.build_embedding_model(backbone_id)(torch.from_numpy(arrays)).numpy()
    # ImageNet weights, not a random init: confident, different answers for different pictures.
    assert np.abs(logits).max() > 5 and logits[0].argmax() != logits[1].argmax()
    onnx = backbone.Embedder(backbone_id=backbone_id).embed_arrays(arrays)
    assert onnx.shape == eager.shape == (2, spec.embedding_dim)
    assert np.abs(onnx - eager).max() < 1e-3
