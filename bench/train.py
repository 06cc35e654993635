"""Training benchmark on real photos: the CPU qualities against the previous default, in one run.

What is measured, per data set (``../shared/datasets/<name>/``: flowers, scenes, ages,
satellite):

* two services run side by side, each a real ``taskvision serve`` (subprocess, fresh data
  directory, its own cold ONNX export cache, ``OMP_WAIT_POLICY=PASSIVE``):

  - **baseline**: the code of ``--baseline-rev`` (default ``6ce2135``, the last commit
    before issue 12: Lite0's multi-scale embedding and a linear head whose weight decay
    is chosen by cross-validation), exported with ``git archive`` into the work
    directory and run from there (``PYTHONPATH``) with the same virtual environment;
  - **ours**: this checkout, trained once per quality (``fast``, ``balanced``, ``best``);

* the data set is uploaded and labelled through each service's API (4 client threads;
  not timed), then each training is timed from ``POST /recognition/v2/task/{id}/train``
  to the moment ``GET /recognition/v2/task/{id}`` shows the new version as
  ``production_version`` (polled every 0.1 s). Before every timed training the bench
  deletes the service's embedding cache (``blobs/embeddings/``), so each run embeds
  every image like a task's first training does;
* per run: the test-split metrics the run registered (the same split for all: same
  snapshot content, same split function and seed), for ours the model selection from
  the bundle (what was chosen, every candidate's cross-validated score on the training
  split), the pipeline steps' seconds from kfp.local's log, and the peak RSS of the
  service and all its descendants (sampled every 0.2 s);
* the load average (``/proc/loadavg``) at the start, before every data set and after
  every run: the machine is shared, so timings are only comparable within a run.
  ``--repeat N`` reruns the timing-critical case (balanced on flowers, cold) N more
  times at the end; the report gives each run with its load and the median.

Before the timed runs each service trains a tiny generated task (not timed; ours with
``quality=best``): that pays the one-off ONNX exports of the backbones into the cold
caches.

Targets (printed as PASS/FAIL): balanced: flowers accuracy >= 0.75, scenes mAP >= 0.94,
ages MAE <= 7.5 years, every data set at least as good as the baseline, flowers
request->production <= 30 s (the median when repeated); best beats balanced on at
least two of flowers, scenes and ages.

The photos are read where they are (never copied into the repo); a data set whose
folder is absent is skipped with a message saying so.

Run it by hand (not collected by pytest)::

    .venv/bin/python bench/train.py [--datasets flowers,scenes,ages,satellite]
        [--qualities fast,balanced,best] [--baseline-rev 6ce2135] [--repeat 2]
        [--out bench/results/train.json]

The results are printed as Markdown on stdout and written as JSON to ``--out``;
progress goes to stderr. The exit status is 1 when a run failed or a target was missed.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import os
import re
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import requests
from _common import (
    API,
    DATASETS_ROOT,
    REPO_ROOT,
    Client,
    Service,
    expect,
    init_script,
    machine_info,
    running_service,
    server_env,
    server_log_summary,
    upload_training_image,
    write_report,
)

from taskvision.metrics import current_names

logger = logging.getLogger("bench.train")

DEFAULT_OUT = REPO_ROOT / "bench" / "results" / "train.json"
ALL_DATASETS = ("flowers", "scenes", "ages", "satellite")
QUALITIES = ("fast", "balanced", "best")
BASELINE_REV = "6ce2135"  # the last commit before issue 12 (model selection)
POLL_S = 0.1  # how often the task is polled for its production version
MEMORY_SAMPLE_S = 0.2
TRAIN_TIMEOUT_S = 1800.0  # one API training
UPLOAD_CONCURRENCY = 4
MIB = 1024

# Targets of quality=balanced (issue 12), and best against balanced.
TARGET_FLOWERS_SECONDS = 30.0
TARGET_FLOWERS_ACCURACY = 0.75
TARGET_SCENES_MAP = 0.94
TARGET_AGES_MAE = 7.5
HEADLINE = {"multi_class": "accuracy", "multi_label": "mAP", "regression": "mae"}

PIPELINE_STEPS = ("validate", "split", "train", "evaluate", "register")
TAG_COLUMNS = ("desert", "mountains", "sea", "sunset", "trees")


# ---- the data sets ------------------------------------------------------------


@dataclass(frozen=True)
class Item:
    path: Path
    labels: tuple[str, ...]  # label names (empty for a multi_label image without tags: the negative label)
    value: float | None = None  # regression


@dataclass(frozen=True)
class Dataset:
    name: str
    task_type: str  # multi_class | multi_label | regression
    label_type: str  # category | tag | value
    label_names: tuple[str, ...]
    items: list[Item]


def load_dataset(name: str) -> Dataset:
    """Read ``labels.csv`` of one data set (the photos stay where they are)."""
    root = DATASETS_ROOT / name
    with (root / "labels.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    if name == "flowers":
        items = [Item(root / row["path"], (row["label"].strip(),)) for row in rows]
        names = tuple(sorted({item.labels[0] for item in items}))
        dataset = Dataset(name, "multi_class", "category", names, items)
    elif name == "scenes":
        items = [
            Item(root / row["path"], tuple(tag for tag in TAG_COLUMNS if row[tag].strip() == "1"))
            for row in rows
        ]
        dataset = Dataset(name, "multi_label", "tag", TAG_COLUMNS, items)
    elif name == "ages":
        items = [Item(root / row["path"], ("age",), float(row["age"])) for row in rows]
        dataset = Dataset(name, "regression", "value", ("age",), items)
    elif name == "satellite":
        items = [Item(root / row["path"], (row["label"].strip(),)) for row in rows]
        names = tuple(sorted({item.labels[0] for item in items}))
        dataset = Dataset(name, "multi_class", "category", names, items)
    else:
        raise ValueError(f"unknown data set {name!r}")
    missing = [item.path for item in items if not item.path.is_file()]
    if missing:
        raise FileNotFoundError(
            f"{name}: {len(missing)} images listed in labels.csv are missing, e.g. {missing[0]}"
        )
    return dataset


def dataset_available(name: str) -> str | None:
    """None when the data set can be read, else why not."""
    if not (DATASETS_ROOT / name / "labels.csv").is_file():
        return f"{DATASETS_ROOT / name / 'labels.csv'} not found"
    return None


def tiny_warmup_images(per_label: int = 20) -> list[tuple[bytes, str]]:
    """A generated two-class task (discs and squares) for the untimed warm-up training."""
    import random

    from PIL import Image, ImageDraw

    rng = random.Random(7)
    images: list[tuple[bytes, str]] = []
    for shape in ("disc", "square"):
        for _ in range(per_label):
            img = Image.new("RGB", (96, 96), tuple(rng.randrange(256) for _ in range(3)))
            draw = ImageDraw.Draw(img)
            x, y, r = rng.randint(25, 70), rng.randint(25, 70), rng.randint(10, 24)
            colour = tuple(rng.randrange(256) for _ in range(3))
            if shape == "disc":
                draw.ellipse((x - r, y - r, x + r, y + r), fill=colour)
            else:
                draw.rectangle((x - r, y - r, x + r, y + r), fill=colour)
            out = io.BytesIO()
            img.save(out, format="PNG")
            images.append((out.getvalue(), shape))
    return images


# ---- memory of a process tree ----------------------------------------------------


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return kids
    for tid in tasks:
        with suppress(OSError):
            kids += [int(x) for x in Path(f"/proc/{pid}/task/{tid}/children").read_text().split()]
    return kids


def _children_by_ppid(pid: int) -> list[int]:
    """Fallback where /proc/<pid>/task/<tid>/children does not exist: scan every process's parent."""
    kids: list[int] = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        if int(stat[stat.rindex(")") + 2 :].split()[1]) == pid:
            kids.append(int(entry))
    return kids


