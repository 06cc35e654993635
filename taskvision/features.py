"""Frozen-backbone features: the ids a model bundle lists in ``features``, and computing them.

This is the one API that turns images into the input of a frozen-backbone head,
for training, evaluation and serving alike. A feature id names a vector that one
pretrained backbone (:mod:`taskvision.backbone`) computes from one image:

``<backbone>-ms1``
    the backbone's multi-scale embedding: final pooled features (1280) plus the
    pooled outputs of blocks 3, 4 and 5 (means) and block 5 (max);
``<backbone>-final``
    the final pooled features alone (the first 1280 numbers of ``-ms1``);
``<id>+hflip``
    the mean of ``<id>``'s vectors for the image and for its mirror image
    (test-time augmentation). For a linear head this is the same as averaging
    the logits of the two, so the head stays one matrix product.

where ``<backbone>`` is ``tf_efficientnet_lite0.in1k``, ``tf_efficientnet_lite1.in1k``
or ``tf_efficientnet_lite2.in1k``. A head's input is the concatenation of the
vectors of its ordered ``features`` list; a bundle written before the list
existed means :data:`LEGACY_FEATURES` (Lite0's multi-scale embedding).

Computing them: an image is preprocessed once per backbone its ids need (each
backbone has its own input size), and each backbone runs once per image (twice
when an ``+hflip`` id needs the mirror image), however many ids use it. The
mirror image's preprocessed array is the array reversed along its width (the
preprocessing is per pixel), so it costs no second resize. Serving uses one
shared :class:`~taskvision.backbone.Embedder` per backbone and process, each with
its own cache (:func:`~taskvision.backbone.shared_embedder`).

Two ways in:

* :func:`embed_images`: PIL pictures -> (N, :func:`feature_dim`) vectors;
* :func:`prepare` then :func:`embed_prepared`: a flat float32 array per image
  (what a decode step can hand over to a batched predict step), then the vectors.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from PIL import Image

from taskvision import backbone, preprocess
from taskvision.preprocess import PreprocessConfig, resize_and_crop, to_array

Array = npt.NDArray[np.float32]

MULTI_SCALE = "ms1"
FINAL = "final"
HFLIP = "+hflip"
LEGACY_FEATURES: tuple[str, ...] = (backbone.EMBEDDING_ID,)


@dataclass(frozen=True)
class FeatureSpec:
    """What one feature id means: columns ``start:stop`` of a backbone's embedding, mirrored or not."""

    id: str
    backbone_id: str
    start: int
    stop: int
    hflip_mean: bool

    @property
    def dim(self) -> int:
        return self.stop - self.start


@functools.lru_cache(maxsize=64)
def feature_spec(feature_id: str) -> FeatureSpec:
    """Parse a feature id; a ValueError naming the valid ones for anything else."""
    base, hflip = (feature_id[: -len(HFLIP)], True) if feature_id.endswith(HFLIP) else (feature_id, False)
    backbone_id, _, kind = base.rpartition("-")
    if backbone_id in backbone.BACKBONES and kind in (MULTI_SCALE, FINAL):
        spec = backbone.BACKBONES[backbone_id]
        stop = spec.embedding_dim if kind == MULTI_SCALE else backbone.FINAL_DIM
        return FeatureSpec(feature_id, backbone_id, 0, stop, hflip)
    valid = ", ".join(f"{b}-{k}" for b in backbone.BACKBONES for k in (MULTI_SCALE, FINAL))
    raise ValueError(
        f"Invalid feature id {feature_id!r}. Only {valid} are supported, each optionally with {HFLIP!r}."
    )


def feature_id(backbone_id: str, *, kind: str = MULTI_SCALE, hflip: bool = False) -> str:
    """The id of a backbone's ``kind`` features (checked)."""
    return feature_spec(f"{backbone_id}-{kind}{HFLIP if hflip else ''}").id


def feature_dim(feature_ids: Sequence[str]) -> int:
    """Length of the concatenated vector (the head's input size)."""
    return sum(feature_spec(fid).dim for fid in feature_ids)


def backbones_needed(feature_ids: Sequence[str]) -> list[str]:
    """The backbones the ids need, in first-use order."""
    return list(dict.fromkeys(feature_spec(fid).backbone_id for fid in feature_ids))


def any_flipped(feature_ids: Sequence[str]) -> bool:
    """Whether any of the ids averages in the mirror image's features (``+hflip``)."""
    return any(fid.endswith(HFLIP) for fid in feature_ids)


