"""Explanations: heat maps peak on the object that decided the answer; CAM and Grad-CAM are exact."""

from __future__ import annotations

import base64
import io
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image, ImageDraw

from serving.model import BundlePredictor
from taskvision import backbone, explain
from taskvision.backbone import EMBEDDING_DIM, shared_embedder
from taskvision.errors import ExplainUnavailableError
from taskvision.task_types import TaskType
from tests.support.bundles import meta_for, network_onnx, write_head_bundle, write_network_bundle

SIZE = 224


def _scene(rng: random.Random, kind: str | None, centre: tuple[int, int], radius: int = 22) -> bytes:
    """A smooth random background with a red disc or a blue square at ``centre`` (or nothing)."""
    coarse = Image.frombytes("RGB", (8, 8), bytes(rng.randrange(120, 230) for _ in range(8 * 8 * 3)))
    image = coarse.resize((SIZE, SIZE), Image.Resampling.BILINEAR)
    draw = ImageDraw.Draw(image)
    x, y = centre
    box = (x - radius, y - radius, x + radius, y + radius)
    if kind == "disc":
        draw.ellipse(box, fill=(220, 30, 30))
    elif kind == "square":
        draw.rectangle(box, fill=(30, 40, 210))
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def _centre(rng: random.Random) -> tuple[int, int]:
    # Inside the centre crop the model sees (224 px resized to 256, centre 224: the middle 196 px).
    return rng.randrange(50, 175), rng.randrange(50, 175)


def _training_scenes() -> tuple[list[bytes], np.ndarray]:
    """90 scenes, discs, squares and empty ones in turn (labels 0, 1, 2), anywhere in the crop."""
    rng = random.Random(3)
    labels = np.arange(90) % 3
    return [_scene(rng, ("disc", "square", None)[label], _centre(rng)) for label in labels], labels


def _off_centre(rng: random.Random) -> tuple[int, int]:
    """A place off the vertical centre line, where an object and its mirror place are far apart."""
    return rng.choice([rng.randrange(50, 80), rng.randrange(145, 175)]), rng.randrange(50, 175)


def _off_centre_cases(rng: random.Random) -> list[tuple[str, tuple[int, int]]]:
    """Four discs and four squares off the vertical centre line."""
    return [(kind, _off_centre(rng)) for kind in ("disc", "square") for _ in range(4)]


def _peak(record: dict[str, object]) -> tuple[float, float]:
    """Where the heat map PNG is brightest, in the image's pixels."""
    (explained,) = record["_explanations"]  # type: ignore[misc]
    uri: str = explained["heatmap"]
    assert uri.startswith("data:image/png;base64,")
    heat = np.asarray(Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))), dtype=np.float32)
    left, top, right, bottom = explained["heatmap_box"]
    row, col = np.unravel_index(int(heat.argmax()), heat.shape)
    return left + (col + 0.5) * (right - left) / heat.shape[1], top + (row + 0.5) * (
        bottom - top
    ) / heat.shape[0]