_HAS_CHILDREN_FILE = Path(f"/proc/{os.getpid()}/task/{os.getpid()}/children").exists()


def process_tree(root: int) -> list[int]:
    """``root`` and all its descendants (alive now)."""
    find = _children if _HAS_CHILDREN_FILE else _children_by_ppid
    seen, todo = [], [root]
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.append(pid)
        todo += find(pid)
    return seen


def proc_memory(pid: int) -> tuple[int, int, str] | None:
    """(VmRSS kB, VmHWM kB, command name) of a process, or None when it is gone (or a zombie)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    if "VmRSS" not in fields:  # kernel threads and zombies have no memory
        return None
    name = fields.get("Name", "?").strip()
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        words = [a.decode(errors="replace") for a in argv if a]
        # "python -m pipelines.local_run" or the KFP step's "-m kfp.dsl.executor_main" say more than "python".
        if "-m" in words:
            name = words[words.index("-m") + 1]
        elif len(words) > 1 and "python" in Path(words[0]).name:
            name = Path(words[1]).name
        elif words:
            name = Path(words[0]).name
    except OSError:
        pass
    return int(fields["VmRSS"].split()[0]), int(fields.get("VmHWM", "0 kB").split()[0]), name


class MemorySampler:
    """Samples the summed RSS of a process tree every ``interval`` seconds on a thread."""

    def __init__(self, root: int, interval: float = MEMORY_SAMPLE_S) -> None:
        self.root, self.interval = root, interval
        self.peak_sum_kb = 0
        self.peak_single_kb = 0
        self.peak_single_name = ""
        self.peak_processes = 0
        self.samples = 0
        self.hwm_kb: dict[int, tuple[int, str]] = {}  # VmHWM of every process seen (its own lifetime peak)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="memory-sampler", daemon=True)

    def __enter__(self) -> MemorySampler:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sample()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def sample(self) -> None:
        total, count = 0, 0
        for pid in process_tree(self.root):
            figures = proc_memory(pid)
            if figures is None:
                continue
            rss, hwm, name = figures
            total += rss
            count += 1
            if rss > self.peak_single_kb:
                self.peak_single_kb, self.peak_single_name = rss, name
            if hwm > self.hwm_kb.get(pid, (0, ""))[0]:
                self.hwm_kb[pid] = (hwm, name)
        self.samples += 1
        self.peak_sum_kb = max(self.peak_sum_kb, total)
        self.peak_processes = max(self.peak_processes, count)

    def summary(self) -> dict[str, Any]:
        hwm = sorted(self.hwm_kb.values(), reverse=True)
        return {
            "peak_rss_sum_mib": round(self.peak_sum_kb / MIB, 1),
            "peak_rss_single_mib": round(self.peak_single_kb / MIB, 1),
            "peak_rss_single_process": self.peak_single_name,
            "max_processes": self.peak_processes,
            "samples": self.samples,
            "sample_interval_s": self.interval,
            # Each process's own lifetime peak (VmHWM); the server's includes what it did before this phase.
            "vmhwm_mib_by_process": [{"process": name, "mib": round(kb / MIB, 1)} for kb, name in hwm[:8]],
        }


# ---- the servers under test ----------------------------------------------------


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def export_revision(rev: str, into: Path) -> str:
    """``git archive`` of ``rev`` into ``into``; returns the full commit id."""
    into.mkdir(parents=True)
    commit = subprocess.run(
        ["git", "-C", str(REPO_ROOT), "rev-parse", "--verify", f"{rev}^{{commit}}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    archive = subprocess.run(
        ["git", "-C", str(REPO_ROOT), "archive", commit], capture_output=True, check=True
    )
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return commit


@contextmanager
def running_server(workdir: Path, name: str, *, code: Path, log_level: str) -> Iterator[Service]:
    """A service running the code in ``code`` on a fresh data dir and a cold ONNX export cache."""
    data_dir = workdir / name / "data"
    cache_dir = data_dir / "cache"
    cache_dir.mkdir(parents=True)
    # The baseline's code predates 357234a: its kfp.local steps leave a folder in the temporary
    # folder each (KFP's ``mktemp -d``). Inside the work directory they go when it does.
    temporary = workdir / name / "tmp"
    temporary.mkdir()
    env = server_env(
        TASKVISION_CACHE_DIR=str(cache_dir), PYTHONUNBUFFERED="1", PYTHONPATH=str(code), TMPDIR=str(temporary)
    )
    with running_service(
        data_dir=data_dir, log_path=workdir / f"{name}.log", env=env, log_level=log_level, name=name, cwd=code
    ) as server:
        yield server


def clear_embedding_cache(server: Service) -> None:
    """Every timed run embeds every image, like a task's first training."""
    shutil.rmtree(server.data_dir / "blobs" / "embeddings", ignore_errors=True)


