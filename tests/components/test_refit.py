"""Refitting a tuned network's last layer: finding it in the ONNX graph, replacing it, its features."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from components.lib import refit
from taskvision import backbone


def _network(tmp_path: Path, *, seed: int = 0, softmax: bool = False) -> onnx.ModelProto:
    """A tiny image network shaped like a partial fine-tune's: conv, pooled, standardized, linear."""
    import torch

    torch.manual_seed(seed)

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 6, 3)
            self.register_buffer("mean", torch.full((6,), 0.1))
            self.register_buffer("std", torch.full((6,), 2.0))
            self.linear = torch.nn.Linear(6, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            pooled = self.conv(x).mean(dim=(2, 3))
            out = self.linear((pooled - self.get_buffer("mean")) / self.get_buffer("std"))
            return out.softmax(dim=1) if softmax else out

    path = tmp_path / f"net{seed}{softmax}.onnx"
    backbone.export_onnx(Net().eval(), path, input_size=8)
    return onnx.load(str(path))


def _run(model: onnx.ModelProto | bytes, x: np.ndarray) -> list[np.ndarray]:
    import onnxruntime as ort

    data = model if isinstance(model, bytes) else model.SerializeToString()
    return ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(None, {"input": x})  # type: ignore[no-any-return]


def test_the_last_layer_is_found_and_its_features_give_the_networks_answers(tmp_path: Path) -> None:
    model = _network(tmp_path)
    x = np.random.default_rng(0).normal(size=(5, 3, 8, 8)).astype(np.float32)
    logits, features = refit.features_session(model).run(None, {"input": x})
    assert features.shape == (5, 6)
    w, b = refit.layer_arrays(model)
    assert w.shape == (4, 6) and b.shape == (4,)
    np.testing.assert_allclose(features @ w.T + b, logits, atol=1e-5)
    np.testing.assert_allclose(refit.run_features(refit.features_session(model), x), features, atol=1e-6)


def test_a_new_last_layer_changes_the_answers_and_nothing_else(tmp_path: Path) -> None:
    model = _network(tmp_path)
    x = np.random.default_rng(1).normal(size=(3, 3, 8, 8)).astype(np.float32)
    _, features = refit.features_session(model).run(None, {"input": x})
    rng = np.random.default_rng(2)
    w, b = rng.normal(size=(4, 6)).astype(np.float32), rng.normal(size=4).astype(np.float32)

    changed = onnx.load_from_string(refit.with_layer(model, model.SerializeToString(), w, b))

    np.testing.assert_allclose(_run(changed, x)[0], features @ w.T + b, atol=1e-5)
    np.testing.assert_array_equal(refit.layer_arrays(changed)[0], w)
    # The trunk is the same network: its id does not change; another network's does.
    assert refit.trunk_id(changed) == refit.trunk_id(model)
    assert refit.trunk_id(_network(tmp_path, seed=1)) != refit.trunk_id(model)
    with pytest.raises(ValueError, match="cannot replace"):
        refit.with_layer(model, model.SerializeToString(), w[:3], b[:3])


def test_a_new_last_layer_is_written_the_slow_way_where_its_bytes_are_ambiguous(tmp_path: Path) -> None:
    """The old weights' bytes occur twice (a bias of zeros, like another initializer's): the network
    is serialized again, with the same result."""
    from onnx import numpy_helper

    model = _network(tmp_path)
    layer = refit.final_layer(model)
    for init in model.graph.initializer:
        if init.name == layer.bias:
            init.CopyFrom(numpy_helper.from_array(np.zeros(4, np.float32), layer.bias))
    model.graph.initializer.append(numpy_helper.from_array(np.zeros(4, np.float32), "unused_zeros"))
    serialized = model.SerializeToString()
    assert serialized.count(np.zeros(4, np.float32).tobytes()) >= 2
    w, b = np.ones((4, 6), np.float32), np.arange(4, dtype=np.float32)

    changed = onnx.load_from_string(refit.with_layer(model, serialized, w, b))

    np.testing.assert_array_equal(refit.layer_arrays(changed)[0], w)
    np.testing.assert_array_equal(refit.layer_arrays(changed)[1], b)
    x = np.random.default_rng(4).normal(size=(2, 3, 8, 8)).astype(np.float32)
    _, features = refit.features_session(model).run(None, {"input": x})
    np.testing.assert_allclose(_run(changed, x)[0], features @ w.T + b, atol=1e-5)


def test_a_network_that_does_not_end_in_a_linear_layer_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not end in a linear layer"):
        refit.final_layer(_network(tmp_path, softmax=True))


def test_kept_features_round_trip_with_and_without_mirror_images(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    kept = refit.TunedFeatures.empty()
    centre, mirrored = rng.normal(size=(3, 6)).astype(np.float32), rng.normal(size=(3, 6)).astype(np.float32)
    kept.add(["a", "b", "c"], centre, mirrored, exact=False)
    kept.add(["d"], centre[:1] * 2, exact=True)  # a test image: no mirror image, the network's own
    kept.write(tmp_path / refit.FEATURES_FILE)

    back = refit.TunedFeatures.from_bytes((tmp_path / refit.FEATURES_FILE).read_bytes())

    assert set(back.centre) == {"a", "b", "c", "d"} and set(back.mirrored) == {"a", "b", "c"}
    assert back.exact == {"d"}
    np.testing.assert_array_equal(back.centre["b"], centre[1])
    np.testing.assert_allclose(back.mirrored["c"], mirrored[2], atol=2e-3)  # kept as float16
    np.testing.assert_array_equal(back.centre["d"], centre[0] * 2)
