"""Training benchmark of the control plane on real photos, against a fine-tuning baseline.

What is measured, per data set (``../shared/datasets/<name>/`` next to the repo):

* **ours**: the real service (``taskvision serve`` as a subprocess, fresh data
  directory) with its default CPU training (the KFP pipeline validate -> split
  -> train -> evaluate -> register run by kfp.local; ``embed`` mode:
  EfficientNet-Lite0 embeddings with ONNX Runtime + a linear head). The wall
  time runs from sending ``POST /recognition/v2/task/{id}/train`` to the moment
  ``GET /recognition/v2/task/{id}`` shows the new version as
  ``production_version`` (polled every 0.1 s). The images are uploaded and
  labelled through the API first (4 client threads); that is not timed. The
  metrics are the ones the run registered with the version (on its test
  split). Peak memory is sampled every 0.2 s over the server process and all
  its descendants (the pipeline process and its step processes): the peak of
  the summed RSS and the largest single process.
* **baseline**: the same backbone fully fine-tuned end to end (the PyTorch
  transfer-learning tutorial's method: SGD with momentum, random resized crops
  and flips; ``components.lib.train`` in ``finetune`` mode) for 25 epochs,
  learning rate 0.001, batch 32, on the very snapshot the service froze for
  its run and the same deterministic split (``split_dataset(test_fraction=0.2,
  seed=0)``, as the pipeline), evaluated by the same evaluate code. It runs in
  a child process of the benchmark (torch on 2 threads) so its time and
  memory are its own; the server is idle meanwhile.

Before the timed runs the service trains once on a tiny generated task (not
timed): the data directory, and the ONNX export cache
(``TASKVISION_CACHE_DIR``, inside it), start empty like on a fresh machine, and
that first training pays the one-off ONNX export of the backbone. Embeddings
are cached per image hash in the blob store, so every timed run embeds its
images from scratch (each data set's images are new to the service).

Targets (printed as PASS/FAIL): flowers trained in < 30 s request->production
with accuracy >= the baseline's; scenes mAP >= 0.90; ages MAE <= 9 years.

The photos are read where they are (never copied into the repo); a data set
whose folder is absent is skipped with a message saying so.

Run it by hand (not collected by pytest)::

    .venv/bin/python bench/train.py [--datasets flowers,scenes,ages]
        [--baseline-datasets flowers,scenes,ages] [--baseline-epochs 25]
        [--out bench/results/train.json]

A 25-epoch fine-tune on a 2-core CPU takes tens of minutes per data set;
``--baseline-epochs 1`` makes a quick end-to-end check and
``--baseline-datasets ''`` skips the baseline. The results are printed as
Markdown on stdout and written as JSON to ``--out``; progress goes to stderr.
The exit status is 1 when a run failed or a target was missed.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import math
import os
import re
import shutil
import subprocess
import sys
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
    stop_process,
    upload_training_image,
    write_report,
)

logger = logging.getLogger("bench.train")

DEFAULT_OUT = REPO_ROOT / "bench" / "results" / "train.json"
ALL_DATASETS = ("flowers", "scenes", "ages")
POLL_S = 0.1  # how often the task is polled for its production version
MEMORY_SAMPLE_S = 0.2
TRAIN_TIMEOUT_S = 1800.0  # one API training (the default CPU mode needs well under a minute)
UPLOAD_CONCURRENCY = 4
BASELINE_THREADS = 2
MIB = 1024

# Targets: flowers fast and at least as accurate as fine-tuning; scenes and ages good enough.
TARGET_FLOWERS_SECONDS = 30.0
TARGET_SCENES_MAP = 0.90
TARGET_AGES_MAE = 9.0

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


# ---- the server under test ----------------------------------------------------


def onnx_cache_dir(data_dir: Path) -> Path:
    """The service's ONNX export cache (``TASKVISION_CACHE_DIR``): in its data dir, so it starts empty."""
    return data_dir / "cache"