# ---- building a task through the API --------------------------------------------------


@dataclass
class BuiltTask:
    task_id: str
    label_ids: dict[str, str]  # name -> id (the negative label under its own name)
    negative_id: str | None
    uploaded: int
    duplicates: int
    upload_wall_s: float


def create_task(
    client: Client, name: str, task_type: str, label_type: str, labels: Sequence[str]
) -> BuiltTask:
    task = expect(client.post(f"{API}/task/", {"name": name, "type": task_type}), 201, f"create task {name}")
    label_ids: dict[str, str] = {}
    for label_name in labels:
        label = expect(
            client.post(f"{API}/label/", {"name": label_name, "type": label_type}),
            201,
            f"create label {label_name}",
        )
        expect(
            client.post(f"{API}/task/{task['id']}/add-label", {"label_id": label["id"]}), 200, "attach label"
        )
        label_ids[label_name] = label["id"]
    task = expect(client.get(f"{API}/task/{task['id']}"), 200, "read task")
    negative = next((lb["id"] for lb in task.get("labels", []) if lb.get("negative_for_task")), None)
    return BuiltTask(task["id"], label_ids, negative, 0, 0, 0.0)


def _upload_one(
    client: Client, built: BuiltTask, data: bytes, labels: Sequence[str], value: float | None
) -> bool:
    """Upload one image and attach its labels; True when the service already had it (duplicate)."""
    image_id, duplicate = upload_training_image(client, data)
    label_ids = [built.label_ids[name] for name in labels] if labels else [built.negative_id]
    for label_id in label_ids:
        if label_id is None:
            raise RuntimeError("an image without tags, but the task has no negative label")
        payload: dict[str, Any] = {"label_id": label_id}
        if value is not None:
            payload["value"] = value
        expect(client.post(f"{API}/training-image/{image_id}/add-label", payload), 200, "add label to image")
    return duplicate


