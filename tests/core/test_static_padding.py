"""Exports fold TensorFlow-style padding into the convolutions and compute the same values."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from taskvision.backbone import export_onnx, onnx_session
from taskvision.static_padding import fold_pads_into_convs, make_padding_static


def _same_padded_net() -> Any:
    """Stride-2 and dilated "same" convolutions (timm's Conv2dSame), the layers tf_efficientnet uses."""
    import torch
    from timm.layers import create_conv2d
    from timm.layers.conv2d_same import Conv2dSame

    torch.manual_seed(0)
    net = torch.nn.Sequential(
        create_conv2d(3, 8, 3, stride=2, padding="same"),
        torch.nn.ReLU(),
        create_conv2d(8, 8, 5, stride=2, padding="same", groups=8),  # depthwise, as EfficientNet's
        create_conv2d(8, 4, 3, stride=2, dilation=2, padding="same"),
    ).eval()
    assert sum(isinstance(m, Conv2dSame) for m in net.modules()) >= 2
    return net


@pytest.mark.parametrize("size", [32, 37])  # even sides pad more at the end; odd ones evenly here
def test_an_export_has_no_pad_left_and_computes_what_torch_does(tmp_path: Path, size: int) -> None:
    import torch
    from timm.layers.conv2d_same import Conv2dSame

    net = _same_padded_net()
    path = tmp_path / "net.onnx"
    export_onnx(net, path, input_size=size)

    ops = [node.op_type for node in onnx.load(str(path)).graph.node]
    assert "Pad" not in ops and "Shape" not in ops
    x = np.random.default_rng(size).standard_normal((3, 3, size, size)).astype(np.float32)
    with torch.inference_mode():
        expected = net(torch.from_numpy(x)).numpy()
    got = onnx_session(path).run(None, {"input": x})[0]
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, atol=1e-5)
    # The module given to the export is left as it was (it may be trained on other sizes).
    assert any(isinstance(m, Conv2dSame) for m in net.modules())


def test_without_the_static_padding_the_export_keeps_its_pads(tmp_path: Path) -> None:
    """What the fold removes: a plain export of the same network pads before each convolution."""
    import torch

    net = _same_padded_net()
    path = tmp_path / "plain.onnx"
    torch.onnx.export(
        net, (torch.zeros(1, 3, 32, 32),), str(path), input_names=["input"], opset_version=17, dynamo=False
    )
    plain = onnx.load(str(path))
    assert sum(node.op_type == "Pad" for node in plain.graph.node) == 3
    assert fold_pads_into_convs(plain) == 0  # its pads depend on the input's shape: not constants


def test_a_made_static_copy_pads_exactly_like_the_original() -> None:
    import torch

    net = _same_padded_net()
    static = make_padding_static(net, 37)
    x = torch.randn(2, 3, 37, 37)
    with torch.inference_mode():
        torch.testing.assert_close(static(x), net(x), rtol=0, atol=0)


def _pad_conv_model(
    mode: str = "constant", fill: float = 0.0, pads: list[int] | None = None
) -> onnx.ModelProto:
    """x -> Pad -> Conv(3x3, pads [0, 0, 0, 0]) -> y, with the pads as an initializer."""
    pads = pads if pads is not None else [0, 0, 0, 0, 0, 0, 1, 1]
    weight = np.random.default_rng(1).standard_normal((2, 1, 3, 3)).astype(np.float32)
    inputs = ["x", "pads", "fill"] if mode == "constant" else ["x", "pads"]
    nodes = [
        helper.make_node("Pad", inputs, ["padded"], mode=mode),
        helper.make_node(
            "Conv", ["padded", "w"], ["y"], kernel_shape=[3, 3], strides=[2, 2], pads=[0, 0, 0, 0]
        ),
    ]
    graph = helper.make_graph(
        nodes,
        "pad-conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 4, 4])],
        [
            numpy_helper.from_array(np.array(pads, dtype=np.int64), "pads"),
            numpy_helper.from_array(np.array(fill, dtype=np.float32), "fill"),
            numpy_helper.from_array(weight, "w"),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {"x": x})[0])


def test_a_zero_pad_moves_into_the_conv_with_begin_and_end_pads_apart() -> None:
    x = np.random.default_rng(2).standard_normal((1, 1, 8, 8)).astype(np.float32)
    model = _pad_conv_model()
    before = _run(model, x)
    assert fold_pads_into_convs(model) == 1
    assert [node.op_type for node in model.graph.node] == ["Conv"]
    conv = model.graph.node[0]
    assert next(a.ints for a in conv.attribute if a.name == "pads") == [0, 0, 1, 1]
    assert {i.name for i in model.graph.initializer} == {"w"}  # the pads and fill went with the Pad
    onnx.checker.check_model(model)
    np.testing.assert_array_equal(_run(model, x), before)


@pytest.mark.parametrize(
    "model",
    [
        _pad_conv_model(mode="reflect"),
        _pad_conv_model(fill=1.0),
        _pad_conv_model(pads=[0, 1, 0, 0, 0, 0, 1, 1]),  # pads the channels
        _pad_conv_model(pads=[0, 0, 0, 0, 0, 0, -1, 0]),  # crops
    ],
    ids=["reflect", "non-zero fill", "channel pad", "negative pad"],
)
def test_a_pad_a_conv_cannot_do_stays(model: onnx.ModelProto) -> None:
    assert fold_pads_into_convs(model) == 0
    assert [node.op_type for node in model.graph.node] == ["Pad", "Conv"]
