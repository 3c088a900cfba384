"""Annotations of a CVAT task, job or project, read through cvat-sdk, as per-frame shapes (``AnnotationSet``).

Each read fetches the annotations, the labels (every page) and the data meta, and hands them to
``annotations.frames_from_annotations``, which interpolates tracks. Frame numbers are task-relative throughout.
Shapes a detector cannot learn from (points, polylines, cuboids, skeletons) are counted in ``skipped`` (and logged
at INFO); what writes a dataset from them tells the user once what it left out.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cvat_sdk import Client

from preannotate.cvat.annotations import frames_from_annotations
from preannotate.cvat.client import cvat_errors
from preannotate.hyperparameters import DEFAULT_TRAIN_ON
from preannotate.shapes import AnnotationSet

log = logging.getLogger(__name__)


def read_task(client: Client, task_id: int) -> AnnotationSet:
    """Every frame of the task, with its shapes and tags."""
    return _read_task(client, task_id)[0]


def _read_task(client: Client, task_id: int) -> tuple[AnnotationSet, dict[int, list[str]]]:
    """The task's frames, and the tags people made (not the model's ``auto`` ones) on each frame that has one."""
    with cvat_errors(client, f"task {task_id}"):
        task = client.tasks.retrieve(task_id)
        stored, labels = task.get_annotations(), task.get_labels()
        result = frames_from_annotations(stored, labels, task.get_meta())
    names = {label.id: label.name for label in labels}
    human_tags: dict[int, list[str]] = {}
    for tag in sorted(stored.tags or (), key=lambda t: t.id):
        if getattr(tag, "source", "manual") != "auto" and tag.label_id in names:  # CVAT's default: manual
            human_tags.setdefault(tag.frame, []).append(names[tag.label_id])
    _report_skipped(result.skipped, f"task {task_id}")
    return result, human_tags


def read_job(client: Client, job_id: int) -> AnnotationSet:
    """The frames of the job's range only (a ground-truth job: the frames it includes), numbered as in the task."""
    with cvat_errors(client, f"job {job_id}"):
        job = client.jobs.retrieve(job_id)
        result = frames_from_annotations(job.get_annotations(), job.get_labels(), job.get_meta(),
                                         range(job.start_frame, job.stop_frame + 1))
    _report_skipped(result.skipped, f"job {job_id}")
    return result


def read_project(client: Client, project_id: int) -> dict[int, AnnotationSet]:
    """Task id → annotations, for every task of the project. The project's labels are read once: its tasks share
    them."""
    with cvat_errors(client, f"project {project_id}"):
        project = client.projects.retrieve(project_id)
        labels = project.get_labels()
        tasks = project.get_tasks()
    result = {}
    for task in sorted(tasks, key=lambda t: t.id):
        with cvat_errors(client, f"task {task.id} of project {project_id}"):
            result[task.id] = frames_from_annotations(task.get_annotations(), labels, task.get_meta())
    _report_skipped(sum((s.skipped for s in result.values()), Counter()), f"project {project_id}")
    return result


# What counts as finished by people (the ``train-on`` key, ``hyperparameters.TRAIN_ON``): a job whose state is
# ``completed``, or whose stage is ``acceptance`` (a reviewer accepted it) — by default both; ``validation`` adds
# jobs handed to review; ``all`` every job, with only the shapes and tags people made (see ``read_finished``).
def job_finished(job: Any, train_on: Sequence[str] = DEFAULT_TRAIN_ON) -> bool:
    """Whether people finished the job (a cvat-sdk job or a JobRead dict), by ``train_on``."""
    get = job.get if isinstance(job, Mapping) else lambda key: getattr(job, key, None)
    return finishes(get("state"), get("stage"), train_on)


def finishes(state: str | None, stage: str | None, train_on: Sequence[str]) -> bool:
    """Whether a job in ``state`` (or ``stage``; None: not that one) counts as finished by ``train_on``."""
    return "all" in train_on or (state == "completed" and "completed" in train_on) or stage in train_on