def upload_all(
    client: Client, built: BuiltTask, jobs: Sequence[tuple[Path | bytes, Sequence[str], float | None]]
) -> None:
    """Upload ``(file or bytes, label names, value)`` jobs with a few client threads."""

    def one(job: tuple[Path | bytes, Sequence[str], float | None]) -> bool:
        source, labels, value = job
        data = source.read_bytes() if isinstance(source, Path) else source
        return _upload_one(client, built, data, labels, value)

    start = time.perf_counter()
    done = 0
    duplicates = 0
    pool = ThreadPoolExecutor(max_workers=UPLOAD_CONCURRENCY, thread_name_prefix="upload")
    try:
        for duplicate in pool.map(one, jobs):
            done += 1
            duplicates += duplicate
            if done % 250 == 0:
                logger.info("  uploaded %d/%d images", done, len(jobs))
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()
    built.uploaded, built.duplicates = done, duplicates
    built.upload_wall_s = round(time.perf_counter() - start, 2)


# ---- one timed training through the API -----------------------------------------------


@dataclass
class TrainOutcome:
    run: dict[str, Any]
    seconds: float  # request -> production_version is the new version
    version: int | None
    metrics: dict[str, Any]
    memory: dict[str, Any]
    steps: list[dict[str, Any]] = field(default_factory=list)  # step changes the run showed, with their time
    log_steps: dict[str, Any] = field(default_factory=dict)
    run_log_tail: list[str] = field(default_factory=list)
    bundle_training: dict[str, Any] = field(default_factory=dict)
    bundle_selection: dict[str, Any] = field(default_factory=dict)
    split: dict[str, list[str]] | None = None  # the train/test image ids the pipeline's split step wrote


def _read_run_log(server: Service, run_id: str) -> str | None:
    """The pipeline run's log; it exists only while the run does (the runner deletes it afterwards)."""
    try:
        return (server.data_dir / "pipeline-runs" / run_id / "run.log").read_text(errors="replace")
    except OSError:
        return None


def _read_split(server: Service, run_id: str) -> dict[str, list[str]] | None:
    """The split step's output (train/test image ids), once it is complete."""
    for path in (server.data_dir / "pipeline-runs" / run_id / "outputs").glob("*/split/split_out"):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            return None  # not (completely) written yet
        return {"train": list(data["train"]), "test": list(data["test"])}
    return None


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
# kfp.local's own lines: "20:45:10.268 - INFO - Executing task 'train'" and
# "... - INFO - Task 'train' finished with status SUCCESS" (task names in colour codes, stripped first).
_KFP_LINE = re.compile(r"^(\d\d:\d\d:\d\d\.\d{3}) - \w+ - (.*)$")
_STEP_START = re.compile(r"^Executing task '([\w-]+)'")
_STEP_END = re.compile(r"^Task '([\w-]+)' finished with status (\w+)")
_PIPELINE_END = re.compile(r"^Pipeline '[\w-]+' finished with status (\w+)")
_NOTABLE = ("embedded ", "candidate ", "chose ", "activations ", "exporting ", "epoch ")
# great-expectations' start-up chatter in the validate step
_NOISE = re.compile(r"Skipping registering function|Multiple declarations of metric")


_TIMESTAMPED = re.compile(r"^\s*(\[KFP Executor )?\d{4}-\d\d-\d\d \d\d:\d\d:\d\d|^\d\d:\d\d:\d\d\.\d{3} - ")


def log_timeline(log: str, limit: int = 200) -> list[str]:
    """The timestamped lines of a run's log (kfp.local's, the KFP executor's, the steps' own)."""
    lines = [_ANSI.sub("", line).strip()[:300] for line in log.splitlines()]
    return [line for line in lines if _TIMESTAMPED.match(line) and not _NOISE.search(line)][-limit:]


def log_step_timings(log: str, requested: datetime) -> dict[str, Any]:
    """Per pipeline step, its start (seconds after the train request) and duration, from kfp.local's log.

    A step's duration includes its subprocess start and imports. ``requested`` is the local wall-clock
    time of the train request (kfp.local logs local times of day).
    """

    def offset(clock: str) -> float:
        when = datetime.combine(requested.date(), datetime.strptime(clock, "%H:%M:%S.%f").time())
        seconds = (when - requested).total_seconds()
        return seconds + 86400 if seconds < -3600 else seconds  # the run crossed midnight

    steps: dict[str, dict[str, Any]] = {}
    notable: list[str] = []
    out: dict[str, Any] = {}
    for raw in log.splitlines():
        line = _ANSI.sub("", raw).strip()
        if any(word in line for word in _NOTABLE) and "INFO" in line:
            notable.append(line[-200:])
        match = _KFP_LINE.match(line)
        if not match:
            continue
        at, message = offset(match.group(1)), match.group(2)
        if started := _STEP_START.match(message):
            steps[started.group(1)] = {"start_s": round(at, 2)}
            out.setdefault("pipeline_first_step_at_s", round(at, 2))
        elif ended := _STEP_END.match(message):
            step = steps.setdefault(ended.group(1), {})
            step["status"] = ended.group(2)
            if "start_s" in step:
                step["seconds"] = round(at - step["start_s"], 2)
        elif finished := _PIPELINE_END.match(message):
            out["pipeline_finished_at_s"] = round(at, 2)
            out["pipeline_status"] = finished.group(1)
    out["steps"] = steps
    out["notable_lines"] = notable[-12:]
    return out