@pytest.fixture(scope="module")
def shapes_head(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A linear head trained (as the train step fits heads) on discs, squares and empty scenes.

    With an "empty" class, each object class's evidence is its object (with two classes
    only, "square" would also mean "no red anywhere", which is all over the background).
    """
    from components.lib.heads import LOGISTIC, HeadSetting, fit_head
    from taskvision.preprocess import preprocess_bytes

    images, labels = _training_scenes()
    arrays = np.stack([preprocess_bytes(data, max_pixels=10**7)[0] for data in images])
    embeddings = shared_embedder().embed_arrays(arrays)
    weight, bias = fit_head(embeddings, labels, TaskType.MULTI_CLASS, HeadSetting(LOGISTIC, 0.1), n_outputs=3)
    directory = tmp_path_factory.mktemp("explain") / "shapes"
    write_head_bundle(directory, weight=weight, bias=bias)
    return directory


@pytest.mark.slow
def test_the_heat_map_peaks_on_the_object(shapes_head: Path) -> None:
    predictor = BundlePredictor("shapes", shapes_head)
    predictor.load()
    rng = random.Random(11)
    cases = [(kind, _centre(rng)) for kind in ("disc", "square") for _ in range(8)]
    answers = predictor.classify([_scene(rng, kind, centre) for kind, centre in cases], explain=True)
    for (kind, (x, y)), answer in zip(cases, answers, strict=True):
        assert isinstance(answer, dict)
        assert answer["best_label"]["name"] == ("label 0" if kind == "disc" else "label 1")
        (explained,) = answer["_explanations"]
        assert explained["id"] == answer["best_label"]["id"]
        px, py = _peak(answer)
        assert abs(px - x) <= 32 and abs(py - y) <= 32, (kind, (x, y), (px, py))  # within two map cells
        left, top, right, bottom = explained["top_region"]
        assert left <= x <= right and top <= y <= bottom, (kind, (x, y), explained["top_region"])
    # The same answers without explanations (explanations run the FP32 maps backbone).
    plain = predictor.classify([_scene(random.Random(11), "disc", _centre(random.Random(11)))])
    assert isinstance(plain[0], dict) and "_explanations" not in plain[0]


@pytest.mark.slow
def test_a_head_over_mirrored_features_peaks_on_the_object(shapes_head: Path, tmp_path: Path) -> None:
    """``+hflip`` features average the image's and its mirror image's embeddings: the mirror image's
    map is flipped back onto the image, so the peak stays on the object (not on its mirror place)."""
    from serving.head_bank import read_linear_head
    from taskvision import features
    from taskvision.bundle import BundleMeta

    plain = read_linear_head(
        shapes_head, BundleMeta.from_json((shapes_head / "bundle.json").read_text()), features.LEGACY_FEATURES
    )
    assert plain is not None
    mirrored = [features.feature_id(backbone.BACKBONE_ID, hflip=True)]
    write_head_bundle(tmp_path / "mirrored", weight=plain.weight, bias=plain.bias, features=mirrored)
    predictor = BundlePredictor("mirrored", tmp_path / "mirrored")
    predictor.load()
    rng = random.Random(12)
    cases = _off_centre_cases(rng)
    answers = predictor.classify([_scene(rng, kind, centre) for kind, centre in cases], explain=True)
    for (kind, (x, y)), answer in zip(cases, answers, strict=True):
        assert isinstance(answer, dict)
        assert answer["best_label"]["name"] == ("label 0" if kind == "disc" else "label 1")
        px, py = _peak(answer)
        assert abs(px - x) <= 32 and abs(py - y) <= 32, (kind, (x, y), (px, py))


@pytest.mark.slow
def test_the_maps_backbone_gives_the_served_embedding() -> None:
    from taskvision.preprocess import preprocess_bytes

    rng = random.Random(5)
    arrays = np.stack(
        [preprocess_bytes(_scene(rng, "disc", _centre(rng)), max_pixels=10**7)[0] for _ in range(3)]
    )
    maps = explain.shared_maps_backbone().run(arrays)
    np.testing.assert_allclose(maps.embeddings, shared_embedder().embed_arrays(arrays), atol=2e-4)
    assert maps.final.shape == (3, 1280, 7, 7) and maps.block3.shape == (3, 80, 14, 14)


def test_cam_splits_each_logit_exactly_over_the_image() -> None:
    rng = np.random.default_rng(0)
    maps = explain.FeatureMaps(
        embeddings=np.zeros((2, EMBEDDING_DIM), np.float32),
        final=rng.random((2, 1280, 7, 7), dtype=np.float32),
        block3=rng.random((2, 80, 14, 14), dtype=np.float32),
        block4=rng.random((2, 112, 14, 14), dtype=np.float32),
        block5=rng.random((2, 192, 7, 7), dtype=np.float32),
    )
    embedding = np.concatenate(
        [
            maps.final.mean(axis=(2, 3)),
            maps.block3.mean(axis=(2, 3)),
            maps.block4.mean(axis=(2, 3)),
            maps.block5.mean(axis=(2, 3)),
            maps.block5.max(axis=(2, 3)),
        ],
        axis=1,
    )
    weights = rng.standard_normal((3, EMBEDDING_DIM)).astype(np.float32)
    grids = explain.cam(maps, weights)
    assert grids.shape == (2, 3, 14, 14)
    np.testing.assert_allclose(grids.sum(axis=(2, 3)), embedding @ weights.T, rtol=1e-4, atol=1e-3)
    # Lite0's grids nest: each 7x7 cell's share goes to the four 14x14 cells it covers, a quarter each.
    w_final, w3, w4, w5_mean, w5_max = np.split(weights, np.cumsum([1280, 80, 112, 192, 192])[:-1], axis=1)
    coarse = (
        np.einsum("rk,nkij->nrij", w_final, maps.final) / 49
        + np.einsum("rk,nkij->nrij", w5_mean, maps.block5) / 49
    )
    for n in range(2):
        for k in range(192):
            i, j = np.unravel_index(int(maps.block5[n, k].argmax()), (7, 7))
            coarse[n, :, i, j] += w5_max[:, k] * maps.block5[n, k].max()
    fine = (np.einsum("rk,nkij->nrij", w3, maps.block3) + np.einsum("rk,nkij->nrij", w4, maps.block4)) / 196
    expected = fine + np.repeat(np.repeat(coarse, 2, axis=2), 2, axis=3) / 4
    np.testing.assert_allclose(grids, expected, rtol=1e-4, atol=1e-5)


def test_cam_shares_cells_that_do_not_nest_by_their_area() -> None:
    """Lite2's maps at 260 px (17x17 and 9x9 cells) on a 17-cell grid where its crop covers the
    middle 96 %: every logit still splits exactly, and a cell's share lands where the cell is."""
    rng = np.random.default_rng(1)
    channels = (1280, 88, 120, 208)
    maps = explain.FeatureMaps(
        embeddings=np.zeros((1, 0), np.float32),
        final=rng.random((1, 1280, 9, 9), dtype=np.float32),
        block3=rng.random((1, 88, 17, 17), dtype=np.float32),
        block4=rng.random((1, 120, 17, 17), dtype=np.float32),
        block5=rng.random((1, 208, 9, 9), dtype=np.float32),
    )
    embedding = np.concatenate(
        [m.mean(axis=(2, 3)) for m in (maps.final, maps.block3, maps.block4, maps.block5)]
        + [maps.block5.max(axis=(2, 3))],
        axis=1,
    )
    weights = rng.standard_normal((2, sum(channels) + 208)).astype(np.float32)
    grids = explain.cam(maps, weights, size=17, span=(0.02, 0.98))
    assert grids.shape == (1, 2, 17, 17)
    np.testing.assert_allclose(grids.sum(axis=(2, 3)), embedding @ weights.T, rtol=1e-4, atol=1e-3)
    assert np.all(grids[0, :, 0, :] != 0)  # the crop's first cells reach into the grid's first row

    # One activation in final cell (2, 6) of 9: it covers [0.02 + 0.96 * 2 / 9, 0.02 + 0.96 * 3 / 9)
    # = [0.233, 0.340) down and [0.660, 0.767) across: grid rows 3-5 and columns 11-13 of 17.
    lone = explain.FeatureMaps(
        embeddings=maps.embeddings,
        final=np.zeros_like(maps.final),
        block3=np.zeros_like(maps.block3),
        block4=np.zeros_like(maps.block4),
        block5=np.zeros_like(maps.block5),
    )
    lone.final[0, 0, 2, 6] = 81.0
    only_final = np.zeros_like(weights)
    only_final[:, 0] = 1.0
    grid = explain.cam(lone, only_final, size=17, span=(0.02, 0.98))[0, 0]
    assert grid.sum() == pytest.approx(1.0, rel=1e-5)
    rows, cols = np.nonzero(grid)
    assert set(rows) == {3, 4, 5} and set(cols) == {11, 12, 13}


