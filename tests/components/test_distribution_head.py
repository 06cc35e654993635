"""Regression's distribution head: a model-selection candidate, exported to ONNX, served like it evaluated."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from components.lib import distribution_head, selection
from components.lib.evaluate import evaluate_model
from components.lib.split import split_dataset
from components.lib.train import TrainConfig, train_model
from serving.model import BundlePredictor
from taskvision import backbone, features
from taskvision.dataset import LabelInfo
from taskvision.inference import BundleModel
from taskvision.storage import LocalBlobStore
from taskvision.task_types import TaskType
from tests.components.test_train import cache_embeddings
from tests.support.images import shape_image
from tests.support.snapshots import RowMaker, info


def _curved_dataset(
    n: int, *, mirror_noise: float = 0.0
) -> tuple[object, list, np.ndarray, np.ndarray, np.ndarray]:
    """Cached embeddings whose value is a curved function of what they are made of: no straight line fits.

    Returns the task, its rows, the centre crops' and the mirror images' vectors, and the values.
    With ``mirror_noise`` a picture and its mirror image carry opposite noise along the signal,
    so their average is the clean vector; without, both views are the clean vector.
    """
    rng = np.random.default_rng(3)
    d = backbone.BACKBONES[backbone.BACKBONE_ID].embedding_dim
    latent = rng.normal(size=(n, 2))
    mixing = rng.normal(size=(2, d))
    clean = latent @ mixing + 0.05 * rng.normal(size=(n, d))
    values = 12.0 * np.abs(latent[:, 0]) + 4.0 * latent[:, 1] ** 2 + 20.0
    noise = mirror_noise * rng.normal(size=latent.shape) @ mixing
    maker = RowMaker()
    for value in values:
        maker.add(["v-size"], values={"v-size": float(value)})
    return (
        info(TaskType.REGRESSION, [LabelInfo("v-size", "size")], count=n),
        maker.rows,
        (clean + noise).astype(np.float32),
        (clean - noise).astype(np.float32),
        values,
    )


@pytest.fixture
def linear_or_distribution(monkeypatch: pytest.MonkeyPatch) -> None:
    """``balanced`` without the partial fine-tune: Lite0's linear head against the distribution head."""
    preset = selection.QualityPreset(
        "balanced",
        linear=((features.feature_id(backbone.BACKBONE_ID),),),
        test_time_flip=False,
        finetune=None,
        finetune_folds=0,
        distribution=True,
    )
    monkeypatch.setitem(selection.PRESETS, "balanced", preset)


def test_a_retrain_that_reuses_a_linear_choice_scores_only_that_choice() -> None:
    narrowed = selection.narrowed(selection.preset("balanced"), [features.feature_id(backbone.BACKBONE_ID)])
    assert selection.preset("balanced").distribution and not narrowed.distribution
    assert narrowed.finetune is None and len(narrowed.linear) == 1


def test_the_exported_head_answers_as_the_fitted_one() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(80, 12)).astype(np.float32)
    y = np.stack([x[:, 0] ** 2, np.abs(x[:, 1])], axis=1).astype(np.float32)  # two outputs
    head = distribution_head.fit(x, (y - y.mean(0)) / y.std(0), seed=0)
    centres = distribution_head.bin_centres((y - y.mean(0)) / y.std(0))
    assert centres.shape == (2, distribution_head.BINS)
    predicted = head.predict(x)
    # answers are expectations over the bins: inside each output's widened range
    assert np.all(predicted >= centres[:, :1].T) and np.all(predicted <= centres[:, -1:].T)
    import onnxruntime

    path = Path(__file__).parent / "unused.onnx"
    try:
        head.export(path)
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        exported = session.run(None, {"features": x})[0]
    finally:
        path.unlink(missing_ok=True)
    np.testing.assert_allclose(exported, predicted, atol=1e-4)


