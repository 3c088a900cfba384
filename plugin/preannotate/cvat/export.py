"""CVAT → a COCO, TFRecord or ImageNet-style (tags) dataset folder: the one path, for both of its uses.

* ``export``: every frame of a task, a job or a project (``preannotate export``);
* ``export_finished``: the frames people finished (``train-on``, ``reader.read_finished``) of the tasks a training
  request names, exported once into a folder training reads, so a resumed run never reads the server again.
  ``cvat.json`` there records what it learned from (``cvat_provenance``), ``COMPLETE`` that the folder is whole.

Annotations come through ``reader`` (tracks interpolated), images through ``CvatFrames`` (by chunk, cached), the
labels through ``merged_labels``, and ``formats.dataset.export_dataset`` writes the folder. A single task or job is
keyed by frame number; several tasks (a project, a training request) by ``(task id, frame)``, so their image files
are named ``task_<id>/<frame name>``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from cvat_sdk import Client

from preannotate.cvat import reader
from preannotate.cvat.client import CvatError, cvat_errors
from preannotate.cvat.frames import CvatFrames
from preannotate.formats.dataset import ExportSummary, export_dataset
from preannotate.frames import frame_ranges
from preannotate.shapes import AnnotationSet, Label

log = logging.getLogger(__name__)


class NothingFinished(ValueError):
    """No job of the tasks asked is finished by people yet: nothing to learn from (said, and nothing trains)."""


def export(client: Client, out_dir: str | Path, fmt: str, *, task: int | None = None, job: int | None = None,
           project: int | None = None, val_fraction: float = 0.0, seed: int = 0, quality: str = "original",
           cache_dir: str | Path | None = None, progress: bool = True) -> ExportSummary:
    """Every frame of one task, job or project as a ``fmt`` folder in ``out_dir``, split by ``val_fraction`` and
    ``seed``; its summary counts the points, polylines, ... left out."""
    if sum(x is not None for x in (task, job, project)) != 1:
        raise CvatError("export one of: a task, a job or a project")
    if project is not None:
        tasks = reader.read_project(client, project)
        if not tasks:
            raise CvatError(f"project {project} has no tasks")
    elif job is not None:
        annotations = reader.read_job(client, job)
        with cvat_errors(client, f"job {job}"):
            tasks = {client.jobs.retrieve(job).task_id: annotations}
    else:
        tasks = {task: reader.read_task(client, task)}
    return _write(client, tasks, out_dir, fmt, by_task=project is not None, val_fraction=val_fraction, seed=seed,
                  quality=quality, cache_dir=cache_dir, progress=progress)


def export_finished(client: Client, request: Mapping[str, Any], directory: str | Path, fmt: str = "coco", *,
                    train_on: Sequence[str], val_fraction: float = 0.0, seed: int = 0) -> Path:
    """The frames people finished (by ``train_on``) of the CVAT tasks a request names (``tasks``, every task of
    ``project``), exported once into ``directory`` as a ``fmt`` folder, images included, split by
    ``val_fraction`` and ``seed``; ``cvat.json`` there records the server, each task's ``updated_date``, and the
    jobs and frames used. A folder found complete is reused; one cut off is written again (in ``.partial`` beside
    it until whole). ``NothingFinished`` when no frame qualifies."""
    directory = Path(directory)
    if (directory / "COMPLETE").is_file():
        return directory
    versions = reader.task_versions(client, reader.task_ids(client, request))
    if not versions:
        raise ValueError("nothing to learn from: no task named (an empty project?)")
    finished = {int(task_id): reader.read_finished(client, int(task_id), train_on) for task_id in versions}
    tasks = {task_id: result.annotations for task_id, result in finished.items() if result.annotations.frames}
    if not tasks:
        where = f"project {request['project']}" if request.get("project") is not None else \
            "task(s) " + ", ".join(versions)
        raise NothingFinished(f"nothing finished to learn from in {where}: no job is "
                              f"{' or '.join(train_on)} yet (train-on={'+'.join(train_on)}); finish a job in "
                              "CVAT, or set train-on=all to learn from every shape and tag people made")
    partial = directory.with_name(directory.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    summary = _write(client, tasks, partial, fmt, by_task=True, val_fraction=val_fraction, seed=seed,
                     cache_dir=directory.parent / "chunks", progress=False)
    if summary.skipped:
        log.warning("left out of training (the model cannot learn from them): %s",
                    ", ".join(f"{n} {kind}" for kind, n in sorted(summary.skipped.items())))
    used = {"server": client.api_map.host, "tasks": versions, "train_on": list(train_on),
            "jobs": {job: date for result in finished.values() for job, date in result.jobs.items()},
            "frames": {str(task_id): frame_ranges(annotations.frames) for task_id, annotations in tasks.items()},
            "unfinished_jobs": sorted(job for result in finished.values() for job in result.unfinished)}
    log.info("learning from %d frames of %d finished job(s) (train-on=%s); %d job(s) left out",
             sum(len(annotations.frames) for annotations in tasks.values()), len(used["jobs"]), "+".join(train_on),
             len(used["unfinished_jobs"]))
    (partial / "cvat.json").write_text(json.dumps(used))
    (partial / "COMPLETE").write_text("")
    if directory.exists():
        shutil.rmtree(directory)
    partial.rename(directory)
    return directory


def cvat_provenance(dataset: str | Path) -> dict[str, Any]:
    """What a folder written by ``export_finished`` learned from, for a manifest (``provenance.cvat``); ``{}`` for
    any other folder."""
    path = Path(dataset) / "cvat.json"
    return {"cvat": json.loads(path.read_text())} if path.is_file() else {}


def merged_labels(label_lists: Sequence[Sequence[Label]]) -> list[Label]:
    """The labels of several tasks by name, in the order first seen (a name's type and attributes from where it is
    first seen), numbered 1..N: every export's labels.

    Merged, rather than the first task's, because standalone tasks each carry their own labels and a project's
    tasks may disagree: the first task's alone would leave out the classes the others were annotated with."""
    seen: dict[str, Label] = {}
    for labels in label_lists:
        for label in labels:
            seen.setdefault(label.name, label)
    return [dataclasses.replace(label, id=i) for i, label in enumerate(seen.values(), 1)]  # a skeleton: its parts too


def _write(client: Client, tasks: Mapping[int, AnnotationSet], out_dir: str | Path, fmt: str, *, by_task: bool,
           val_fraction: float, seed: int, quality: str = "original", cache_dir: str | Path | None = None,
           progress: bool) -> ExportSummary:
    """The tasks' frames, keyed by ``(task, frame)`` when ``by_task`` (else by frame: one task), as a folder."""
    items = [((task_id, number) if by_task else number, frame) for task_id, annotations in tasks.items()
             for number, frame in sorted(annotations.frames.items())]
    images = {task_id: CvatFrames(client, task_id, quality=quality, cache_dir=cache_dir) for task_id in tasks}
    return export_dataset(out_dir, fmt, merged_labels([annotations.labels for annotations in tasks.values()]),
                          items, images if by_task else next(iter(images.values())), val_fraction=val_fraction,
                          seed=seed, progress=progress)
