"""When training starts — the trigger policy, in one place.

A trigger never trains and never calls CVAT inside the event that fired it: it decides, records a job in the store
(``jobs.JobStore``) and returns; the job's own process reads CVAT. The policy comes from the function's environment:

* ``PREANNOTATE_TRAIN_ON`` — which jobs count as finished, in the ``train-on`` key's grammar (``completed``,
  ``validation``, ``acceptance``, ``all``; default ``completed,acceptance``): a change that finishes a job starts
  training, and the training learns from the jobs it names (``state=completed``, ``stage=acceptance`` and ``any``
  read the same);
* ``PREANNOTATE_TRAIN_MIN_NEW_FRAMES`` — train only once jobs covering at least this many frames were finished
  since the last training run (default 0: the first qualifying job starts it);
* ``PREANNOTATE_TRAIN_DEBOUNCE`` — wait this long (``90s``, ``10m``, ``1h``) after the last qualifying event before
  training starts, so a reviewer closing ten jobs starts one run, not ten (default 0);
* ``PREANNOTATE_TRAIN_PROJECTS`` — only these project ids (default: any project the webhook reports).

New tasks: with ``PREANNOTATE_ANNOTATE_ON=task``, a ``create:task`` delivery, or the ``update:task`` that says the
task's upload finished (``webhooks.upload_finished``), for a project the function serves
(``PREANNOTATE_TRAIN_PROJECT``, else ``PREANNOTATE_TRAIN_PROJECTS``, else any) records the task's *pre-annotation*
job (``queue_annotation``), once per task: the job records say which version annotated it, so a re-delivery never
queues it again. Any other ``update:task`` starts nothing: every save changes a task, a person's or one of CVAT's
lambda manager. The job waits for the upload (CVAT sends ``create:task`` before it) and for CVAT's lambda manager
(``worker.annotate_job``), and leaves a task people already work on to them. A promotion's re-annotation is
recorded once per version.

Cron records a *check* job (``only_if_changed``) while no job is queued or running; its process retrains only when
a finished job's ``updated_date`` differs from what the served version learned, or a job was finished or reopened
since (``annotations_changed``).
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from preannotate.cvat.reader import finishes
from preannotate.cvat.webhooks import JOB_EVENTS, TASK_EVENTS, upload_finished
from preannotate.durations import parse_duration
from preannotate.files import write_atomically
from preannotate.hyperparameters import DEFAULT_TRAIN_ON, parse_train_on
from preannotate.training.jobs import Job, JobStore

ANNOTATE_ON = ("", "task")
REANNOTATE = "re-annotate"  # the reason of a pre-annotation queued by a promotion (once per version)


@dataclass(frozen=True)
class TrainingPolicy:
    train_on: tuple[str, ...] = DEFAULT_TRAIN_ON
    min_new_frames: int = 0
    debounce_s: float = 0.0
    projects: frozenset[int] | None = None
    annotate_on: str = ""  # "task": pre-annotate new tasks of the projects

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> TrainingPolicy:
        env = os.environ if environ is None else environ
        try:
            train_on = parse_train_on(env.get("PREANNOTATE_TRAIN_ON") or ",".join(DEFAULT_TRAIN_ON))
        except ValueError as error:
            raise ValueError(f"PREANNOTATE_TRAIN_ON: {error}") from None
        projects = env.get("PREANNOTATE_TRAIN_PROJECTS", "").replace(";", ",")
        try:
            min_new_frames = int(env.get("PREANNOTATE_TRAIN_MIN_NEW_FRAMES") or 0)
            project_ids = frozenset(int(p) for p in projects.split(",") if p.strip()) or None
        except ValueError:
            raise ValueError("PREANNOTATE_TRAIN_MIN_NEW_FRAMES and PREANNOTATE_TRAIN_PROJECTS take whole numbers"
                             ) from None
        debounce = env.get("PREANNOTATE_TRAIN_DEBOUNCE")
        try:
            debounce_s = parse_duration(debounce) if debounce else 0.0
        except ValueError as error:
            raise ValueError(f"PREANNOTATE_TRAIN_DEBOUNCE: {error}") from None
        annotate_on = (env.get("PREANNOTATE_ANNOTATE_ON") or "").strip().lower()
        if annotate_on not in ANNOTATE_ON:
            raise ValueError(f"PREANNOTATE_ANNOTATE_ON is {annotate_on!r}: use task (pre-annotate new tasks) or "
                             "leave it empty")
        if project_ids is None and (env.get("PREANNOTATE_TRAIN_PROJECT") or "").strip().isdigit():
            project_ids = frozenset({int(env["PREANNOTATE_TRAIN_PROJECT"])})
        return cls(train_on=train_on, min_new_frames=min_new_frames, debounce_s=debounce_s,
                   projects=project_ids, annotate_on=annotate_on)


@dataclass(frozen=True)
class Trigger:
    """A job change that counts toward training: what was finished and where."""

    project_id: int | None
    task_id: int
    job_id: int
    frames: int
    reason: str

    @property
    def scope(self) -> str:
        """What is retrained: the project, or the task when it belongs to none."""
        return f"project:{self.project_id}" if self.project_id is not None else f"task:{self.task_id}"

    @property
    def target(self) -> dict[str, Any]:
        return {"project": self.project_id} if self.project_id is not None else {"tasks": [self.task_id]}


def qualifying_change(payload: Mapping[str, Any], policy: TrainingPolicy) -> Trigger | str:
    """The ``Trigger`` this delivery represents, or why it does not count (a string, for the answer and the log)."""
    event = payload.get("event")
    if event == "ping":
        return "ping"
    if event in TASK_EVENTS:
        return new_task(payload, policy)
    if event not in JOB_EVENTS:
        return f"{event} does not start training (only job updates do)"
    job, before = payload.get("job") or {}, payload.get("before_update") or {}
    if not isinstance(job, Mapping) or not isinstance(before, Mapping):
        return f"{event}: its job or before_update is not an object, not a CVAT delivery"
    changed = {key: job.get(key) for key in ("state", "stage") if key in before and before[key] != job.get(key)}
    if not changed:
        return f"job {job.get('id')}: neither state nor stage changed"
    matched = next((f"{k}={v}" for k, v in changed.items()
                    if finishes(v if k == "state" else None, v if k == "stage" else None, policy.train_on)), None)
    if matched is None:
        now = ", ".join(f"{k}={v}" for k, v in changed.items())
        return f"job {job.get('id')}: {now} is not one of {', '.join(policy.train_on)}"
    project_id = job.get("project_id")
    if project_id is not None and (not isinstance(project_id, int) or isinstance(project_id, bool)):
        return f"job {job.get('id')}: its project_id is not a CVAT id"
    if policy.projects is not None and project_id not in policy.projects:
        return f"job {job.get('id')}: project {project_id} is not one this function trains for"
    try:
        return Trigger(project_id=project_id, task_id=int(job["task_id"]), job_id=int(job["id"]),
                       frames=int(job.get("frame_count") or 0), reason=f"job {job['id']} {matched}")
    except (KeyError, TypeError, ValueError):
        return f"job {job.get('id')}: the delivery lacks the job's task id or frame count"


@dataclass(frozen=True)
class NewTask:
    """A task of a served project was created or its upload finished: it is to be pre-annotated."""

    project_id: int
    task_id: int
    event: str  # "create:task" or "upload finished"


def new_task(payload: Mapping[str, Any], policy: TrainingPolicy) -> NewTask | str:
    """The ``NewTask`` a ``create:task`` delivery, or the ``update:task`` of a finished upload, stands for; or why
    the delivery does not count."""
    event, task = payload.get("event"), payload.get("task") or {}
    if policy.annotate_on != "task":
        return f"{event}: new tasks are not pre-annotated (set PREANNOTATE_ANNOTATE_ON=task)"
    if not isinstance(task, Mapping) or not isinstance(task.get("id"), int):
        return f"{event}: its task is not an object with an id, not a CVAT delivery"
    project_id = task.get("project_id")
    if not isinstance(project_id, int) or isinstance(project_id, bool):
        return f"task {task['id']}: in no project, so not one this function pre-annotates"
    if policy.projects is not None and project_id not in policy.projects:
        return f"task {task['id']}: project {project_id} is not one this function pre-annotates"
    if event == "update:task":
        if not upload_finished(payload):
            before = payload.get("before_update")
            changed = ", ".join(before) if isinstance(before, Mapping) and before else "nothing"
            return (f"task {task['id']}: update:task changed {changed}, not its data (an annotation save, by a "
                    "person or CVAT's lambda manager, or an edit): it starts no pre-annotation")
        event = "upload finished"
    return NewTask(project_id, task["id"], str(event))


@dataclass
class Decision:
    """What a trigger did: the job it recorded (or joined), or None and why not."""

    job: Job | None
    reason: str


class Triggers:
    """Turns qualifying events into recorded jobs, by the policy (see the module docstring)."""

    def __init__(self, jobs: JobStore, policy: TrainingPolicy):
        self.jobs, self.policy = jobs, policy
        self._lock = threading.Lock()  # the pending counts are read and written by the routes' threads
        self.state_path = jobs.root / "webhook-state.json"

    def on_job_change(self, change: Trigger, request_for: Callable[[dict[str, Any]], dict[str, Any]]) -> Decision:
        """Count the finished frames of ``change``'s scope; once there are enough, record a training job (made by
        ``request_for(target)``) that waits out the debounce, or push back the one already waiting."""
        with self._lock:
            state = _read_json(self.state_path)
            pending = state.get(change.scope, {"frames": 0, "jobs": []})
            if change.job_id not in pending["jobs"]:  # the same job finished twice counts once
                pending = {"frames": pending["frames"] + change.frames, "jobs": pending["jobs"] + [change.job_id]}
            if pending["frames"] < self.policy.min_new_frames:
                state[change.scope] = pending
                _write_json(self.state_path, state)
                return Decision(None, f"{change.reason}: {pending['frames']} of {self.policy.min_new_frames} new "
                                      "frames so far")
            state.pop(change.scope, None)
            _write_json(self.state_path, state)
            not_before = time.time() + self.policy.debounce_s
            waiting = [job for job in self.jobs.all()
                       if job.state == "queued" and job.request.get("scope") == change.scope]
            if waiting:
                job = self.jobs.update(waiting[-1].id,
                                       lambda j: setattr(j, "not_before", max(j.not_before, not_before)))
                return Decision(job, f"{change.reason}: joined the waiting job")
            request = {**request_for(change.target), "scope": change.scope}
            job = self.jobs.create(request, trigger=f"webhook: {change.reason}", not_before=not_before)
            return Decision(job, change.reason)

    def on_new_task(self, change: NewTask, model: str) -> Decision:
        """Record the task's pre-annotation job, once per task."""
        with self._lock:
            return queue_annotation(self.jobs, change.task_id, model, f"{change.event} in project {change.project_id}")

    def on_schedule(self, request: dict[str, Any]) -> Decision:
        """Cron: record a job that retrains only if the annotations changed, unless a job is already pending."""
        if any(job.state in ("queued", "running") for job in self.jobs.all()):
            return Decision(None, "cron: a training job is already queued or running")
        job = self.jobs.create({**request, "only_if_changed": True}, trigger="cron")
        return Decision(job, "cron: recorded a job that retrains if the annotations changed")


