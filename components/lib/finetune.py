"""End-to-end fine-tuning of EfficientNet-Lite0 (the train step's ``finetune`` mode; the GPU default).

The method of the PyTorch transfer-learning tutorial: every layer trains,
SGD with momentum 0.9, random resized crops and horizontal flips, here with a
cosine learning-rate schedule. The trained network is exported to ONNX
(``model.onnx``: image -> logits) so that serving runs it like any bundle.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from taskvision import backbone, imaging
from taskvision.bundle import MODEL_FILE, BundleMeta
from taskvision.dataset import DatasetInfo, ManifestRow
from taskvision.preprocess import DEFAULT, draft_side, resize_and_crop, to_array
from taskvision.storage import BlobStore
from taskvision.task_types import TaskType

if TYPE_CHECKING:
    from components.lib.train import TrainConfig

logger = logging.getLogger(__name__)
Array = npt.NDArray[np.float32]


def _load(store: BlobStore, row: ManifestRow, max_pixels: int) -> Any:
    return imaging.load_rgb(
        store.get(row.blob_key), max_pixels=max_pixels, draft_size=(draft_side(DEFAULT.resize_to),) * 2
    )


def finetune(
    info: DatasetInfo,
    train_rows: list[ManifestRow],
    test_rows: list[ManifestRow],
    y_train: Array,
    y_test: Array,
    store: BlobStore,
    out_dir: Path,
    config: TrainConfig,
    meta: BundleMeta,
    report: Callable[[float, str], None],
) -> None:
    import torch
    from torchvision import transforms

    torch.manual_seed(config.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    task_type = info.task_type
    n_out = len(meta.labels)
    model = backbone.build_torch_model(num_classes=n_out).to(device)

    train_tf = transforms.Compose(
        [
            transforms.RandomResizedCrop(
                DEFAULT.input_size, scale=(0.5, 1.0), interpolation=transforms.InterpolationMode.BICUBIC
            ),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(DEFAULT.mean, DEFAULT.std),
        ]
    )
    images = [_load(store, row, config.max_image_pixels) for row in train_rows]
    if task_type is TaskType.REGRESSION:
        y_fit = (y_train - np.asarray(meta.target_mean)) / np.asarray(meta.target_std)
    else:
        y_fit = y_train
    y_tensor = torch.from_numpy(np.asarray(y_fit))
    if task_type is TaskType.MULTI_CLASS:
        y_tensor = y_tensor.long()
        loss_fn: Callable[[Any, Any], Any] = torch.nn.functional.cross_entropy
    elif task_type is TaskType.MULTI_LABEL:
        loss_fn = torch.nn.functional.binary_cross_entropy_with_logits
    else:
        loss_fn = torch.nn.functional.mse_loss
    y_tensor = y_tensor.to(device)

    optimizer = torch.optim.SGD(model.parameters(), lr=config.learning_rate, momentum=0.9, weight_decay=1e-4)
    steps_per_epoch = math.ceil(len(images) / config.batch_size)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs * steps_per_epoch)
    generator = np.random.default_rng(config.seed)
    for epoch in range(config.epochs):
        model.train()
        order = generator.permutation(len(images))
        total = 0.0
        for start in range(0, len(order), config.batch_size):
            batch = order[start : start + config.batch_size]
            x = torch.stack([train_tf(images[i]) for i in batch]).to(device)
            loss = loss_fn(model(x), y_tensor[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            total += float(loss.detach()) * len(batch)
        logger.info("epoch %d/%d: loss %.4f", epoch + 1, config.epochs, total / len(images))
        report(0.9 * (epoch + 1) / config.epochs, f"fine-tuning: epoch {epoch + 1}/{config.epochs}")

    model = model.cpu().eval()
    backbone.export_onnx(model, out_dir / MODEL_FILE)
    test_arrays = (
        np.stack([to_array(resize_and_crop(_load(store, r, config.max_image_pixels))) for r in test_rows])
        if test_rows
        else np.zeros((0, 3, DEFAULT.input_size, DEFAULT.input_size), dtype=np.float32)
    )
    if task_type is TaskType.MULTI_LABEL and len(train_rows):
        # Thresholds on the training split (the test split stays unseen).
        from taskvision.metrics import best_f1_thresholds

        train_arrays = np.stack([to_array(resize_and_crop(image)) for image in images])
        with torch.inference_mode():
            logits = model(torch.from_numpy(train_arrays)).numpy()
        meta.thresholds = best_f1_thresholds(y_train.astype(np.int64), 1.0 / (1.0 + np.exp(-logits)))
    np.savez(
        out_dir / "test_inputs.npz",
        image_ids=np.asarray([row.image_id for row in test_rows]),
        images=test_arrays.astype(np.float32),
        targets=y_test,
    )
