"""Our shapes in CVAT's JSON and back — the one encoder, for every way a shape reaches CVAT.

* ``labeled_shape``: a ``LabeledShapeRequest`` body, what ``PATCH /api/tasks/ID/annotations`` takes (our uploads)
  and what cvat-sdk's auto-annotation driver sends (``cvat-cli task auto-annotate``); ``shape_from_stored`` reads
  a stored shape back (``GET .../annotations``);
* ``detector_item`` / ``shape_from_detector_item``: an item of a CVAT detector function's response, which CVAT's
  lambda manager turns into the same request (``../shared/reference/cvat-nuclio-contract.md``).

The rules, the same on every path:

* a mask is written as its outline when the target label takes polygons (``label_type="polygon"``, as CVAT's
  lambda manager does) or when asked (``as_polygon``: cvat-cli's ``--conv-mask-to-poly``); an outline of fewer
  than three points is dropped, as CVAT drops it;
* ``rotation`` is kept in ``[0, 360)`` for rectangles and ellipses, and is 0 for every other type;
* groups are left out of requests: a detector's or a file's group ids would join the task's own groups;
* attributes are written by the target label's attribute ids, by name; names the label lacks are left out;
* a tag (a classifier's prediction, ``Shape.type == "tag"``) is a ``LabeledImageRequest`` (``labeled_tag``) and a
  detector item without points, which CVAT's lambda manager stores as a tag (``DetectionResultConverter``);
* a track (``shapes.Track``) is a ``LabeledTrackRequest`` (``labeled_track``): its keyframes are written like shapes
  (a keyframe with nothing left is dropped), the track's attributes are the label's immutable ones and each
  keyframe's its mutable ones;
* a skeleton has no points of its own: its keypoints are its ``elements``, each a ``points`` shape of one point
  with its sublabel's id and ``outside`` where it is hidden, one per sublabel of the target label, as CVAT's lambda
  manager writes them (``DetectionResultConverter``): a keypoint of a sublabel the label lacks is left out, a
  sublabel with no keypoint gets one ``outside`` at the centroid of the others, and a skeleton with every keypoint
  outside (or none) is dropped. In a detector's response it is ``{label, type: "skeleton", elements: [{label,
  type: "points", points: [x, y], outside}]}``, every keypoint listed.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

from preannotate.formats import masks
from preannotate.shapes import TAG, Shape, Track

ROTATING = ("rectangle", "ellipse")


def geometry(shape: Shape, label_type: str = "any", as_polygon: bool = False) -> tuple[str, list[float]] | None:
    """The CVAT type and points ``shape`` is written as (see the module docstring); None when nothing is left."""
    if shape.type == "mask" and (as_polygon or label_type == "polygon"):
        outline = masks.cvat_rle_to_polygon(shape.points)
        return ("polygon", [float(v) for v in outline]) if len(outline) >= 6 else None
    if shape.type == "polygon" and len(shape.points) < 6:
        return None
    return shape.type, [float(p) for p in shape.points]


def rotation(shape: Shape, shape_type: str) -> float:
    return float(shape.rotation) % 360 if shape_type in ROTATING else 0.0


def labeled_shape(shape: Shape, *, frame: int, label_id: int, attribute_ids: Mapping[str, int] | None = None,
                  label_type: str = "any", as_polygon: bool = False, source: str | None = "auto",
                  sublabel_ids: Mapping[str, int] | None = None) -> dict[str, Any] | None:
    """``shape`` as a ``LabeledShapeRequest`` body (a plain dict: cvat-sdk's checked models cost ~200 µs a shape,
    a tenth of a 100-box frame's inference; ``cvat_sdk.models.LabeledShapeRequest(**body)`` builds one).
    ``source=None`` leaves the source out, for cvat-sdk's driver, which sets it itself. A skeleton needs its
    target label's ``sublabel_ids`` (sublabel name → CVAT id, in the label's order); without them it is None."""
    encoded = geometry(shape, label_type, as_polygon)
    if encoded is None:
        return None
    kind, points = encoded
    body = {"type": kind, "frame": frame, "label_id": label_id, "points": points, "rotation": rotation(shape, kind),
            "occluded": bool(shape.occluded), "z_order": int(shape.z_order),
            "attributes": _attribute_values(shape.attributes, attribute_ids)}
    if kind == "skeleton":
        elements = _elements(shape, sublabel_ids or {}, frame, source)
        if elements is None:
            return None
        body["elements"] = elements
    return body if source is None else {**body, "source": source}


def _elements(skeleton: Shape, sublabel_ids: Mapping[str, int], frame: int, source: str | None
              ) -> list[dict[str, Any]] | None:
    """A skeleton's keypoints as CVAT's ``SubLabeledShapeRequest`` bodies, one per sublabel (see the module
    docstring); None when none of them is visible."""
    given = {element.label: element for element in skeleton.elements if element.label in sublabel_ids}
    if not any(not element.outside for element in given.values()):
        return None
    xs = [float(e.points[0]) for e in given.values()]
    ys = [float(e.points[1]) for e in given.values()]
    centre = [sum(xs) / len(xs), sum(ys) / len(ys)]
    elements = []
    for name, sublabel_id in sublabel_ids.items():
        element = given.get(name)
        body = {"type": "points", "frame": frame, "label_id": sublabel_id,
                "points": [float(p) for p in element.points[:2]] if element else list(centre),
                "occluded": bool(element and element.occluded), "outside": element is None or bool(element.outside),
                "z_order": 0, "rotation": 0.0, "attributes": []}
        elements.append(body if source is None else {**body, "source": source})
    return elements


def labeled_tag(shape: Shape, *, frame: int, label_id: int, attribute_ids: Mapping[str, int] | None = None,
                source: str | None = "auto") -> dict[str, Any]:
    """A tag as a ``LabeledImageRequest`` body (what the ``tags`` of a PATCH take); ``source`` as for shapes."""
    body = {"frame": frame, "label_id": label_id, "attributes": _attribute_values(shape.attributes, attribute_ids)}
    return body if source is None else {**body, "source": source}


def labeled_track(track: Track, *, label_id: int, attribute_ids: Mapping[str, int] | None = None,
                  mutable: Collection[str] = (), label_type: str = "any", source: str = "auto"
                  ) -> dict[str, Any] | None:
    """``track`` as a ``LabeledTrackRequest`` body (``mutable``: the names of the label's mutable attributes);
    None when none of its keyframes is left, or only outside ones."""
    attribute_ids = attribute_ids or {}
    shapes = []
    for keyframe in track.keyframes:
        encoded = geometry(keyframe, label_type)
        if encoded is None:
            continue
        kind, points = encoded
        shapes.append({"type": kind, "frame": keyframe.frame, "points": points, "rotation": rotation(keyframe, kind),
                       "occluded": bool(keyframe.occluded), "outside": bool(keyframe.outside),
                       "z_order": int(keyframe.z_order),
                       "attributes": _attribute_values(keyframe.attributes, {n: i for n, i in attribute_ids.items()
                                                                             if n in mutable})})
    while shapes and shapes[0]["outside"]:  # a track starts where it is first seen
        shapes.pop(0)
    if not shapes:
        return None
    immutable = {name: spec for name, spec in attribute_ids.items() if name not in mutable}
    return {"frame": shapes[0]["frame"], "label_id": label_id, "group": 0, "source": source,
            "attributes": _attribute_values(track.attributes, immutable),
            "shapes": shapes}


def _attribute_values(attributes: Mapping[str, Any], attribute_ids: Mapping[str, int] | None) -> list[dict[str, Any]]:
    """Attributes by the target label's spec ids; names the label lacks are left out."""
    attribute_ids = attribute_ids or {}
    return [{"spec_id": attribute_ids[name], "value": str(value)}
            for name, value in attributes.items() if name in attribute_ids]


def shape_from_stored(stored: Mapping[str, Any], label: str, attributes: Mapping[str, str]) -> Shape:
    """A stored shape (``GET .../annotations``: ``label_id``, ``spec_id`` attributes) as ours, its label and
    attributes already named."""
    return Shape(label=label, type=stored["type"], points=[float(p) for p in stored["points"]],
                 frame=stored["frame"], rotation=float(stored.get("rotation") or 0.0), attributes=dict(attributes),
                 group=stored.get("group") or 0, occluded=bool(stored.get("occluded")),
                 z_order=stored.get("z_order") or 0, source=stored.get("source") or "manual",
                 outside=bool(stored.get("outside")))


def detector_item(shape: Shape) -> dict[str, Any]:
    """``shape`` as an item of a CVAT detector's response: a mask carries its box bitmap (``mask``) and its outline
    (``points``), so CVAT's *convert masks to polygons* works; the lambda manager maps ``label`` by name."""
    item: dict[str, Any] = {"label": shape.label, "type": shape.type,
                            "attributes": [{"name": k, "value": str(v)} for k, v in shape.attributes.items()]}
    if shape.score is not None:
        item = {"confidence": f"{shape.score:.4f}", **item}
    if shape.type == TAG:  # CVAT keeps a tag's label and attributes (no group, no geometry)
        return item
    if shape.type == "mask":
        item["mask"] = masks.cvat_rle_to_nuclio_mask(shape.points)
        item["points"] = masks.cvat_rle_to_polygon(shape.points)
    elif shape.type == "skeleton":  # every keypoint: CVAT fills a missing one at the centroid, outside
        item["elements"] = [{"label": element.label, "type": "points",
                             "points": [float(p) for p in element.points[:2]], "outside": bool(element.outside)}
                            for element in shape.elements]
    else:
        item["points"] = [float(p) for p in shape.points]
    if rotation(shape, shape.type):
        item["rotation"] = rotation(shape, shape.type)
    if shape.group:
        item["group_id"] = shape.group
    return item


def shape_from_detector_item(item: Mapping[str, Any], frame: int = 0) -> Shape:
    """An item of any CVAT detector's response as a shape with ``source: auto`` (masks in CVAT's RLE; a tag
    without points)."""
    shape_type = item["type"]
    points = ([] if shape_type in (TAG, "skeleton") else masks.nuclio_mask_to_cvat_rle(item["mask"])
              if shape_type == "mask" else [float(p) for p in item["points"]])
    confidence = item.get("confidence")
    return Shape(label=item["label"], type=shape_type, points=points, frame=frame,
                 score=float(confidence) if confidence not in (None, "") else None,
                 rotation=float(item.get("rotation", 0.0)),
                 attributes={a["name"]: a["value"] for a in item.get("attributes") or ()},
                 group=int(item.get("group_id") or 0), source="auto", outside=bool(item.get("outside")),
                 elements=[shape_from_detector_item(element, frame) for element in item.get("elements") or ()])