@contextmanager
def running_server(workdir: Path, *, log_level: str) -> Iterator[Service]:
    """Start the service on a fresh data dir under ``workdir``; always stop it."""
    data_dir = workdir / "data"
    cache_dir = onnx_cache_dir(data_dir)
    cache_dir.mkdir(parents=True)
    env = server_env(
        TASKVISION_CACHE_DIR=str(cache_dir),  # a cold ONNX export cache, like a fresh machine
        PYTHONUNBUFFERED="1",
    )
    with running_service(
        data_dir=data_dir, log_path=workdir / "server.log", env=env, log_level=log_level
    ) as server:
        yield server


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
_NOTABLE = ("embedded ", "weight decay", "exporting ", "epoch ")
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
    bundle = server.data_dir / "blobs" / "models" / task_id / run_id / "bundle.json"
    if bundle.is_file():
        bundle_training = json.loads(bundle.read_text()).get("training", {})
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
        split=split,
    )


# ---- the baseline (a child process) ------------------------------------------------------


def baseline_worker(spec_path: Path) -> int:
    """In the child: fine-tune on the snapshot and split the service used; write the result JSON."""
    spec = json.loads(spec_path.read_text())
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s baseline %(message)s")
    started = time.perf_counter()
    import torch

    torch.set_num_threads(BASELINE_THREADS)
    from components.lib.evaluate import evaluate_model
    from components.lib.split import split_dataset
    from components.lib.train import TrainConfig, train_model
    from taskvision.dataset import read_snapshot
    from taskvision.storage import LocalBlobStore

    store = LocalBlobStore(Path(spec["blobs_root"]))
    info, rows = read_snapshot(store, spec["snapshot_prefix"])
    split = split_dataset(info, rows, test_fraction=0.2, seed=0)
    config = TrainConfig(
        mode="finetune", epochs=spec["epochs"], learning_rate=0.001, batch_size=32, augment="flip"
    )
    out_dir = Path(spec["out_dir"])
    last = [0.0]

    def progress(fraction: float, message: str) -> None:
        now = time.perf_counter()
        if message.startswith("fine-tuning") and now - last[0] > 1.0:
            last[0] = now
            spent = now - train_start
            left = spent / fraction * 0.9 - spent if fraction > 0 else math.nan  # epochs are 0..0.9
            logging.info("%s: %.0f s so far, about %.0f s of epochs left", message, spent, left)

    logging.info(
        "%s: fine-tuning %d train / %d test images for %d epochs",
        spec["name"],
        len(split.train),
        len(split.test),
        config.epochs,
    )
    train_start = time.perf_counter()
    train_model(info, rows, split, store, out_dir, config, progress=progress)
    train_s = time.perf_counter() - train_start
    eval_start = time.perf_counter()
    metrics = evaluate_model(out_dir)
    eval_s = time.perf_counter() - eval_start
    result = {
        "train_images": len(split.train),
        "test_images": len(split.test),
        "test_ids": split.test,
        "train_ids": split.train,
        "setup_s": round(train_start - started, 2),  # imports, snapshot, split
        "train_s": round(train_s, 2),
        "evaluate_s": round(eval_s, 2),
        "torch_threads": torch.get_num_threads(),
        "config": {
            "mode": config.mode,
            "epochs": config.epochs,
            "learning_rate": config.learning_rate,
            "batch_size": config.batch_size,
            "augment": config.augment,
            "optimizer": "SGD momentum 0.9",
        },
        "metrics": metrics,
    }
    Path(spec["result"]).write_text(json.dumps(result))
    return 0


