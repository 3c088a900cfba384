"""Training jobs of a function: recorded in the model store, run one at a time in a separate process.

A trigger (``POST /train``, a webhook, cron) only *records* a job and returns; the ``JobRunner`` thread of the
function starts queued jobs, one at a time per store, each as ``python -m preannotate.worker run ...`` (a training
job, or a task's pre-annotation), so an event never waits for training and a crash in training cannot take the
detector down. Layout::

    STORE/.jobs/<id>/job.json     state, request, trigger, progress, the version published, error
    STORE/.jobs/<id>/log.txt      the training process's output (its tail is in GET /jobs/<id>)
    STORE/.jobs/<id>/work/        the job's dataset (exported from CVAT once) and run/, the trainer's output
                                  directory: checkpoints, metrics.jsonl, TensorBoard events
    STORE/.jobs/runner.lock       held by the runner whose process is training; free when none is

Everything lives in the store, so jobs survive a restart: a job left ``running`` by a runner that died (its lock is
free again) is queued again and resumes from its last checkpoint. Several Nuclio workers of one function share the
store; the lock makes sure only one of them trains.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from preannotate.files import write_atomically

log = logging.getLogger(__name__)

STATES = ("queued", "running", "succeeded", "skipped", "failed", "cancelled")
FINISHED = ("succeeded", "skipped", "failed", "cancelled")
LOG_TAIL_LINES = 20
TRY_LATER = 75  # a job process's exit code for "not yet" (EX_TEMPFAIL): queued again, RETRY_S later
RETRY_S = 15.0


class JobNotFound(LookupError):
    pass


@dataclass
class Job:
    id: str
    request: dict[str, Any]                 # what to train: tasks/project, model, name, hyperparameters, ...
    trigger: str = "http"                   # "http", "webhook: job 7 state=completed", "cron"
    state: str = "queued"
    created: float = field(default_factory=time.time)
    not_before: float = 0.0                 # debounce: a queued job does not start before this time
    started: float | None = None
    finished: float | None = None
    attempts: int = 0                       # runs started (more than one: resumed after a restart)
    cancel_requested: bool = False
    version: int | None = None              # the store version it published
    promoted: bool | None = None
    promotion: str | None = None            # why the version is served, or kept unserved
    metrics: dict[str, Any] = field(default_factory=dict)
    skipped: str | None = None              # why it ended without training (cron: nothing changed)
    error: str | None = None
    outcome: dict[str, Any] = field(default_factory=dict)  # what else it did (a pre-annotation: task, frames, ...)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Job:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


class JobStore:
    """The jobs of one model store (see the module docstring)."""

    def __init__(self, store_root: str | os.PathLike):
        self.root = Path(store_root) / ".jobs"
        self._lock = threading.Lock()

    def directory(self, job_id: str) -> Path:
        if not job_id or "/" in job_id or job_id.startswith("."):
            raise JobNotFound(f"no job {job_id!r}")
        return self.root / job_id

    def create(self, request: dict[str, Any], trigger: str = "http", not_before: float = 0.0) -> Job:
        job = Job(id=time.strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(3), request=request, trigger=trigger,
                  not_before=not_before)
        (self.directory(job.id) / "work").mkdir(parents=True)
        self.save(job)
        return job

    def save(self, job: Job) -> None:
        write_atomically(self.directory(job.id) / "job.json", json.dumps(dataclasses.asdict(job), indent=2))

    def get(self, job_id: str) -> Job:
        try:
            return Job.from_dict(json.loads((self.directory(job_id) / "job.json").read_text()))
        except FileNotFoundError:
            raise JobNotFound(f"no job {job_id!r} in {self.root}") from None

    def update(self, job_id: str, change: Callable[[Job], None]) -> Job:
        """Read, change and write a job, one writer at a time across threads and processes (the runner, the
        routes of every worker and the training process all write)."""
        directory = self.directory(job_id)
        if not (directory / "job.json").is_file():
            raise JobNotFound(f"no job {job_id!r} in {self.root}")
        with self._lock, open(directory / ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                job = self.get(job_id)
                change(job)
                self.save(job)
                return job
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def all(self) -> list[Job]:
        if not self.root.is_dir():
            return []
        jobs = []
        for directory in sorted(self.root.iterdir()):
            if (directory / "job.json").is_file():
                with contextlib.suppress(JobNotFound, json.JSONDecodeError):
                    jobs.append(self.get(directory.name))
        return sorted(jobs, key=lambda job: job.created)

    def work_dir(self, job_id: str) -> Path:
        return self.directory(job_id) / "work"

    def log_path(self, job_id: str) -> Path:
        return self.directory(job_id) / "log.txt"

    def progress(self, job_id: str) -> dict[str, Any]:
        """The trainer's latest record (step, total steps, loss, learning rate, ETA) from ``metrics.jsonl``."""
        path = self.work_dir(job_id) / "run" / "metrics.jsonl"
        last: dict[str, Any] = {}
        with contextlib.suppress(OSError):
            with open(path, "rb") as file:
                file.seek(max(0, file.seek(0, os.SEEK_END) - 16384))  # the tail is enough
                for line in file.read().decode(errors="replace").splitlines():
                    with contextlib.suppress(json.JSONDecodeError):
                        record = json.loads(line)
                        if isinstance(record, dict):
                            last.update(record)  # later records (steps, evaluations) override earlier ones
        return last

    def log_tail(self, job_id: str, lines: int = LOG_TAIL_LINES) -> list[str]:
        with contextlib.suppress(OSError):
            with open(self.log_path(job_id), "rb") as file:
                file.seek(max(0, file.seek(0, os.SEEK_END) - 65536))
                return file.read().decode(errors="replace").splitlines()[-lines:]
        return []

    def describe(self, job: Job) -> dict[str, Any]:
        """What ``GET /jobs/<id>`` answers."""
        info = dataclasses.asdict(job)
        progress = self.progress(job.id)
        for key in ("step", "total_steps", "loss", "lr", "images_per_s", "eta_s"):
            if key in progress:
                info[key] = progress[key]
        if job.state == "running" and "step" in progress and progress.get("total_steps"):
            info["progress"] = round(progress["step"] / progress["total_steps"], 4)
        info["log_tail"] = self.log_tail(job.id)
        return info

    @contextlib.contextmanager
    def runner_lock(self) -> Iterator[bool]:
        """Try to become the store's training runner; yields whether this process got the lock."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / "runner.lock", "a") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            try:
                yield True
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)


def job_command(store_root: Path, job_id: str) -> list[str]:
    """How a job is run: this interpreter, in a process of its own (``preannotate.worker``, at the top of the
    package: a job composes training, CVAT and pre-annotation)."""
    return [sys.executable, "-m", "preannotate.worker", "run", str(store_root), job_id]


class JobRunner:
    """Starts queued jobs one at a time and follows them to the end. One per function process; the store's
    runner lock lets only one process train at a time."""

    def __init__(self, jobs: JobStore, command: Callable[[Path, str], list[str]] = job_command,
                 poll_s: float = 1.0):
        self.jobs = jobs
        self.command = command
        self.poll_s = poll_s
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self.process: subprocess.Popen | None = None
        self.running_job: str | None = None

    def start(self) -> JobRunner:
        self._thread = threading.Thread(target=self._loop, name="preannotate-jobs", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float | None = None) -> None:
        """Start no more jobs and stop the one running: SIGTERM to its processes (a training checkpoints and stops,
        a pre-annotation ends, its uploads journaled). The job stays ``running``, so the store's next runner resumes
        it. Waits for that, at most ``timeout`` seconds (default: until it has stopped)."""
        self._stop.set()
        self._wake.set()
        if self._thread:
            self._thread.join(timeout)

    def kill(self) -> None:
        """End the running job's processes at once (SIGKILL); it resumes from its last checkpoint."""
        process = self.process
        if process is not None and process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)

    def wake(self) -> None:
        """Look at the queue now (a job was added or cancelled)."""
        self._wake.set()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._run_next()
            except Exception:  # the runner must outlive any one job
                log.exception("job runner")
            self._wake.wait(self.poll_s)
            self._wake.clear()

    def _run_next(self) -> None:
        with self.jobs.runner_lock() as mine:
            if not mine:
                return  # another process of this function is training
            self._requeue_orphans()
            now = time.time()
            queued = [job for job in self.jobs.all() if job.state == "queued" and job.not_before <= now]
            if queued:
                self._run(queued[0])

    def _requeue_orphans(self) -> None:
        """Jobs left ``running`` while nobody holds the lock lost their runner (a restart): run them again."""
        for job in self.jobs.all():
            if job.state == "running" and job.version is not None:  # it had finished (then the function restarted)
                self.jobs.update(job.id, lambda j: _finish(j, 0, []))
            elif job.state == "running":
                log.warning("job %s was interrupted; it resumes from its last checkpoint", job.id)
                self.jobs.update(job.id, lambda j: setattr(j, "state", "queued"))

    def _run(self, job: Job) -> None:
        def started(job: Job) -> None:
            job.state, job.started, job.attempts, job.error = "running", job.started or time.time(), \
                job.attempts + 1, None

        self.jobs.update(job.id, started)
        log.info("job %s: training (%s)", job.id, job.trigger)
        with open(self.jobs.log_path(job.id), "ab") as output:
            self.running_job = job.id
            self.process = subprocess.Popen(self.command(self.jobs.root.parent, job.id), stdout=output,
                                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            start_new_session=True)
            signalled = False
            while (code := self.process.poll()) is None:
                if self._stop.wait(self.poll_s):
                    # the function is shutting down: the job stays "running"; the next start resumes it
                    os.killpg(self.process.pid, signal.SIGTERM)
                    self.process.wait()
                    return
                if not signalled and self.jobs.get(job.id).cancel_requested:  # asked by any process
                    os.killpg(self.process.pid, signal.SIGTERM)  # the trainer checkpoints and stops
                    signalled = True
            self.process, self.running_job = None, None
        self.jobs.update(job.id, lambda j: _finish(j, code, self.jobs.log_tail(job.id, 5)))
        log.info("job %s: %s", job.id, self.jobs.get(job.id).state)


def request_cancel(job: Job) -> None:
    """Mark a job to be cancelled: a queued one is at once, a running one by its runner within a poll."""
    if job.state in FINISHED:
        return
    job.cancel_requested = True
    if job.state == "queued":
        job.state, job.finished = "cancelled", time.time()


def _finish(job: Job, code: int, tail: list[str]) -> None:
    if code == TRY_LATER and not job.cancel_requested:
        job.state, job.not_before = "queued", time.time() + RETRY_S
        return
    job.finished = time.time()
    if job.cancel_requested:
        job.state = "cancelled"
    elif code == 0 and job.skipped:
        job.state = "skipped"
    elif code == 0 and job.version is not None:
        job.state = "succeeded"
    else:
        job.state = "failed"
        job.error = job.error or f"the job's process exited with code {code}: " + " | ".join(tail)
