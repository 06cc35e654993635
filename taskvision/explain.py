"""Explanations: class-activation maps of a classification, as small heat-map PNGs and a top region.

**Frozen-backbone heads (CAM).** The head is linear over the backbone's
multi-scale embedding, and every part of that embedding is a pooling of a
feature map: the final 1280-channel map (7x7 for Lite0 at 224 px,
average-pooled) and blocks 3, 4 (14x14, averaged) and 5 (7x7, averaged and
max-pooled). So a logit splits exactly into one contribution per image
location: location (i, j) of a map with H x W cells contributes
``w . A[:, i, j] / (H W)`` for an averaged part, and the maximum of a
max-pooled channel contributes ``w_k A_k`` at the location where it was taken.
:func:`cam` adds these up on one grid over the image: each map's cells
partition the crop the backbone saw into equal squares, and a cell's
contribution is shared among the grid cells it overlaps, in proportion to the
area (for Lite0 a 7x7 cell is shared equally by the four 14x14 cells it
covers). The grid sums to the logit minus the bias. The maps come from a second
ONNX export of the same backbone that also outputs them (:func:`maps_onnx_path`),
run only for requests that ask for explanations.

A head's input is the concatenation of its bundle's ``features``
(:mod:`taskvision.features`); each part is a slice of a backbone's
embedding, of the image or (``+hflip``) averaged with its mirror image's. So
the head's weights split exactly into weights over each backbone's embedding
of the image and of the mirror image (:func:`view_weights`), and the mirror
image's map, flipped back, adds to the image's. A head over several backbones
(Lite0, Lite1 at 240 px, Lite2 at 260 px: ``best``'s concatenations) adds each
backbone's maps on one grid over the largest of their centre crops (Lite2's
89 % of the shorter side against Lite0's 87.5 %; the crops share their centre,
up to a pixel of rounding): :func:`explanation_grid` says where each
backbone's crop lies on it and how fine it is (the finest backbone's block-3
grid: 14, 15 or 17 cells). A cell is placed by the crop's equal partition,
not by the convolutions' exact padding (Lite1's 8 block-5 cells at stride 32
span 256 px of its 240), which moves a coarse cell's share by at most half a
cell; the sums stay exact.

**Distribution heads (integrated gradients).** Regression's distribution head
(:mod:`components.lib.distribution_head`: an MLP and a softmax over value bins)
reads the same pooled embedding, but its answer is not linear in it, so it has
no weights to split. :class:`DistributionHead` reads its arrays back from its
``head.onnx`` (checking that they give the served answers) and computes the
gradient of the answer analytically; integrated gradients average it along the
path from the training features' mean to the image's features, and those
per-image weights are split over the maps exactly as a linear head's are
(:func:`head_cam`): the heat map shows where the features raise the answer above
the average training image's.

**Fine-tuned networks (Grad-CAM).** A fine-tuned bundle's ``model.onnx`` ends
in global average pooling and a linear classifier (timm's EfficientNet).
:class:`GradCamNetwork` adds the last feature map ``A`` (the pooling's input)
as an output of the graph. The gradient of class score ``y_c`` with respect
to ``A_k[i, j]`` through pooling and a linear layer is ``W_ck / (H W)`` at
every location, so Grad-CAM's channel weights (the spatially averaged
gradients) are ``W_ck / (H W)`` and the map is ``ReLU(sum_k W_ck / (H W) A_k)``:
computed here without automatic differentiation, and checked against torch
autograd in the tests. Per-channel constants between the pooling and the
classifier (a partial fine-tune's head standardizes its input: ``(x - mean) /
std``) fold into ``W``: a shift changes only the bias, a scale scales ``W``'s
columns. A partial fine-tune averaged with a linear head
(:meth:`components.lib.partial_finetune.TunedTail.export_ensemble`)
concatenates the tuned pooled features with the frozen embedding before its
one linear layer: its Grad-CAM is the tuned feature map's, with that layer's
columns of the tuned slice (the frozen part's own maps are left out). A graph
that does not end that way is refused
(:class:`~taskvision.errors.ExplainUnavailableError`). Regression's fine-tune
averaged with a distribution head
(:meth:`components.lib.partial_finetune.TunedTail.export_with_distribution`)
answers ``(tuned layer + distribution head) * 0.5``, with the test-time flip
over the image and its mirror image as one batch: the distribution head reads
the frozen embedding, so the answer's gradient on the tuned map is still the
tuned layer's weights, times the constant factors after it, and the mirror
image's map is flipped back and added (:class:`_AnswerTail` checks that graph
shape and refuses any other).

Which score is explained: multi_class explains the class's logit minus the
mean logit (softmax depends only on those differences); multi_label and
regression explain the output's own logit. The heat map is the positive part
of the map scaled to 0-255, a grayscale PNG laid over ``heatmap_box`` (the
centre crop the model saw, in the original image's pixels); ``top_region`` is
the bounding box of the cells at or above half the peak that touch the peak.
"""

from __future__ import annotations

import base64
import io
import logging
import math
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from taskvision import backbone, features
from taskvision.errors import ExplainUnavailableError
from taskvision.preprocess import DEFAULT, PreprocessConfig

if TYPE_CHECKING:
    import onnxruntime
    import torch