def run_baseline(
    server: Service, workdir: Path, name: str, task_id: str, run_id: str, epochs: int
) -> dict[str, Any]:
    """Fine-tune in a child process on the service's snapshot of ``run_id``; time and memory."""
    prefix = f"datasets/{task_id}/{run_id}"
    blobs = server.data_dir / "blobs"
    if not (blobs / prefix / "dataset.json").is_file():
        raise RuntimeError(f"the run's snapshot {blobs / prefix} is missing")
    spec_path = workdir / f"baseline-{name}.json"
    result_path = workdir / f"baseline-{name}-result.json"
    spec = {
        "name": name,
        "blobs_root": str(blobs),
        "snapshot_prefix": prefix,
        "out_dir": str(workdir / f"baseline-{name}-model"),  # = model_dir
        "epochs": epochs,
        "result": str(result_path),
    }
    spec_path.write_text(json.dumps(spec))
    model_dir = workdir / f"baseline-{name}-model"
    env = {**server.env, "OMP_NUM_THREADS": str(BASELINE_THREADS), "PYTHONPATH": str(REPO_ROOT)}
    command = [sys.executable, str(Path(__file__).resolve()), "--baseline-worker", str(spec_path)]
    logger.info("baseline %s: fine-tuning for %d epochs in a child process", name, epochs)
    process = subprocess.Popen(command, env=env, cwd=REPO_ROOT)  # its log goes to our stderr
    try:
        with MemorySampler(process.pid) as memory:
            start = time.perf_counter()
            code = process.wait()
            seconds = time.perf_counter() - start
    finally:
        stop_process(process, "baseline")
    if code != 0 or not result_path.is_file():
        raise RuntimeError(f"the baseline child for {name} exited with {code}")
    result: dict[str, Any] = json.loads(result_path.read_text())
    shutil.rmtree(model_dir, ignore_errors=True)
    result["wall_s"] = round(seconds, 2)
    result["memory"] = memory.summary()
    logger.info("baseline %s: %.1f s (train %.1f s)", name, seconds, result["train_s"])
    return result


# ---- per data set --------------------------------------------------------------------------


def headline(task_type: str, metrics: dict[str, Any]) -> dict[str, float]:
    keys = {
        "multi_class": ("accuracy", "precision", "recall", "f1"),
        "multi_label": ("mAP", "precision", "recall", "f1"),
        "regression": ("mae", "rmse", "r2"),
    }[task_type]
    return {k: round(float(metrics[k]), 4) for k in keys if k in metrics}


def bench_dataset(
    client: Client, server: Service, dataset: Dataset
) -> tuple[dict[str, Any], BuiltTask, TrainOutcome]:
    logger.info(
        "%s: creating the %s task and uploading %d images",
        dataset.name,
        dataset.task_type,
        len(dataset.items),
    )
    built = create_task(
        client, f"bench {dataset.name}", dataset.task_type, dataset.label_type, dataset.label_names
    )
    upload_all(client, built, [(item.path, item.labels, item.value) for item in dataset.items])
    logger.info(
        "%s: %d images uploaded in %.1f s (not timed); training",
        dataset.name,
        built.uploaded,
        built.upload_wall_s,
    )
    outcome = train_and_wait(client, server, built.task_id)
    load = list(os.getloadavg())
    result = {
        "dataset": dataset.name,
        "task_type": dataset.task_type,
        "images": len(dataset.items),
        "labels": list(dataset.label_names),
        "untagged_images": sum(not item.labels for item in dataset.items),
        "task_id": built.task_id,
        "upload": {
            "images": built.uploaded,
            "duplicates": built.duplicates,
            "wall_s": built.upload_wall_s,
            "concurrency": UPLOAD_CONCURRENCY,
        },
        "ours": {
            "request_to_production_s": outcome.seconds,
            "version": outcome.version,
            "run": outcome.run,
            "train_images": outcome.bundle_training.get("train_images"),
            "test_images": outcome.metrics.get("test_images", outcome.bundle_training.get("test_images")),
            "training": outcome.bundle_training,
            "headline": headline(dataset.task_type, outcome.metrics),
            "metrics": outcome.metrics,
            "memory": outcome.memory,
            "run_steps_seen": outcome.steps,
            "run_log_step_seconds": outcome.log_steps,
            "run_log_tail": outcome.run_log_tail,
            "load_average_after": load,
        },
    }
    return result, built, outcome


# ---- report -------------------------------------------------------------------------------