def queue_annotation(jobs: JobStore, task_id: int, model: str, reason: str, version: int | None = None) -> Decision:
    """Record a pre-annotation job of ``task_id`` by ``model``: once per task for a new task, once per version for
    the re-annotation a promoted ``version`` asks for. The job records are the ledger: a task whose job succeeded
    (with the version it recorded) or was left (``skipped``, and why) is not queued again for the same reason; one
    queued or running is joined. A failed or cancelled job is no record: the next delivery queues the task again."""
    mine = [job for job in jobs.all() if job.request.get("kind") == "annotate" and job.request.get("task") == task_id]
    pending = next((job for job in mine if job.state in ("queued", "running")), None)
    if pending is not None:
        jobs.update(pending.id, lambda j: setattr(j, "not_before", min(j.not_before, time.time())))  # data came
        return Decision(pending, f"task {task_id}: its pre-annotation is already queued (job {pending.id})")
    if version is None:
        done = next((job for job in reversed(mine) if job.state in ("succeeded", "skipped")), None)
    else:
        done = next((job for job in mine if job.state == "succeeded" and job.version == version), None)
    if done is not None:
        what = f"left by job {done.id}: {done.skipped}" if done.state == "skipped" else \
            f"already pre-annotated by version {done.version} (job {done.id})"
        return Decision(None, f"task {task_id}: {what}")
    request = {"kind": "annotate", "task": task_id, "model": model, "reason": reason}
    if version is not None:
        request["version"] = version
    job = jobs.create(request, trigger=f"{reason}: pre-annotate task {task_id}")
    return Decision(job, f"task {task_id}: pre-annotation queued ({reason})")


def annotations_changed(client, request: Mapping[str, Any], learned: Mapping[str, str] | None, served: str,
                        train_on: Sequence[str]) -> tuple[bool, str]:
    """Whether the finished jobs (``train_on``) of the tasks of ``request`` changed since the version ``served``
    (``NAME@V``) learned them: ``learned`` is job id → ``updated_date`` from its manifest (``provenance.cvat.jobs``),
    None when there is no version (or it predates that record). A job finished, saved again or reopened counts; a
    save in a job no one finished does not (training would not read it)."""
    from preannotate.cvat import reader  # cvat-sdk: only in the job's process, not in a function's routes

    now = reader.finished_job_versions(client, reader.task_ids(client, request), train_on)
    if learned is None:
        return True, (f"{served} has no record of the jobs it learned" if "@" in served
                      else f"{served} has no version yet")
    changed = sorted((job for job in set(now) | set(learned) if learned.get(job) != now.get(job)), key=int)
    if not changed:
        return False, f"finished jobs unchanged since {served}"
    return True, f"job(s) {', '.join(changed)} finished, changed or reopened since {served}"


def _read_json(path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _write_json(path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, json.dumps(data))