class RunFailed(RuntimeError):
    """A training run that failed, with what its log said."""

    def __init__(self, message: str, log: list[str]) -> None:
        super().__init__(message)
        self.log = log


def train_and_wait(
    client: Client, server: Service, task_id: str, *, params: dict[str, Any] | None = None, timed: bool = True
) -> TrainOutcome:
    """Ask for a training and wait until the new version is the task's production version."""
    before = expect(client.get(f"{API}/task/{task_id}"), 200, "read task")["production_version"]
    steps: list[dict[str, Any]] = []
    last_log = ""
    split: dict[str, list[str]] | None = None
    with MemorySampler(server.process.pid) as memory:
        requested = datetime.now()  # local time, as kfp.local logs it
        start = time.perf_counter()
        response = client.post(f"{API}/task/{task_id}/train", params)
        run = expect(response, 202, "train")
        run_id = run["id"]
        deadline = time.monotonic() + TRAIN_TIMEOUT_S
        next_run_poll = 0.0
        production = before
        while True:
            production = expect(client.get(f"{API}/task/{task_id}"), 200, "poll task")["production_version"]
            elapsed = time.perf_counter() - start
            if production != before:
                break
            # The run's log and split exist only while the run does: keep the latest copy.
            last_log = _read_run_log(server, run_id) or last_log
            split = split or _read_split(server, run_id)
            if elapsed >= next_run_poll:  # the run, for its step and failures, twice a second
                next_run_poll = elapsed + 0.5
                run = expect(client.get(f"{API}/training-run/{run_id}"), 200, "poll run")
                if not steps or (steps[-1]["step"], steps[-1]["status"]) != (run["step"], run["status"]):
                    steps.append({"at_s": round(elapsed, 2), "step": run["step"], "status": run["status"]})
                    logger.info(
                        "  %6.1f s  %s %s %s", elapsed, run["status"], run["step"], run.get("message", "")
                    )
                if run["status"] in ("FAILED", "CANCELED"):
                    raise RunFailed(
                        f"run {run_id} {run['status']} at step {run['step']!r}: {run['error']}",
                        log_timeline(_read_run_log(server, run_id) or last_log),
                    )
            if time.monotonic() > deadline:
                raise RuntimeError(f"run {run_id} not in production after {TRAIN_TIMEOUT_S:.0f} s: {run}")
            time.sleep(POLL_S)
        seconds = time.perf_counter() - start
    run = expect(client.get(f"{API}/training-run/{run_id}"), 200, "read run")
    if run["status"] != "SUCCEEDED" or run["version"] != production:
        raise RuntimeError(f"production is version {production} but the run says {run}")
    models = expect(client.get(f"{API}/model/", {"task": task_id}), 200, "list models")["results"]
    model = next(m for m in models if m["version"] == production)
    bundle_training: dict[str, Any] = {}
    bundle_selection: dict[str, Any] = {}
    bundle = server.data_dir / "blobs" / "models" / task_id / run_id / "bundle.json"
    if bundle.is_file():
        written = json.loads(bundle.read_text())
        bundle_training = written.get("training", {})
        bundle_selection = written.get("selection", {})
    if timed:
        logger.info("  version %d in production %.2f s after the train request", production, seconds)
    return TrainOutcome(
        run=run,
        seconds=round(seconds, 3),
        version=production,
        metrics=model["metrics"],
        memory=memory.summary(),
        steps=steps,
        log_steps=log_step_timings(last_log, requested),
        run_log_tail=log_timeline(last_log),
        bundle_training=bundle_training,
        bundle_selection=bundle_selection,
        split=split,
    )


# ---- per data set --------------------------------------------------------------------------


def headline(task_type: str, metrics: dict[str, Any]) -> dict[str, float]:
    keys = {
        "multi_class": ("accuracy", "macro_precision", "macro_recall", "macro_f1", "ece"),
        "multi_label": ("mAP", "exact_match_accuracy", "macro_precision", "macro_recall", "macro_f1", "ece"),
        "regression": ("mae", "rmse", "r2", "out_of_range"),
    }[task_type]
    metrics = current_names(task_type, metrics)
    return {k: round(float(metrics[k]), 4) for k in keys if k in metrics}


def outcome_record(task_type: str, outcome: TrainOutcome, load_before: list[float]) -> dict[str, Any]:
    selection = outcome.bundle_selection
    return {
        "request_to_production_s": outcome.seconds,
        "version": outcome.version,
        "headline": headline(task_type, outcome.metrics),
        "metrics": outcome.metrics,
        "memory": outcome.memory,
        "train_images": outcome.bundle_training.get("train_images"),
        "test_images": outcome.metrics.get("test_images"),
        "training": outcome.bundle_training,
        "selection": selection,
        "chosen": selection.get("chosen", "lite0-ms1 (the only candidate)") if selection else "-",
        "run_log_step_seconds": outcome.log_steps,
        "run_steps_seen": outcome.steps,
        "run_log_tail": outcome.run_log_tail,
        "load_average_before": load_before,
        "load_average_after": loadavg(),
    }