def evaluate_targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    """PASS/FAIL (or n/a) per target."""
    by_name = {row["dataset"]: row for row in report["datasets"]}
    targets: list[dict[str, Any]] = []

    def add(name: str, ok: bool | None, detail: str) -> None:
        targets.append(
            {"target": name, "status": "n/a" if ok is None else ("PASS" if ok else "FAIL"), "detail": detail}
        )

    def missing(name: str) -> tuple[bool | None, str]:
        row = by_name.get(name)
        if row and "error" in row:
            return False, f"the run failed: {row['error'][:200]}"
        return None, f"{name} not run"

    flowers = by_name.get("flowers")
    if flowers and "ours" in flowers:
        seconds = flowers["ours"]["request_to_production_s"]
        add(
            f"flowers request->production < {TARGET_FLOWERS_SECONDS:.0f} s",
            seconds < TARGET_FLOWERS_SECONDS,
            f"{seconds:.2f} s",
        )
        ours = flowers["ours"]["headline"]["accuracy"]
        base = flowers.get("baseline")
        if base and "metrics" in base:
            theirs = round(float(base["metrics"]["accuracy"]), 4)
            add(
                "flowers accuracy >= baseline's",
                ours >= theirs,
                f"{ours:.4f} vs {theirs:.4f} ({base['config']['epochs']}-epoch fine-tune)",
            )
        else:
            add("flowers accuracy >= baseline's", None, f"{ours:.4f}; no baseline run")
    else:
        add(f"flowers request->production < {TARGET_FLOWERS_SECONDS:.0f} s", *missing("flowers"))
        add("flowers accuracy >= baseline's", *missing("flowers"))
    scenes = by_name.get("scenes")
    if scenes and "ours" in scenes:
        value = scenes["ours"]["headline"]["mAP"]
        add(f"scenes mAP >= {TARGET_SCENES_MAP:.2f}", value >= TARGET_SCENES_MAP, f"{value:.4f}")
    else:
        add(f"scenes mAP >= {TARGET_SCENES_MAP:.2f}", *missing("scenes"))
    ages = by_name.get("ages")
    if ages and "ours" in ages:
        value = ages["ours"]["headline"]["mae"]
        add(f"ages MAE <= {TARGET_AGES_MAE:.0f} years", value <= TARGET_AGES_MAE, f"{value:.2f} years")
    else:
        add(f"ages MAE <= {TARGET_AGES_MAE:.0f} years", *missing("ages"))
    return targets


def _metrics_cell(task_type: str, values: dict[str, float]) -> str:
    if not values:
        return "-"
    prf = f"P/R/F1 {values.get('precision', 0):.3f}/{values.get('recall', 0):.3f}/{values.get('f1', 0):.3f}"
    if task_type == "multi_class":
        return f"acc {values['accuracy']:.3f}; {prf}"
    if task_type == "multi_label":
        return f"mAP {values['mAP']:.3f}; {prf}"
    return f"MAE {values['mae']:.2f}; RMSE {values['rmse']:.2f}; R² {values['r2']:.3f}"


def _memory_cell(memory: dict[str, Any] | None) -> str:
    if not memory:
        return "-"
    return f"{memory['peak_rss_sum_mib']:.0f} / {memory['peak_rss_single_mib']:.0f}"