def test_share_matrix() -> None:
    np.testing.assert_allclose(explain.share_matrix(14, (0.0, 1.0), 14), np.eye(14), atol=1e-6)
    shares = explain.share_matrix(8, (0.0045, 0.9955), 17)
    assert shares.shape == (17, 8)
    np.testing.assert_allclose(shares.sum(axis=0), 1.0, rtol=1e-5)
    assert shares[0, 0] > 0 and shares[16, 7] > 0 and shares[16, 0] == 0


@pytest.mark.slow
def test_a_head_over_lite1_and_lite2_peaks_on_the_object(tmp_path: Path) -> None:
    """``best``'s heads over other backbones are explained too: each backbone's maps on one grid
    over the largest crop (Lite2's), the mirror image's flipped back; the peak is on the object."""
    from components.lib.heads import LOGISTIC, HeadSetting, fit_head
    from serving.extractors import Extractors
    from taskvision import features
    from taskvision.preprocess import preprocess_bytes

    lite1, lite2 = (backbone.backbone_spec(b) for b in list(backbone.BACKBONES)[1:])
    fids = [features.feature_id(lite1.id), features.feature_id(lite2.id, hflip=True)]
    images, labels = _training_scenes()

    def inputs(data: list[bytes]) -> dict[Any, np.ndarray]:
        return {
            spec.preprocess: np.stack(
                [preprocess_bytes(d, max_pixels=10**7, config=spec.preprocess)[0] for d in data]
            )
            for spec in (lite1, lite2)
        }

    embeddings = Extractors().embed(fids, inputs(images))
    weight, bias = fit_head(embeddings, labels, TaskType.MULTI_CLASS, HeadSetting(LOGISTIC, 0.1), n_outputs=3)
    write_head_bundle(tmp_path / "two", weight=weight, bias=bias, features=fids)
    predictor = BundlePredictor("two", tmp_path / "two")
    predictor.load()
    check = random.Random(12)
    cases = _off_centre_cases(check)
    scenes = [_scene(check, kind, centre) for kind, centre in cases]
    answers = predictor.classify(scenes, explain=True)
    for (kind, (x, y)), answer, plain in zip(cases, answers, predictor.classify(scenes), strict=True):
        assert isinstance(answer, dict) and isinstance(plain, dict)
        assert answer["best_label"]["name"] == ("label 0" if kind == "disc" else "label 1")
        assert answer["best_label"]["prob"] == pytest.approx(plain["best_label"]["prob"], abs=1e-4)
        (explained,) = answer["_explanations"]
        assert explained["heatmap_box"] == [round(v) for v in explain.crop_box(SIZE, SIZE, lite2.preprocess)]
        px, py = _peak(answer)
        assert abs(px - x) <= 32 and abs(py - y) <= 32, (kind, (x, y), (px, py))
    head_input, grids = explain.linear_head_cam(inputs(scenes), fids, weight)
    assert grids.shape == (8, 3, 17, 17)
    np.testing.assert_allclose(head_input, Extractors().embed(fids, inputs(scenes)), atol=2e-4)
    np.testing.assert_allclose(grids.sum(axis=(2, 3)), head_input @ weight.T, rtol=1e-4, atol=1e-3)