def timed_training(
    client: Client, server: Service, task_id: str, params: dict[str, Any] | None, task_type: str, what: str
) -> dict[str, Any]:
    clear_embedding_cache(server)
    before = loadavg()
    logger.info("%s: training (load %s)", what, before)
    outcome = train_and_wait(client, server, task_id, params=params)
    record = outcome_record(task_type, outcome, before)
    logger.info("%s: %.1f s, %s, chose %s", what, outcome.seconds, record["headline"], record["chosen"])
    return record


def upload_dataset(client: Client, dataset: Dataset, server_name: str) -> BuiltTask:
    built = create_task(
        client, f"bench {dataset.name}", dataset.task_type, dataset.label_type, dataset.label_names
    )
    upload_all(client, built, [(item.path, item.labels, item.value) for item in dataset.items])
    logger.info(
        "%s on %s: %d images uploaded in %.1f s (not timed)",
        dataset.name,
        server_name,
        built.uploaded,
        built.upload_wall_s,
    )
    return built


def bench_dataset(
    clients: dict[str, Client], servers: dict[str, Service], dataset: Dataset, qualities: Sequence[str]
) -> tuple[dict[str, Any], BuiltTask]:
    row: dict[str, Any] = {
        "dataset": dataset.name,
        "task_type": dataset.task_type,
        "images": len(dataset.items),
        "labels": list(dataset.label_names),
        "untagged_images": sum(not item.labels for item in dataset.items),
        "load_average_before": loadavg(),
    }
    base_task = upload_dataset(clients["baseline"], dataset, "baseline")
    ours_task = upload_dataset(clients["ours"], dataset, "ours")
    row["upload"] = {"baseline_s": base_task.upload_wall_s, "ours_s": ours_task.upload_wall_s}
    row["baseline"] = timed_training(
        clients["baseline"],
        servers["baseline"],
        base_task.task_id,
        None,
        dataset.task_type,
        f"{dataset.name} baseline",
    )
    row["ours"] = {}
    for quality in qualities:
        row["ours"][quality] = timed_training(
            clients["ours"],
            servers["ours"],
            ours_task.task_id,
            {"quality": quality, "reselect": True},  # a full model selection, as a first training
            dataset.task_type,
            f"{dataset.name} {quality}",
        )
    return row, ours_task


# ---- report -------------------------------------------------------------------------------


def _value(row: dict[str, Any], which: str) -> float | None:
    run = row["baseline"] if which == "baseline" else row.get("ours", {}).get(which)
    if not run:
        return None
    value = run["headline"].get(HEADLINE[row["task_type"]])
    return None if value is None else float(value)


def _better_or_equal(task_type: str, a: float, b: float) -> bool:
    return a <= b if task_type == "regression" else a >= b


def evaluate_targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    """PASS/FAIL (or n/a) per target."""
    by_name = {row["dataset"]: row for row in report["datasets"] if "baseline" in row}
    targets: list[dict[str, Any]] = []

    def add(name: str, ok: bool | None, detail: str) -> None:
        targets.append(
            {"target": name, "status": "n/a" if ok is None else ("PASS" if ok else "FAIL"), "detail": detail}
        )

    for name, key, limit, higher in (
        ("flowers", "accuracy", TARGET_FLOWERS_ACCURACY, True),
        ("scenes", "mAP", TARGET_SCENES_MAP, True),
        ("ages", "mae", TARGET_AGES_MAE, False),
    ):
        label = f"balanced {name} {key} {'>=' if higher else '<='} {limit}"
        value = _value(by_name[name], "balanced") if name in by_name else None
        if value is None:
            add(label, None, f"{name} balanced not run")
        else:
            add(label, value >= limit if higher else value <= limit, f"{value:.4f}")
    for name, row in by_name.items():
        ours, base = _value(row, "balanced"), _value(row, "baseline")
        if ours is not None and base is not None:
            add(
                f"balanced {name} at least as good as the baseline",
                _better_or_equal(row["task_type"], ours, base),
                f"{HEADLINE[row['task_type']]} {ours:.4f} vs {base:.4f}",
            )
    seconds = report.get("flowers_balanced_seconds")
    if seconds:
        median = statistics.median(seconds)
        add(
            f"balanced flowers request->production <= {TARGET_FLOWERS_SECONDS:.0f} s",
            median <= TARGET_FLOWERS_SECONDS,
            f"median {median:.1f} s of {len(seconds)} run(s): {', '.join(f'{s:.1f}' for s in seconds)}",
        )
    else:
        add(f"balanced flowers request->production <= {TARGET_FLOWERS_SECONDS:.0f} s", None, "not run")
    wins, compared = [], 0
    for name in ("flowers", "scenes", "ages"):
        if name not in by_name:
            continue
        best, balanced = _value(by_name[name], "best"), _value(by_name[name], "balanced")
        if best is None or balanced is None:
            continue
        compared += 1
        better = best < balanced if by_name[name]["task_type"] == "regression" else best > balanced
        if better:
            wins.append(name)
    add(
        "best beats balanced on at least two of flowers, scenes, ages",
        None if compared < 2 else len(wins) >= 2,
        f"better on {', '.join(wins) or 'none'} of {compared}",
    )
    return targets


