"""TensorFlow-style "same" padding, made static for ONNX export and folded into the convolutions.

timm's ``tf_efficientnet_lite*`` pad their stride-2 convolutions the way
TensorFlow does ("same": one more row and column at the bottom and right than
at the top and left on even sides). timm's ``Conv2dSame`` works that padding out
from the input's size on every call, so the TorchScript exporter writes it as a
chain of ``Shape``/``Gather``/``Ceil``/``Sub``/``Cast`` nodes feeding a ``Pad``
before each of those convolutions. ONNX Runtime cannot fold that chain (the
batch axis is dynamic), so it runs five ``Pad`` nodes on the largest maps of the
network, and each forces its blocked (NCHWc) convolution layout out and back
in around it.

Our exports always take one fixed image size, so the padding is known at
export time:

* :func:`make_padding_static` gives a copy of the torch module whose
  ``Conv2dSame`` layers pad by constants (worked out from one forward pass at
  the export size): the exported ``Pad`` nodes then depend on constants only;
* :func:`fold_pads_into_convs` evaluates those constants and moves each
  zero ``Pad`` into the ``pads`` attribute of the ``Conv`` it feeds (ONNX
  ``Conv`` takes separate begin and end pads), then drops the nodes left
  unused.

The network computes exactly the same values (the same zeros, added by the
convolution instead of before it): Lite0's embeddings came out identical to
the last bit, 1.42x faster in FP32 (9.1 -> 6.43 ms an image, the server's
all-cores session) and 1.61x in INT8 (8.01 -> 4.97 ms; ``bench/padding.py``,
README "Static padding").
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import onnx
    import torch

# Operators whose value can be worked out at export time when all their inputs can.
_FOLDABLE = frozenset(
    {"Constant", "ConstantOfShape", "Concat", "Reshape", "Slice", "Transpose", "Cast", "Unsqueeze", "Squeeze"}
)


def make_padding_static(model: torch.nn.Module, input_size: int) -> torch.nn.Module:
    """A copy of ``model`` whose ``Conv2dSame`` layers pad by constants for ``input_size`` images.

    The model itself is left as it is (it may still be trained on other sizes).
    A model without such layers is returned as it is.
    """
    import torch
    from timm.layers.conv2d_same import Conv2dSame

    if not any(isinstance(m, Conv2dSame) for m in model.modules()):
        return model

    class StaticSameConv(torch.nn.Module):
        """A ``Conv2dSame`` with its padding worked out for one input size: zero pad, then convolve."""

        def __init__(self, conv: Conv2dSame, height: int, width: int) -> None:
            super().__init__()
            top, bottom = _same_padding(height, conv.kernel_size[0], conv.stride[0], conv.dilation[0])
            left, right = _same_padding(width, conv.kernel_size[1], conv.stride[1], conv.dilation[1])
            self.pad = (left, right, top, bottom)  # F.pad's order: the last axis first
            self.conv = conv

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            c = self.conv
            x = torch.nn.functional.pad(x, self.pad)
            return torch.nn.functional.conv2d(x, c.weight, c.bias, c.stride, 0, c.dilation, c.groups)

    model = copy.deepcopy(model)
    sizes: dict[int, set[tuple[int, int]]] = {}  # by module: the sizes it saw (a shared layer may see two)

    def record(module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        sizes.setdefault(id(module), set()).add((int(args[0].shape[-2]), int(args[0].shape[-1])))

    layers = {id(m): m for m in model.modules() if isinstance(m, Conv2dSame)}
    hooks = [layer.register_forward_pre_hook(record) for layer in layers.values()]
    try:
        with torch.inference_mode():
            model(torch.zeros(1, 3, input_size, input_size))
    finally:
        for hook in hooks:
            hook.remove()
    static = {
        key: StaticSameConv(layers[key], *next(iter(seen))) for key, seen in sizes.items() if len(seen) == 1
    }
    for parent in list(model.modules()):
        for child, module in list(parent.named_children()):
            if id(module) in static:
                setattr(parent, child, static[id(module)])
    return model


def _same_padding(size: int, kernel: int, stride: int, dilation: int) -> tuple[int, int]:
    """TensorFlow's "same" padding of one axis: (before, after), the odd one after (as timm pads)."""
    total = max((-(-size // stride) - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


def fold_pads_into_convs(model: onnx.ModelProto) -> int:
    """Move every constant zero ``Pad`` that feeds only a ``Conv`` into that ``Conv``'s ``pads``.

    Changes ``model`` in place and returns how many were folded. A ``Pad`` is
    left where it is unless its pads are known at export time, it pads the
    spatial axes only, by non-negative amounts, with zeros, and its output goes
    to one ``Conv`` (with explicit pads) and nowhere else.
    """
    from onnx import helper

    graph = model.graph
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    graph_outputs = {o.name for o in graph.output}
    values = _ConstantValues(model)
    folded = []
    for pad in graph.node:
        if pad.op_type != "Pad" or len(pad.input) < 2:
            continue
        mode = next((a.s for a in pad.attribute if a.name == "mode"), b"constant")
        pads = values.get(pad.input[1])
        fill = values.get(pad.input[2]) if len(pad.input) > 2 and pad.input[2] else np.zeros(1)
        users = consumers.get(pad.output[0], [])
        if mode != b"constant" or pads is None or fill is None or np.any(fill != 0):
            continue
        if len(users) != 1 or users[0].op_type != "Conv" or pad.output[0] in graph_outputs:
            continue
        conv = users[0]
        attributes = {a.name: a for a in conv.attribute}
        if "auto_pad" in attributes and attributes["auto_pad"].s not in (b"", b"NOTSET"):
            continue
        begins, ends = np.split(pads.astype(np.int64).ravel(), 2)  # ONNX order: all begins, then all ends
        if begins[:2].any() or ends[:2].any() or (pads < 0).any():  # batch or channels, or cropping
            continue
        spatial = len(begins) - 2
        old = list(attributes["pads"].ints) if "pads" in attributes else [0] * (2 * spatial)
        new = [int(old[i] + begins[2 + i]) for i in range(spatial)] + [
            int(old[spatial + i] + ends[2 + i]) for i in range(spatial)
        ]
        if "pads" in attributes:
            conv.attribute.remove(attributes["pads"])
        conv.attribute.append(helper.make_attribute("pads", new))
        conv.input[0] = pad.input[0]
        folded.append(pad)
    for pad in folded:
        graph.node.remove(pad)
    _drop_unused(model)
    return len(folded)


class _ConstantValues:
    """Values of tensors computed from constants alone (evaluated with ONNX's reference runtime)."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.producers = {out: node for node in model.graph.node for out in node.output}
        self.order = {id(node): i for i, node in enumerate(model.graph.node)}
        self.initializers = {i.name: i for i in model.graph.initializer}

    def get(self, name: str) -> np.ndarray | None:
        from onnx import helper, numpy_helper
        from onnx.reference import ReferenceEvaluator

        if name in self.initializers:
            return np.asarray(numpy_helper.to_array(self.initializers[name]))
        nodes = self._ancestors(name)
        if nodes is None:
            return None
        needed = {i for node in nodes for i in node.input} & self.initializers.keys()
        graph = helper.make_graph(
            nodes,
            "constant",
            [],
            [helper.make_tensor_value_info(name, 0, None)],
            [self.initializers[i] for i in sorted(needed)],
        )
        sub = helper.make_model(graph, opset_imports=self.model.opset_import)
        (value,) = ReferenceEvaluator(sub).run([name], {})  # a list: intermediate=False
        return np.asarray(value)

    def _ancestors(self, name: str) -> list[onnx.NodeProto] | None:
        """The nodes that compute ``name``, in graph order; None when it depends on anything but constants."""
        found: dict[int, onnx.NodeProto] = {}
        pending = [name]
        while pending:
            tensor = pending.pop()
            if not tensor or tensor in self.initializers:
                continue
            node = self.producers.get(tensor)
            if node is None or node.op_type not in _FOLDABLE:
                return None
            if id(node) not in found:
                found[id(node)] = node
                pending.extend(node.input)
        return sorted(found.values(), key=lambda node: self.order[id(node)])


def _drop_unused(model: onnx.ModelProto) -> None:
    """Remove nodes (and initializers) whose outputs nothing reads, until none is left."""
    graph = model.graph
    while True:
        read = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
        unused = [node for node in graph.node if not any(out in read for out in node.output)]
        if not unused:
            break
        for node in unused:
            graph.node.remove(node)
    read = {name for node in graph.node for name in node.input}
    for init in [i for i in graph.initializer if i.name not in read]:
        graph.initializer.remove(init)