def markdown(report: dict[str, Any]) -> str:
    machine, cfg = report["machine"], report["config"]
    commit = f"{machine['git_commit']}{' (dirty)' if machine['git_dirty'] else ''}"
    load = ", ".join(f"{x:.2f}" for x in machine["load_average_at_start"])
    warm = report.get("warmup", {})
    modes = "/".join(
        sorted({row["ours"]["training"].get("mode", "?") for row in report["datasets"] if "ours" in row})
    )
    out = [
        f"## Training benchmark ({report['date']})",
        "",
        f"{machine['nproc']} CPUs ({machine['cpu_model']}), {machine['memory_gib']} GiB, "
        f"load average at start {load}, Python {machine['python']}, commit {commit}. "
        f"Ours: the service's default CPU training (kfp.local pipeline, {modes} mode), timed from the "
        f"train request until the new version is production (polled every {POLL_S} s); an untimed "
        f"warm-up training on a tiny generated task ran first ({warm.get('seconds', 0):.1f} s, it paid "
        "the one-off ONNX export of the backbone into the cold cache). Baseline: the same backbone fully "
        f"fine-tuned (SGD, lr 0.001, batch 32, random crops + flips, {cfg['baseline_epochs']} epochs, "
        f"torch on {BASELINE_THREADS} threads) on the same snapshot and split. Peak RSS: sampled every "
        f"{MEMORY_SAMPLE_S} s, summed over the process tree / largest single process, MiB.",
        "",
        "| dataset | type | images | train/test | ours: request->production | ours: metrics | ours: peak RSS "
        "| baseline: wall time | baseline: metrics | baseline: peak RSS |",
        "|---|---|---:|---:|---:|---|---:|---:|---|---:|",
    ]
    for row in report["datasets"]:
        if "ours" not in row:
            out.append(
                f"| {row['dataset']} | - | - | - | {row.get('skipped') or row.get('error', '-')} | | | | | |"
            )
            continue
        ours = row["ours"]
        base = row.get("baseline") or {}
        if "metrics" in base:
            base_time = f"{base['wall_s']:.0f} s ({base['config']['epochs']} ep.)"
            base_metrics = _metrics_cell(row["task_type"], headline(row["task_type"], base["metrics"]))
        else:
            base_time, base_metrics = base.get("error", "not run"), "-"
        cells = [
            row["dataset"],
            row["task_type"],
            str(row["images"]),
            f"{ours['train_images']}/{ours['test_images']}",
            f"{ours['request_to_production_s']:.1f} s",
            _metrics_cell(row["task_type"], ours["headline"]),
            _memory_cell(ours["memory"]),
            base_time,
            base_metrics,
            _memory_cell(base.get("memory")),
        ]
        out.append("| " + " | ".join(cells) + " |")
    out += [
        "",
        "Our runs, from the pipeline log: when kfp.local started the first step and finished the pipeline "
        "(seconds after the train request), and each step's seconds (its process start and imports "
        "included).",
        "",
        "| dataset | first step at | validate | split | train | evaluate | register | pipeline done at "
        "| in production at |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in report["datasets"]:
        if "ours" not in row:
            continue
        log = row["ours"]["run_log_step_seconds"]
        cells = [str(log.get("steps", {}).get(step, {}).get("seconds", "?")) for step in PIPELINE_STEPS]
        out.append(
            f"| {row['dataset']} | {log.get('pipeline_first_step_at_s', '?')} | {' | '.join(cells)} "
            f"| {log.get('pipeline_finished_at_s', '?')} | {row['ours']['request_to_production_s']:.2f} |"
        )
    out += [""] + [f"- **{t['status']}** {t['target']}: {t['detail']}" for t in report["targets"]]
    out += ["", f"Total benchmark time {report['total_s'] / 60:.1f} min."]
    return "\n".join(out)


# ---- main -------------------------------------------------------------------


def _names(value: str, parser: argparse.ArgumentParser, option: str) -> list[str]:
    names = [part.strip() for part in value.split(",") if part.strip()]
    unknown = [n for n in names if n not in ALL_DATASETS]
    if unknown:
        parser.error(
            f"{option}: unknown data set(s) {', '.join(unknown)}; choose from {', '.join(ALL_DATASETS)}"
        )
    return names


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--datasets", default=",".join(ALL_DATASETS), help="data sets trained through the API"
    )
    parser.add_argument(
        "--baseline-datasets",
        default=",".join(ALL_DATASETS),
        help="data sets also fine-tuned as the baseline",
    )
    parser.add_argument("--baseline-epochs", type=int, default=25, help="fine-tuning epochs of the baseline")
    parser.add_argument("--server-log-level", default="info", choices=["debug", "info", "warning", "error"])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where to write the JSON results")
    parser.add_argument("--baseline-worker", type=Path, help=argparse.SUPPRESS)  # internal: the child process
    args = parser.parse_args(argv)
    if args.baseline_worker:
        return args
    args.dataset_names = _names(args.datasets, parser, "--datasets")
    args.baseline_names = [n for n in _names(args.baseline_datasets, parser, "--baseline-datasets")]
    not_trained = [n for n in args.baseline_names if n not in args.dataset_names]
    if not_trained:
        parser.error(f"--baseline-datasets {', '.join(not_trained)} need the API run too (--datasets)")
    if args.baseline_epochs < 1:
        parser.error("--baseline-epochs must be 1 or more")
    return args


