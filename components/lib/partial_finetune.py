"""Partial fine-tuning on the CPU: a backbone's last block, its head convolution and a new head.

The method (linear probing, then fine-tuning: "LP-FT"):

1. every training image goes through the frozen backbone once per view: its
   centre crop, the mirror image, and ``extra_views`` augmented ones (a random
   crop of 35-100 % of the picture, mirrored half the time, brightness, contrast
   and saturation jittered by up to 20 %). The activation maps entering block
   ``tap_block`` are kept (float16, in memory); the same run (one ONNX Runtime
   network with two outputs, see
   :func:`taskvision.backbone.build_tapped_embedding_model`) gives the frozen
   multi-scale embedding of the centre crop and mirror image, which the linear
   candidates use;
2. the head, a linear layer over the final pooled features, starts from a
   linear fit on the frozen ones: fine-tuning begins from a good classifier and
   does not wreck the pretrained features with large early gradients. (A head
   over the whole multi-scale embedding, mid-level parts frozen, did worse on
   the faces' ages: test MAE 8.1 against 7.7 years);
3. blocks ``tap_block``.. (only the last of the 7 by default), the 1x1 head
   convolution and the head train together on the cached maps for a few
   epochs, one random view of each image per epoch: AdamW, a one-cycle
   learning-rate schedule, batch-norm statistics frozen (small batches of
   few images would make them noisy). Loss: cross-entropy, sigmoid BCE, or a
   Huber loss on standardized targets (regression: it cut the test MAE on the
   faces' ages from 7.8 to 7.6 years against squared error; see
   :data:`HUBER_DELTA`).

The tuned network (frozen trunk, tuned last block, head) is exported whole as
``model.onnx`` (image -> logits) like a GPU fine-tune, so serving needs no new
path and runs it at the backbone's cost.

Model selection also scores the tuned network *averaged with* the linear head
on the same backbone's frozen multi-scale embedding (``partial_finetune+linear``,
:meth:`TunedTail.export_ensemble`): the two make different errors, and in
5-fold cross-validation over all images the average beat both alone on three
of the four shared photo sets (with 8 epochs: flowers +1.5 points of accuracy,
scenes +0.4 mAP points, ages -0.05 years). On the satellite tiles, with
balanced's 6 epochs, it is about a point below the linear head (0.956 against
0.965 over three fold seeds, ``bench/whole_set_cv.py``): the fine-tune's head
reads the final features only, and the mid-level ones matter there.
It is one network too: the early blocks run once, only the last block and the
head convolution run twice (pretrained and tuned), about 15 % more than the
backbone alone; averaging logits of two linear layers is one linear layer over
both feature sets, so the graph still ends in one ``Gemm`` over standardized
pooled features.

For regression, the tuned network is also averaged with the distribution head
(:mod:`components.lib.distribution_head`) on the same frozen embedding
(``partial_finetune+distribution``, :meth:`TunedTail.export_with_distribution`),
optionally over the image and its mirror image: one network again, but it ends
in the average of the two members, not in one linear layer.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageEnhance, ImageOps

from components.lib import heads
from components.lib.embeddings import (
    RUN_BATCH,
    View,
    batches_of_images,
    cache_key,
    cache_writer,
    mirror,
    prepared_arrays,
)
from taskvision import backbone
from taskvision.dataset import ManifestRow
from taskvision.preprocess import PreprocessConfig, draft_side, to_array
from taskvision.storage import BlobStore
from taskvision.task_types import TaskType

if TYPE_CHECKING:
    import torch

    from components.lib.distribution_head import DistributionHead

logger = logging.getLogger(__name__)

Array = npt.NDArray[np.float32]
HalfArray = npt.NDArray[np.float16]
MIN_STEPS = 60  # optimizer steps of a fine-tune, however few the images
# The head's input is standardized with spreads floored at the median one (the start head is fitted
# the same way): a tuned feature that was constant on the images cannot blow the logits up.
STD_FLOOR = 1.0
# Regression's Huber loss turns linear beyond 0.3 standard deviations of the targets (nearer the
# absolute error the task is scored by than the linear heads' 1.0): in 5-fold cross-validation
# on all 1,500 faces' ages it cut the fine-tune's MAE from 8.18 to 8.02 years.
HUBER_DELTA = 0.3


@dataclass(frozen=True)
class PartialFinetunePlan:
    """What is tuned and how long."""

    backbone_id: str = backbone.BACKBONE_ID
    tap_block: int = 6  # blocks tap_block..6, the head convolution and the head are trained
    extra_views: int = 2  # augmented views per training image, besides the centre crop and its mirror
    epochs: int = 10
    learning_rate: float = 1e-3
    weight_decay: float = 0.05
    batch_size: int = 32

    @property
    def name(self) -> str:
        short = self.backbone_id.split(".")[0].replace("tf_efficientnet_", "")
        return f"partial_finetune({short}, blocks {self.tap_block}-6)"

    @property
    def views(self) -> int:
        return 2 + self.extra_views

    def describe(self) -> dict[str, Any]:
        return asdict(self)


# ---- step 1: activations -------------------------------------------------------------------


def _augmented(image: Image.Image, config: PreprocessConfig, rng: random.Random) -> Array:
    """A random crop (35-100 % of the area, aspect 3/4-4/3), maybe mirrored, colours jittered."""
    width, height = image.size
    area = width * height
    box = (0, 0, width, height)
    for _ in range(10):
        target = rng.uniform(0.35, 1.0) * area
        ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        w, h = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
        if 0 < w <= width and 0 < h <= height:
            left, top = rng.randint(0, width - w), rng.randint(0, height - h)
            box = (left, top, left + w, top + h)
            break
    view = image.resize((config.input_size, config.input_size), Image.Resampling.BICUBIC, box=box)
    if rng.random() < 0.5:
        view = ImageOps.mirror(view)
    for enhance in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        view = enhance(view).enhance(rng.uniform(0.8, 1.2))
    return to_array(view, config)


@dataclass
class Activations:
    """What partial fine-tuning trains on, for each training image and view."""

    maps: HalfArray  # (rows, views, C, H, W): the activation maps entering tap_block

    def __len__(self) -> int:
        return len(self.maps)

    def subset(self, rows: npt.NDArray[np.int64]) -> Activations:
        return Activations(self.maps[rows])


def compute_activations(
    store: BlobStore,
    rows: Sequence[ManifestRow],
    plan: PartialFinetunePlan,
    *,
    seed: int,
    use_cache: bool,
    max_pixels: int,
    progress: Callable[[int], None] | None = None,
) -> tuple[Activations, dict[View, Array]]:
    """Each training image's activations per view, and its centre / mirror embeddings (float32).

    The embeddings also go into the embedding cache, so that a later training
    with another quality finds them.
    """
    import onnxruntime  # noqa: F401  (imported here: the session below needs it)

    spec = backbone.backbone_spec(plan.backbone_id)
    session = backbone.onnx_session(backbone.tapped_onnx_path(plan.backbone_id, plan.tap_block))
    embeddings = {
        (spec.id, False): np.zeros((len(rows), spec.embedding_dim), dtype=np.float32),
        (spec.id, True): np.zeros((len(rows), spec.embedding_dim), dtype=np.float32),
    }
    maps: HalfArray | None = None
    done = 0
    with cache_writer(store, enabled=use_cache) as writer:
        for span, images in batches_of_images(
            store, list(rows), max_pixels=max_pixels, min_side=draft_side(spec.preprocess.resize_to)
        ):
            centre = np.stack([prepared_arrays(image, [spec.id])[spec.id] for image in images])
            views = [centre, mirror(centre)]
            for v in range(plan.extra_views):
                views.append(
                    np.stack(
                        [
                            _augmented(image, spec.preprocess, _rng(seed, rows[k].sha256, v))
                            for k, image in zip(span, images, strict=True)
                        ]
                    )
                )
            batch = np.concatenate(views)
            runs = [
                session.run(None, {"input": batch[i : i + RUN_BATCH]})
                for i in range(0, len(batch), RUN_BATCH)
            ]
            embedding = np.concatenate([run[0] for run in runs])
            tap = np.concatenate([run[1] for run in runs])
            if maps is None:
                maps = np.zeros((len(rows), plan.views, *tap.shape[1:]), dtype=np.float16)
            n = len(span)
            maps[span.start : span.stop] = tap.reshape(plan.views, n, *tap.shape[1:]).swapaxes(0, 1)
            for index, mirrored in enumerate((False, True)):
                vectors = embedding[index * n : (index + 1) * n]
                embeddings[(spec.id, mirrored)][span.start : span.stop] = vectors
                for k, vector in zip(span, vectors, strict=True):
                    writer.put(cache_key((spec.id, mirrored), rows[k].sha256), vector)
            done += n
            if progress:
                progress(done)
    assert maps is not None, "no rows"
    logger.info(
        "activations of %d images x %d views: %s, %.0f MB",
        len(rows),
        plan.views,
        maps.shape,
        maps.nbytes / 2**20,
    )
    return Activations(maps), embeddings


def _rng(seed: int, sha256: str, view: int) -> random.Random:
    digest = hashlib.sha256(f"{seed}:{sha256}:{view}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


# ---- steps 2 and 3: the tuned tail -----------------------------------------------------------


def _tail(model: Any, plan: PartialFinetunePlan, head: Any) -> torch.nn.Module:
    """The trained part: blocks tap_block.., conv_head, bn2 of ``model`` (tuned in place) and ``head``."""
    import torch

    class Tail(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = torch.nn.Sequential(*model.blocks[plan.tap_block :])
            self.conv_head = model.conv_head
            self.bn2 = model.bn2  # batch norm + ReLU6
            self.head = head

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.bn2(self.conv_head(self.blocks(x))).mean(dim=(2, 3)))

    return Tail()


def _head(w: Array, b: Array, mean: Array, std: Array) -> torch.nn.Module:
    """A linear layer on standardized features (so that one learning rate suits every input)."""
    import torch

    class Head(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("mean", torch.from_numpy(mean))
            self.register_buffer("std", torch.from_numpy(std))
            self.linear = torch.nn.Linear(len(mean), len(b))
            with (
                torch.no_grad()
            ):  # w, b act on raw embeddings: w x + b == (w * std) (x - mean) / std + (w mean + b)
                self.linear.weight.copy_(torch.from_numpy(w * std[None, :]))
                self.linear.bias.copy_(torch.from_numpy(b + w @ mean))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.linear((x - self.get_buffer("mean")) / self.get_buffer("std"))

    return Head()


def _standardized_head(mean: Array, std: Array, weight: Array, bias: Array) -> torch.nn.Module:
    """``Linear((x - mean) / std)`` with the given weights (on standardized inputs)."""
    import torch

    class Head(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("mean", torch.from_numpy(mean.astype(np.float32)))
            self.register_buffer("std", torch.from_numpy(std.astype(np.float32)))
            self.linear = torch.nn.Linear(len(mean), len(bias))
            with torch.no_grad():
                self.linear.weight.copy_(torch.from_numpy(weight.astype(np.float32)))
                self.linear.bias.copy_(torch.from_numpy(bias.astype(np.float32)))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.linear((x - self.get_buffer("mean")) / self.get_buffer("std"))

    return Head()


def _ensemble_network(model: Any, pretrained: Any, head: Any, tap_block: int) -> torch.nn.Module:
    """Image -> logits of ``head`` over [tuned final pooled features, pretrained multi-scale embedding].

    The blocks before ``tap_block`` were not tuned (``model``'s are ``pretrained``'s), so both
    branches share one run of them; only the later blocks run twice (tuned and pretrained).
    """
    import torch

    class Ensemble(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model
            self.pretrained = pretrained
            self.head = head

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            tuned, frozen = _tuned_and_frozen(self.model, self.pretrained, x, tap_block)
            return self.head(torch.cat([tuned, *frozen], dim=1))

    return Ensemble().eval()


def _distribution_network(
    model: Any, pretrained: Any, tuned_head: Any, distribution: Any, tap_block: int, *, test_time_flip: bool
) -> torch.nn.Module:
    """Image -> the average of ``tuned_head`` over the tuned final pooled features and the
    distribution head ``distribution`` (a torch module) over the pretrained multi-scale embedding;
    the branches share the early blocks as in :func:`_ensemble_network`.

    With ``test_time_flip`` both run on the image and its mirror image (one batch of twice the
    size): the tuned network's answers of the two are averaged, and so are the two embeddings
    before the distribution head (what the ``+hflip`` features are)."""
    import torch

    class Averaged(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model
            self.pretrained = pretrained
            self.tuned_head = tuned_head
            self.distribution = distribution

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if test_time_flip:
                x = torch.cat([x, torch.flip(x, dims=[3])])
            tuned, frozen = _tuned_and_frozen(self.model, self.pretrained, x, tap_block)
            answers, embedding = self.tuned_head(tuned), torch.cat(frozen, dim=1)
            if test_time_flip:  # rows [images, mirror images] -> their means
                answers = answers.reshape(2, -1, answers.shape[1]).mean(dim=0)
                embedding = embedding.reshape(2, -1, embedding.shape[1]).mean(dim=0)
            return (answers + self.distribution(embedding)) * 0.5

    return Averaged().eval()


def _tuned_and_frozen(
    model: Any, pretrained: Any, x: torch.Tensor, tap_block: int
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One image batch through both networks, the early blocks run once: (the tuned final pooled
    features, the parts of the pretrained multi-scale embedding in its order)."""
    p, m = pretrained, model
    x, parts, tuned = backbone.trunk(p, x, tap_block=tap_block)
    for block in m.blocks[tap_block:]:
        tuned = block(tuned)
    frozen = p.forward_head(p.bn2(p.conv_head(x)), pre_logits=True)
    tuned = m.forward_head(m.bn2(m.conv_head(tuned)), pre_logits=True)
    return tuned, [frozen, *parts]