def _metrics_cell(task_type: str, values: dict[str, float]) -> str:
    if not values:
        return "-"
    if task_type == "multi_class":
        return (
            f"acc **{values['accuracy']:.3f}**, macro F1 {values.get('macro_f1', 0):.3f}, "
            f"ECE {values.get('ece', 0):.3f}"
        )
    if task_type == "multi_label":
        return (
            f"mAP **{values['mAP']:.3f}**, macro F1 {values.get('macro_f1', 0):.3f}, "
            f"ECE {values.get('ece', 0):.3f}"
        )
    outside = int(values.get("out_of_range", 0))
    return f"MAE **{values['mae']:.2f}**, R² {values['r2']:.3f}, out of range {outside}"


def _memory_cell(memory: dict[str, Any] | None) -> str:
    if not memory:
        return "-"
    return f"{memory['peak_rss_sum_mib']:.0f} / {memory['peak_rss_single_mib']:.0f}"


def _load(values: list[float] | None) -> str:
    return "/".join(f"{x:.1f}" for x in values) if values else "?"


def markdown(report: dict[str, Any]) -> str:
    machine, cfg = report["machine"], report["config"]
    commit = f"{machine['git_commit']}{' (dirty)' if machine['git_dirty'] else ''}"
    out = [
        f"## Training benchmark ({report['date']})",
        "",
        f"{machine['nproc']} CPUs ({machine['cpu_model']}), {machine['memory_gib']} GiB, Python "
        f"{machine['python']}, commit {commit}; baseline: the code of {cfg['baseline_commit'][:7]} "
        "(the previous default). Load average (1/5/15 min) at start "
        f"{_load(machine['load_average_at_start'])}, at end {_load(machine.get('load_average_at_end'))}. "
        "Each run from a cold embedding cache; time from the train request until the new version is "
        f"production (polled every {POLL_S} s). Peak RSS: summed over the service's process tree / "
        "largest single process, MiB.",
        "",
        "| dataset | run | request -> production | test metrics | chosen (CV score) | peak RSS "
        "| load before |",
        "|---|---|---:|---|---|---:|---:|",
    ]
    for row in report["datasets"]:
        if "baseline" not in row:
            out.append(f"| {row['dataset']} | - | {row.get('skipped') or row.get('error', '-')} | | | | |")
            continue
        runs = [("baseline", row["baseline"]), *list(row.get("ours", {}).items())]
        for which, run in runs:
            selection = run.get("selection") or {}
            chosen = "lite0-ms1, linear (fixed)"
            if selection:
                score = next(
                    (
                        c["cv_score"]
                        for c in selection.get("candidates", [])
                        if c["name"] == selection["chosen"]
                    ),
                    None,
                )
                chosen = f"{selection['chosen']} ({score:.4f})" if score is not None else selection["chosen"]
            out.append(
                f"| {row['dataset']} | {which} | {run['request_to_production_s']:.1f} s "
                f"| {_metrics_cell(row['task_type'], run['headline'])} | {chosen} "
                f"| {_memory_cell(run['memory'])} | {_load(run['load_average_before'])} |"
            )
    out += [
        "",
        "Cross-validated scores of every candidate (training split only; regression: minus the MAE):",
        "",
    ]
    for row in report["datasets"]:
        for quality, run in (row.get("ours") or {}).items():
            selection = run.get("selection") or {}
            cells = ", ".join(
                f"{c['name']} {c['cv_score']:.4f} ({c['seconds']:.0f} s)"
                for c in selection.get("candidates", [])
            )
            out.append(f"- {row['dataset']} {quality}: {cells}")
    repeats = report.get("repeats") or []
    if repeats:
        out += ["", "Balanced on flowers, repeated (cold):", ""]
        out += [
            f"- {r['request_to_production_s']:.1f} s, accuracy {r['headline'].get('accuracy', 0):.3f}, "
            f"load before {_load(r['load_average_before'])}"
            for r in repeats
        ]
    out += [""] + [f"- **{t['status']}** {t['target']}: {t['detail']}" for t in report["targets"]]
    out += ["", f"Total benchmark time {report['total_s'] / 60:.1f} min."]
    return "\n".join(out)


# ---- main -------------------------------------------------------------------


