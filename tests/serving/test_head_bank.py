"""The head bank: heads read out of head.onnx answer what ONNX Runtime answers, grouped products agree."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from serving.extractors import DEFAULT_FEATURES
from serving.head_bank import HeadBank, linear_head_from_onnx, npz_bytes, read_linear_head
from taskvision.bundle import BundleMeta, linear_head_onnx
from tests.support.bundles import network_onnx, random_head, write_head_bundle


def test_a_gemm_head_is_read_as_arrays_that_answer_like_onnx_runtime(tmp_path: Path) -> None:
    weight, bias = random_head(7, seed=1)
    data = linear_head_onnx(weight, bias)
    head = linear_head_from_onnx(data, DEFAULT_FEATURES)
    assert (
        head is not None and head.weight.shape == (7, weight.shape[1]) and head.features == DEFAULT_FEATURES
    )
    x = np.random.default_rng(2).standard_normal((5, weight.shape[1])).astype(np.float32)
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    expected = session.run(None, {"input": x})[0]
    np.testing.assert_allclose(head.logits(x), expected, atol=1e-5)
    assert head.nbytes == weight.nbytes + bias.nbytes


def test_a_head_that_is_not_one_linear_layer_is_left_to_onnx_runtime(tmp_path: Path) -> None:
    assert linear_head_from_onnx(network_onnx(3, seed=0)[0], DEFAULT_FEATURES) is None


def test_head_npz_is_preferred_when_the_bundle_has_one(tmp_path: Path) -> None:
    meta = write_head_bundle(tmp_path, n_labels=3, seed=3)
    weight, bias = random_head(3, seed=4)  # different from head.onnx's
    head = linear_head_from_onnx(linear_head_onnx(weight, bias), DEFAULT_FEATURES)
    assert head is not None
    (tmp_path / "head.npz").write_bytes(npz_bytes(head))
    read = read_linear_head(tmp_path, BundleMeta.from_json(meta.to_json()), DEFAULT_FEATURES)
    assert read is not None
    np.testing.assert_array_equal(read.weight, weight)


def test_heads_of_one_group_share_one_product_with_the_same_answers() -> None:
    bank = HeadBank()
    heads = {}
    for i, k in enumerate((2, 5, 20)):
        head = linear_head_from_onnx(linear_head_onnx(*random_head(k, seed=i)), DEFAULT_FEATURES)
        assert head is not None
        bank.add(f"task-{i}.v1", head)
        heads[f"task-{i}.v1"] = head
    other = linear_head_from_onnx(linear_head_onnx(*random_head(2, seed=9)), ("another-feature",))
    assert other is not None
    bank.add("other.v1", other)
    assert bank.groups() == {DEFAULT_FEATURES: list(heads), ("another-feature",): ["other.v1"]}
    x = np.random.default_rng(5).standard_normal((3, heads["task-0.v1"].weight.shape[1])).astype(np.float32)
    together = bank.logits(list(heads), x)
    for head, logits in zip(heads.values(), together, strict=True):
        assert logits.shape == (3, head.weight.shape[0])
        np.testing.assert_allclose(logits, head.logits(x), rtol=1e-5, atol=1e-5)
    assert bank.nbytes == sum(h.nbytes for h in heads.values()) + other.nbytes


def test_removing_a_replaced_head_keeps_the_new_one() -> None:
    bank = HeadBank()
    old = linear_head_from_onnx(linear_head_onnx(*random_head(2, seed=0)), DEFAULT_FEATURES)
    new = linear_head_from_onnx(linear_head_onnx(*random_head(2, seed=1)), DEFAULT_FEATURES)
    assert old is not None and new is not None
    bank.add("t.v1", old)
    bank.add("t.v1", new)  # reloaded
    bank.remove("t.v1", old)  # the old predictor stops
    assert bank.get("t.v1") is new
    bank.remove("t.v1", new)
    assert "t.v1" not in bank
