"""Refitting a partial fine-tune's last layer: a retrain of a barely changed dataset in seconds.

A partially fine-tuned network (:mod:`components.lib.partial_finetune`) ends in
one linear layer over standardized pooled features; in its ONNX graph the node
that makes the output is a ``Gemm`` whose first input is those features. When
a retrain's dataset barely changed (:func:`components.lib.selection.reusable_choice`),
fine-tuning the blocks again would cost a minute for little change: the retrain
keeps the tuned blocks and refits that layer alone, its penalty chosen by
cross-validation like a linear candidate's, on the features of every training
image (old and new), standardized with spreads floored at the median one as the
fine-tune's own head was (:data:`components.lib.partial_finetune.STD_FLOOR`).
The new ``model.onnx`` is the previous one with the layer's two initializers
replaced, so the network's answers are exactly ``features @ W.T + b``.

The features of each image go into the bundle as ``tuned_features.npz``
(:data:`FEATURES_FILE`: the images' sha256, centre-crop features as float32
and mirror-image ones as float16, about 7.5 KB an image), written by the full
fine-tune and carried forward, with the new images' and without those no
longer in the dataset, by each refit: a refit computes features only for
images the previous version did not have. The
training images' come from the float16 activations the fine-tune trained on
(within about 1 % of the exported network's); a test image's must be the
network's own (``exact``), since the evaluation's metrics are computed from
them: a refit recomputes those of test images that were training images
before. The file is a training artifact: the register step stores it
beside the bundle, serving never reads it.

Regression's fine-tune averaged with the distribution head (``partial_finetune+distribution``)
ends in the average of two members, not in one layer. Its bundle keeps the training images'
features of the tuned layer and the tuned tail's weights (:data:`TAIL_FILE`); a refit keeps
the tuned blocks, refits the tuned layer (its penalty chosen by the average's cross-validated
score) and the distribution head on every training image, and exports the network again
(``components.lib.train._refit_with_distribution``): 28 s for the 1,500 faces of ``ages``
against 89 s for the full selection, which fine-tunes twice (README, Retrain).
"""

from __future__ import annotations

import hashlib
import io
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from components.lib.embeddings import RUN_BATCH, batches_of_images, mirror, prepared_arrays
from taskvision import backbone
from taskvision.dataset import ManifestRow
from taskvision.preprocess import draft_side
from taskvision.storage import BlobStore

if TYPE_CHECKING:
    import onnx
    import onnxruntime

logger = logging.getLogger(__name__)

Array = npt.NDArray[np.float32]
FEATURES_FILE = "tuned_features.npz"
# A network that does not end in one linear layer (regression's fine-tune averaged with the
# distribution head) cannot have one layer swapped in its graph: its bundle also keeps the tuned
# tail's weights (:meth:`components.lib.partial_finetune.TunedTail.save`, about 4 MB for Lite0),
# and a refit rebuilds the network from them with both members refitted and exports it again.
TAIL_FILE = "tuned_tail.npz"
# What the register step stores beside a bundle for the next retrain (serving reads neither).
RETRAIN_FILES = (FEATURES_FILE, TAIL_FILE)


@dataclass(frozen=True)
class FinalLayer:
    """Where the network's last linear layer is in its ONNX graph."""

    features: str  # the tensor it reads: the standardized pooled features
    weight: str  # initializer names
    bias: str
    trans_b: bool  # torch's Linear exports W as (outputs, features) with transB=1


def final_layer(model: onnx.ModelProto) -> FinalLayer:
    """The ``Gemm`` that makes the graph's output; ValueError for a network that does not end in one."""
    output = model.graph.output[0].name
    node = next((n for n in model.graph.node if output in n.output), None)
    if node is None or node.op_type != "Gemm" or len(node.input) != 3:
        raise ValueError("The network does not end in a linear layer.")
    attributes = {a.name: a for a in node.attribute}
    for name in ("alpha", "beta"):
        if name in attributes and attributes[name].f != 1.0:
            raise ValueError(f"The network's last layer scales by {name}.")
    trans_a = "transA" in attributes and attributes["transA"].i == 1
    if trans_a:
        raise ValueError("The network's last layer transposes its input.")
    trans_b = "transB" in attributes and attributes["transB"].i == 1
    return FinalLayer(node.input[0], node.input[1], node.input[2], trans_b)


