"""Geometry of the server-rendered SVG charts (the templates draw it; no chart library, no script).

Only numbers are computed here; names reach the SVG through the autoescaping
templates. Sizes are in the SVG's own units (``viewBox``), so a chart scales to
any screen width.
"""

from __future__ import annotations

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