def test_grad_cam_of_a_network_equals_torch_autograd(tmp_path: Path) -> None:
    import torch

    data, params = network_onnx(3, seed=4)
    network = explain.GradCamNetwork(data)
    image = np.random.default_rng(1).standard_normal((1, 3, 224, 224)).astype(np.float32)
    logits, feature_map = network.run(image)
    rows = explain.explained_rows("multi_class", network.weight)
    ours = explain.grad_cam(feature_map, rows)[0, 2]

    conv = torch.nn.Conv2d(3, 8, 16, stride=16)
    conv.weight.data, conv.bias.data = torch.from_numpy(params["conv_w"]), torch.from_numpy(params["conv_b"])
    fc = torch.nn.Linear(8, 3)
    fc.weight.data, fc.bias.data = torch.from_numpy(params["fc_w"]), torch.from_numpy(params["fc_b"])
    activations = torch.relu(conv(torch.from_numpy(image)))
    activations.retain_grad()
    scores = fc(activations.mean(dim=(2, 3)))
    (scores[0, 2] - scores[0].mean()).backward()  # multi_class: the class against the mean
    assert activations.grad is not None
    alpha = activations.grad.mean(dim=(2, 3), keepdim=True)
    reference = (alpha * activations).sum(dim=1)[0].detach().numpy()
    np.testing.assert_allclose(logits, scores.detach().numpy(), atol=1e-4)
    np.testing.assert_allclose(ours, reference, rtol=1e-4, atol=1e-5)


def test_a_fine_tuned_bundle_is_explained_with_grad_cam(tmp_path: Path) -> None:
    write_network_bundle(tmp_path / "tuned", n_labels=3, seed=2, task_type=TaskType.MULTI_LABEL)
    predictor = BundlePredictor("tuned", tmp_path / "tuned")
    predictor.load()
    image = _scene(random.Random(1), "disc", (112, 112))
    (answer,) = predictor.classify([image], explain=True)
    assert isinstance(answer, dict)
    tags = [lb for lb in answer["best_label"] if lb["id"].startswith("label-")]
    assert [e["id"] for e in answer["_explanations"]] == [t["id"] for t in tags]  # each tag above threshold
    for explained in answer["_explanations"]:
        assert explained["heatmap_box"] == [14, 14, 210, 210]  # 224 px -> 256, centre 224 crop
        assert explained["heatmap"].startswith("data:image/png;base64,")


def _served(network: Any, folder: Path, task_type: TaskType, n_labels: int) -> BundlePredictor:
    """``network`` (a torch module: image -> answers) exported as a fine-tuned bundle in ``folder``,
    loaded by the predictor that serves it."""
    from taskvision.bundle import MODEL_FILE

    folder.mkdir()
    backbone.export_onnx(network, folder / MODEL_FILE, input_size=224)
    (folder / "bundle.json").write_text(meta_for(task_type, n_labels, frozen=False).to_json())
    predictor = BundlePredictor(folder.name, folder)
    predictor.load()
    return predictor


def _tuned_copy(pretrained: Any) -> Any:
    """A copy of ``pretrained`` whose last block (the one a partial fine-tune trains) differs from it."""
    import copy

    import torch

    tuned = copy.deepcopy(pretrained)
    with torch.no_grad():
        for parameter in tuned.blocks[6].parameters():
            parameter.add_(0.01 * torch.randn_like(parameter))
    return tuned