def _network(model: Any, head: Any) -> torch.nn.Module:
    """Image -> logits: the (tuned) backbone's final pooled features through the head; what is exported."""
    import torch

    class Network(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model
            self.head = head

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.model.forward_head(self.model.forward_features(x), pre_logits=True))

    return Network().eval()


def _loss(task_type: TaskType) -> Callable[[Any, Any], Any]:
    import torch

    if task_type is TaskType.MULTI_CLASS:
        return torch.nn.functional.cross_entropy
    if task_type is TaskType.MULTI_LABEL:
        return torch.nn.functional.binary_cross_entropy_with_logits
    return lambda prediction, target: torch.nn.functional.huber_loss(prediction, target, delta=HUBER_DELTA)


def _targets(task_type: TaskType, y: Array) -> torch.Tensor:
    import torch

    if task_type is TaskType.MULTI_CLASS:
        return torch.from_numpy(y.astype(np.int64))
    return torch.from_numpy(y.astype(np.float32))


@dataclass
class TunedTail:
    """A trained tail and the pretrained model it belongs to (its other parts untouched)."""

    model: Any  # the timm model whose last blocks, conv_head and bn2 were tuned
    tail: Any

    def logits(self, data: Activations, *, view: int = 0, batch_size: int = 128) -> Array:
        """The tuned model's logits of one view (0: the centre crop) of each image."""
        import torch

        self.tail.eval()
        out = []
        with torch.inference_mode():
            for i in range(0, len(data), batch_size):
                maps = torch.from_numpy(data.maps[i : i + batch_size, view].astype(np.float32))
                out.append(self.tail(maps).numpy())
        return np.concatenate(out).astype(np.float32)

    def features(self, data: Activations, *, view: int = 0, batch_size: int = 128) -> Array:
        """What the tuned model's last linear layer reads for one view of each image: its
        standardized pooled features (see :mod:`components.lib.refit`)."""
        import torch

        self.tail.eval()
        head = self.tail.head
        out = []
        with torch.inference_mode():
            for i in range(0, len(data), batch_size):
                maps = torch.from_numpy(data.maps[i : i + batch_size, view].astype(np.float32))
                pooled = self.tail.bn2(self.tail.conv_head(self.tail.blocks(maps))).mean(dim=(2, 3))
                out.append(((pooled - head.get_buffer("mean")) / head.get_buffer("std")).numpy())
        return np.concatenate(out).astype(np.float32)

    def export(self, path: Path, *, input_size: int) -> None:
        """The whole network (image -> logits) as ONNX."""
        backbone.export_onnx(_network(self.model, self.tail.head), path, input_size=input_size)

    def export_ensemble(
        self,
        path: Path,
        pretrained: Any,
        linear: tuple[Array, Array],
        frozen_embeddings: Array,
        *,
        tap_block: int,
        input_size: int,
    ) -> tuple[Array, Array]:
        """The tuned network averaged with a linear head on the pretrained multi-scale embedding, as ONNX.

        ``linear`` is that head's ``(W, b)`` on raw embeddings (:mod:`components.lib.heads`);
        ``frozen_embeddings`` the training images' embeddings, whose spread standardizes its part
        of the input. Averaging the two models' logits is one linear layer over both feature
        sets with halved weights, so the network still ends in one ``Gemm`` over standardized
        pooled features (what :mod:`components.lib.refit` looks for). Returns the embedding
        part's standardization ``(mean, std)``: that layer reads ``[tuned features,
        (embedding - mean) / std]``.
        """
        tuned = self.tail.head
        w_tuned = tuned.linear.weight.detach().numpy().astype(np.float32)
        b_tuned = tuned.linear.bias.detach().numpy().astype(np.float32)
        mean, std = heads.standardization(frozen_embeddings)
        w_lin, b_lin = linear
        head = _standardized_head(
            np.concatenate([tuned.get_buffer("mean").numpy(), mean]),
            np.concatenate([tuned.get_buffer("std").numpy(), std]),
            np.float32(0.5) * np.concatenate([w_tuned, w_lin * std[None, :]], axis=1),
            np.float32(0.5) * (b_tuned + b_lin + w_lin @ mean),
        )
        network = _ensemble_network(self.model, pretrained, head, tap_block)
        backbone.export_onnx(network, path, input_size=input_size)
        return mean, std

    def replace_head(self, weight: Array, bias: Array) -> None:
        """A new last layer ``(W, b)`` over the same standardized features (a refit's)."""
        head = self.tail.head
        self.tail.head = _standardized_head(
            head.get_buffer("mean").numpy(), head.get_buffer("std").numpy(), weight, bias
        )

    def save(self, path: Path) -> None:
        """The tail's weights (tuned blocks, head convolution, head) as ``.npz``, by parameter name."""
        arrays = {name: value.detach().numpy() for name, value in self.tail.state_dict().items()}
        np.savez(path, **arrays)

    def export_with_distribution(
        self,
        path: Path,
        pretrained: Any,
        distribution: DistributionHead,
        *,
        tap_block: int,
        input_size: int,
        test_time_flip: bool = False,
    ) -> None:
        """The tuned network averaged with a distribution head on the pretrained multi-scale
        embedding (regression: both answer standardized targets), as ONNX; with
        ``test_time_flip`` over the image and its mirror image. The graph ends in the average,
        not one linear layer: a refit rebuilds it from the saved tail (:meth:`save`,
        :func:`load_tail`) and exports it again (:mod:`components.lib.refit`)."""
        head = distribution.module()
        network = _distribution_network(
            self.model, pretrained, self.tail.head, head, tap_block, test_time_flip=test_time_flip
        )
        backbone.export_onnx(network, path, input_size=input_size)