def test_a_curved_target_chooses_the_distribution_head_and_serves_it_as_evaluated(
    tmp_path: Path, linear_or_distribution: None
) -> None:
    store = LocalBlobStore(tmp_path / "blobs")
    task, rows, x, _, values = _curved_dataset(240)
    cache_embeddings(store, rows, x)
    split = split_dataset(task, rows, seed=0)
    out = tmp_path / "model"

    meta = train_model(task, rows, split, store, out, TrainConfig(mode="embed", quality="balanced"))

    scores = {c["kind"]: c["cv_score"] for c in meta.selection["candidates"]}
    assert set(scores) == {selection.LINEAR, selection.DISTRIBUTION}
    assert scores[selection.DISTRIBUTION] > scores[selection.LINEAR] + 0.5  # minus MAE: lower error
    assert meta.selection["kind"] == selection.DISTRIBUTION
    assert meta.frozen_backbone and meta.features == [backbone.EMBEDDING_ID]
    assert meta.training["head"] == distribution_head.NAME
    # Not one linear layer: no head.npz, so serving runs head.onnx in its own session.
    assert (out / "head.onnx").exists() and not (out / "head.npz").exists()
    test = np.isin([row.image_id for row in rows], split.test)
    metrics = evaluate_model(out)
    assert metrics["test_images"] == int(test.sum()) and metrics["r2"] > 0.3  # 0.53 when written
    model = BundleModel.load(out)
    standardized = model.logits_from_embeddings(x[test])
    assert np.abs(model.outputs(standardized)[:, 0] - values[test]).mean() == pytest.approx(
        metrics["mae"], rel=1e-4
    )

    # Served on real images (the backbone runs): the answers of the evaluate step's code path.
    predictor = BundlePredictor("curved", out)
    predictor.load()
    assert predictor.head is None and predictor.network is not None
    images = [shape_image("circle", 5), shape_image("square", 6)]
    prepared = np.stack([model.prepare(model.decode(data, max_pixels=10**7)[0]) for data in images])
    expected = model.outputs(model.logits_from_prepared(prepared))[:, 0]
    answers = predictor.classify(images)
    served = [answer["labels"][0]["value"] for answer in answers]
    assert served == pytest.approx(expected.tolist(), abs=1e-3)
    # Explained by integrated gradients (taskvision.explain.DistributionHead): the same answers.
    (explained,) = predictor.classify(images[:1], explain=True)
    assert isinstance(explained, dict)
    assert explained["labels"][0]["value"] == pytest.approx(served[0], abs=1e-3)
    (heat,) = explained["_explanations"]
    assert heat["id"] == "v-size" and heat["heatmap"].startswith("data:image/png;base64,")


def test_a_mirror_image_that_averages_noise_away_chooses_the_flipped_head_and_serves_it(
    tmp_path: Path, linear_or_distribution: None
) -> None:
    """A picture and its mirror image carry opposite noise, so their average is the clean vector:
    ``+hflip`` scores better, the same fitted heads are scored both ways, and the bundle serves
    the averaged features."""
    store = LocalBlobStore(tmp_path / "blobs")
    task, rows, centre, mirror, values = _curved_dataset(240, mirror_noise=0.3)
    cache_embeddings(store, rows, centre, mirrored=mirror)
    split = split_dataset(task, rows, seed=0)
    out = tmp_path / "model"

    meta = train_model(task, rows, split, store, out, TrainConfig(mode="embed", quality="balanced"))

    flipped = backbone.EMBEDDING_ID + features.HFLIP
    by_features = {
        tuple(c["features"]): c for c in meta.selection["candidates"] if c["kind"] == selection.DISTRIBUTION
    }
    assert set(by_features) == {(backbone.EMBEDDING_ID,), (flipped,)}
    assert by_features[(flipped,)]["cv_score"] > by_features[(backbone.EMBEDDING_ID,)]["cv_score"]
    assert (
        by_features[(flipped,)]["serving_cost"]
        > 2 * by_features[(backbone.EMBEDDING_ID,)]["serving_cost"] - 0.1
    )
    assert meta.selection["kind"] == selection.DISTRIBUTION and meta.features == [flipped]

    # Evaluated on the test images' averaged vectors, as served.
    test = np.isin([row.image_id for row in rows], split.test)
    averaged = (centre + mirror)[test] / 2
    model = BundleModel.load(out)
    answers = model.outputs(model.logits_from_embeddings(averaged))[:, 0]
    assert np.abs(answers - values[test]).mean() == pytest.approx(evaluate_model(out)["mae"], rel=1e-4)

    # Served on real images: the backbone runs on the picture and its mirror image.
    predictor = BundlePredictor("flipped", out)
    predictor.load()
    images = [shape_image("circle", 5), shape_image("square", 6)]
    prepared = np.stack([model.prepare(model.decode(data, max_pixels=10**7)[0]) for data in images])
    expected = model.outputs(model.logits_from_prepared(prepared))[:, 0]
    served = [answer["labels"][0]["value"] for answer in predictor.classify(images)]
    assert served == pytest.approx(expected.tolist(), abs=1e-3)
    one_view = features.embed_prepared(
        np.stack(
            [features.prepare(model.decode(d, max_pixels=10**7)[0], [backbone.EMBEDDING_ID]) for d in images]
        ),
        [backbone.EMBEDDING_ID],
    )
    centre_only = model.outputs(model.logits_from_embeddings(one_view))[:, 0]
    assert not np.allclose(centre_only, expected, atol=1e-3)  # the mirror image did count