@pytest.mark.slow
def test_a_partial_fine_tune_is_explained_with_grad_cam(tmp_path: Path) -> None:
    """The exported partial fine-tune standardizes the pooled features before its linear layer;
    Grad-CAM folds that into the weights and still equals torch autograd's."""
    import torch

    from components.lib.partial_finetune import _head, _network
    from taskvision.bundle import MODEL_FILE
    from taskvision.preprocess import preprocess_bytes

    rng = np.random.default_rng(7)
    weight = rng.standard_normal((3, backbone.FINAL_DIM)).astype(np.float32) * 0.1
    mean = rng.random(backbone.FINAL_DIM).astype(np.float32)
    std = (rng.random(backbone.FINAL_DIM) + 0.5).astype(np.float32)
    network = _network(
        backbone.build_torch_model(num_classes=0), _head(weight, np.zeros(3, np.float32), mean, std)
    )
    folder = tmp_path / "partial"
    predictor = _served(network, folder, TaskType.MULTI_CLASS, 3)
    image = _scene(random.Random(2), "disc", (80, 120))
    (answer,) = predictor.classify([image], explain=True)
    assert isinstance(answer, dict)
    (explained,) = answer["_explanations"]
    assert explained["id"] == answer["best_label"]["id"] and explained["heatmap_box"] == [14, 14, 210, 210]

    gradcam = explain.GradCamNetwork((folder / MODEL_FILE).read_bytes())
    arrays = preprocess_bytes(image, max_pixels=10**7)[0][None]
    logits, feature_map = gradcam.run(arrays)
    best = int(logits[0].argmax())
    ours = explain.grad_cam(feature_map, explain.explained_rows("multi_class", gradcam.weight))[0, best]
    activations = network.model.forward_features(torch.from_numpy(arrays))
    activations.retain_grad()
    scores = network.head(activations.mean(dim=(2, 3)))
    (scores[0, best] - scores[0].mean()).backward()
    assert activations.grad is not None
    alpha = activations.grad.mean(dim=(2, 3), keepdim=True)
    reference = (alpha * activations).sum(dim=1)[0].detach().numpy()
    np.testing.assert_allclose(logits, scores.detach().numpy(), atol=1e-3)
    np.testing.assert_allclose(ours, reference, atol=1e-3 * float(np.abs(reference).max()))


def test_graphs_that_do_not_end_in_pooling_and_a_classifier_are_refused(tmp_path: Path) -> None:
    from taskvision.bundle import linear_head_onnx

    with pytest.raises(ExplainUnavailableError):
        explain.GradCamNetwork(linear_head_onnx(np.ones((2, 4), np.float32), np.zeros(2, np.float32)))
    meta = meta_for(TaskType.MULTI_CLASS, 2, frozen=True)
    assert meta.frozen_backbone


def test_top_region_and_crop_box() -> None:
    grid = np.zeros((14, 14), np.float32)
    grid[3:5, 9:12] = 1.0
    grid[4, 10] = 2.0
    grid[12, 1] = 1.5  # bright but not connected to the peak
    assert explain.top_cells(grid) == (3, 9, 5, 12)
    assert explain.crop_box(224, 224) == (14.0, 14.0, 210.0, 210.0)
    left, top, right, bottom = explain.crop_box(1000, 500)  # shorter side 500 -> 256
    assert (round(top), round(bottom)) == (31, 469) and round(right - left) == round(bottom - top)


@pytest.mark.slow
def test_a_fine_tune_averaged_with_a_linear_head_is_explained_with_its_tuned_map(tmp_path: Path) -> None:
    """The averaged network's last layer reads [tuned pooled features, frozen embedding]: Grad-CAM
    of the tuned map uses that layer's columns of the tuned slice, as torch autograd says."""

    import torch

    from components.lib.partial_finetune import _ensemble_network, _standardized_head
    from taskvision.bundle import MODEL_FILE
    from taskvision.preprocess import preprocess_bytes

    rng = np.random.default_rng(8)
    width = backbone.FINAL_DIM + backbone.EMBEDDING_DIM
    weight = rng.standard_normal((3, width)).astype(np.float32) * 0.1
    mean = rng.random(width).astype(np.float32)
    std = (rng.random(width) + 0.5).astype(np.float32)
    pretrained = backbone.build_torch_model(num_classes=0)
    tuned = _tuned_copy(pretrained)
    network = _ensemble_network(tuned, pretrained, _standardized_head(mean, std, weight, np.zeros(3)), 6)
    folder = tmp_path / "averaged"
    predictor = _served(network, folder, TaskType.MULTI_CLASS, 3)
    image = _scene(random.Random(3), "disc", (80, 120))
    (answer,) = predictor.classify([image], explain=True)
    assert isinstance(answer, dict)
    (explained,) = answer["_explanations"]
    assert explained["id"] == answer["best_label"]["id"]

    gradcam = explain.GradCamNetwork((folder / MODEL_FILE).read_bytes())
    assert gradcam.weight.shape == (3, backbone.FINAL_DIM)
    arrays = preprocess_bytes(image, max_pixels=10**7)[0][None]
    logits, feature_map = gradcam.run(arrays)
    best = int(logits[0].argmax())
    ours = explain.grad_cam(feature_map, explain.explained_rows("multi_class", gradcam.weight))[0, best]
    # torch: the same network, with the tuned map's gradient kept.
    x = torch.from_numpy(arrays)
    with torch.no_grad():
        trunk, parts, tap = backbone.trunk(pretrained, x, tap_block=6)
        frozen = pretrained.forward_head(pretrained.bn2(pretrained.conv_head(trunk)), pre_logits=True)
    activations = tuned.bn2(tuned.conv_head(tuned.blocks[6](tap)))
    activations.retain_grad()
    scores = network.head(torch.cat([activations.mean(dim=(2, 3)), frozen, *parts], dim=1))
    (scores[0, best] - scores[0].mean()).backward()
    assert activations.grad is not None
    reference = (activations.grad.mean(dim=(2, 3), keepdim=True) * activations).sum(dim=1)[0].detach().numpy()
    np.testing.assert_allclose(logits, scores.detach().numpy(), atol=1e-3)
    np.testing.assert_allclose(ours, reference, atol=1e-3 * float(np.abs(reference).max()))