def _initializers(model: onnx.ModelProto) -> dict[str, Any]:
    return {init.name: init for init in model.graph.initializer}


def layer_arrays(model: onnx.ModelProto) -> tuple[Array, Array]:
    """The last layer's ``(W, b)`` with W as (outputs, features): logits = features @ W.T + b."""
    from onnx import numpy_helper

    layer = final_layer(model)
    inits = _initializers(model)
    w = numpy_helper.to_array(inits[layer.weight]).astype(np.float32)
    b = numpy_helper.to_array(inits[layer.bias]).astype(np.float32)
    return (w if layer.trans_b else w.T), b


def model_arrays(path: Path) -> tuple[Array, Array]:
    """:func:`layer_arrays` of the ``model.onnx`` at ``path``."""
    import onnx

    return layer_arrays(onnx.load(str(path)))


def trunk_id(model: onnx.ModelProto) -> str:
    """A hash of every weight but the last layer's: the same for a network and all its refits."""
    layer = final_layer(model)
    digest = hashlib.sha256()
    for init in model.graph.initializer:
        if init.name not in (layer.weight, layer.bias):
            digest.update(init.name.encode())
            digest.update(init.SerializeToString())
    return digest.hexdigest()[:16]


def with_layer(model: onnx.ModelProto, serialized: bytes, w: Array, b: Array) -> bytes:
    """The network ``model`` (``serialized``: its bytes) with its last layer set to ``(W, b)``, W as
    (outputs, features).

    The new weights have the old ones' shapes, so their bytes take the old ones' place in the
    serialized network: protobuf would take 0.2-0.6 s to write a 13 MB network out again. The
    result is parsed back and checked; where the old bytes are not found exactly once, the
    network is written out by protobuf after all.
    """
    import onnx
    from onnx import numpy_helper

    layer = final_layer(model)
    inits = _initializers(model)
    weight = np.ascontiguousarray(w if layer.trans_b else w.T, dtype=np.float32)
    bias = np.ascontiguousarray(b, dtype=np.float32)
    old_w, old_b = (numpy_helper.to_array(inits[name]) for name in (layer.weight, layer.bias))
    if weight.shape != old_w.shape or bias.shape != old_b.shape:
        raise ValueError(f"A layer of shape {weight.shape} cannot replace one of shape {old_w.shape}.")
    spliced = serialized
    for name, new in ((layer.weight, weight), (layer.bias, bias)):
        old = inits[name].raw_data
        if not old or spliced.count(old) != 1:
            break
        spliced = spliced.replace(old, new.tobytes())
    else:
        back = layer_arrays(onnx.load_from_string(spliced))
        if np.array_equal(back[0], w) and np.array_equal(back[1], bias):
            return spliced
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    inits = _initializers(copy)
    inits[layer.weight].CopyFrom(numpy_helper.from_array(weight, layer.weight))
    inits[layer.bias].CopyFrom(numpy_helper.from_array(bias, layer.bias))
    return bytes(copy.SerializeToString())


def features_session(model: onnx.ModelProto) -> onnxruntime.InferenceSession:
    """An ONNX Runtime session of the network that also outputs its last layer's input features."""
    import onnx
    import onnxruntime as ort

    layer = final_layer(model)
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    copy.graph.output.append(onnx.helper.make_tensor_value_info(layer.features, onnx.TensorProto.FLOAT, None))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.inter_op_num_threads = 1
    return ort.InferenceSession(
        copy.SerializeToString(), sess_options=options, providers=["CPUExecutionProvider"]
    )


def run_features(session: onnxruntime.InferenceSession, arrays: Array) -> Array:
    """Features of preprocessed images (N, 3, H, W): the second output of a :func:`features_session`."""
    return run_batches(session, arrays, output=1)


def run_batches(session: onnxruntime.InferenceSession, arrays: Array, *, output: int) -> Array:
    """The network's output number ``output`` of preprocessed images (N, 3, H, W), in runs of
    :data:`RUN_BATCH`."""
    runs = range(0, len(arrays), RUN_BATCH)
    out = [session.run(None, {"input": arrays[i : i + RUN_BATCH]})[output] for i in runs]
    return np.concatenate(out).astype(np.float32) if out else np.zeros((0, 0), dtype=np.float32)