def job_untouched(job: Any) -> bool:
    """Whether no one has started the job yet (state new, stage annotation): pre-annotation may fill it."""
    return job.state == "new" and job.stage == "annotation"


def annotation_jobs(client: Client, task_id: int) -> list[Any]:
    """The task's annotation jobs (not its ground-truth job, whose frames other jobs hold too)."""
    with cvat_errors(client, f"jobs of task {task_id}"):
        return [job for job in client.tasks.retrieve(task_id).get_jobs()
                if str(getattr(job, "type", "annotation")) == "annotation"]


@dataclass
class FinishedFrames:
    """A task's frames that people finished, and the jobs they came from."""

    annotations: AnnotationSet
    jobs: dict[int, str]           # job id → its updated_date, of every job used
    unfinished: list[int]          # jobs left out (or, with ``all``, kept only for the shapes and tags people made)


def read_finished(client: Client, task_id: int, train_on: Sequence[str] = DEFAULT_TRAIN_ON) -> FinishedFrames:
    """The task's annotations on the frames of its finished jobs only (``job_finished``): frames of untouched jobs
    are not empty frames to learn from, and the model's own ``auto`` shapes there no one reviewed. With ``all``, the
    frames of unfinished jobs count too, but only those with a shape or a tag a person made, and only with those (a
    finished job's shapes and tags count whatever their source: someone reviewed them)."""
    annotations, human_tags = _read_task(client, task_id)
    finished_frames: set[int] = set()
    used, unfinished = {}, []
    for job in annotation_jobs(client, task_id):
        frames = range(job.start_frame, job.stop_frame + 1)
        if job_finished(job, [t for t in train_on if t != "all"]):
            finished_frames.update(frames)
            used[job.id] = _date(job.updated_date)
        else:
            unfinished.append(job.id)
            if "all" in train_on:
                used[job.id] = _date(job.updated_date)
    frames = {}
    for number, frame in annotations.frames.items():
        if number in finished_frames:
            frames[number] = frame
        elif "all" in train_on:
            human = [shape for shape in frame.shapes if shape.source != "auto"]
            if human or human_tags.get(number):
                frames[number] = dataclasses.replace(frame, shapes=human, tags=human_tags.get(number, []))
    return FinishedFrames(dataclasses.replace(annotations, frames=frames), used, unfinished)


def task_ids(client, request: Mapping[str, Any]) -> list[int]:
    """The tasks a request names: its ``tasks`` and every task of its ``project``."""
    ids = list(request.get("tasks") or [])
    if request.get("project") is not None:
        with cvat_errors(client, f"project {request['project']}"):
            ids += [task.id for task in client.projects.retrieve(request["project"]).get_tasks()]
    return sorted(set(ids))


def task_versions(client, ids: Sequence[int]) -> dict[str, str]:
    """Task id → its ``updated_date`` (it changes whenever annotations are saved)."""
    versions = {}
    for task_id in ids:
        with cvat_errors(client, f"task {task_id}"):
            versions[str(task_id)] = _date(client.tasks.retrieve(task_id).updated_date)
    return versions


def finished_job_versions(client, ids: Sequence[int], train_on: Sequence[str] = DEFAULT_TRAIN_ON
                          ) -> dict[str, str]:
    """Job id → ``updated_date`` of the finished jobs of these tasks (what cron compares with what a version
    learned: a save in a job nobody finished changes nothing training would read)."""
    return {str(job.id): _date(job.updated_date) for task_id in ids for job in annotation_jobs(client, task_id)
            if job_finished(job, train_on)}


def _date(value: Any) -> str:
    return value.isoformat() if hasattr(value, "isoformat") else str(value)


def _report_skipped(skipped: Counter[str], where: str) -> None:
    if skipped:
        counts = ", ".join(f"{count} {kind}" for kind, count in sorted(skipped.items()))
        log.info("%s has %d per-frame shapes a detector cannot learn from (%s); detector datasets leave them out",
                    where, sum(skipped.values()), counts)
