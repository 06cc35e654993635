"""The shared preprocessing: exact normalisation and the evaluation transform."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from taskvision.preprocess import DEFAULT, PreprocessConfig, preprocess_bytes, resize_and_crop, to_array


def _arithmetic(image: Image.Image, config: PreprocessConfig) -> np.ndarray:
    """The textbook normalisation, on the whole float array."""
    pixels = np.asarray(image, dtype=np.float32) / np.float32(255.0)
    mean, std = np.asarray(config.mean, dtype=np.float32), np.asarray(config.std, dtype=np.float32)
    return ((pixels - mean) / std).astype(np.float32).transpose(2, 0, 1)


@pytest.mark.parametrize(
    "config",
    [DEFAULT, PreprocessConfig(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))],
    ids=["lite0", "imagenet"],
)
def test_the_lookup_table_gives_exactly_the_arithmetic_values(config: PreprocessConfig) -> None:
    rng = np.random.default_rng(3)
    pixels = rng.integers(0, 256, size=(37, 53, 3), dtype=np.uint8)
    pixels[0, :3] = [[0, 0, 0], [255, 255, 255], [128, 64, 200]]  # both ends of the range
    image = Image.fromarray(pixels, "RGB")
    out = to_array(image, config)
    assert out.dtype == np.float32 and out.shape == (3, 37, 53) and out.flags.c_contiguous
    np.testing.assert_array_equal(out, _arithmetic(image, config))
    mean, std = np.asarray(config.mean), np.asarray(config.std)
    np.testing.assert_allclose(out[:, 0, 0], (0.0 - mean) / std, rtol=1e-6)  # level 0
    np.testing.assert_allclose(out[:, 0, 1], (1.0 - mean) / std, rtol=1e-6)  # level 255


def test_a_grey_picture_is_normalised_as_rgb() -> None:
    grey = Image.fromarray(np.full((10, 12), 255, dtype=np.uint8), "L")
    out = to_array(grey)
    assert out.shape == (3, 10, 12)
    np.testing.assert_array_equal(out, np.ones((3, 10, 12), dtype=np.float32))


def test_preprocess_bytes_resizes_the_short_side_and_crops_the_centre() -> None:
    picture = Image.new("RGB", (600, 300), (255, 0, 0))
    buffer = io.BytesIO()
    picture.save(buffer, "PNG")
    array, size = preprocess_bytes(buffer.getvalue(), max_pixels=10**7)
    assert size == (600, 300)
    assert array.shape == (3, DEFAULT.input_size, DEFAULT.input_size)
    assert resize_and_crop(picture).size == (DEFAULT.input_size, DEFAULT.input_size)
    np.testing.assert_allclose(array[:, 112, 112], [1.0, -1.0, -1.0], atol=1e-6)