@dataclass
class TunedFeatures:
    """Each image's features, by sha256: its centre crop's and (when known) its mirror image's."""

    centre: dict[str, Array]
    mirrored: dict[str, Array]
    exact: set[str]  # whose centre features the exported network computed (not the activations)

    @staticmethod
    def empty() -> TunedFeatures:
        return TunedFeatures({}, {}, set())

    @staticmethod
    def from_bytes(data: bytes) -> TunedFeatures:
        with np.load(io.BytesIO(data)) as npz:  # each member read once: indexing npz reads it again
            shas = [str(s) for s in npz["sha256"]]
            centre, mirrored = npz["centre"].astype(np.float32), npz["mirrored"].astype(np.float32)
            has_mirror, exact = npz["has_mirror"], npz["exact"]
        return TunedFeatures(
            {s: centre[i] for i, s in enumerate(shas)},
            {s: mirrored[i] for i, s in enumerate(shas) if has_mirror[i]},
            {s for i, s in enumerate(shas) if exact[i]},
        )

    def add(self, shas: Sequence[str], centre: Array, mirrored: Array | None = None, *, exact: bool) -> None:
        for i, sha in enumerate(shas):
            self.centre[sha] = centre[i]
            if mirrored is not None:
                self.mirrored[sha] = mirrored[i]
            if exact:
                self.exact.add(sha)
            else:
                self.exact.discard(sha)

    def keep_only(self, shas: Iterable[str]) -> int:
        """Forget the images not in ``shas`` (removed from the dataset); how many were forgotten."""
        wanted = set(shas)
        gone = [sha for sha in self.centre if sha not in wanted]
        for sha in gone:
            del self.centre[sha]
            self.mirrored.pop(sha, None)
            self.exact.discard(sha)
        return len(gone)

    def write(self, path: Path) -> None:
        shas = sorted(self.centre)
        dim = len(next(iter(self.centre.values()))) if shas else 0
        mirrored = np.zeros((len(shas), dim), dtype=np.float16)
        has_mirror = np.zeros(len(shas), dtype=bool)
        for i, sha in enumerate(shas):
            if sha in self.mirrored:
                mirrored[i], has_mirror[i] = self.mirrored[sha], True
        np.savez(
            path,
            sha256=np.asarray(shas),
            centre=np.stack([self.centre[s] for s in shas]).astype(np.float32)
            if shas
            else np.zeros((0, 0), np.float32),
            mirrored=mirrored,
            has_mirror=has_mirror,
            exact=np.asarray([s in self.exact for s in shas], dtype=bool),
        )

    def complete(
        self,
        store: BlobStore,
        rows: Sequence[ManifestRow],
        session: Any,
        backbone_id: str,
        *,
        with_mirror: bool,
        exact: bool,
        max_pixels: int,
    ) -> int:
        """Compute the features of ``rows`` it lacks (both views with ``with_mirror``, the network's own
        with ``exact``); how many images ran.

        ``session`` is called only when something is missing (a callable giving the features session).
        """
        todo = list(
            {
                row.sha256: row
                for row in rows
                if row.sha256 not in self.centre
                or (with_mirror and row.sha256 not in self.mirrored)
                or (exact and row.sha256 not in self.exact)
            }.values()
        )
        if not todo:
            return 0
        spec = backbone.backbone_spec(backbone_id)
        runner = session()
        for span, images in batches_of_images(
            store, todo, max_pixels=max_pixels, min_side=draft_side(spec.preprocess.resize_to)
        ):
            arrays = np.stack([prepared_arrays(image, [spec.id])[spec.id] for image in images])
            shas = [todo[k].sha256 for k in span]
            self.add(
                shas,
                run_features(runner, arrays),
                run_features(runner, mirror(arrays)) if with_mirror else None,
                exact=True,
            )
        return len(todo)

    def matrix(self, rows: Sequence[ManifestRow], *, mirrored: bool = False) -> Array:
        source = self.mirrored if mirrored else self.centre
        return np.stack([source[row.sha256] for row in rows]).astype(np.float32)
