"""The model's confidence per frame, visible in CVAT's own UI: a frame tag.

Every pre-annotated frame gets one ``auto`` tag of the label ``CONFIDENCE_LABEL`` (type ``tag``) with a number
attribute ``confidence`` from 0 (the model is unsure) to 100. In CVAT's annotation view a reviewer sets the filter
``attr["confidence"] < 60`` (Filters → attribute of label "preannotate:confidence") and jumps between the matching
frames with the search arrows, least sure first in ``preannotate review``. The label is added to the project (or to
a standalone task) once, the first time a task is pre-annotated; training never learns it, and a function's spec
never lists it.
"""

from __future__ import annotations

import json
from typing import Any

from cvat_sdk import Client, models

from preannotate.cvat.client import cvat_errors
from preannotate.cvat.meta import frame_meta

CONFIDENCE_LABEL = "preannotate:confidence"
CONFIDENCE_ATTRIBUTE = "confidence"
_SPEC = {"name": CONFIDENCE_LABEL, "type": "tag", "color": "#ffcc00",
         "attributes": [{"name": CONFIDENCE_ATTRIBUTE, "input_type": "number", "values": ["0", "100", "1"],
                         "default_value": "100", "mutable": False}]}


def ensure_confidence_label(client: Client, task_id: int) -> None:
    """Add the confidence tag label to the task's project (or to the task, when it is in none) unless it is there."""
    with cvat_errors(client, f"task {task_id}"):
        task = client.tasks.retrieve(task_id)
        if any(label.name == CONFIDENCE_LABEL for label in task.get_labels()):
            return
        spec = {key: value for key, value in _SPEC.items() if key != "attributes"}
        label = models.PatchedLabelRequest(**spec, attributes=[models.AttributeRequest(**a)
                                                               for a in _SPEC["attributes"]])
        if task.project_id:  # a project's tasks share its labels: add it there
            client.projects.api.partial_update(
                task.project_id, patched_project_write_request=models.PatchedProjectWriteRequest(labels=[label]))
        else:
            client.tasks.api.partial_update(
                task_id, patched_task_write_request=models.PatchedTaskWriteRequest(labels=[label]))


def confidence_tag(frame: int, confidence: float, label_id: int, attribute_id: int) -> dict[str, Any]:
    """The ``LabeledImageRequest`` body of a frame's confidence tag (``confidence`` from 0.0 to 1.0)."""
    return {"frame": frame, "label_id": label_id, "group": 0, "source": "auto",
            "attributes": [{"spec_id": attribute_id, "value": str(round(100 * confidence))}]}


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
