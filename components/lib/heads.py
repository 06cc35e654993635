"""Linear heads on frozen-backbone features, and scoring them by cross-validation.

Every head here is ``outputs = x @ W.T + b`` on the raw feature vector (the
standardization used while fitting is folded into ``W`` and ``b``), so serving
runs it as one matrix product (``head.onnx``'s Gemm, or ``head.npz``).

* classification (multi_class softmax / multi_label sigmoid): L2-penalised
  logistic regression, LBFGS in torch;
* regression, on standardized targets: ridge in closed form (every penalty of a
  grid from one eigendecomposition), or a Huber-loss linear model (LBFGS) that
  is less pulled by outliers.

:func:`cross_validate` gives out-of-fold scores for a grid of settings; folds
are built from groups so that an image and its mirrored copy are always on
the same side.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from taskvision.metrics import average_precision
from taskvision.task_types import TaskType

logger = logging.getLogger(__name__)

Array = npt.NDArray[np.float32]
IntArray = npt.NDArray[np.int64]

LOGISTIC = "logistic"
RIDGE = "ridge"
HUBER = "huber"
HUBER_DELTA = 1.0  # on standardized targets: errors beyond one standard deviation count linearly


@dataclass(frozen=True)
class HeadSetting:
    """One head to try: its kind and its L2 penalty."""

    kind: str  # logistic | ridge | huber
    penalty: float

    @property
    def name(self) -> str:
        return f"{self.kind}(l2={self.penalty:g})"


def default_grid(
    task_type: TaskType, *, fixed_penalty: float | None = None, robust: bool = True
) -> list[HeadSetting]:
    """The head settings cross-validation chooses from for ``task_type``."""
    if task_type is TaskType.REGRESSION:
        penalties = [fixed_penalty] if fixed_penalty is not None else [0.1, 0.3, 1.0, 3.0, 10.0]
        grid = [HeadSetting(RIDGE, p) for p in penalties]
        if robust:
            grid += [HeadSetting(HUBER, p) for p in penalties]
        return grid
    penalties = [fixed_penalty] if fixed_penalty is not None else [1e-2, 1e-1, 1.0]
    return [HeadSetting(LOGISTIC, p) for p in penalties]


def standardization(x: Array, *, std_floor: float = 0.0) -> tuple[Array, Array]:
    """Per-feature mean and spread of ``x``; spreads below ``std_floor`` times the median spread are raised.

    A feature (nearly) constant on the training images gets a tiny spread, and so a
    large weight on raw features; the floor bounds how much a change in it can move
    the outputs (what a fine-tuned feature that starts to vary does).
    """
    mean = x.mean(axis=0)
    std = x.std(axis=0)
    std = np.maximum(std, std_floor * float(np.median(std))) + 1e-6
    return mean.astype(np.float32), std.astype(np.float32)


def _fold_back(w: Array, b: Array, mean: Array, std: Array) -> tuple[Array, Array]:
    # (x - m) / s @ W.T + b == x @ (W / s).T + (b - (W / s) @ m)
    w_raw = (w / std[None, :]).astype(np.float32)
    return w_raw, (b - w_raw @ mean).astype(np.float32)


def _ridge_solutions(xs: Array, y: Array, penalties: Sequence[float]) -> list[tuple[Array, Array]]:
    """Ridge on standardized ``xs`` for each penalty, from one eigendecomposition (primal or dual)."""
    n, d = xs.shape
    x64, y64 = xs.astype(np.float64), y.astype(np.float64)
    y_mean = y64.mean(axis=0)
    yc = y64 - y_mean
    solutions = []
    if d <= n:
        values, vectors = np.linalg.eigh(x64.T @ x64)
        projected = vectors.T @ (x64.T @ yc)
        for penalty in penalties:
            w = vectors @ (projected / (values + penalty * n)[:, None])
            solutions.append((w.T.astype(np.float32), y_mean.astype(np.float32)))
    else:
        values, vectors = np.linalg.eigh(x64 @ x64.T)
        projected = vectors.T @ yc
        for penalty in penalties:
            alpha = vectors @ (projected / (values + penalty * n)[:, None])
            solutions.append(((x64.T @ alpha).T.astype(np.float32), y_mean.astype(np.float32)))
    return solutions


def _lbfgs(
    xs: Array,
    y: Array,
    task_type: TaskType,
    setting: HeadSetting,
    n_outputs: int,
    max_iter: int,
    init: tuple[Array, Array] | None = None,
) -> tuple[Array, Array]:
    import torch

    torch.manual_seed(0)
    xt = torch.from_numpy(np.ascontiguousarray(xs))
    linear = torch.nn.Linear(xs.shape[1], n_outputs)
    with torch.no_grad():
        if init is None:
            linear.weight.zero_()
            linear.bias.zero_()
        else:
            linear.weight.copy_(torch.from_numpy(init[0]))
            linear.bias.copy_(torch.from_numpy(init[1]))
    loss_fn: Callable[[Any, Any], Any]
    if task_type is TaskType.MULTI_CLASS:
        yt = torch.from_numpy(y.astype(np.int64))
        loss_fn = torch.nn.functional.cross_entropy
    elif task_type is TaskType.MULTI_LABEL:
        yt = torch.from_numpy(y.astype(np.float32))
        loss_fn = torch.nn.functional.binary_cross_entropy_with_logits
    else:
        yt = torch.from_numpy(y.astype(np.float32))

        def loss_fn(prediction: Any, target: Any) -> Any:
            # Summed over outputs, so that the penalty weighs the same as ridge's (mean over rows).
            per_output = torch.nn.functional.huber_loss(
                prediction, target, delta=HUBER_DELTA, reduction="none"
            )
            return 2.0 * per_output.mean(dim=0).sum()

    optimizer = torch.optim.LBFGS(
        linear.parameters(), lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe"
    )

    # Logistic: mean loss + penalty / 2 * |W|^2. Huber: twice the mean Huber loss is the mean squared
    # error for small residuals, so penalty * |W|^2 makes a penalty mean what it means for ridge.
    factor = 1.0 if setting.kind == HUBER else 0.5

    def closure() -> Any:
        optimizer.zero_grad()
        loss = loss_fn(linear(xt), yt) + factor * setting.penalty * (linear.weight**2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return (
        linear.weight.detach().numpy().astype(np.float32),
        linear.bias.detach().numpy().astype(np.float32),
    )


def fit_heads(
    x: Array,
    y: Array,
    task_type: TaskType,
    settings: Sequence[HeadSetting],
    *,
    n_outputs: int,
    max_iter: int = 100,
    std_floor: float = 0.0,
) -> list[tuple[Array, Array]]:
    """Fit one head per setting on raw features ``x``; returns ``(W, b)`` on raw features for each.

    ``n_outputs`` is the number of model outputs (the task's labels), which the
    targets of a fold may not show. Regression ``y`` (n, outputs) must already be
    standardized. Logistic and Huber fits of increasing penalty start from the
    previous solution (fewer LBFGS steps).
    """
    mean, std = standardization(x, std_floor=std_floor)
    xs = ((x - mean) / std).astype(np.float32)
    ridge = sorted({s.penalty for s in settings if s.kind == RIDGE})
    ridge_fits = dict(zip(ridge, _ridge_solutions(xs, y, ridge), strict=True)) if ridge else {}
    results: dict[HeadSetting, tuple[Array, Array]] = {}
    previous: dict[str, tuple[Array, Array]] = {}
    for setting in sorted(settings, key=lambda s: (s.kind, -s.penalty)):
        if setting.kind == RIDGE:
            results[setting] = ridge_fits[setting.penalty]
            continue
        if setting.kind not in (LOGISTIC, HUBER):
            raise ValueError(
                f"Invalid head {setting.kind!r}. Only {LOGISTIC}, {RIDGE}, {HUBER} are supported."
            )
        init = previous.get(setting.kind)
        if init is None and setting.kind == HUBER and ridge_fits:
            init = ridge_fits[min(ridge_fits, key=lambda p: abs(p - setting.penalty))]
        fit = _lbfgs(xs, y, task_type, setting, n_outputs, max_iter, init)
        results[setting] = previous[setting.kind] = fit
    return [_fold_back(*results[setting], mean, std) for setting in settings]


def fit_head(
    x: Array,
    y: Array,
    task_type: TaskType,
    setting: HeadSetting,
    *,
    n_outputs: int,
    max_iter: int = 100,
    std_floor: float = 0.0,
) -> tuple[Array, Array]:
    """One head (see :func:`fit_heads`)."""
    return fit_heads(x, y, task_type, [setting], n_outputs=n_outputs, max_iter=max_iter, std_floor=std_floor)[
        0
    ]


def predict(x: Array, w: Array, b: Array) -> Array:
    return (x @ w.T + b).astype(np.float32)


def score(task_type: TaskType, y: Array, outputs: Array) -> float:
    """Higher is better: accuracy, mean AP, or minus the MAE (in the units of ``y``)."""
    if task_type is TaskType.MULTI_CLASS:
        return float((outputs.argmax(axis=1) == y).mean())
    if task_type is TaskType.MULTI_LABEL:
        return float(
            np.mean([average_precision(y[:, j].astype(np.int64), outputs[:, j]) for j in range(y.shape[1])])
        )
    return -float(np.abs(outputs - y).mean())


def folds(n_groups: int, k: int, seed: int) -> list[IntArray]:
    """``k`` disjoint random sets of group indices covering ``range(n_groups)``."""
    order = np.random.default_rng(seed).permutation(n_groups)
    return [order[i::k] for i in range(k)]


@dataclass
class CrossValidation:
    """Out-of-fold outputs of each head setting (rows in the order of the training rows)."""

    settings: list[HeadSetting]
    oof: list[Array]  # per setting: (rows, outputs)
    oof_mirror: list[Array] | None  # per setting: the mirrored rows' outputs (for test-time flips)


def cross_validate(
    x: Array,
    y: Array,
    task_type: TaskType,
    settings: Sequence[HeadSetting],
    fold_groups: Sequence[IntArray],
    *,
    n_outputs: int,
    x_mirror: Array | None = None,
    augment_with_mirror: bool = False,
    std_floor: float = 0.0,
) -> CrossValidation:
    """Fit every setting on each fold's complement; predict the fold.

    Row ``i`` of ``x`` is image ``i`` (its group). ``x_mirror`` holds the same
    images mirrored: with ``augment_with_mirror`` they are added to each training
    side (with the same targets), and either way their out-of-fold outputs are
    kept, so that a test-time flip (averaging both) can be scored without
    another fit.
    """
    settings = list(settings)
    oof = [np.zeros((len(x), n_outputs), dtype=np.float32) for _ in settings]
    oof_mirror = [np.zeros_like(o) for o in oof] if x_mirror is not None else None
    for fold in fold_groups:
        held = np.zeros(len(x), dtype=bool)
        held[fold] = True
        x_fit, y_fit = x[~held], y[~held]
        if augment_with_mirror and x_mirror is not None:
            x_fit = np.concatenate([x_fit, x_mirror[~held]])
            y_fit = np.concatenate([y_fit, y[~held]])
        fits = fit_heads(x_fit, y_fit, task_type, settings, n_outputs=n_outputs, std_floor=std_floor)
        for j, (w, b) in enumerate(fits):
            oof[j][held] = predict(x[held], w, b)
            if oof_mirror is not None and x_mirror is not None:
                oof_mirror[j][held] = predict(x_mirror[held], w, b)
    return CrossValidation(settings, oof, oof_mirror)
