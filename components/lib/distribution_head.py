"""A regression head that answers with a distribution over the targets' range (label distribution learning).

Each output's range (its training values' span, widened by :data:`RANGE_MARGIN` on each side) is
cut into :data:`BINS` bins. A small network over the standardized frozen features (one hidden
layer of :data:`HIDDEN` units, GELU, dropout) gives a softmax over the bins; it is trained towards
a Gaussian around the true value (:data:`SIGMA_BINS` bins wide) plus a little of the absolute
error of its mean, and its answer is that mean. A linear head must fit one straight line from
features to the value; this head can be sure of a child's age and unsure of an adult's, and a
neighbouring bin's error costs little. In 5-fold cross-validation over all 1,500 faces of the
shared ``ages`` set, on Lite0's frozen features: MAE 7.69 years (centre crops; 7.42-7.57 with
the mirror image averaged in), against 8.58 for the cross-validated ridge head and 8.02 for the
partial fine-tune (README, "Quality presets").

Fitting is cheap per step but many steps: on this 2-core machine one fit on 1,600 rows took 9.9 s
with one torch thread and 11.6 s with two (the matrices are too small to share), and two fits on
one thread each, side by side in two Python threads, took 9.9 s together (one fit alone: 6.5 s
since the optimizer is torch's fused AdamW). So :func:`fit_many`
runs the train step's several fits (cross-validation folds, the final head) that way, each with
its own random generator (initial weights, dropout, batch order): a fit's result does not depend
on what runs beside it.

Targets are the standardized ones the train step fits (``(y - mean) / std``), and so is the
answer: the exported head (``head.onnx``: features -> one value per output) has the shape of a
linear regression head's output, and the bundle's ``target_mean`` / ``target_std`` turn it into
the task's units as for any head. It is not one ``Gemm``, so serving runs it in its own ONNX
Runtime session after the shared backbone instead of in the head bank.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

Array = npt.NDArray[np.float32]

BINS = 100
SIGMA_BINS = 3.0  # the Gaussian target's width, in bins (ages: about 3.5 years)
RANGE_MARGIN = 0.05  # of each output's span, beyond its lowest and highest training value
HIDDEN = 512
DROPOUT = 0.2
EPOCHS = 60
MIN_STEPS = 200  # optimizer steps, however few the rows
BATCH = 64
LEARNING_RATE = 1e-3
WEIGHT_DECAY = 0.05
ABSOLUTE_ERROR_WEIGHT = 0.05  # per bin width of absolute error of the mean, beside the distribution's loss
STD_FLOOR = 1e-6

NAME = f"distribution head ({HIDDEN} hidden, {BINS} bins)"


@dataclass
class DistributionHead:
    """A fitted head: the torch module, the feature standardization and each output's bin centres."""

    network: Any  # torch.nn.Sequential: features -> (N, outputs * BINS) logits
    mean: Array  # (D,) of the training features
    std: Array
    centres: Array  # (outputs, BINS), in standardized target units

    def predict(self, x: Array) -> Array:
        """(N, D) features -> (N, outputs) standardized values."""
        import torch

        module = self.module()
        with torch.inference_mode():
            return module(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))).numpy()

    def module(self) -> Any:
        """Features -> standardized values, as one torch module (what is exported)."""
        import torch

        network = self.network
        mean, std, centres = (torch.from_numpy(a) for a in (self.mean, self.std, self.centres))

        class Head(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.network = network

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                logits = self.network((x - mean) / std)
                p = torch.softmax(logits.reshape(x.shape[0], *centres.shape), dim=-1)
                return (p * centres).sum(dim=-1)

        head = Head()
        head.eval()
        return head

    def export(self, path: Path) -> None:
        """``head.onnx``: features (N, D) -> standardized values (N, outputs)."""
        import torch

        tmp = path.with_suffix(f".tmp{os.getpid()}")
        example = torch.zeros(1, len(self.mean))
        with torch.inference_mode(), warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(
                self.module(),
                (example,),
                str(tmp),
                input_names=["features"],
                output_names=["values"],
                dynamic_axes={"features": {0: "batch"}, "values": {0: "batch"}},
                opset_version=17,
                dynamo=False,
            )
        os.replace(tmp, path)


def bin_centres(y: Array) -> Array:
    """(outputs, BINS): each output's range, widened by RANGE_MARGIN, cut into BINS bins."""
    table = np.asarray(y, dtype=np.float32).reshape(len(y), -1)
    low, high = table.min(axis=0), table.max(axis=0)
    pad = RANGE_MARGIN * np.maximum(high - low, 1e-3)
    low, high = low - pad, high + pad
    width = (high - low) / BINS
    steps = np.arange(BINS, dtype=np.float32) + np.float32(0.5)
    return (low[:, None] + width[:, None] * steps[None, :]).astype(np.float32)


def fit(x: Array, y: Array, *, seed: int) -> DistributionHead:
    """Train on features ``x`` (N, D) and standardized targets ``y`` (N, outputs)."""
    return fit_many([(x, y)], seed=seed)[0]


def fit_many(jobs: Sequence[tuple[Array, Array]], *, seed: int) -> list[DistributionHead]:
    """:func:`fit` of each ``(x, y)`` in ``jobs``, as many at once as there are cores, each on one
    torch thread (torch's thread count is restored afterwards)."""
    import torch

    threads = torch.get_num_threads()
    workers = max(1, min(len(jobs), os.cpu_count() or 1))
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(workers, thread_name_prefix="distribution-head") as pool:
            return list(pool.map(lambda job: _fit(*job, seed=seed), jobs))
    finally:
        torch.set_num_threads(threads)


def _dropout(p: float, generator: Any) -> Any:
    """``torch.nn.Dropout(p)`` drawing its masks from ``generator`` (not torch's global one, which
    fits running side by side would share)."""
    import torch

    class Dropout(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if not self.training:
                return x
            keep = torch.rand(x.shape, generator=generator) >= p
            return x * keep / (1.0 - p)

    return Dropout()


def _linear(inputs: int, outputs: int, generator: Any) -> Any:
    """``torch.nn.Linear`` with its default initial weights (uniform within 1/sqrt(inputs)) drawn
    from ``generator``."""
    import torch

    layer = torch.nn.Linear(inputs, outputs)
    bound = 1.0 / math.sqrt(inputs)
    with torch.no_grad():
        layer.weight.uniform_(-bound, bound, generator=generator)
        layer.bias.uniform_(-bound, bound, generator=generator)
    return layer


def _fit(x: Array, y: Array, *, seed: int) -> DistributionHead:
    import torch

    y = np.asarray(y, dtype=np.float32).reshape(len(y), -1)
    outputs = y.shape[1]
    mean = x.mean(axis=0).astype(np.float32)
    std = np.maximum(x.std(axis=0), STD_FLOOR).astype(np.float32)
    centres = bin_centres(y)
    width = torch.from_numpy(centres[:, 1] - centres[:, 0])
    centres_t = torch.from_numpy(centres)

    generator = torch.Generator().manual_seed(seed)
    network = torch.nn.Sequential(
        _dropout(DROPOUT, generator),
        _linear(x.shape[1], HIDDEN, generator),
        torch.nn.GELU(),
        _dropout(DROPOUT, generator),
        _linear(HIDDEN, outputs * BINS, generator),
    )
    features = torch.from_numpy(((x - mean) / std).astype(np.float32))
    targets = torch.from_numpy(y)
    # The Gaussian around each true value, over its output's bins.
    distance = (centres_t[None] - targets[:, :, None]) / (SIGMA_BINS * width[None, :, None])
    wanted = torch.exp(-0.5 * distance**2)
    wanted = wanted / wanted.sum(dim=-1, keepdim=True).clamp_min(1e-12)

    steps_per_epoch = math.ceil(len(x) / BATCH)
    epochs = max(EPOCHS, math.ceil(MIN_STEPS / steps_per_epoch))
    # The fused AdamW (one kernel per step instead of a dozen element-wise passes over each weight,
    # the same update): the optimizer was 43 % of a fit's time; a fit on 1,600 rows took 6.5 s
    # against 9.6 s, its answers within 5e-7.
    optimizer = torch.optim.AdamW(
        network.parameters(), lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY, fused=True
    )
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=LEARNING_RATE, total_steps=epochs * steps_per_epoch, pct_start=0.1
    )
    batches = np.random.default_rng(seed)
    network.train()
    for _ in range(epochs):
        order = torch.from_numpy(batches.permutation(len(x)))
        for first in range(0, len(x), BATCH):
            batch = order[first : first + BATCH]
            log_p = torch.log_softmax(network(features[batch]).reshape(len(batch), outputs, BINS), dim=-1)
            expected = (log_p.exp() * centres_t[None]).sum(dim=-1)
            loss = (
                -(wanted[batch] * log_p).sum(dim=-1).mean()
                + ABSOLUTE_ERROR_WEIGHT * ((expected - targets[batch]).abs() / width[None]).mean()
            )
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    network.eval()
    return DistributionHead(network=network, mean=mean, std=std, centres=centres)