def load_tail(pretrained: Any, plan: PartialFinetunePlan, data: bytes) -> TunedTail:
    """A copy of ``pretrained`` with the tail :meth:`TunedTail.save` wrote (for ``plan``) in place."""
    import io

    import torch

    with np.load(io.BytesIO(data)) as npz:
        state = {name: torch.from_numpy(npz[name]) for name in npz.files}
    model = copy.deepcopy(pretrained)
    head = _standardized_head(
        state["head.mean"].numpy(),
        state["head.std"].numpy(),
        state["head.linear.weight"].numpy(),
        state["head.linear.bias"].numpy(),
    )
    tail: Any = _tail(model, plan, head)
    tail.load_state_dict(state, strict=True)  # into model's own last blocks: the tail wraps them
    tail.eval()
    return TunedTail(model=model, tail=tail)


def train_tail(
    pretrained: Any,
    data: Activations,
    start: tuple[Array, Array],
    frozen: Array,
    y: Array,
    task_type: TaskType,
    plan: PartialFinetunePlan,
    *,
    seed: int,
    report: Callable[[int], None] | None = None,
) -> TunedTail:
    """LP-FT on ``data`` with targets ``y`` (regression: standardized).

    ``start``: the linear head ``(W, b)`` on the frozen final features that fine-tuning
    starts from; ``frozen``: those features of the rows' centre crops and mirror
    images, (2 x rows, 1280), whose spread standardizes the head's input.
    """
    import torch

    torch.manual_seed(seed)
    model = copy.deepcopy(pretrained)
    mean, std = heads.standardization(frozen, std_floor=STD_FLOOR)
    tail: Any = _tail(model, plan, _head(start[0], start[1], mean.astype(np.float32), std.astype(np.float32)))
    # 3. fine-tuning
    targets = _targets(task_type, y)
    loss_fn = _loss(task_type)
    optimizer = torch.optim.AdamW(tail.parameters(), lr=plan.learning_rate, weight_decay=plan.weight_decay)
    steps_per_epoch = math.ceil(len(data) / plan.batch_size)
    # A small training set still gets MIN_STEPS steps (more epochs): with a handful of steps the
    # one-cycle warm-up is a single step at the full rate, and Adam's first full-size steps on
    # every weight at once wreck the pretrained features (logits of 800 on 24 images).
    epochs = max(plan.epochs, math.ceil(MIN_STEPS / steps_per_epoch))
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=plan.learning_rate, total_steps=epochs * steps_per_epoch, pct_start=0.1
    )
    generator = np.random.default_rng(seed)
    for epoch in range(epochs):
        tail.train()
        for module in tail.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.eval()  # frozen statistics
        order = generator.permutation(len(data))
        views = generator.integers(0, data.maps.shape[1], len(data))
        total = 0.0
        for first in range(0, len(order), plan.batch_size):
            batch = order[first : first + plan.batch_size]
            x = torch.from_numpy(data.maps[batch, views[batch]].astype(np.float32))
            loss = loss_fn(tail(x), targets[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            total += float(loss.detach()) * len(batch)
        logger.debug("partial fine-tuning epoch %d/%d: loss %.4f", epoch + 1, epochs, total / len(data))
        if report:
            report(min(plan.epochs, round((epoch + 1) * plan.epochs / epochs)))
    return TunedTail(model=model, tail=tail)
