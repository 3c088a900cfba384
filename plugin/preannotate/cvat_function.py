"""Our models as a cvat-sdk auto-annotation function, the door for ``cvat-cli task auto-annotate``::

    cvat-cli --server-host http://cvat:8080 --auth user task auto-annotate 12 \\
        --function-module preannotate.cvat_function -p model=str:boxes [-p store=str:/models] [-p device=str:cpu]

cvat-cli calls ``create(**parameters)`` (the ``-p`` values; the model defaults to ``$PREANNOTATE_MODEL``, the
store to ``$PREANNOTATE_MODEL_STORE``). ``model`` is anything ``preannotate serve --model`` takes: a name in the
store (its newest version), ``NAME@VERSION``, an architecture, or an artifact directory. The labels come from the
model's manifest, each declared with the shape type the model returns for it, as the deployed spec lists it
(``lambda_spec.spec_labels``: ``rectangle``; ``mask`` — polygons with ``--conv-mask-to-poly`` — or a rectangle or
ellipse label's own type, rotated, for a mask model; a skeleton with a keypoint per part, returned with an element
for each, and ``points``, for a keypoint model; a classifier's ``tag``, returned as cvat-sdk's ``tag``), with the
select, radio and checkbox
attributes the model learned (``models.attributes``; cvat-sdk maps them to the task's by name, and wants the same
input types and values); ``--conf-threshold`` is honoured for every label, else each label's served threshold
(``Manifest.threshold_of``).
The same ``cvataa.annotate_task`` drives it from Python.
"""

from __future__ import annotations

import os

import cvat_sdk.auto_annotation as cvataa
import PIL.Image
from cvat_sdk import models

from preannotate import devices
from preannotate.cvat import encoding, lambda_spec
from preannotate.models import Detector, architecture_of, detect_served, load_model
from preannotate.shapes import TAG, Label, Shape


class DetectionFunction:
    """A ``cvataa.DetectionFunction`` around one of our detectors."""

    def __init__(self, detector: Detector):
        self.detector = detector
        self.labels = list(detector.manifest.labels)
        self._id_of = {label.name: index for index, label in enumerate(self.labels)}
        # Every label is declared with the shape type the model returns for it (the deployed spec's types,
        # ``lambda_spec.spec_labels``: a skeleton with a keypoint per part, a points label, a rectangle or an
        # ellipse a mask model fits), so cvat-sdk checks it against the task's label types before the first frame;
        # ids are local to the spec (a skeleton's keypoints: local to it).
        output = architecture_of(detector.manifest).output
        listed, unlisted = lambda_spec.spec_labels(self.labels, output, detector.manifest.outlines)
        declared = {label.name: label for label in listed}
        # what no task label of the model's types would take still comes back as a box (a box model's for an
        # ellipse label, a keypoint model's for a rectangle one): declared so, cvat-sdk maps it to a box label only
        declared.update({label.name: Label(label.name, "rectangle", label.attributes, label.id) for label in unlisted
                         if label.type != "skeleton"})
        self._declared = declared
        self._sublabel_ids = {label.name: {part.name: number for number, part in enumerate(label.sublabels)}
                              for label in declared.values() if label.type == "skeleton"}
        learned = getattr(detector, "attribute_model", None)  # models.attributes.AttributedDetector
        self._attribute_ids: dict[str, dict[str, int]] = {}  # label → attribute name → its id in the spec
        attributes: dict[str, list[models.AttributeRequest]] = {}
        for number, head in enumerate(learned.heads if learned is not None else ()):
            self._attribute_ids.setdefault(head.label, {})[head.name] = number
            attributes.setdefault(head.label, []).append(cvataa.attribute_spec(
                head.name, number, head.input_type, [] if head.input_type == "checkbox" else list(head.values)))
        self.spec = cvataa.DetectionFunctionSpec(labels=[
            self._label_spec(declared[label.name], index, attributes.get(label.name, []))
            for index, label in enumerate(self.labels) if label.name in declared])

    @staticmethod
    def _label_spec(label: Label, index: int, attributes: list[models.AttributeRequest]
                    ) -> models.PatchedLabelRequest:
        if label.type == "skeleton":
            return cvataa.skeleton_label_spec(label.name, index, [
                cvataa.keypoint_spec(part.name, number) for number, part in enumerate(label.sublabels)],
                attributes=attributes)
        return cvataa.label_spec(label.name, index, type=label.type, attributes=attributes)

    def detect(self, context: cvataa.DetectionFunctionContext, image: PIL.Image.Image
               ) -> list[cvataa.DetectionAnnotation]:
        threshold = getattr(context, "conf_threshold", None)  # contexts of older cvat-sdk versions lack it
        conv_mask_to_poly = bool(getattr(context, "conv_mask_to_poly", False))
        shapes = detect_served(self.detector, [image.convert("RGB")], threshold)[0]
        return [request for shape in shapes if (request := self._request(shape, conv_mask_to_poly)) is not None]

    def _request(self, shape: Shape, conv_mask_to_poly: bool) -> cvataa.DetectionAnnotation | None:
        label_id = self._id_of.get(shape.label)
        if label_id is not None and shape.type == TAG:
            return models.LabeledImageRequest(**encoding.labeled_tag(shape, frame=0, label_id=label_id, source=None))
        body = None if label_id is None else encoding.labeled_shape(
            shape, frame=0, label_id=label_id, attribute_ids=self._attribute_ids.get(shape.label),
            label_type=self._declared[shape.label].type, as_polygon=conv_mask_to_poly, source=None,
            sublabel_ids=self._sublabel_ids.get(shape.label))
        if body is None or body["type"] != "skeleton":
            return None if body is None else models.LabeledShapeRequest(**body)
        return cvataa.skeleton(body["label_id"], [
            cvataa.keypoint(element["label_id"], element["points"], occluded=element["occluded"],
                            outside=element["outside"]) for element in body["elements"]],
            occluded=body["occluded"], attributes=body["attributes"])


def create(model: str | None = None, store: str | None = None, device: str | None = None) -> DetectionFunction:
    """The factory ``cvat-cli ... -p model=str:NAME [-p store=str:DIR] [-p device=str:cpu]`` calls."""
    model = model or os.environ.get("PREANNOTATE_MODEL")
    if not model:
        raise ValueError("name the model: -p model=str:NAME (a model in the store, NAME@VERSION, an architecture "
                         "or an artifact directory), or set PREANNOTATE_MODEL")
    device = devices.checked(device, "-p device") if device else devices.from_environment(os.environ)
    return DetectionFunction(load_model(model, store, device))
