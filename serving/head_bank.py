"""The head bank: frozen-backbone heads kept as numpy matrices instead of one ONNX session each.

A frozen-backbone bundle's ``head.onnx`` is a single Gemm, ``logits = x @ W.T + b``,
over the concatenation of the feature vectors its bundle names in ``features``
(in order). :func:`read_linear_head` reads ``W`` and ``b`` out of it (or out
of a ``head.npz`` holding the same two arrays); a head whose graph is anything
else is not a linear head, and its bundle is served with its own ONNX Runtime
session instead (:class:`taskvision.inference.BundleModel`).

:class:`HeadBank` holds the linear heads of every loaded version, grouped by
their features tuple: the server computes each feature vector of an image
once, and the heads of one group that are asked about the same images are
evaluated with one matrix product (:meth:`HeadBank.logits`). A head is a few
kilobytes to a few hundred (2-20 labels x 1,856 float32 inputs: 15-150 KB),
so ten thousand of them fit in memory where ten thousand ONNX Runtime
sessions would not. What is loaded, and when it is evicted, is the model
repository's business (:mod:`serving.repository`); the bank only holds what
it is given.
"""

from __future__ import annotations

import io
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from taskvision.bundle import BundleMeta

logger = logging.getLogger(__name__)

Array = npt.NDArray[np.float32]
HEAD_ARRAYS_FILE = "head.npz"  # the same W and b as plain arrays (``weight``, ``bias``), when a bundle has it


@dataclass(frozen=True)
class LinearHead:
    """``logits = features @ weight.T + bias`` over the concatenated ``features`` vectors."""

    weight: Array  # (K, D) float32, C-contiguous
    bias: Array  # (K,) float32
    features: tuple[str, ...]

    @property
    def nbytes(self) -> int:
        return int(self.weight.nbytes + self.bias.nbytes)

    def logits(self, embeddings: Array) -> Array:
        return np.asarray(embeddings @ self.weight.T + self.bias, dtype=np.float32)


def read_linear_head(directory: Path, meta: BundleMeta, features: tuple[str, ...]) -> LinearHead | None:
    """The bundle's head as ``W``, ``b``; None when its head is not one linear layer."""
    arrays = directory / HEAD_ARRAYS_FILE
    if arrays.is_file():
        with np.load(arrays) as data:
            if {"weight", "bias"} <= set(data.files):
                return _head(data["weight"], data["bias"], features)
    if not meta.frozen_backbone:
        return None
    return linear_head_from_onnx((directory / meta.weights_file).read_bytes(), features)


def linear_head_from_onnx(data: bytes, features: tuple[str, ...]) -> LinearHead | None:
    """``W`` and ``b`` of an ONNX graph that is exactly one ``Gemm(input, W, b)``; else None."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load_model_from_string(data)
    graph = model.graph
    if len(graph.node) != 1 or graph.node[0].op_type != "Gemm" or len(graph.input) != 1:
        return None
    node = graph.node[0]
    attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    if (
        attributes.get("transA", 0)
        or attributes.get("alpha", 1.0) != 1.0
        or attributes.get("beta", 1.0) != 1.0
    ):
        return None
    initializers = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    if len(node.input) != 3 or node.input[0] != graph.input[0].name:
        return None
    weight, bias = initializers.get(node.input[1]), initializers.get(node.input[2])
    if weight is None or bias is None or weight.ndim != 2:
        return None
    if not attributes.get("transB", 0):
        weight = weight.T
    return _head(weight, np.broadcast_to(bias, (weight.shape[0],)), features)


def _head(weight: npt.ArrayLike, bias: npt.ArrayLike, features: tuple[str, ...]) -> LinearHead:
    w = np.ascontiguousarray(weight, dtype=np.float32)
    b = np.ascontiguousarray(bias, dtype=np.float32).reshape(-1)
    if w.ndim != 2 or b.shape != (w.shape[0],):
        raise ValueError(f"A linear head needs W (K, D) and b (K,); got {w.shape} and {b.shape}.")
    w.setflags(write=False)
    b.setflags(write=False)
    return LinearHead(weight=w, bias=b, features=features)


class HeadBank:
    """The linear heads of the loaded versions, by model name, grouped by features tuple (thread-safe)."""

    def __init__(self) -> None:
        self._heads: dict[str, LinearHead] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._heads)

    def __contains__(self, name: object) -> bool:
        return name in self._heads

    def add(self, name: str, head: LinearHead) -> None:
        with self._lock:
            self._heads[name] = head

    def remove(self, name: str, head: LinearHead | None = None) -> None:
        """Forget ``name``'s head; only if it is still ``head`` when given (a reload replaces it)."""
        with self._lock:
            if head is None or self._heads.get(name) is head:
                self._heads.pop(name, None)

    def get(self, name: str) -> LinearHead:
        head = self._heads.get(name)
        if head is None:
            raise KeyError(f"No head {name!r} in the bank.")
        return head

    @property
    def nbytes(self) -> int:
        """Bytes of all the heads' arrays."""
        with self._lock:
            return sum(head.nbytes for head in self._heads.values())

    def groups(self) -> dict[tuple[str, ...], list[str]]:
        """Model names by the features tuple their heads take."""
        with self._lock:
            heads = list(self._heads.items())
        out: dict[tuple[str, ...], list[str]] = {}
        for name, head in heads:
            out.setdefault(head.features, []).append(name)
        return out

    def logits(self, names: Sequence[str], embeddings: Array) -> list[Array]:
        """Each named head's logits for the same images: one matrix product for the whole group.

        All the heads must take the same features (``embeddings`` is their
        concatenation, (N, D)). Returns one (N, K_i) array per name.
        """
        heads = [self.get(name) for name in names]
        if len({head.features for head in heads}) > 1:
            raise ValueError("Heads of different feature groups cannot share one product.")
        if len(heads) == 1:
            return [heads[0].logits(embeddings)]
        weight = np.concatenate([head.weight for head in heads])
        bias = np.concatenate([head.bias for head in heads])
        stacked = np.asarray(embeddings @ weight.T + bias, dtype=np.float32)
        splits = np.cumsum([head.weight.shape[0] for head in heads])[:-1]
        return list(np.split(stacked, splits, axis=1))


def npz_bytes(head: LinearHead) -> bytes:
    """``head`` as a ``head.npz`` (what :func:`read_linear_head` reads)."""
    out = io.BytesIO()
    np.savez(out, weight=head.weight, bias=head.bias)
    return out.getvalue()
