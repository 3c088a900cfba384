"""The model's confidence per frame, visible in CVAT's own UI: a frame tag; and what people changed since.

Every pre-annotated frame gets one ``auto`` tag of the label ``CONFIDENCE_LABEL`` (type ``tag``) with a number
attribute ``confidence`` from 0 (the model is unsure) to 100. In CVAT's annotation view a reviewer sets the filter
``attr["confidence"] < 60`` (Filters → attribute of label "preannotate:confidence") and jumps between the matching
frames with the search arrows, least sure first in ``preannotate review``. The label is added to the project (or to
a standalone task) once, the first time a task is pre-annotated; training never learns it, and a function's spec
never lists it.

The tag's second attribute, ``shapes``, is how many shapes the pre-annotation wrote on the frame: what arrived.
``review_counts`` compares it with what the frame holds now (``ReviewCounts``), using what CVAT 2.42's editor does
to a shape's ``source`` (``cvat-core/src/annotations-objects.ts``, ``computeNewSource``; the server stores what the
editor sends and keeps a shape's id when it is updated):

* a shape written by the pre-annotation is ``auto`` and stays ``auto`` while no one moves it: changing its label or
  an attribute leaves ``auto`` too;
* moving, resizing, rotating it, editing its points, or toggling occluded, outside or its z-order makes it
  ``semi-auto``;
* a shape a person draws is ``manual`` (``semi-auto`` when drawn with an AI or OpenCV tool);
* a deleted shape is gone.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from cvat_sdk import Client, models

from preannotate.cvat.client import cvat_errors
from preannotate.cvat.meta import frame_meta

CONFIDENCE_LABEL = "preannotate:confidence"
CONFIDENCE_ATTRIBUTE = "confidence"
SHAPES_ATTRIBUTE = "shapes"  # how many shapes the pre-annotation wrote on the frame
_SPEC = {"name": CONFIDENCE_LABEL, "type": "tag", "color": "#ffcc00",
         "attributes": [{"name": CONFIDENCE_ATTRIBUTE, "input_type": "number", "values": ["0", "100", "1"],
                         "default_value": "100", "mutable": False},
                        # -1: not recorded. CVAT reads an attribute a tag lacks as its default, and tags written
                        # before this attribute existed lack it (JobAnnotation._extend_attributes)
                        {"name": SHAPES_ATTRIBUTE, "input_type": "number", "values": ["-1", "1000000", "1"],
                         "default_value": "-1", "mutable": False}]}


def ensure_confidence_label(client: Client, task_id: int) -> None:
    """Add the confidence tag label to the task's project (or to the task, when it is in none) unless it is there;
    give one made by an earlier version the attributes it lacks."""
    with cvat_errors(client, f"task {task_id}"):
        task = client.tasks.retrieve(task_id)
        found = next((label for label in task.get_labels() if label.name == CONFIDENCE_LABEL), None)
        have = {attribute.name for attribute in (found.attributes or ())} if found is not None else set()
        missing = [models.AttributeRequest(**a) for a in _SPEC["attributes"] if a["name"] not in have]
        if not missing:
            return
        if found is None:
            spec = {key: value for key, value in _SPEC.items() if key != "attributes"}
            label = models.PatchedLabelRequest(**spec, attributes=missing)
        else:  # CVAT adds attributes by name and keeps the label's others
            label = models.PatchedLabelRequest(id=found.id, attributes=missing)
        if task.project_id:  # a project's tasks share its labels: add it there
            client.projects.api.partial_update(
                task.project_id, patched_project_write_request=models.PatchedProjectWriteRequest(labels=[label]))
        else:
            client.tasks.api.partial_update(
                task_id, patched_task_write_request=models.PatchedTaskWriteRequest(labels=[label]))


def confidence_tag(frame: int, confidence: float, label_id: int, attribute_ids: Mapping[str, int],
                   shapes: int | None = None) -> dict[str, Any]:
    """The ``LabeledImageRequest`` body of a frame's confidence tag (``confidence`` from 0.0 to 1.0), with the
    number of ``shapes`` written on the frame when the label has that attribute (``attribute_ids``: name → id)."""
    attributes = [{"spec_id": attribute_ids[CONFIDENCE_ATTRIBUTE], "value": str(round(100 * confidence))}]
    if shapes is not None and SHAPES_ATTRIBUTE in attribute_ids:
        attributes.append({"spec_id": attribute_ids[SHAPES_ATTRIBUTE], "value": str(shapes)})
    return {"frame": frame, "label_id": label_id, "group": 0, "source": "auto", "attributes": attributes}


def task_confidences(client: Client, task_id: int) -> tuple[dict[int, int], dict[int, str]]:
    """Frame → confidence (0-100) of a pre-annotated task, and frame → file name."""
    with cvat_errors(client, f"task {task_id}"):
        task = client.tasks.retrieve(task_id)
        labels, meta = task.get_labels(), frame_meta(task.get_meta())
        _, response = client.tasks.api.retrieve_annotations(task_id, _parse_response=False)
    names = {number: info.name for number, info in meta.numbered().items()}
    return read_confidences(json.loads(response.data), labels), names


def read_confidences(annotations: dict[str, Any], labels: list[Any]) -> dict[int, int]:
    """Frame → confidence (0-100) from a task's annotations (GET JSON) and its labels (cvat-sdk models)."""
    label = next((label for label in labels if label.name == CONFIDENCE_LABEL), None)
    if label is None:
        return {}
    attribute = next((a.id for a in label.attributes or () if a.name == CONFIDENCE_ATTRIBUTE), None)
    found = {}
    for tag in annotations.get("tags") or ():
        if tag.get("label_id") != label.id:
            continue
        value = next((a.get("value") for a in tag.get("attributes") or () if a.get("spec_id") == attribute), None)
        try:
            found[int(tag["frame"])] = int(float(value))
        except (TypeError, ValueError):
            continue
    return found