def _names(value: str, allowed: Sequence[str], parser: argparse.ArgumentParser, option: str) -> list[str]:
    names = [part.strip() for part in value.split(",") if part.strip()]
    unknown = [n for n in names if n not in allowed]
    if unknown:
        parser.error(f"{option}: unknown {', '.join(unknown)}; choose from {', '.join(allowed)}")
    return names


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--datasets", default=",".join(ALL_DATASETS), help="data sets to train on")
    parser.add_argument("--qualities", default=",".join(QUALITIES), help="our qualities to train with")
    parser.add_argument("--baseline-rev", default=BASELINE_REV, help="git revision of the baseline's code")
    parser.add_argument(
        "--repeat", type=int, default=0, help="rerun balanced on flowers this many more times at the end"
    )
    parser.add_argument("--server-log-level", default="info", choices=["debug", "info", "warning", "error"])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where to write the JSON results")
    args = parser.parse_args(argv)
    args.dataset_names = _names(args.datasets, ALL_DATASETS, parser, "--datasets")
    args.quality_names = _names(args.qualities, QUALITIES, parser, "--qualities")
    if args.repeat < 0:
        parser.error("--repeat must be 0 or more")
    return args


def warm_up(client: Client, server: Service, params: dict[str, Any] | None) -> dict[str, Any]:
    warm = create_task(client, "bench warm-up", "multi_class", "category", ("disc", "square"))
    upload_all(client, warm, [(data, (label,), None) for data, label in tiny_warmup_images()])
    start = time.perf_counter()
    outcome = train_and_wait(client, server, warm.task_id, params=params, timed=False)
    return {
        "images": warm.uploaded,
        "params": params,
        "seconds": round(time.perf_counter() - start, 2),
        "metrics": headline("multi_class", outcome.metrics),
        "onnx_cache_files": sorted(p.name for p in (server.data_dir / "cache").rglob("*.onnx")),
    }


def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    begin = time.perf_counter()
    report: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "config": {
            "datasets": args.dataset_names,
            "qualities": args.quality_names,
            "baseline_rev": args.baseline_rev,
            "repeat": args.repeat,
            "datasets_root": str(DATASETS_ROOT),
            "poll_interval_s": POLL_S,
            "memory_sample_interval_s": MEMORY_SAMPLE_S,
            "upload_concurrency": UPLOAD_CONCURRENCY,
            "cold_embedding_cache_per_run": True,
        },
        "datasets": [],
    }
    report["machine"]["load_average_at_start"] = loadavg()
    datasets: list[Dataset] = []
    for name in args.dataset_names:
        why = dataset_available(name)
        if why:
            logger.warning("skipping %s: %s (the photos live in %s)", name, why, DATASETS_ROOT)
            report["datasets"].append({"dataset": name, "skipped": why})
            continue
        datasets.append(load_dataset(name))
    baseline_code = workdir / "baseline-code"
    report["config"]["baseline_commit"] = export_revision(args.baseline_rev, baseline_code)
    flowers_task: BuiltTask | None = None
    with (
        running_server(workdir, "baseline", code=baseline_code, log_level=args.server_log_level) as base,
        running_server(workdir, "ours", code=REPO_ROOT, log_level=args.server_log_level) as ours,
    ):
        servers = {"baseline": base, "ours": ours}
        clients = {name: Client(server) for name, server in servers.items()}
        logger.info("warm-up: a tiny generated task on each service (not timed): the ONNX exports")
        report["warmup"] = {
            "baseline": warm_up(clients["baseline"], base, None),
            "ours": warm_up(clients["ours"], ours, {"quality": "best"}),
        }
        for dataset in datasets:
            try:
                row, built = bench_dataset(clients, servers, dataset, args.quality_names)
            except (RuntimeError, requests.RequestException) as exc:
                logger.error("%s failed: %s", dataset.name, exc)
                failure: dict[str, Any] = {
                    "dataset": dataset.name,
                    "task_type": dataset.task_type,
                    "error": str(exc),
                }
                if isinstance(exc, RunFailed):
                    failure["run_log_tail"] = exc.log[-60:]
                    for line in exc.log[-25:]:
                        logger.error("  | %s", line)
                report["datasets"].append(failure)
                continue
            report["datasets"].append(row)
            if dataset.name == "flowers":
                flowers_task = built
        seconds = [
            row["ours"]["balanced"]["request_to_production_s"]
            for row in report["datasets"]
            if row["dataset"] == "flowers" and "balanced" in row.get("ours", {})
        ]
        report["repeats"] = []
        if flowers_task is not None and seconds:
            for k in range(args.repeat):
                record = timed_training(
                    clients["ours"],
                    ours,
                    flowers_task.task_id,
                    {"quality": "balanced", "reselect": True},
                    "multi_class",
                    f"flowers balanced, repeat {k + 1}/{args.repeat}",
                )
                report["repeats"].append(record)
                seconds.append(record["request_to_production_s"])
        report["flowers_balanced_seconds"] = seconds
        report["server_logs"] = {
            name: server_log_summary(server.log_path) for name, server in servers.items()
        }
    report["machine"]["load_average_at_end"] = loadavg()
    report["targets"] = evaluate_targets(report)
    report["total_s"] = round(time.perf_counter() - begin, 1)
    return report


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    init_script()
    workdir = Path(tempfile.mkdtemp(prefix="taskvision-train-bench-"))
    try:
        report = run(args, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    write_report(report, args.out, markdown)
    failed = any("error" in row for row in report["datasets"])
    failed |= any(t["status"] == "FAIL" for t in report["targets"])
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