def views_needed(feature_ids: Sequence[str]) -> list[tuple[str, bool]]:
    """The (backbone, mirrored) embeddings the ids need, in a fixed order."""
    views: dict[tuple[str, bool], None] = {}
    for fid in feature_ids:
        spec = feature_spec(fid)
        views[(spec.backbone_id, False)] = None
        if spec.hflip_mean:
            views[(spec.backbone_id, True)] = None
    return list(views)


def input_configs(feature_ids: Sequence[str]) -> list[PreprocessConfig]:
    """The preprocessing of each backbone the ids need (as :func:`backbones_needed`)."""
    return [backbone.BACKBONES[b].preprocess for b in backbones_needed(feature_ids)]


def assemble(vectors: Mapping[tuple[str, bool], Array], feature_ids: Sequence[str]) -> Array:
    """Concatenate the ids' vectors from embeddings per (backbone, mirrored) view.

    ``vectors[(backbone_id, mirrored)]`` is that backbone's (N, embedding_dim) embedding
    matrix of the images (mirrored or not). Training, evaluation and serving all build
    a head's input here, so they cannot disagree on what a feature id means.
    """
    parts = []
    for fid in feature_ids:
        spec = feature_spec(fid)
        part = vectors[(spec.backbone_id, False)][:, spec.start : spec.stop]
        if spec.hflip_mean:
            part = (part + vectors[(spec.backbone_id, True)][:, spec.start : spec.stop]) * np.float32(0.5)
        parts.append(part)
    if not parts:
        raise ValueError("At least one feature id is needed.")
    return np.ascontiguousarray(np.concatenate(parts, axis=1), dtype=np.float32)


def prepare(image: Image.Image, feature_ids: Sequence[str]) -> Array:
    """One decoded RGB picture -> the flat float32 input :func:`embed_prepared` takes.

    It holds the preprocessed (C, H, W) array of each backbone the ids need, in
    :func:`backbones_needed` order, flattened and concatenated.
    """
    arrays = [
        to_array(resize_and_crop(image, config), config).ravel() for config in input_configs(feature_ids)
    ]
    return np.concatenate(arrays) if len(arrays) > 1 else arrays[0]


def prepared_size(feature_ids: Sequence[str]) -> int:
    """The length of one image's :func:`prepare` array."""
    return sum(3 * c.input_size * c.input_size for c in input_configs(feature_ids))


def embed_prepared(
    prepared: Array,
    feature_ids: Sequence[str],
    *,
    embedder: Callable[[str], backbone.Embedder] = backbone.shared_embedder,
) -> Array:
    """(N, :func:`prepared_size`) prepared images -> (N, :func:`feature_dim`) feature vectors.

    ``embedder(backbone_id)`` gives the embedder of a backbone; by default the
    process's shared one (with its cache).
    """
    prepared = np.asarray(prepared, dtype=np.float32).reshape(len(prepared), -1)
    if prepared.shape[1] != prepared_size(feature_ids):
        wanted = prepared_size(feature_ids)
        raise ValueError(
            f"Prepared images have {prepared.shape[1]} values each; {feature_ids} need {wanted}."
        )
    views = views_needed(feature_ids)
    vectors: dict[tuple[str, bool], Array] = {}
    offset = 0
    for config, backbone_id in zip(input_configs(feature_ids), backbones_needed(feature_ids), strict=True):
        size = 3 * config.input_size * config.input_size
        arrays = prepared[:, offset : offset + size].reshape(-1, 3, config.input_size, config.input_size)
        offset += size
        run = embedder(backbone_id)
        for mirrored in (False, True):
            if (backbone_id, mirrored) in views:
                view = np.ascontiguousarray(arrays[:, :, :, ::-1]) if mirrored else arrays
                vectors[(backbone_id, mirrored)] = run.embed_arrays(view)
    return assemble(vectors, feature_ids)


def embed_images(
    images: Sequence[Image.Image],
    feature_ids: Sequence[str],
    *,
    embedder: Callable[[str], backbone.Embedder] = backbone.shared_embedder,
) -> Array:
    """Decoded RGB pictures -> (N, :func:`feature_dim`) feature vectors."""
    if not images:
        return np.zeros((0, feature_dim(feature_ids)), dtype=np.float32)
    return embed_prepared(
        np.stack([prepare(image, feature_ids) for image in images]), feature_ids, embedder=embedder
    )


def draft_side(feature_ids: Sequence[str], factor: int = preprocess.DRAFT_FACTOR) -> int:
    """A JPEG may be decoded at reduced scale down to this side (see :func:`preprocess.draft_side`)."""
    return preprocess.draft_side(max(config.resize_to for config in input_configs(feature_ids)), factor)