# ---------------------------------------------------------------------------------------------------- review counts

AUTO, SEMI_AUTO = "auto", "semi-auto"


@dataclass
class ReviewCounts:
    """What people changed on pre-annotated frames, relative to what arrived (see the module docstring)."""

    frames: int = 0    # pre-annotated frames counted (their tag says how many shapes arrived)
    arrived: int = 0   # shapes the pre-annotation wrote on them
    kept: int = 0      # still ``auto``: untouched, or only relabelled or given other attributes
    moved: int = 0     # made ``semi-auto``: reshaped, moved, or flagged occluded/outside
    deleted: int = 0   # arrived and gone
    added: int = 0     # drawn by people: ``manual`` (or ``file``), track keyframes, ``semi-auto`` beyond what arrived
    foreign: int = 0   # ``auto`` shapes beyond what arrived: another writer (CVAT's Automatic annotation)
    uncounted: int = 0  # pre-annotated frames whose tag does not say what arrived (written by an earlier version)

    @property
    def objects(self) -> int:
        """The shapes the frames hold now, people's and the model's: the reviewed truth."""
        return self.kept + self.moved + self.added

    @property
    def edits(self) -> int:
        return self.moved + self.deleted + self.added

    @property
    def per_100(self) -> float | None:
        """Edits per 100 objects of the reviewed frames (drawing them all from scratch is 100)."""
        return 100.0 * self.edits / self.objects if self.objects else None

    def add_frame(self, arrived: int, sources: Iterable[str]) -> None:
        """Count one frame: ``arrived`` shapes written, and the ``source`` of each shape it holds now."""
        sources = list(sources)
        auto, semi = sources.count(AUTO), sources.count(SEMI_AUTO)
        kept = min(auto, arrived)
        moved = min(semi, arrived - kept)  # a semi-auto shape is a moved arrival while arrivals are missing
        self.frames += 1
        self.arrived += arrived
        self.kept += kept
        self.moved += moved
        self.deleted += arrived - kept - moved
        self.added += len(sources) - auto - moved
        self.foreign += auto - kept

    def __add__(self, other: ReviewCounts) -> ReviewCounts:
        return ReviewCounts(**{name: getattr(self, name) + getattr(other, name)
                               for name in self.__dataclass_fields__})


@dataclass
class JobReview:
    """One job's counts: its id, state and stage, its frames, and what people changed there."""

    job: int
    state: str
    stage: str
    start: int
    stop: int
    counts: ReviewCounts = field(default_factory=ReviewCounts)

    @property
    def started(self) -> bool:
        """Someone saved in it (CVAT's editor moves a new job to "in progress" on its first save) or moved it on."""
        return not (self.state == "new" and self.stage == "annotation")


def review_counts(client: Client, task_id: int) -> list[JobReview]:
    """Each annotation job of the task with what people changed on its pre-annotated frames (``ReviewCounts``)."""
    with cvat_errors(client, f"task {task_id}"):
        task = client.tasks.retrieve(task_id)
        labels = task.get_labels()
        jobs = [job for job in task.get_jobs() if str(getattr(job, "type", "annotation")) == "annotation"]
        _, response = client.tasks.api.retrieve_annotations(task_id, _parse_response=False)
    return count_jobs(json.loads(response.data), labels,
                      [JobReview(job.id, str(job.state), str(job.stage), job.start_frame, job.stop_frame)
                       for job in sorted(jobs, key=lambda job: job.start_frame)])


def count_jobs(annotations: dict[str, Any], labels: list[Any], jobs: list[JobReview]) -> list[JobReview]:
    """``review_counts`` from a task's annotations (GET JSON), labels (cvat-sdk models) and jobs."""
    arrived = read_arrived(annotations, labels)
    sources: dict[int, list[str]] = {frame: [] for frame in arrived}
    for shape in annotations.get("shapes") or ():
        if shape["frame"] in sources:
            sources[shape["frame"]].append(str(shape.get("source") or "manual"))
    for track in annotations.get("tracks") or ():  # people's tracks: each keyframe drawn on a counted frame
        for shape in track.get("shapes") or ():
            if shape["frame"] in sources and not shape.get("outside"):
                sources[shape["frame"]].append("manual")
    for job in jobs:
        for frame in range(job.start, job.stop + 1):
            if frame not in arrived:
                continue
            if arrived[frame] is None:
                job.counts.uncounted += 1
            else:
                job.counts.add_frame(arrived[frame], sources[frame])
    return jobs


def read_arrived(annotations: dict[str, Any], labels: list[Any]) -> dict[int, int | None]:
    """Frame → how many shapes the pre-annotation wrote there, from the confidence tags (None where the tag does not
    say: written before the count was recorded)."""
    label = next((label for label in labels if label.name == CONFIDENCE_LABEL), None)
    if label is None:
        return {}
    attribute = next((a.id for a in label.attributes or () if a.name == SHAPES_ATTRIBUTE), None)
    found: dict[int, int | None] = {}
    for tag in annotations.get("tags") or ():
        if tag.get("label_id") != label.id:
            continue
        value = next((a.get("value") for a in tag.get("attributes") or () if a.get("spec_id") == attribute), None)
        try:
            count = int(float(value))
        except (TypeError, ValueError):
            count = -1
        found[int(tag["frame"])] = count if count >= 0 else None
    return found
