"""The regression charts' geometry: round axis steps, every error in a bin, big test splits thinned."""

from __future__ import annotations

import pytest

from api.console.charts import MAX_POINTS, histogram, nice_step, scatter


@pytest.mark.parametrize(
    ("span", "count", "step"), [(40, 5, 10), (8, 12, 1), (0.9, 12, 0.1), (37, 5, 10), (3, 4, 1), (0, 5, 1)]
)
def test_axis_steps_are_round(span: float, count: int, step: float) -> None:
    assert nice_step(span, count) == pytest.approx(step)


def test_every_error_lands_in_one_bin_the_largest_included_and_exact_answers_too() -> None:
    chart = histogram([0.0, 0.4, 1.0, 2.5, 6.0], tolerance=3.0)
    assert chart is not None
    assert sum(b.count for b in chart.bins) == 5
    last = chart.bins[-1]
    assert last.low <= 6.0 < last.high and last.count == 1
    assert [b.beyond_tolerance for b in chart.bins] == [b.low >= 3.0 for b in chart.bins]
    assert (
        chart.tolerance_x is not None and chart.plot_x < chart.tolerance_x < chart.plot_x + chart.plot_width
    )
    assert histogram([]) is None
    exact = histogram([0.0, 0.0])
    assert exact is not None and exact.bins[0].count == 2 and exact.bins[-1].high == pytest.approx(1.0)


def test_a_big_test_split_is_thinned_but_counted_whole() -> None:
    pairs = [(float(i % 50), float(i % 50) + 1.0, i % 7 == 0) for i in range(5 * MAX_POINTS)]
    chart = scatter(pairs)
    assert chart is not None
    assert chart.total == 5 * MAX_POINTS and chart.shown <= MAX_POINTS
    assert chart.wrong == sum(1 for *_, wrong in pairs if wrong)
    left, right = chart.plot_x, chart.plot_x + chart.size
    assert all(
        left <= p.x <= right and chart.plot_y <= p.y <= chart.plot_y + chart.size for p in chart.points
    )
    assert scatter([]) is None