@pytest.mark.slow
@pytest.mark.parametrize("test_time_flip", [False, True])
def test_a_fine_tune_averaged_with_a_distribution_head_is_explained_with_its_tuned_map(
    tmp_path: Path, test_time_flip: bool
) -> None:
    """Regression's averaged network answers ``(tuned head + distribution head) * 0.5`` (with the
    test-time flip: over the image and its mirror image). The distribution head reads the frozen
    embedding, not the tuned map, so the answer's Grad-CAM over the tuned map is the tuned head's
    weights times the factors on the way, on the image's map plus the mirror image's flipped
    back: what torch autograd gives."""

    import torch

    from components.lib.partial_finetune import _distribution_network, _standardized_head
    from taskvision.bundle import MODEL_FILE
    from taskvision.preprocess import preprocess_bytes

    rng = np.random.default_rng(9)
    weight = rng.standard_normal((1, backbone.FINAL_DIM)).astype(np.float32) * 0.1
    mean = rng.random(backbone.FINAL_DIM).astype(np.float32)
    std = (rng.random(backbone.FINAL_DIM) + 0.5).astype(np.float32)
    pretrained = backbone.build_torch_model(num_classes=0)
    tuned = _tuned_copy(pretrained)
    torch.manual_seed(0)
    distribution = torch.nn.Sequential(
        torch.nn.Linear(EMBEDDING_DIM, 8), torch.nn.GELU(), torch.nn.Linear(8, 1)
    )
    head = _standardized_head(mean, std, weight, np.zeros(1))
    network = _distribution_network(tuned, pretrained, head, distribution, 6, test_time_flip=test_time_flip)
    folder = tmp_path / "averaged"
    predictor = _served(network, folder, TaskType.REGRESSION, 1)
    image = _scene(random.Random(4), "disc", (80, 120))
    (answer,) = predictor.classify([image], explain=True)
    (plain,) = predictor.classify([image])
    assert isinstance(answer, dict) and isinstance(plain, dict)
    (explained,) = answer["_explanations"]
    assert explained["id"] == "label-0" and explained["heatmap"].startswith("data:image/png;base64,")
    assert answer["best_label"]["value"] == pytest.approx(plain["best_label"]["value"], abs=1e-3)

    gradcam = explain.GradCamNetwork((folder / MODEL_FILE).read_bytes())
    assert gradcam.mirrored is test_time_flip
    arrays = preprocess_bytes(image, max_pixels=10**7)[0][None]
    answers, feature_map = gradcam.run(arrays)
    ours = explain.grad_cam(feature_map, explain.explained_rows("regression", gradcam.weight))[0, 0]
    # torch: the same network, with the tuned map's gradient kept.
    x = torch.from_numpy(arrays)
    if test_time_flip:
        x = torch.cat([x, torch.flip(x, dims=[3])])
    with torch.no_grad():
        trunk, parts, tap = backbone.trunk(pretrained, x, tap_block=6)
        frozen = torch.cat(
            [pretrained.forward_head(pretrained.bn2(pretrained.conv_head(trunk)), pre_logits=True), *parts], 1
        )
    activations = tuned.bn2(tuned.conv_head(tuned.blocks[6](tap)))
    activations.retain_grad()
    values = head(activations.mean(dim=(2, 3)))
    if test_time_flip:
        values, frozen = values.reshape(2, 1, 1).mean(dim=0), frozen.reshape(2, 1, -1).mean(dim=0)
    output = (values + distribution(frozen)) * 0.5
    output[0, 0].backward()
    assert activations.grad is not None
    per_copy = (activations.grad.mean(dim=(2, 3), keepdim=True) * activations).sum(dim=1).detach().numpy()
    reference = per_copy[0] + (per_copy[1][:, ::-1] if test_time_flip else 0.0)
    np.testing.assert_allclose(answers, output.detach().numpy(), atol=1e-3)
    np.testing.assert_allclose(ours, reference, atol=1e-3 * float(np.abs(reference).max()))