logger = logging.getLogger(__name__)

Array = npt.NDArray[np.float32]
Floats = npt.NDArray[np.floating[Any]]  # numpy's arithmetic on float32 arrays, as its stubs type it
GRID = 14  # the explanation grid of Lite0's features: its blocks 3-4 at 224 px (16 px cells)
HEATMAP_SIZE = 56  # pixels of the PNG's side (the console scales it over the crop)
MAP_NAMES = ("final", "block3", "block4", "block5")
MAPS_BACKBONE = backbone.BACKBONE_ID  # the default backbone (Lite0)


# ---- the backbone with its feature maps -------------------------------------------------------


def build_maps_model(backbone_id: str = MAPS_BACKBONE) -> torch.nn.Module:
    """The multi-scale embedding network that also returns the feature maps it pools."""
    import torch

    class MultiScaleWithMaps(torch.nn.Module):
        def __init__(self, model: Any) -> None:
            super().__init__()
            self.model = model

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
            m = self.model
            x = m.bn1(m.conv_stem(x))
            maps = []
            for index, block in enumerate(m.blocks):
                x = block(x)
                if index in (3, 4, 5):
                    maps.append(x)
            final = m.bn2(m.conv_head(x))
            b3, b4, b5 = maps
            embedding = torch.cat(
                [
                    final.mean(dim=(2, 3)),
                    b3.mean(dim=(2, 3)),
                    b4.mean(dim=(2, 3)),
                    b5.mean(dim=(2, 3)),
                    b5.amax(dim=(2, 3)),
                ],
                dim=1,
            )
            return embedding, final, b3, b4, b5

    return MultiScaleWithMaps(backbone.build_torch_model(num_classes=0, backbone_id=backbone_id)).eval()


def maps_onnx_path(backbone_id: str = MAPS_BACKBONE) -> Path:
    """The cached ONNX export of :func:`build_maps_model` (exported with torch on first use)."""
    spec = backbone.backbone_spec(backbone_id)
    name = f"{spec.embedding_id}-maps"
    key = backbone.export_key(f"{name}-v1", backbone_id, str(spec.embedding_dim))
    path = backbone.cache_dir() / f"{name}-{key}.onnx"
    if not path.exists():
        logger.info("exporting %s with its feature maps to ONNX at %s (once)", spec.embedding_id, path)
        backbone.export_onnx(
            build_maps_model(backbone_id),
            path,
            input_size=spec.preprocess.input_size,
            output_names=["embedding", *MAP_NAMES],
        )
    return path


@dataclass(frozen=True)
class FeatureMaps:
    """One batch through the maps backbone: the embedding (N, D) and the maps it pools."""

    embeddings: Array
    final: Array  # (N, 1280, 7, 7) for Lite0 at 224 px
    block3: Array  # (N, 80, 14, 14)
    block4: Array  # (N, 112, 14, 14)
    block5: Array  # (N, 192, 7, 7)


class MapsBackbone:
    """The backbone export with feature maps, on ONNX Runtime (loaded on first use, thread-safe)."""

    def __init__(
        self, session: onnxruntime.InferenceSession | None = None, *, backbone_id: str = MAPS_BACKBONE
    ) -> None:
        self._session = session
        self.backbone_id = backbone_id
        self._lock = threading.Lock()

    @property
    def session(self) -> onnxruntime.InferenceSession:
        with self._lock:
            if self._session is None:
                self._session = backbone.onnx_session(maps_onnx_path(self.backbone_id), spinning=False)
            return self._session

    def run(self, arrays: Array) -> FeatureMaps:
        outputs = self.session.run(None, {"input": arrays.astype(np.float32, copy=False)})
        embedding, final, b3, b4, b5 = (np.asarray(o, dtype=np.float32) for o in outputs)
        return FeatureMaps(embeddings=embedding, final=final, block3=b3, block4=b4, block5=b5)


_MAPS: dict[str, MapsBackbone] = {}
_MAPS_LOCK = threading.Lock()


def shared_maps_backbone(backbone_id: str = MAPS_BACKBONE) -> MapsBackbone:
    """The process-wide maps backbone of ``backbone_id`` (loaded on first use)."""
    backbone.backbone_spec(backbone_id)  # a ValueError for an unknown backbone
    with _MAPS_LOCK:
        if backbone_id not in _MAPS:
            _MAPS[backbone_id] = MapsBackbone(backbone_id=backbone_id)
        return _MAPS[backbone_id]


View = tuple[str, bool]  # (backbone id, mirrored)


def view_weights(feature_ids: Sequence[str], weights: Array) -> dict[View, Array]:
    """Rows (R, D) over the concatenated ``feature_ids`` as rows over each backbone's embedding of
    the image (``(backbone, False)``) and of its mirror image (``(backbone, True)``, only when a
    ``+hflip`` id needs it). Rows of each image (N, R, D) split the same way.

    ``x @ weights.T`` equals the sum of ``e[view] @ out[view].T`` over the views, exactly.
    """
    out: dict[View, Array] = {}

    def rows(view: View) -> Array:
        if view not in out:
            dim = backbone.backbone_spec(view[0]).embedding_dim
            out[view] = np.zeros((*weights.shape[:-1], dim), dtype=np.float32)
        return out[view]

    offset = 0
    for fid in feature_ids:
        spec = features.feature_spec(fid)
        part = weights[..., offset : offset + spec.dim]
        offset += spec.dim
        if spec.hflip_mean:
            rows((spec.backbone_id, False))[..., spec.start : spec.stop] += 0.5 * part
            rows((spec.backbone_id, True))[..., spec.start : spec.stop] += 0.5 * part
        else:
            rows((spec.backbone_id, False))[..., spec.start : spec.stop] += part
    if offset != weights.shape[-1]:
        raise ValueError(f"The head takes {weights.shape[-1]} inputs; {list(feature_ids)} give {offset}.")
    return out


