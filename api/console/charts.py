"""Geometry of the server-rendered SVG charts (the templates draw it; no chart library, no script).

Only numbers are computed here; names reach the SVG through the autoescaping
templates. Sizes are in the SVG's own units (``viewBox``), so a chart scales to
any screen width.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

NAME_WIDTH = 180  # the label names' column
PLOT_WIDTH = 300
ROW_HEIGHT = 30
TOP = 26  # room for the minimum's caption
MAX_NAME_CHARS = 24


@dataclass(frozen=True)
class Bar:
    name: str
    short_name: str
    value: int
    y: float
    width: float
    below_minimum: bool
    missing: int  # images still needed to reach the minimum
    text_x: float  # where its figure is written (past the minimum's line when the bar is short of it)


@dataclass(frozen=True)
class BarChart:
    bars: list[Bar]
    minimum: int | None
    minimum_x: float | None
    plot_x: float
    width: float
    height: float
    row_height: float

    @property
    def blocked(self) -> list[Bar]:
        return [bar for bar in self.bars if bar.below_minimum]


def _short(name: str) -> str:
    return name if len(name) <= MAX_NAME_CHARS else name[: MAX_NAME_CHARS - 1] + "…"


def label_bars(rows: list[tuple[str, int, bool]], *, minimum: int | None) -> BarChart:
    """Horizontal bars of images per label, with the minimum to train marked.

    ``rows`` are (name, images, held to the minimum); a tagging task's negative
    label is shown but not held to it.
    """
    top = max([count for _, count, _ in rows] + [minimum or 0, 1])
    scale = PLOT_WIDTH / (top * 1.1)
    minimum_x = round(NAME_WIDTH + minimum * scale, 1) if minimum is not None else None
    bars = []
    for i, (name, count, checked) in enumerate(rows):
        width = round(count * scale, 1)
        below = bool(checked and minimum is not None and count < minimum)
        end = NAME_WIDTH + width
        bars.append(
            Bar(
                name=name,
                short_name=_short(name),
                value=count,
                y=TOP + i * ROW_HEIGHT,
                width=width,
                below_minimum=below,
                missing=max(0, (minimum or 0) - count) if checked else 0,
                text_x=(max(end, minimum_x) if below and minimum_x is not None else end) + 6,
            )
        )
    return BarChart(
        bars=bars,
        minimum=minimum,
        minimum_x=minimum_x,
        plot_x=NAME_WIDTH,
        width=NAME_WIDTH + PLOT_WIDTH + 150,
        height=TOP + max(1, len(bars)) * ROW_HEIGHT + 6,
        row_height=ROW_HEIGHT,
    )


@dataclass(frozen=True)
class Probability:
    name: str
    prob: float
    width: float  # 0..100 of the bar's viewBox
    above_threshold: bool | None = None


def probability_bars(labels: list[dict[str, object]], best: set[str]) -> list[Probability]:
    """One bar per label of a classify answer (sorted as answered: most probable first)."""
    bars = []
    for label in labels:
        prob = label.get("prob")
        value = float(prob) if isinstance(prob, int | float) else 0.0
        bars.append(
            Probability(
                name=str(label.get("name", "")),
                prob=value,
                width=round(max(0.0, min(1.0, value)) * 100, 2),
                above_threshold=str(label.get("id")) in best,
            )
        )
    return bars


# ---- regression: predicted against actual, and the errors ---------------------------------------

MAX_POINTS = 2_000  # a bigger test split is thinned evenly (the SVG stays light)


@dataclass(frozen=True)
class Tick:
    pos: float  # along its axis, in the SVG's units
    text: str


def nice_step(span: float, count: int) -> float:
    """A round step (1, 2 or 5 times a power of ten) that cuts ``span`` into about ``count`` parts."""
    if not math.isfinite(span) or span <= 0:
        return 1.0
    raw = span / max(1, count)
    power = 10 ** math.floor(math.log10(raw))
    return next(m * power for m in (1, 2, 5, 10) if m * power >= raw * 0.999)


def _tick_text(value: float, step: float) -> str:
    digits = max(0, -math.floor(math.log10(step))) if step < 1 else 0
    text = f"{value:,.{digits}f}"
    return "0" if text.lstrip("-") == f"{0:.{digits}f}" else text


def _range(values: list[float], step_count: int) -> tuple[float, float, float]:
    """A round range covering ``values`` and its step."""
    lo, hi = min(values), max(values)
    if hi - lo < 1e-9:
        lo, hi = lo - 1, hi + 1
    step = nice_step(hi - lo, step_count)
    return math.floor(lo / step) * step, math.ceil(hi / step) * step, step


@dataclass(frozen=True)
class Point:
    x: float
    y: float
    wrong: bool


@dataclass(frozen=True)
class Scatter:
    """Predicted (up) against actual (across) on the same scale; the diagonal is a perfect answer."""

    points: list[Point]
    ticks: list[Tick]  # the same values on both axes (x positions; y is mirrored, see y_ticks)
    y_ticks: list[Tick]
    plot_x: float
    plot_y: float
    size: float
    width: float
    height: float
    total: int  # images, before thinning
    wrong: int

    @property
    def shown(self) -> int:
        return len(self.points)


def scatter(pairs: list[tuple[float, float, bool]], *, size: float = 340) -> Scatter | None:
    """``pairs`` are (actual, predicted, wrong). None without any."""
    if not pairs:
        return None
    step_every = max(1, math.ceil(len(pairs) / MAX_POINTS))
    lo, hi, step = _range([v for a, p, _ in pairs for v in (a, p)], 5)
    left, top = 70.0, 14.0
    scale = size / (hi - lo)

    def x(value: float) -> float:
        return round(left + (value - lo) * scale, 1)

    def y(value: float) -> float:
        return round(top + size - (value - lo) * scale, 1)

    values = [lo + i * step for i in range(round((hi - lo) / step) + 1)]
    return Scatter(
        points=[Point(x(a), y(p), wrong) for a, p, wrong in pairs[::step_every]],
        ticks=[Tick(x(v), _tick_text(v, step)) for v in values],
        y_ticks=[Tick(y(v), _tick_text(v, step)) for v in values],
        plot_x=left,
        plot_y=top,
        size=size,
        width=left + size + 20,
        height=top + size + 56,
        total=len(pairs),
        wrong=sum(1 for _, _, wrong in pairs if wrong),
    )


@dataclass(frozen=True)
class Bin:
    low: float
    high: float
    count: int
    x: float
    y: float
    width: float
    height: float
    low_text: str
    high_text: str
    beyond_tolerance: bool  # the whole bin is further off than the tolerance


@dataclass(frozen=True)
class Histogram:
    """How many images were off by how much (absolute error), with the tolerance marked."""

    bins: list[Bin]
    x_ticks: list[Tick]
    y_ticks: list[Tick]
    plot_x: float
    plot_y: float
    plot_width: float
    plot_height: float
    width: float
    height: float
    tolerance: float | None
    tolerance_x: float | None
    tolerance_text: str
    total: int


def histogram(
    errors: list[float], *, tolerance: float | None = None, bins: int = 12, width: float = 420
) -> Histogram | None:
    """Absolute errors in about ``bins`` round-sized bins from 0. None without any."""
    errors = [abs(e) for e in errors if math.isfinite(e)]
    if not errors:
        return None
    top_error = max(max(errors), tolerance or 0.0) or 1.0  # all exact: one bin from 0 to 1
    step = nice_step(top_error, bins)
    n = max(1, math.ceil(top_error / step - 1e-9))
    if max(errors) >= n * step:  # the largest error sits on the last edge: its bin is [edge, edge + step)
        n += 1
    counts = [0] * n
    for error in errors:
        counts[min(n - 1, int(error / step))] += 1
    left, top, height = 60.0, 14.0, 220.0
    hi_count = max(counts)
    count_step = nice_step(hi_count, 4) if hi_count > 4 else 1.0
    count_top = math.ceil(hi_count / count_step) * count_step
    x_scale, y_scale = width / (n * step), height / count_top
    out = []
    for i, count in enumerate(counts):
        low, high = i * step, (i + 1) * step
        bar = round(count * y_scale, 1)
        out.append(
            Bin(
                low=low,
                high=high,
                count=count,
                x=round(left + low * x_scale + 1, 1),
                y=round(top + height - bar, 1),
                width=round(step * x_scale - 2, 1),
                height=bar,
                low_text=_tick_text(low, step),
                high_text=_tick_text(high, step),
                beyond_tolerance=tolerance is not None and low >= tolerance,
            )
        )
    label_every = max(1, math.ceil((n + 1) / 7))
    x_ticks = [
        Tick(round(left + i * step * x_scale, 1), _tick_text(i * step, step))
        for i in range(0, n + 1, label_every)
    ]
    y_ticks = [
        Tick(round(top + height - c * y_scale, 1), f"{int(c):,}")
        for c in (i * count_step for i in range(int(count_top / count_step) + 1))
    ]
    return Histogram(
        bins=out,
        x_ticks=x_ticks,
        y_ticks=y_ticks,
        plot_x=left,
        plot_y=top,
        plot_width=width,
        plot_height=height,
        width=left + width + 24,
        height=top + height + 56,
        tolerance=tolerance,
        tolerance_x=round(left + tolerance * x_scale, 1) if tolerance is not None else None,
        tolerance_text=f"{tolerance:,.2f}" if tolerance is not None else "",  # as the gallery writes values
        total=len(errors),
    )
