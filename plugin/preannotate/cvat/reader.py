"""Annotations of a CVAT task, job or project, read through cvat-sdk, as per-frame shapes (``AnnotationSet``).

Each read fetches the annotations, the labels (every page) and the data meta, and hands them to
``annotations.frames_from_annotations``, which interpolates tracks. Frame numbers are task-relative throughout.
Shapes a detector cannot learn from (points, polylines, cuboids, skeletons) are counted in ``skipped`` (and logged
at INFO); what writes a dataset from them tells the user once what it left out.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from cvat_sdk import Client

from preannotate.cvat.annotations import frames_from_annotations
from preannotate.cvat.client import cvat_errors
from preannotate.shapes import AnnotationSet

log = logging.getLogger(__name__)


def read_task(client: Client, task_id: int) -> AnnotationSet:
    """Every frame of the task, with its shapes and tags."""
    with cvat_errors(client, f"task {task_id}"):
        task = client.tasks.retrieve(task_id)
        result = frames_from_annotations(task.get_annotations(), task.get_labels(), task.get_meta())
    _report_skipped(result.skipped, f"task {task_id}")
    return result


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
            updated = client.tasks.retrieve(task_id).updated_date
            versions[str(task_id)] = updated.isoformat() if hasattr(updated, "isoformat") else str(updated)
    return versions


def _report_skipped(skipped: Counter[str], where: str) -> None:
    if skipped:
        counts = ", ".join(f"{count} {kind}" for kind, count in sorted(skipped.items()))
        log.info("%s has %d per-frame shapes a detector cannot learn from (%s); detector datasets leave them out",
                    where, sum(skipped.values()), counts)