def _averaged_tiny_network(partner_reads_the_map: bool) -> bytes:
    """``network_onnx``'s graph with its answer averaged with a second member: computed from the
    image (explainable: that member has no gradient on the feature map) or from the feature map
    itself (not explainable by the classifier's weights alone)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load_model_from_string(network_onnx(2, seed=5)[0])
    graph = model.graph
    graph.node[-1].output[0] = "logits"
    source = "features" if partner_reads_the_map else "input"
    graph.initializer.append(numpy_helper.from_array(np.ones((2, 1), np.float32), "spread"))
    graph.initializer.append(numpy_helper.from_array(np.float32(0.5), "half"))
    graph.node.extend(
        [
            helper.make_node("ReduceMean", [source], ["level"], axes=[1, 2, 3], keepdims=0),
            helper.make_node("Unsqueeze", ["level", "axis1"], ["column"]),
            helper.make_node("MatMul", ["column", "spread_t"], ["member"]),
            helper.make_node("Add", ["logits", "member"], ["sum"]),
            helper.make_node("Mul", ["sum", "half"], ["output"]),
        ]
    )
    graph.initializer.append(numpy_helper.from_array(np.asarray([1], np.int64), "axis1"))
    graph.initializer.append(numpy_helper.from_array(np.ones((1, 2), np.float32), "spread_t"))
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 2]))
    onnx.checker.check_model(model)
    return model.SerializeToString()


def test_an_averaged_answer_is_explained_only_when_the_other_member_ignores_the_map() -> None:
    network = explain.GradCamNetwork(_averaged_tiny_network(partner_reads_the_map=False))
    _, params = network_onnx(2, seed=5)
    np.testing.assert_allclose(network.weight, 0.5 * params["fc_w"], rtol=1e-6)  # the average halves it
    assert network.logits_name == "output" and not network.mirrored
    image = np.random.default_rng(2).standard_normal((1, 3, 224, 224)).astype(np.float32)
    answers, feature_map = network.run(image)
    assert answers.shape == (1, 2) and feature_map.shape == (1, 8, 14, 14)
    with pytest.raises(ExplainUnavailableError, match="another function of the feature map"):
        explain.GradCamNetwork(_averaged_tiny_network(partner_reads_the_map=True))


# ---- a distribution head (integrated gradients) -------------------------------------------------


def _distribution_head(x: np.ndarray, y: np.ndarray) -> tuple[Any, bytes]:
    """A fitted distribution head (components.lib.distribution_head) and its exported head.onnx."""
    import tempfile

    from components.lib import distribution_head

    head = distribution_head.fit(x, y, seed=0)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "head.onnx"
        head.export(path)
        return head, path.read_bytes()


def _session_run(model: bytes) -> Any:
    import onnxruntime as ort

    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    return lambda x: session.run(None, {"features": x.astype(np.float32)})[0]


def test_a_distribution_head_read_back_from_onnx_computes_what_torch_does() -> None:
    """The arrays read from head.onnx give the exported answers; their gradient is torch autograd's;
    integrated gradients add up to the answer minus the average training image's (completeness)."""
    import torch

    from taskvision.bundle import linear_head_onnx

    rng = np.random.default_rng(5)
    x = rng.standard_normal((160, 12)).astype(np.float32) * 2.0 + 1.0
    y = np.stack([np.sin(x[:, 0]) + x[:, 1] ** 2 / 4, np.abs(x[:, 2])], axis=1).astype(np.float32)
    fitted, model = _distribution_head(x, y)
    served = _session_run(model)
    head = explain.DistributionHead.from_onnx(model, served)
    probes = x[:8] + rng.standard_normal((8, 12)).astype(np.float32)
    np.testing.assert_allclose(head.values(probes), fitted.predict(probes), atol=1e-5)

    module = fitted.module()
    wanted = torch.from_numpy(probes).requires_grad_(True)
    values = module(wanted)
    for output in range(2):
        (slope,) = torch.autograd.grad(values[:, output].sum(), wanted, retain_graph=True)
        np.testing.assert_allclose(head.gradients(probes)[:, output], slope.numpy(), rtol=1e-4, atol=1e-6)

    rows = head.attribution_rows(probes)
    assert rows.shape == (8, 2, 12)
    gained = np.einsum("nod,nd->no", rows, probes - head.mean)
    expected = head.values(probes) - head.values(head.mean[None])
    np.testing.assert_allclose(gained, expected, atol=0.01 * np.abs(expected).max())

    # What it cannot read is refused: a linear layer, or arrays that do not give the served answers.
    with pytest.raises(ExplainUnavailableError):
        explain.DistributionHead.from_onnx(
            linear_head_onnx(np.ones((2, 12), np.float32), np.zeros(2, np.float32)), served
        )
    with pytest.raises(ExplainUnavailableError):
        explain.DistributionHead.from_onnx(model, lambda features: served(features) + 0.01)


