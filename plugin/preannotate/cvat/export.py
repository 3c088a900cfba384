"""A CVAT task, job or project → a COCO, TFRecord or ImageNet-style (tags) training folder (``preannotate export``).

Annotations come through ``reader`` (tracks interpolated), images through ``CvatFrames`` (by chunk, cached), and
``formats.dataset.export_dataset`` writes the folder. A task or job is keyed by frame number; a project by
``(task id, frame)``, so its image files are named ``task_<id>/<frame name>``.
"""

from __future__ import annotations

from pathlib import Path

from cvat_sdk import Client

from preannotate.cvat import reader
from preannotate.cvat.client import CvatError, cvat_errors
from preannotate.cvat.frames import CvatFrames
from preannotate.cvat.review import CONFIDENCE_LABEL
from preannotate.formats.dataset import ExportSummary, export_dataset


def export(client: Client, out_dir: str | Path, fmt: str, *, task: int | None = None, job: int | None = None,
           project: int | None = None, val_fraction: float = 0.0, seed: int = 0, quality: str = "original",
           cache_dir: str | Path | None = None, progress: bool = True) -> ExportSummary:
    if sum(x is not None for x in (task, job, project)) != 1:
        raise CvatError("export one of: a task, a job or a project")
    if project is not None:
        sets = reader.read_project(client, project)
        if not sets:
            raise CvatError(f"project {project} has no tasks")
        labels = next(iter(sets.values())).labels
        items = [((task_id, number), frame) for task_id, annotation_set in sets.items()
                 for number, frame in sorted(annotation_set.frames.items())]
        images = {task_id: CvatFrames(client, task_id, quality=quality, cache_dir=cache_dir) for task_id in sets}
    else:
        if job is not None:
            annotation_set = reader.read_job(client, job)
            with cvat_errors(client, f"job {job}"):
                task = client.jobs.retrieve(job).task_id
        else:
            annotation_set = reader.read_task(client, task)
        labels = annotation_set.labels
        items = sorted(annotation_set.frames.items())
        images = CvatFrames(client, task, quality=quality, cache_dir=cache_dir)
    labels = [label for label in labels if label.name != CONFIDENCE_LABEL]  # our review tags are not a class
    return export_dataset(out_dir, fmt, labels, items, images, val_fraction=val_fraction, seed=seed,
                          progress=progress)  # its summary counts the points, polylines, ... left out