def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    begin = time.perf_counter()
    report: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "config": {
            "datasets": args.dataset_names,
            "baseline_datasets": args.baseline_names,
            "baseline_epochs": args.baseline_epochs,
            "datasets_root": str(DATASETS_ROOT),
            "our_params": "none: the server's defaults (mode auto = embed without a GPU)",
            "poll_interval_s": POLL_S,
            "memory_sample_interval_s": MEMORY_SAMPLE_S,
            "upload_concurrency": UPLOAD_CONCURRENCY,
            "cold_onnx_cache": True,
            "warmup": "an untimed training of a tiny generated task (40 images) first: the ONNX export",
        },
        "datasets": [],
    }
    datasets: list[Dataset] = []
    for name in args.dataset_names:
        why = dataset_available(name)
        if why:
            logger.warning("skipping %s: %s (the photos live in %s)", name, why, DATASETS_ROOT)
            report["datasets"].append({"dataset": name, "skipped": why})
            continue
        datasets.append(load_dataset(name))
    if not datasets:
        logger.warning("no data set found under %s: nothing to benchmark", DATASETS_ROOT)
        report["total_s"] = round(time.perf_counter() - begin, 1)
        report["targets"] = evaluate_targets(report)
        return report

    with running_server(workdir, log_level=args.server_log_level) as server:
        client = Client(server)
        logger.info("warm-up: a tiny generated task, trained once (not timed) to pay the ONNX export")
        warm = create_task(client, "bench warm-up", "multi_class", "category", ("disc", "square"))
        upload_all(client, warm, [(data, (label,), None) for data, label in tiny_warmup_images()])
        warm_start = time.perf_counter()
        warm_outcome = train_and_wait(client, server, warm.task_id, timed=False)
        report["warmup"] = {
            "images": warm.uploaded,
            "seconds": round(time.perf_counter() - warm_start, 2),
            "metrics": headline("multi_class", warm_outcome.metrics),
            "onnx_cache_files": sorted(
                p.name for p in onnx_cache_dir(server.data_dir).rglob("*") if p.is_file()
            ),
        }
        logger.info("warm-up done in %.1f s", report["warmup"]["seconds"])

        runs: dict[str, tuple[dict[str, Any], BuiltTask, TrainOutcome]] = {}
        for dataset in datasets:
            try:
                row, built, outcome = bench_dataset(client, server, dataset)
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
            runs[dataset.name] = (row, built, outcome)

        # The baselines after every API run, so they never share the CPU with a timed run.
        for name in args.baseline_names:
            if name not in runs:
                continue
            row, built, outcome = runs[name]
            try:
                base = run_baseline(
                    server, workdir, name, built.task_id, outcome.run["id"], args.baseline_epochs
                )
            except RuntimeError as exc:
                logger.error("baseline %s failed: %s", name, exc)
                row["baseline"] = {"error": str(exc)}
                continue
            # The same split by construction (same snapshot, function and seed); checked against the
            # ids the pipeline's split step wrote when the bench could read them during the run.
            if outcome.split is not None:
                base["same_split_as_ours"] = sorted(base["test_ids"]) == sorted(
                    outcome.split["test"]
                ) and sorted(base["train_ids"]) == sorted(outcome.split["train"])
            else:
                base["same_split_as_ours"] = (base["train_images"], base["test_images"]) == (
                    row["ours"]["train_images"],
                    row["ours"]["test_images"],
                )
            if not base["same_split_as_ours"]:
                logger.warning("baseline %s: its split differs from the pipeline's", name)
            del base["test_ids"], base["train_ids"]
            row["baseline"] = base
            logger.info(
                "baseline %s: %s",
                name,
                _metrics_cell(row["task_type"], headline(row["task_type"], base["metrics"])),
            )
        report["server_log"] = server_log_summary(server.log_path)
    report["machine"]["load_average_at_end"] = list(os.getloadavg())
    report["targets"] = evaluate_targets(report)
    report["total_s"] = round(time.perf_counter() - begin, 1)
    return report


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.baseline_worker:
        return baseline_worker(args.baseline_worker)
    init_script()
    workdir = Path(tempfile.mkdtemp(prefix="taskvision-train-bench-"))
    try:
        report = run(args, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    write_report(report, args.out, markdown)
    failed = any("error" in row for row in report["datasets"])
    failed |= any("error" in row.get("baseline", {}) for row in report["datasets"])
    failed |= any(t["status"] == "FAIL" for t in report["targets"])
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
