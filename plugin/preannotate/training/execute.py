"""What a training job does, in its own process: read the CVAT tasks it names, train, publish, decide promotion.

Also the check cron uses: did the annotations change since the served version learned them? A version's manifest
records, under ``provenance.cvat``, the server and every task's ``updated_date`` it learned from.
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from preannotate.cvat.annotations import AnnotationSet
from preannotate.cvat.frames import FrameImages
from preannotate.models import ModelStore
from preannotate.models.artifact import Manifest
from preannotate.shapes import Label

log = logging.getLogger(__name__)


@dataclass
class TaskData:
    """One CVAT task's annotated frames and where their images come from."""

    task_id: int
    annotations: AnnotationSet
    images: FrameImages
    updated_date: str


def task_ids(client, request: dict[str, Any]) -> list[int]:
    """The tasks a request names: its ``tasks`` and every task of its ``project``."""
    from preannotate.cvat.client import cvat_errors

    ids = list(request.get("tasks") or [])
    if request.get("project") is not None:
        with cvat_errors(client, f"project {request['project']}"):
            ids += [task.id for task in client.projects.retrieve(request["project"]).get_tasks()]
    return sorted(set(ids))


def task_versions(client, ids: Sequence[int]) -> dict[str, str]:
    """Task id → its ``updated_date`` (it changes whenever annotations are saved)."""
    from preannotate.cvat.client import cvat_errors

    versions = {}
    for task_id in ids:
        with cvat_errors(client, f"task {task_id}"):
            updated = client.tasks.retrieve(task_id).updated_date
            versions[str(task_id)] = updated.isoformat() if hasattr(updated, "isoformat") else str(updated)
    return versions


def load_tasks(client, request: dict[str, Any], cache_dir: Path | None = None) -> list[TaskData]:
    from preannotate.cvat.frames import CvatFrames
    from preannotate.cvat.reader import read_task

    versions = task_versions(client, task_ids(client, request))
    return [TaskData(int(task_id), read_task(client, int(task_id)),
                     CvatFrames(client, int(task_id), cache_dir=cache_dir), updated)
            for task_id, updated in versions.items()]


def annotations_changed(request: dict[str, Any], store: ModelStore) -> tuple[bool, str]:
    """Whether the tasks of ``request`` changed since the version served under ``request['name']`` learned them."""
    from preannotate.cvat.client import connect

    version = store.serving(request["name"])
    learned = {}
    if version is not None:
        learned = (Manifest.read(store.path(request["name"], version)).provenance.get("cvat") or {}).get("tasks", {})
    with connect() as client:
        now = task_versions(client, task_ids(client, request))
    if version is None:
        return True, f"{request['name']} has no version yet"
    changed = sorted((t for t in now if learned.get(t) != now[t]), key=int)
    if not changed:
        return False, f"annotations unchanged since {request['name']}@{version}"
    return True, f"task(s) {', '.join(changed)} changed since {request['name']}@{version}"


def should_promote(promote: str, metrics: dict[str, Any], serving: Manifest | None) -> bool:
    """``auto``: a new version is served unless it evaluates worse (mAP) than the one served now."""
    if promote in ("always", "never"):
        return promote == "always"
    if serving is None:
        return True
    new, old = metrics.get("map"), serving.metrics.get("map")
    return old is None or (new is not None and new >= old)


def prepare_dataset(client, request: dict[str, Any], directory: Path, val_fraction: float, seed: int) -> Path:
    """The job's CVAT tasks exported once into ``directory`` (a COCO folder, images included): training reads the
    folder, not the server, and a resumed job finds it complete and reuses it."""
    from preannotate.formats.dataset import export_dataset

    if (directory / "COMPLETE").is_file():
        return directory
    tasks = load_tasks(client, request, cache_dir=directory.parent / "chunks")
    if not tasks:
        raise ValueError("nothing to learn from: the job names no task (an empty project?)")
    labels = merged_labels([task.annotations.labels for task in tasks])
    items = [((task.task_id, number), frame) for task in tasks for number, frame in
             sorted(task.annotations.frames.items())]
    partial = directory.with_name(directory.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    export_dataset(partial, "coco", labels, items, {task.task_id: task.images for task in tasks},
                   val_fraction=val_fraction, seed=seed, progress=False)
    (partial / "cvat.json").write_text(json.dumps({"server": client.api_map.host, "tasks": {
        str(task.task_id): task.updated_date for task in tasks}}))
    (partial / "COMPLETE").write_text("")
    if directory.exists():
        shutil.rmtree(directory)
    partial.rename(directory)
    return directory


def merged_labels(label_lists: Sequence[Sequence[Label]]) -> list[Label]:
    """The labels of several tasks by name, in the order first seen, numbered 1..N (tasks of one project share
    theirs; standalone tasks may each have their own)."""
    seen: dict[str, Label] = {}
    for labels in label_lists:
        for label in labels:
            seen.setdefault(label.name, label)
    return [Label(label.name, label.type, label.attributes, i) for i, label in enumerate(seen.values(), 1)]


def execute_job(job, work_dir: Path, store_root: Path, stop: threading.Event) -> dict[str, Any] | None:
    """Train as ``job.request`` says; ``None`` when stopped by a signal (its checkpoint stays for a resume)."""
    from preannotate.cvat.client import connect
    from preannotate.formats.dataset import training_split
    from preannotate.training.hyperparameters import Hyperparameters
    from preannotate.training.trainer import TrainingInterrupted, train

    request = job.request
    store = ModelStore(store_root)
    hp = Hyperparameters().updated(request.get("hyperparameters") or "")
    with connect() as client:
        dataset = prepare_dataset(client, request, work_dir / "dataset", hp.val_fraction, hp.seed)
    labels, train_items, val_items = training_split(dataset, hp.val_fraction, hp.seed)
    serving = store.serving(request["name"])
    serving_manifest = Manifest.read(store.path(request["name"], serving)) if serving is not None else None
    previous = store.resolve(request["from_model"]) if request.get("from_model") else None
    try:
        result = train(request["model"], labels, train_items, val_items, work_dir / "run", store=store,
                       name=request["name"],
                       hyperparameters=request.get("hyperparameters") or "", previous=previous,
                       provenance={"cvat": json.loads((dataset / "cvat.json").read_text()), "job": job.id,
                                   "trigger": job.trigger},
                       promote=lambda metrics: should_promote(request.get("promote", "auto"), metrics,
                                                              serving_manifest),
                       progress=False, stop=stop)
    except TrainingInterrupted as stopped:
        log.info("%s", stopped)
        return None
    return {"version": result.version, "promoted": store.serving(request["name"]) == result.version,
            "metrics": result.metrics}