@pytest.fixture(scope="module")
def disc_radii() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """400 scenes with a red disc of radius 8-30 px anywhere in the crop: the radii, and each scene's
    Lite0 embedding (from the maps backbone) alone and averaged with its mirror image's (``+hflip``).
    (With 120 scenes, or with empty ones among them, the distribution head learnt them by heart and
    missed some new discs.)"""
    from taskvision import features
    from taskvision.preprocess import preprocess_bytes

    rng = random.Random(21)
    radii = np.asarray([rng.randrange(8, 31) for _ in range(400)], dtype=np.float32)
    scenes = [_scene(rng, "disc", _centre(rng), int(r)) for r in radii]
    fids = [features.feature_id(backbone.BACKBONE_ID, hflip=True)]
    centre, averaged = [], []
    for first in range(0, len(scenes), 100):
        arrays = np.stack(
            [preprocess_bytes(data, max_pixels=10**7)[0] for data in scenes[first : first + 100]]
        )
        maps = explain.head_maps(arrays, fids)
        centre.append(maps.maps[(backbone.BACKBONE_ID, False)].embeddings)
        averaged.append(maps.inputs)
    return radii, np.concatenate(centre), np.concatenate(averaged)


@pytest.mark.slow
@pytest.mark.parametrize("hflip", [False, True])
def test_a_distribution_head_peaks_on_the_object(
    tmp_path: Path, hflip: bool, disc_radii: tuple[np.ndarray, np.ndarray, np.ndarray]
) -> None:
    """A regression task's distribution head (how large is the red disc?) is explained: the heat map
    of a large disc peaks on it, and the answers are the unexplained ones."""
    from taskvision import features
    from taskvision.preprocess import preprocess_bytes

    radii, centre, averaged = disc_radii
    fids = [features.feature_id(backbone.BACKBONE_ID, hflip=hflip)]
    meta = meta_for(TaskType.REGRESSION, 1, frozen=True, features=fids)
    target = (radii[:, None] - meta.target_mean[0]) / meta.target_std[0]
    _, model = _distribution_head(averaged if hflip else centre, target)
    folder = tmp_path / "radius"
    folder.mkdir()
    (folder / meta.weights_file).write_bytes(model)
    (folder / "bundle.json").write_text(meta.to_json())
    predictor = BundlePredictor("radius", folder)
    predictor.load()
    assert predictor.head is None and predictor.network is not None  # served in its own session

    check = random.Random(22)
    cases = [_off_centre(check) for _ in range(6)]
    images = [_scene(check, "disc", centre, 26) for centre in cases]
    answers = predictor.classify(images, explain=True)
    for (x, y), answer, plain in zip(cases, answers, predictor.classify(images), strict=True):
        assert isinstance(answer, dict) and isinstance(plain, dict) and "_explanations" not in plain
        assert answer["best_label"]["value"] == pytest.approx(plain["best_label"]["value"], abs=1e-3)
        assert answer["best_label"]["value"] > 20  # a large disc: above the average training scene's (19)
        px, py = _peak(answer)
        assert abs(px - x) <= 32 and abs(py - y) <= 32, ((x, y), (px, py))
    # Each map adds up to its weights' product with the head's input (as a linear head's does).
    head = explain.DistributionHead.from_onnx(model, _session_run(model))
    inputs = np.stack([preprocess_bytes(data, max_pixels=10**7)[0] for data in images])
    maps = explain.head_maps(inputs, fids)
    rows = head.attribution_rows(maps.inputs)
    grids = explain.head_cam(maps, fids, rows)
    assert grids.shape == (6, 1, explain.GRID, explain.GRID)
    np.testing.assert_allclose(
        grids.sum(axis=(2, 3)), np.einsum("nod,nd->no", rows, maps.inputs), rtol=1e-4, atol=1e-3
    )
