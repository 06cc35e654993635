"""How far a training run is: overall progress across its steps, time left, place in the queue.

The steps report their own progress (0..1 each, ``progress.json``). Overall
progress weighs each step by its usual share of a training's time on a CPU
(the train step's embedding and fitting dominate). Time left extrapolates the
time spent so far once there is enough progress to go on, and before that uses
how long the task's previous training took.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from api.db.models import Model, RunStatus, TrainingRun, utcnow

# Share of a typical training's time per pipeline step, in order.
STEP_WEIGHTS: dict[str, float] = {
    "validate": 0.1,
    "split": 0.05,
    "train": 0.7,
    "evaluate": 0.1,
    "register": 0.05,
}
_STEPS = list(STEP_WEIGHTS)
# Below this much overall progress, extrapolating the elapsed time says little.
_EXTRAPOLATE_FROM = 0.15


@dataclass(frozen=True)
class RunState:
    overall_progress: float
    eta_seconds: int | None
    queue_position: int | None
    model_id: str | None


def overall_progress(run: TrainingRun) -> float:
    """0..1 across every step of the run."""
    if run.status == RunStatus.SUCCEEDED:
        return 1.0
    if run.status in (RunStatus.QUEUED, RunStatus.STARTING) or run.step not in STEP_WEIGHTS:
        return 0.0
    done = sum(STEP_WEIGHTS[step] for step in _STEPS[: _STEPS.index(run.step)])
    return round(min(1.0, done + STEP_WEIGHTS[run.step] * max(0.0, min(1.0, run.progress))), 4)


def eta_seconds(run: TrainingRun, progress: float, *, typical_s: float | None, now: datetime) -> int | None:
    """Seconds left for a running run (None when it is not running or nothing is known yet)."""
    if run.status not in (RunStatus.RUNNING, RunStatus.FINISHING) or run.started is None:
        return None
    elapsed = max(0.0, (now - run.started).total_seconds())
    if progress >= _EXTRAPOLATE_FROM:
        return max(0, round(elapsed * (1 - progress) / progress))
    if typical_s is not None:
        return max(0, round(typical_s - elapsed))
    return None


def describe(session: Session, runs: Sequence[TrainingRun]) -> dict[str, RunState]:
    """The state of each run (a few queries for the whole page)."""
    now = utcnow()
    queued = session.execute(
        select(TrainingRun.id).where(TrainingRun.status == RunStatus.QUEUED).order_by(TrainingRun.created)
    ).scalars()
    position = {run_id: i + 1 for i, run_id in enumerate(queued)}
    ids = [run.id for run in runs]
    models = (
        dict(session.execute(select(Model.run_id, Model.id).where(Model.run_id.in_(ids))).all())
        if ids
        else {}
    )
    typical = _typical_durations(session, {run.task_id for run in runs if run.status == RunStatus.RUNNING})
    states = {}
    for run in runs:
        progress = overall_progress(run)
        states[run.id] = RunState(
            overall_progress=progress,
            eta_seconds=eta_seconds(run, progress, typical_s=typical.get(run.task_id), now=now),
            queue_position=position.get(run.id),
            model_id=models.get(run.id),
        )
    return states


def _typical_durations(session: Session, task_ids: set[str]) -> dict[str, float]:
    """Seconds the latest successful training of each task took."""
    if not task_ids:
        return {}
    latest = (
        select(TrainingRun.task_id, func.max(TrainingRun.finished).label("finished"))
        .where(TrainingRun.task_id.in_(task_ids), TrainingRun.status == RunStatus.SUCCEEDED)
        .group_by(TrainingRun.task_id)
        .subquery()
    )
    rows = session.execute(
        select(TrainingRun.task_id, TrainingRun.started, TrainingRun.finished).join(
            latest, (latest.c.task_id == TrainingRun.task_id) & (latest.c.finished == TrainingRun.finished)
        )
    ).all()
    return {task_id: (end - start).total_seconds() for task_id, start, end in rows if start and end}