@dataclass(frozen=True)
class ExplanationGrid:
    """Where a head's maps are added up: ``size`` x ``size`` cells over the centre crop of
    ``config`` (the largest crop of the head's backbones); ``spans[b]`` is the part of that crop's
    side, as fractions ``(start, stop)``, that backbone ``b``'s own crop covers."""

    size: int
    config: PreprocessConfig
    spans: dict[str, tuple[float, float]]


def explanation_grid(feature_ids: Sequence[str]) -> ExplanationGrid:
    """The grid the maps of a head over ``feature_ids`` are added up on (see the module docstring).

    Lite0's features alone: :data:`GRID` cells over Lite0's crop, as before there were several backbones.
    """
    configs = {b: backbone.backbone_spec(b).preprocess for b in features.backbones_needed(feature_ids)}
    widest = max(configs.values(), key=lambda c: c.input_size / c.resize_to)
    spans = {}
    for b, config in configs.items():
        share = (config.input_size / config.resize_to) / (widest.input_size / widest.resize_to)
        spans[b] = ((1.0 - share) / 2.0, (1.0 + share) / 2.0)
    size = max(-(-c.input_size // 16) for c in configs.values())  # blocks 3-4 have stride 16
    return ExplanationGrid(size=size, config=widest, spans=spans)


@dataclass(frozen=True)
class HeadMaps:
    """Images through the maps backbones a head's features need: the head's input (N, D) and each
    view's maps (the image's, and the mirror image's for a ``+hflip`` feature)."""

    inputs: Array
    maps: dict[View, FeatureMaps]


def head_maps(inputs: Array | Mapping[PreprocessConfig, Array], feature_ids: Sequence[str]) -> HeadMaps:
    """Run the maps backbones of ``feature_ids`` on ``inputs``: the images preprocessed for each
    backbone the features need (keyed by its :class:`~taskvision.preprocess.PreprocessConfig`),
    or one array when they need one backbone."""
    needed = features.backbones_needed(feature_ids)
    if isinstance(inputs, np.ndarray) and len(needed) != 1:
        raise ValueError(f"{list(feature_ids)} need {len(needed)} preprocessings; one array was given.")
    maps: dict[View, FeatureMaps] = {}
    for fid in feature_ids:
        spec = features.feature_spec(fid)
        for mirrored in (False, True) if spec.hflip_mean else (False,):
            if (spec.backbone_id, mirrored) in maps:
                continue
            arrays = (
                inputs
                if isinstance(inputs, np.ndarray)
                else inputs[backbone.backbone_spec(spec.backbone_id).preprocess]
            )
            if mirrored:  # the mirror image's input is the input reversed along its width
                arrays = np.ascontiguousarray(arrays[:, :, :, ::-1])
            maps[(spec.backbone_id, mirrored)] = shared_maps_backbone(spec.backbone_id).run(arrays)
    embeddings = {view: m.embeddings for view, m in maps.items()}
    return HeadMaps(inputs=features.assemble(embeddings, feature_ids), maps=maps)


def head_cam(head: HeadMaps, feature_ids: Sequence[str], rows: Array) -> Array:
    """The maps (N, R, G, G) of weight rows over the head's input, on :func:`explanation_grid`'s grid.

    ``rows`` is (R, D), the same for every image, or (N, R, D), one set per image. Each map sums
    to its row's product with that image's head input.
    """
    grid = explanation_grid(feature_ids)
    grids = None
    for (b, mirrored), view_rows in view_weights(feature_ids, rows).items():
        part = cam(head.maps[(b, mirrored)], view_rows, size=grid.size, span=grid.spans[b])
        if mirrored:  # flipped back onto the image (the span is centred, so it maps onto itself)
            part = part[:, :, :, ::-1]
        grids = part if grids is None else grids + part
    assert grids is not None
    return np.ascontiguousarray(grids, dtype=np.float32)


def linear_head_cam(
    inputs: Array | Mapping[PreprocessConfig, Array], feature_ids: Sequence[str], rows: Array
) -> tuple[Array, Array]:
    """The head input (N, D) and the maps (N, R, G, G) of R weight rows (:func:`head_maps`, then
    :func:`head_cam`). Each map sums to the row's product with the head input."""
    head = head_maps(inputs, feature_ids)
    return head.inputs, head_cam(head, feature_ids, rows)


# ---- the maps of a linear head (CAM) ---------------------------------------------------------------


def share_matrix(cells: int, span: tuple[float, float], size: int) -> Array:
    """(size, cells): the share of each of ``cells`` equal cells over ``span`` (fractions of a side)
    that falls in each of ``size`` equal cells over the whole side; each column sums to 1."""
    start, stop = span
    source = np.linspace(start, stop, cells + 1)
    target = np.linspace(0.0, 1.0, size + 1)
    ends = np.minimum(target[1:, None], source[None, 1:])
    overlap = ends - np.maximum(target[:-1, None], source[None, :-1])
    return (np.clip(overlap, 0.0, None) / np.diff(source)[None, :]).astype(np.float32)


def cam(
    maps: FeatureMaps, weights: Array, *, size: int = GRID, span: tuple[float, float] = (0.0, 1.0)
) -> Array:
    """Per-location contributions (N, R, size, size) to ``embedding @ weights.T`` for R weight rows:
    (R, D), or (N, R, D) with each image's own rows.

    Each map's cells cover ``span`` of the grid's side (all of it by default) and share their
    contributions among the grid cells they overlap. Each grid sums to the corresponding product
    (the logit without its bias).
    """
    n, r = maps.final.shape[0], weights.shape[-2]
    per_image = weights.ndim == 3
    c_final, c3, c4, c5 = (m.shape[1] for m in (maps.final, maps.block3, maps.block4, maps.block5))
    w_final, w3, w4, w5_mean, w5_max = np.split(
        weights.astype(np.float32), np.cumsum([c_final, c3, c4, c5, c5])[:-1], axis=-1
    )

    def averaged(w: Array, feature_map: Array) -> Array:  # (N, R, H, W)
        h, w_ = feature_map.shape[2:]
        rows = "nrk" if per_image else "rk"
        return np.einsum(f"{rows},nkij->nrij", w, feature_map) / np.float32(h * w_)

    # Max-pooled block 5: channel k's maximum is taken at one location; its whole term goes there.
    block5 = averaged(w5_mean, maps.block5)
    flat = maps.block5.reshape(n, c5, -1)
    where = flat.argmax(axis=2)  # (N, C5)
    peak = np.take_along_axis(flat, where[:, :, None], axis=2)[:, :, 0]  # (N, C5)
    for image in range(n):
        contribution = (w5_max[image] if per_image else w5_max) * peak[image][None, :]  # (R, C5)
        np.add.at(block5[image].reshape(r, -1).T, where[image], contribution.T)
    out = np.zeros((n, r, size, size), dtype=np.float32)
    for part in (averaged(w_final, maps.final), block5, averaged(w3, maps.block3), averaged(w4, maps.block4)):
        if part.shape[2:] == (size, size) and span == (0.0, 1.0):  # the grid's own cells
            out += part
            continue
        down = share_matrix(part.shape[2], span, size)
        across = share_matrix(part.shape[3], span, size)
        out += down @ part @ across.T  # (T, H) @ (N, R, H, W) @ (W, U)
    return out


def explained_rows(task_type: str, weight: Array) -> Array:
    """Per output, the weights of the score that is explained (see the module docstring)."""
    if task_type == "multi_class":
        return np.asarray(weight - weight.mean(axis=0, keepdims=True), dtype=np.float32)
    return weight


# ---- the maps of a distribution head (integrated gradients) ---------------------------------------

IG_STEPS = 32  # points on the path from the average training image's features to the image's


@dataclass(frozen=True)
class DistributionHead:
    """Regression's distribution head (:mod:`components.lib.distribution_head`) as numpy arrays, read
    back from its ``head.onnx``: ``z = (x - mean) / std``; ``h = W1 z + b1``; ``GELU``;
    ``l = W2 GELU(h) + b2``, one softmax over each output's bins; the answer is the mean of the
    bins' centres (standardized target units).

    Its answer is not linear in the features, so it has no weights to split over the image. Its
    explanation uses integrated gradients instead: along the straight path from the training
    features' mean (``mean``: the average training image's head input) to the image's features
    ``x``, the gradient averaged over :data:`IG_STEPS` points, ``g``, gives the weights. Then
    ``g . (x - mean)`` is the answer minus the average training image's answer, up to the
    midpoint rule's error (the test checks 1 %), and ``g . x``, which :func:`head_cam` splits over
    the image like a linear head's logit, differs from the answer by a constant per image. The
    heat map shows where the features push the answer above the average training image's.
    """

    mean: Array  # (D,)
    std: Array
    w1: Array  # (H, D)
    b1: Array
    w2: Array  # (outputs * bins, H)
    b2: Array
    centres: Array  # (outputs, bins)

    @classmethod
    def from_onnx(cls, model_bytes: bytes, run: Callable[[Array], Array]) -> DistributionHead:
        """Read the arrays of an exported distribution head, then check them: on probe inputs they must
        give what ``run`` (the served ONNX Runtime session: features -> values) gives, within 1e-3.
        Any other graph raises :class:`~taskvision.errors.ExplainUnavailableError`."""
        import onnx
        from onnx import numpy_helper

        refused = ExplainUnavailableError(
            "This model's head is neither a linear layer nor a distribution head."
        )
        graph = onnx.load_from_string(model_bytes).graph
        constants = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
        for node in graph.node:
            if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
                constants[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
        by_input: dict[str, list[Any]] = {}
        for node in graph.node:
            for tensor in node.input:
                by_input.setdefault(tensor, []).append(node)

        def next_op(tensor: str, op: str) -> Any:
            nodes = [n for n in by_input.get(tensor, []) if n.op_type == op]
            if len(nodes) != 1:
                raise refused
            return nodes[0]

        def constant(node: Any) -> Array:
            if len(node.input) != 2 or node.input[1] not in constants:
                raise refused
            return np.asarray(constants[node.input[1]], dtype=np.float32)

        def linear(node: Any) -> tuple[Array, Array]:
            if len(node.input) != 3 or not all(t in constants for t in node.input[1:]):
                raise refused
            weight = np.asarray(constants[node.input[1]], dtype=np.float32)
            transposed = {a.name: a.i for a in node.attribute}.get("transB", 0)
            return (weight if transposed else weight.T), np.asarray(
                constants[node.input[2]], dtype=np.float32
            )

        try:
            sub = next_op(graph.input[0].name, "Sub")
            div = next_op(sub.output[0], "Div")
            first = next_op(div.output[0], "Gemm")
            gemms = [n for n in graph.node if n.op_type == "Gemm"]
            softmax = next(n for n in graph.node if n.op_type == "Softmax")
            centres = constant(next_op(softmax.output[0], "Mul"))
        except StopIteration:
            raise refused from None
        if len(gemms) != 2 or gemms[0] is not first:
            raise refused
        w1, b1 = linear(gemms[0])
        w2, b2 = linear(gemms[1])
        head = cls(
            mean=np.broadcast_to(constant(sub), w1.shape[1:]).copy(),
            std=np.broadcast_to(constant(div), w1.shape[1:]).copy(),
            w1=w1,
            b1=b1,
            w2=w2,
            b2=b2,
            centres=centres.reshape(-1, centres.shape[-1]),
        )
        if head.w2.shape[0] != head.centres.size or head.w2.shape[1] != head.w1.shape[0]:
            raise refused
        spread = head.std * np.random.default_rng(0).standard_normal((4, head.mean.size))
        probes = np.concatenate([head.mean[None], head.mean + spread]).astype(np.float32)
        served = np.asarray(run(probes), dtype=np.float32)
        if served.shape != (len(probes), len(head.centres)) or not np.allclose(
            head.values(probes), served, rtol=1e-3, atol=1e-3
        ):
            raise refused
        return head

    def _forward(self, x: Floats) -> tuple[Floats, Floats, Floats]:
        """(hidden pre-activations (N, H), bin probabilities (N, outputs, bins), values (N, outputs))."""
        hidden = ((x - self.mean) / self.std) @ self.w1.T + self.b1
        logits = (_gelu(hidden) @ self.w2.T + self.b2).reshape(len(x), *self.centres.shape)
        logits -= logits.max(axis=-1, keepdims=True)
        p = np.exp(logits)
        p /= p.sum(axis=-1, keepdims=True)
        return hidden, p, (p * self.centres).sum(axis=-1)

    def values(self, x: npt.ArrayLike) -> Floats:
        """Features (N, D) -> standardized values (N, outputs), as the exported head computes them."""
        return self._forward(np.asarray(x, dtype=np.float32))[2]

    def gradients(self, x: npt.ArrayLike) -> Floats:
        """d value / d features at ``x``: (N, outputs, D)."""
        x = np.asarray(x, dtype=np.float32)
        hidden, p, values = self._forward(x)
        outputs, bins = self.centres.shape
        # d value_o / d logit_{o,b} = p_{o,b} (centre_{o,b} - value_o), and no other output's logits.
        d_logits = p * (self.centres[None] - values[:, :, None])  # (N, O, B)
        w2 = self.w2.reshape(outputs, bins, -1)  # (O, B, H)
        d_hidden = np.matmul(d_logits.transpose(1, 0, 2), w2).transpose(1, 0, 2)  # (N, O, H)
        d_hidden *= _gelu_slope(hidden)[:, None, :]
        return (d_hidden @ self.w1) / self.std  # (N, O, D)

    def attribution_rows(self, x: npt.ArrayLike, *, steps: int = IG_STEPS) -> Array:
        """Integrated gradients' weights (N, outputs, D) of each image (see the class docstring)."""
        x = np.asarray(x, dtype=np.float32)
        alphas = (np.arange(steps, dtype=np.float32) + 0.5) / steps
        path = self.mean[None, None] + alphas[:, None, None] * (x - self.mean)[None]  # (S, N, D)
        slopes = self.gradients(path.reshape(-1, x.shape[1])).reshape(steps, len(x), len(self.centres), -1)
        return slopes.mean(axis=0).astype(np.float32)


def _erf(x: Floats) -> Floats:
    """The error function (Abramowitz and Stegun 7.1.26: within 1.5e-7), numpy has none."""
    a = np.abs(x)
    t = 1.0 / (1.0 + 0.3275911 * a)
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    return np.sign(x) * (1.0 - poly * np.exp(-a * a))


def _gelu(h: Floats) -> Floats:
    return 0.5 * h * (1.0 + _erf(h / math.sqrt(2.0)))


def _gelu_slope(h: Floats) -> Floats:
    return 0.5 * (1.0 + _erf(h / math.sqrt(2.0))) + h * np.exp(-0.5 * h * h) / math.sqrt(2.0 * math.pi)


# ---- Grad-CAM of a fine-tuned network ------------------------------------------------------------


class GradCamNetwork:
    """A fine-tuned ``model.onnx`` that also outputs its last feature map, with its classifier weights."""

    def __init__(self, model_bytes: bytes) -> None:
        import onnx
        from onnx import helper, numpy_helper

        model = onnx.load_model_from_string(model_bytes)
        graph = model.graph
        consumers: dict[str, list[Any]] = {}
        for node in graph.node:
            for name in node.input:
                consumers.setdefault(name, []).append(node)
        initializers = {t.name: t for t in graph.initializer}
        pools = [node for node in graph.node if node.op_type == "GlobalAveragePool"]
        if not pools:
            raise ExplainUnavailableError("The network has no global average pooling to explain.")
        pool = pools[-1]
        tensor = pool.output[0]
        scale: Array | None = None  # per channel, from Mul / Div by constants on the way
        span: tuple[int, int] | None = None  # the pooled features' columns of a concatenation
        # pooled vector -> (Flatten | Reshape | Squeeze | per-channel constant shift or scale)*
        #   -> (one Concat with other features, then more shifts and scales)? -> Gemm
        while True:
            following = consumers.get(tensor, [])
            if len(following) != 1:
                raise ExplainUnavailableError("The pooled features feed more than one layer.")
            node = following[0]
            if node.op_type in ("Flatten", "Reshape", "Squeeze"):
                tensor = node.output[0]
                continue
            if node.op_type == "Concat" and span is None and scale is None:
                # A partial fine-tune averaged with a linear head reads [tuned pooled features,
                # frozen embedding]: the tuned map's gradient is the Gemm's columns of its slice.
                span = _concat_span(model, node, tensor)
                tensor = node.output[0]
                continue
            constant = _constant_operand(node, tensor, initializers)
            if constant is not None:
                if node.op_type in ("Mul", "Div"):
                    factor = 1.0 / constant if node.op_type == "Div" else constant
                    scale = factor if scale is None else scale * factor
                tensor = node.output[0]
                continue
            break
        attributes = _attributes(node)
        if (
            node.op_type != "Gemm"
            or node.input[0] != tensor
            or node.input[1] not in initializers
            or attributes.get("transA", 0)
            or attributes.get("alpha", 1.0) != 1.0
        ):
            raise ExplainUnavailableError("The network does not end in pooling and one linear classifier.")
        weight = numpy_helper.to_array(initializers[node.input[1]]).astype(np.float32)
        weight = weight if attributes.get("transB", 0) else weight.T  # (K, C)
        if scale is not None:  # W (s * x) = (W * s) x
            weight = weight * np.broadcast_to(scale.reshape(-1), (weight.shape[1],))[None, :]
        if span is not None:
            weight = weight[:, span[0] : span[1]]
        tail = _AnswerTail(graph, consumers, pool.input[0])
        answer, answer_factor = tail.follow(node.output[0])
        self.weight: Array = np.ascontiguousarray(weight * np.float32(answer_factor), dtype=np.float32)
        self.mirrored = tail.mirrored  # the map's rows: the images, then their mirror images
        self.logits_name = answer
        self.map_name = pool.input[0]
        graph.output.append(helper.make_tensor_value_info(self.map_name, onnx.TensorProto.FLOAT, None))
        self._bytes = model.SerializeToString()
        self._session: onnxruntime.InferenceSession | None = None
        self._lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        return len(self._bytes)

    def run(self, arrays: Array) -> tuple[Array, Array]:
        """Logits (N, K) and the last feature map (N, C, H, W)."""
        import onnxruntime as ort

        with self._lock:
            if self._session is None:
                options = ort.SessionOptions()
                options.add_session_config_entry("session.intra_op.allow_spinning", "0")
                self._session = ort.InferenceSession(
                    self._bytes, sess_options=options, providers=["CPUExecutionProvider"]
                )
            session = self._session
        name = session.get_inputs()[0].name
        logits, feature_map = session.run(
            [self.logits_name, self.map_name], {name: arrays.astype(np.float32)}
        )
        feature_map = np.asarray(feature_map, dtype=np.float32)
        if self.mirrored:  # the mirror image's map, flipped back, adds to the image's: Grad-CAM is linear
            n = len(arrays)
            if len(feature_map) != 2 * n:
                raise ExplainUnavailableError("The network's feature map does not hold each image twice.")
            feature_map = feature_map[:n] + feature_map[n:, :, :, ::-1]
        return np.asarray(logits, dtype=np.float32), np.ascontiguousarray(feature_map)


class _AnswerTail:
    """What an averaged network does after the tuned features' linear layer, up to its answer.

    :func:`components.lib.partial_finetune._distribution_network` averages that layer's output
    with a distribution head's over the frozen embedding (``(tuned + other) * 0.5``), and with a
    test-time flip runs the image and its mirror image as one batch of twice the size and averages
    the two rows of each answer (``Reshape`` to ``(2, N, K)``, ``ReduceMean`` over axis 0). The
    gradient of the answer with respect to the tuned feature map is then the linear layer's
    weight times the constant factors on the way (0.5 for the average, 0.5 more for the mirror
    pair), on the image's map and, flipped back, on its mirror image's; the other member adds
    nothing as long as it is not computed from that map (checked). Anything else is refused.
    """

    def __init__(self, graph: Any, consumers: dict[str, list[Any]], feature_map: str) -> None:
        from onnx import numpy_helper

        self.graph = graph
        self.consumers = consumers
        self.outputs = {o.name for o in graph.output}
        self.constants: dict[str, Array] = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
        self.producers: dict[str, Any] = {}
        for node in graph.node:
            for name in node.output:
                self.producers[name] = node
            if node.op_type == "Constant":
                value = next((a.t for a in node.attribute if a.name == "value"), None)
                if value is not None:
                    self.constants[node.output[0]] = numpy_helper.to_array(value)
        self.from_map = self._downstream(feature_map)
        self.mirrored = False

    def follow(self, tensor: str) -> tuple[str, float]:
        """(the graph output the answer is, the constant factor from ``tensor`` to it)."""
        factor, partnered = 1.0, False
        while tensor not in self.outputs:
            node = self._only_consumer(tensor)
            other = [name for name in node.input if name != tensor]
            if node.op_type == "Reshape" and not self.mirrored:
                tensor = self._mirror_mean(node)
                factor *= 0.5
                continue
            if node.op_type in ("Mul", "Div") and len(other) == 1 and other[0] in self.constants:
                value = self.constants[other[0]]
                if value.size != 1 or (node.op_type == "Div" and node.input[0] != tensor):
                    raise ExplainUnavailableError("The answer is scaled by more than one number.")
                number = float(value.reshape(-1)[0])
                factor *= number if node.op_type == "Mul" else 1.0 / number
            elif node.op_type == "Add" and len(other) == 1 and not partnered:
                if other[0] in self.from_map:
                    raise ExplainUnavailableError("The answer adds another function of the feature map.")
                partnered = other[0] not in self.constants  # the averaged member (a constant: a shift)
            else:
                raise ExplainUnavailableError(
                    "The network does not end in pooling and one linear classifier."
                )
            tensor = node.output[0]
        return tensor, factor

    def _only_consumer(self, tensor: str) -> Any:
        following = [n for n in self.consumers.get(tensor, []) if n.op_type != "Shape"]
        if len(following) != 1:
            raise ExplainUnavailableError("The classifier's output feeds more than one layer.")
        return following[0]

    def _mirror_mean(self, reshape: Any) -> str:
        """The output of ``Reshape`` to (2, N, K) + ``ReduceMean`` over axis 0 of an image batch
        the graph doubled with its mirror images; refused otherwise."""

        mean = self._only_consumer(reshape.output[0])
        attributes = _attributes(mean)
        axes = attributes.get("axes")
        if axes is None and len(mean.input) > 1 and mean.input[1] in self.constants:
            axes = self.constants[mean.input[1]].reshape(-1).tolist()  # opset 18: axes as an input
        shape = self.producers.get(reshape.input[1])
        leading = (
            self.constants.get(shape.input[0])
            if shape is not None and shape.op_type == "Concat"
            else self.constants.get(reshape.input[1])
        )
        if (
            mean.op_type != "ReduceMean"
            or list(axes or []) != [0]
            or attributes.get("keepdims", 1) != 0
            or leading is None
            or int(leading.reshape(-1)[0]) != 2
            or not self._input_doubled_with_mirror()
        ):
            raise ExplainUnavailableError(
                "The network averages its answers in a way that cannot be explained."
            )
        self.mirrored = True
        return str(mean.output[0])

    def _input_doubled_with_mirror(self) -> bool:
        """Whether the graph's input enters as Concat(axis 0)[input, input flipped along its width]."""

        image = self.graph.input[0].name
        for node in self.consumers.get(image, []):
            if node.op_type != "Concat" or list(node.input)[:1] != [image] or len(node.input) != 2:
                continue
            attributes = _attributes(node)
            flipped = self.producers.get(node.input[1])
            if attributes.get("axis") != 0 or flipped is None or flipped.op_type != "Slice":
                continue
            parts = [self.constants.get(name) for name in flipped.input[1:]]
            if flipped.input[0] != image or len(parts) != 4 or any(p is None for p in parts):
                continue
            _, _, axes, steps = (np.asarray(p).reshape(-1).tolist() for p in parts)
            if axes in ([3], [-1]) and steps == [-1]:
                return True
        return False

    def _downstream(self, tensor: str) -> set[str]:
        """Every tensor computed from ``tensor``."""
        seen, todo = {tensor}, [tensor]
        while todo:
            for node in self.consumers.get(todo.pop(), []):
                for name in node.output:
                    if name not in seen:
                        seen.add(name)
                        todo.append(name)
        return seen


def _attributes(node: Any) -> dict[str, Any]:
    """An ONNX node's attributes by name, as Python values."""
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _concat_span(model: Any, node: Any, tensor: str) -> tuple[int, int]:
    """The columns ``tensor`` fills in the output of Concat ``node`` (along axis 1 of 2-d inputs)."""
    import onnx

    attributes = _attributes(node)
    if attributes.get("axis") not in (1, -1):
        raise ExplainUnavailableError("The pooled features are concatenated along another axis.")
    inferred = onnx.shape_inference.infer_shapes(model)
    widths: dict[str, int] = {}
    for info in [*inferred.graph.value_info, *inferred.graph.output]:
        dims = info.type.tensor_type.shape.dim
        if len(dims) == 2 and dims[1].HasField("dim_value"):
            widths[info.name] = dims[1].dim_value
    inputs = list(node.input)
    if tensor not in inputs or any(name not in widths for name in inputs[: inputs.index(tensor) + 1]):
        raise ExplainUnavailableError("The widths of the concatenated features are unknown.")
    start = sum(widths[name] for name in inputs[: inputs.index(tensor)])
    return start, start + widths[tensor]


def _constant_operand(node: Any, tensor: str, initializers: dict[str, Any]) -> Array | None:
    """The per-channel constant of ``tensor + c``, ``- c``, ``* c`` or ``/ c``; else None.

    ``c`` must be a stored constant of at most one value per channel (a vector or a scalar).
    """
    from onnx import numpy_helper

    if node.op_type not in ("Add", "Sub", "Mul", "Div") or len(node.input) != 2 or tensor not in node.input:
        return None
    other = node.input[1] if node.input[0] == tensor else node.input[0]
    if other not in initializers or other == tensor:
        return None
    if node.op_type in ("Sub", "Div") and node.input[0] != tensor:  # c - x or c / x: not a shift/scale
        return None
    value = numpy_helper.to_array(initializers[other]).astype(np.float32)
    if value.ndim > 1 and any(d != 1 for d in value.shape[:-1]):
        return None
    return value


def grad_cam(feature_map: Array, weights: Array) -> Array:
    """Grad-CAM (N, R, H, W) for R classifier rows (R, C) over a GAP + linear tail (before the ReLU)."""
    _, _, h, w = feature_map.shape
    return np.einsum("rk,nkij->nrij", weights / float(h * w), feature_map).astype(np.float32)


# ---- what a client gets ---------------------------------------------------------------------------


def crop_box(
    width: int, height: int, config: PreprocessConfig = DEFAULT
) -> tuple[float, float, float, float]:
    """The centre crop the model saw, in the original (upright) image's pixels: (left, top, right, bottom).

    Mirrors :func:`taskvision.preprocess.resize_and_crop`.
    """
    scale = config.resize_to / min(width, height)
    resized_w = max(config.input_size, round(width * scale))
    resized_h = max(config.input_size, round(height * scale))
    left = (resized_w - config.input_size) // 2
    top = (resized_h - config.input_size) // 2
    sx, sy = width / resized_w, height / resized_h
    return (left * sx, top * sy, (left + config.input_size) * sx, (top + config.input_size) * sy)


def heatmap_png(grid: Array, size: int = HEATMAP_SIZE) -> bytes:
    """The positive part of ``grid`` (H, W) scaled to 0-255, resized to ``size`` px, as a grayscale PNG."""
    from PIL import Image

    positive = np.maximum(grid, 0.0)
    peak = float(positive.max())
    scaled = positive / peak * 255.0 if peak > 0 else positive
    image = Image.fromarray(np.round(scaled).astype(np.uint8), mode="L")
    image = image.resize((size, size), Image.Resampling.BILINEAR)
    out = io.BytesIO()
    image.save(out, format="PNG", optimize=True)
    return out.getvalue()


def top_cells(grid: Array, fraction: float = 0.5) -> tuple[int, int, int, int]:
    """Bounding cells (row0, col0, row1, col1; exclusive ends) of the region at >= ``fraction`` of the
    peak that is connected (4-neighbours) to the peak."""
    peak_index = np.unravel_index(int(np.argmax(grid)), grid.shape)
    peak = float(grid[peak_index])
    if peak <= 0:
        r, c = int(peak_index[0]), int(peak_index[1])
        return r, c, r + 1, c + 1
    mask = grid >= fraction * peak
    seen = {(int(peak_index[0]), int(peak_index[1]))}
    stack = list(seen)
    while stack:
        r, c = stack.pop()
        for nr, nc in ((r - 1, c), (r + 1, c), (r, c - 1), (r, c + 1)):
            if 0 <= nr < grid.shape[0] and 0 <= nc < grid.shape[1] and mask[nr, nc] and (nr, nc) not in seen:
                seen.add((nr, nc))
                stack.append((nr, nc))
    rows = [r for r, _ in seen]
    cols = [c for _, c in seen]
    return min(rows), min(cols), max(rows) + 1, max(cols) + 1


def explanation(
    grid: Array, label: dict[str, Any], width: int, height: int, config: PreprocessConfig = DEFAULT
) -> dict[str, Any]:
    """One explained label of one image, as the classify answer carries it."""
    left, top, right, bottom = crop_box(width, height, config)
    rows, cols = grid.shape
    r0, c0, r1, c1 = top_cells(grid)
    cell_w, cell_h = (right - left) / cols, (bottom - top) / rows
    return {
        "id": label["id"],
        "name": label["name"],
        "heatmap": "data:image/png;base64," + base64.b64encode(heatmap_png(grid)).decode("ascii"),
        "heatmap_box": [round(left), round(top), round(right), round(bottom)],
        "top_region": [
            round(left + c0 * cell_w),
            round(top + r0 * cell_h),
            round(left + c1 * cell_w),
            round(top + r1 * cell_h),
        ],
    }
