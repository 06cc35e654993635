"""The one image preprocessing used by training, evaluation and serving.

EfficientNet-Lite0 (timm ``tf_efficientnet_lite0``) was trained on 224x224
crops normalised with mean = std = 0.5 and bicubic resizing. Evaluation (and
so serving) resizes the shorter side to 224 / 0.875 = 256 and takes the
centre 224x224 crop (:data:`DEFAULT`). Lite1 and Lite2 do the same at 240 and
260 (crop fractions 0.882 and 0.890; see :mod:`taskvision.backbone`).
Implemented with PIL and numpy, so serving needs no torch.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from PIL import Image

from taskvision import imaging


@dataclass(frozen=True)
class PreprocessConfig:
    input_size: int = 224
    crop_pct: float = 0.875
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    interpolation: str = "bicubic"

    @property
    def resize_to(self) -> int:
        return round(self.input_size / self.crop_pct)


DEFAULT = PreprocessConfig()

# A large JPEG is decoded at reduced scale (libjpeg's DCT scaling: 1/2, 1/4 or 1/8 of each
# side, a low-pass filter for free) while its shorter side stays at least DRAFT_FACTOR times
# the side it is resized to. At 1, a 512 px photo for a 256 px resize decodes at 256 px and
# its decode and resize take 0.6 ms instead of 2.7 ms, on every classify request.
DRAFT_FACTOR = 1
# Bundles written before ``bundle.json`` recorded ``draft_factor`` saw pictures decoded down
# to twice the resize (Pillow's own choice for thumbnails); they still do, answering as before.
LEGACY_DRAFT_FACTOR = 2


def draft_side(resize_to: int, factor: int = DRAFT_FACTOR) -> int:
    """The side a JPEG may be decoded down to, for a picture resized to ``resize_to``."""
    return factor * resize_to


def resize_and_crop(image: Image.Image, config: PreprocessConfig = DEFAULT) -> Image.Image:
    """Resize the shorter side to ``resize_to`` (bicubic) and take the centre square crop.

    Only the centre square is resampled (Pillow's ``box``): the work and the memory
    are those of the ``input_size`` x ``input_size`` output, whatever the input's
    shape. The filter's coordinates are exactly those of resizing the whole
    picture and then cropping, so the pixels are the same too.
    """
    width, height = image.size
    scale = config.resize_to / min(width, height)
    size = (max(config.input_size, round(width * scale)), max(config.input_size, round(height * scale)))
    left = (size[0] - config.input_size) // 2
    top = (size[1] - config.input_size) // 2
    # Source pixels per output pixel along each axis, as the whole-picture resize would use.
    sx, sy = width / size[0], height / size[1]
    box = (left * sx, top * sy, (left + config.input_size) * sx, (top + config.input_size) * sy)
    # reducing_gap: a large photo is first shrunk by an integer factor (fast), then resampled bicubic.
    return image.resize(
        (config.input_size, config.input_size), Image.Resampling.BICUBIC, box=box, reducing_gap=3.0
    )


def to_array(image: Image.Image, config: PreprocessConfig = DEFAULT) -> npt.NDArray[np.float32]:
    """RGB picture -> normalised float32 CHW array.

    Each channel goes through a 256-entry lookup table holding ``(v / 255 - mean) / std``
    computed in float32: the same numbers as doing that arithmetic on the whole
    array, with one output allocation instead of five (this runs on every request).
    """
    pixels = np.asarray(image.convert("RGB") if image.mode != "RGB" else image, dtype=np.uint8)
    table = _normalisation_table(config.mean, config.std)
    out = np.empty((3, pixels.shape[0], pixels.shape[1]), dtype=np.float32)
    for channel in range(3):
        np.take(table[channel], pixels[:, :, channel], out=out[channel])
    return out


@functools.lru_cache(maxsize=8)
def _normalisation_table(
    mean: tuple[float, float, float], std: tuple[float, float, float]
) -> npt.NDArray[np.float32]:
    """(3, 256) float32: channel c's normalised value of the 8-bit level v."""
    levels = np.arange(256, dtype=np.float32) / np.float32(255.0)
    mean_, std_ = np.asarray(mean, dtype=np.float32), np.asarray(std, dtype=np.float32)
    table: npt.NDArray[np.float32] = ((levels[None, :] - mean_[:, None]) / std_[:, None]).astype(np.float32)
    table.setflags(write=False)
    return table


def decode_image(data: bytes, *, max_pixels: int, min_side: int) -> tuple[Image.Image, tuple[int, int]]:
    """Decode image bytes for model inputs. Returns (upright RGB picture, original (width, height)).

    Every model input (training, evaluation, serving, any backbone) is decoded
    here, through :mod:`taskvision.imaging`'s checks. Large JPEGs are decoded at
    a reduced scale, never below ``min_side`` (:func:`draft_side` of the largest
    resize the picture is for), since the models see only a few hundred pixels.
    """
    return imaging.load_upright(data, max_pixels=max_pixels, draft_size=(min_side, min_side))


def preprocess_bytes(
    data: bytes, *, max_pixels: int, config: PreprocessConfig = DEFAULT
) -> tuple[npt.NDArray[np.float32], tuple[int, int]]:
    """Decode image bytes and preprocess for evaluation. Returns (CHW array, original (width, height))."""
    image, size = decode_image(data, max_pixels=max_pixels, min_side=draft_side(config.resize_to))
    return to_array(resize_and_crop(image, config), config), size
