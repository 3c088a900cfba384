"""COCO instances (ground truth) and COCO results (predictions), from and to our shapes — in this one module.

Deliberate differences from CVAT's own ``COCO 1.0`` export (what a trainer needs, listed in the README too):

* masks and ellipses are RLE with ``iscrowd: 0`` (CVAT writes ``iscrowd: 1``, which trainers and COCOeval skip);
* a rotated rectangle is written as its rotated polygon with the box that holds it (CVAT writes the unrotated box
  and puts ``rotation`` in the attributes);
* every shape is its own instance: CVAT merges a ``group`` into one annotation under the leader's label, which
  would teach a detector the wrong class; the group id stays in ``attributes.group``;
* ``attributes.track_id`` is CVAT's track id (CVAT renumbers tracks from 0);
* points, polylines and tags are not exported (neither does CVAT); the readers count them.

Skeletons (and points labels) go to a COCO *keypoints* dataset (``to_coco_keypoints``), field for field as CVAT's
``COCO Keypoints 1.0`` writes it (Datumaro's ``coco_person_keypoints``, ``_KeypointsConverter``): every label a
category, a skeleton's with ``keypoints`` (its sublabels' names, in order) and ``skeleton`` (its edges, 1-based);
each skeleton an annotation with ``keypoints`` ``[x, y, v, ...]`` (v: 0 outside, 1 occluded, 2 visible; an outside
keypoint keeps the place CVAT stores for it; 2 decimals), ``num_keypoints`` (those not outside), ``bbox`` of the
keypoints not outside, its ``area`` (w × h), ``segmentation: []``, ``iscrowd: 0`` and ``attributes``
(``occluded``, ``keyframe`` and the label's). Where ours differs:

* category ids are 1..N over the labels, as in our instances file: CVAT numbers every label *and each skeleton's
  sublabels* (a skeleton of 3 parts moves the next label's id by 4), which no reader of COCO needs;
* a points label is a category of one keypoint named as itself, each points shape of one point an annotation (CVAT
  leaves points out; a model learns them so, ``shapes.as_skeleton``); one of several points is left out and counted;
* a skeleton grouped with a box or polygon stays its own annotation (CVAT merges the group into one, with the
  group's outline); the group id stays in ``attributes.group``.

A COCO file a person gives (``preannotate import``) is read by ``read_file``, ``dataset_images``,
``dataset_categories`` and ``read_shapes``, which say in one sentence what is not COCO in it, and where.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools import mask as coco_mask

from preannotate.formats import masks
from preannotate.shapes import (
    DETECTABLE_TYPES,
    FrameAnnotations,
    Label,
    Shape,
    as_skeleton,
    from_skeleton,
    keypoint_names,
    skeleton_edges,
    skeleton_svg,
)


def categories(labels: Sequence[Label]) -> list[dict[str, Any]]:
    """COCO categories: every CVAT label in CVAT's order, ids from 1 (as CVAT's export numbers them)."""
    return [{"id": i, "name": label.name, "supercategory": ""} for i, label in enumerate(labels, start=1)]


def shape_to_annotation(shape: Shape, width: int, height: int) -> dict[str, Any] | None:
    """One shape → the geometry part of a COCO annotation (``bbox``, ``area``, ``segmentation``, ``iscrowd``);
    None for shapes a detector cannot learn or that are empty."""
    if shape.type not in DETECTABLE_TYPES:
        return None
    if shape.type == "rectangle" and not shape.rotation % 360:
        x1, y1, x2, y2 = (float(v) for v in shape.points[:4])
        x1, x2 = sorted((max(0.0, min(x1, width)), max(0.0, min(x2, width))))
        y1, y2 = sorted((max(0.0, min(y1, height)), max(0.0, min(y2, height))))
        if x2 - x1 <= 0 or y2 - y1 <= 0:
            return None
        return {"bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1), "segmentation": [],
                "iscrowd": 0}
    if shape.type in ("polygon", "rectangle"):  # rotated rectangles as their corners
        polygon = shape.polygon()
        if len(polygon) < 6:
            return None
        area = float(coco_mask.area(coco_mask.frPyObjects([polygon], height, width))[0])
        corners = np.asarray(polygon, dtype=float)
        xs, ys = corners[0::2].clip(0, width), corners[1::2].clip(0, height)
        box = [float(xs.min()), float(ys.min()), float(xs.max() - xs.min()), float(ys.max() - ys.min())]
        if box[2] <= 0 or box[3] <= 0:
            return None
        return {"bbox": box, "area": area, "segmentation": [[round(float(v), 3) for v in polygon]], "iscrowd": 0}
    # Masks and ellipses as RLE, made without drawing the whole frame (a shape is small next to the frame, and
    # a full-frame bitmap per shape made this the slowest part of an export).
    rle = (masks.cvat_rle_to_coco_rle(shape.points, width, height) if shape.type == "mask"
           else coco_mask.frPyObjects([shape.polygon()], height, width)[0])
    area = float(coco_mask.area(rle)) if rle is not None else 0.0
    if not area:
        return None
    return {"bbox": [float(v) for v in coco_mask.toBbox(rle)], "area": area,
            "segmentation": {"size": [height, width], "counts": rle["counts"].decode("ascii")}, "iscrowd": 0}


def to_coco(frames: Iterable[tuple[FrameAnnotations, str]], labels: Sequence[Label],
            skipped: Counter[str] | None = None) -> dict[str, Any]:
    """A COCO instances dataset of ``(frame, file_name)`` pairs; image ids count from 1 in the order given.
    Shapes left out (not detectable, empty, or with a label not in ``labels``) are counted by type in ``skipped``."""
    category_of = {label.name: i for i, label in enumerate(labels, start=1)}
    images, annotations = [], []
    for image_id, (frame, file_name) in enumerate(frames, start=1):
        images.append(_image(image_id, frame, file_name))
        for shape in frame.shapes:
            geometry = shape_to_annotation(shape, frame.width, frame.height) if shape.label in category_of else None
            if geometry is None:
                if skipped is not None:
                    skipped[shape.type] += 1
                continue
            attributes: dict[str, Any] = {**shape.attributes, "occluded": shape.occluded}
            if shape.rotation:
                attributes["rotation"] = shape.rotation
            if shape.track_id is not None:
                attributes["track_id"] = shape.track_id
            _add(annotations, image_id, category_of[shape.label], geometry, shape, attributes)
    return _document(images, annotations, categories(labels))


def _add(annotations: list[dict[str, Any]], image_id: int, category_id: int, geometry: dict[str, Any], shape: Shape,
         attributes: dict[str, Any]) -> None:
    """One shape's COCO annotation (its group and score too), appended with the next id."""
    if shape.group:
        attributes["group"] = shape.group
    annotation = {"id": len(annotations) + 1, "image_id": image_id, "category_id": category_id, **geometry,
                  "attributes": attributes}
    if shape.score is not None:
        annotation["score"] = shape.score
    annotations.append(annotation)


def _image(image_id: int, frame: FrameAnnotations, file_name: str) -> dict[str, Any]:
    return {"id": image_id, "file_name": file_name, "width": frame.width, "height": frame.height, "frame": frame.frame}


def _document(images: list[dict[str, Any]], annotations: list[dict[str, Any]], categories: list[dict[str, Any]]
              ) -> dict[str, Any]:
    return {"info": {"description": "exported by cvat-preannotate"}, "licenses": [], "images": images,
            "annotations": annotations, "categories": categories}


KEYPOINT_TYPES = ("skeleton", "points")  # the label types a keypoints dataset holds
VISIBLE, OCCLUDED, OUTSIDE = 2, 1, 0     # COCO's keypoint visibility (Datumaro's Points.Visibility)


def keypoint_categories(labels: Sequence[Label]) -> list[dict[str, Any]]:
    """``categories`` with, for a skeleton or points label, its ``keypoints`` and ``skeleton`` (empty for others)."""
    return [{**category, "keypoints": list(keypoint_names(label)) if label.type in KEYPOINT_TYPES else [],
             "skeleton": [list(edge) for edge in skeleton_edges(label)] if label.type == "skeleton" else []}
            for category, label in zip(categories(labels), labels, strict=True)]


def skeleton_to_annotation(shape: Shape, names: Sequence[str]) -> dict[str, Any]:
    """A skeleton (its keypoints named ``names``, in order) → the keypoint part of a COCO annotation, as CVAT's
    ``COCO Keypoints 1.0`` writes it (see the module docstring)."""
    by_name = {element.label: element for element in shape.elements}
    triplets: list[float] = []
    seen = []
    for name in names:
        element = by_name.get(name)
        if element is None:  # a part the shape lacks: CVAT has none (it fills every part), so outside
            triplets += [0.0, 0.0, OUTSIDE]
            continue
        visibility = OUTSIDE if element.outside else OCCLUDED if element.occluded else VISIBLE
        x, y = (round(float(v), 2) for v in element.points[:2])  # Datumaro's points keep 2 decimals
        triplets += [x, y, visibility]
        if visibility != OUTSIDE:
            seen.append((x, y))
    xs, ys = [p[0] for p in seen] or [0.0], [p[1] for p in seen] or [0.0]
    box = [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)]
    return {"segmentation": [], "area": box[2] * box[3], "bbox": [round(v, 2) for v in box], "iscrowd": 0,
            "keypoints": triplets, "num_keypoints": len(seen)}


def to_coco_keypoints(frames: Iterable[tuple[FrameAnnotations, str]], labels: Sequence[Label],
                      skipped: Counter[str] | None = None) -> dict[str, Any]:
    """A COCO keypoints dataset of ``(frame, file_name)`` pairs (as ``to_coco``): the skeletons of skeleton labels
    and the points shapes of one point of points labels (see the module docstring). Skeletons and points shapes
    left out (a label not in ``labels`` or of another type, a points shape of several points) are counted in
    ``skipped``."""
    label_of = {label.name: label for label in labels if label.type in KEYPOINT_TYPES}
    category_of = {label.name: i for i, label in enumerate(labels, start=1)}
    images, annotations = [], []
    for image_id, (frame, file_name) in enumerate(frames, start=1):
        images.append(_image(image_id, frame, file_name))
        for shape in frame.shapes:
            if shape.type not in KEYPOINT_TYPES:
                continue
            label = label_of.get(shape.label)
            if label is None or (shape.type == "points" and len(shape.points) != 2):
                if skipped is not None:
                    skipped[shape.type] += 1
                continue
            skeleton = as_skeleton(shape)
            attributes: dict[str, Any] = {**shape.attributes, "occluded": shape.occluded}
            if shape.track_id is None:
                attributes["keyframe"] = False  # on a track's frame it would say whether a keyframe lies there
            else:
                attributes["track_id"] = shape.track_id
            _add(annotations, image_id, category_of[shape.label],
                 skeleton_to_annotation(skeleton, keypoint_names(label)), shape, attributes)
    return _document(images, annotations, keypoint_categories(labels))


def category_label(category: dict[str, Any], label_id: int | None = None) -> Label:
    """A COCO category as a label: a category with ``keypoints`` a skeleton (its edges drawn from ``skeleton``),
    or a points label when its one keypoint bears its own name (how ``to_coco_keypoints`` writes one)."""
    names = [str(name) for name in category.get("keypoints") or ()]
    if not names:
        return Label(name=category["name"], id=label_id)
    if names == [category["name"]] and not category.get("skeleton"):
        return Label(name=category["name"], type="points", id=label_id)
    edges = [(int(a), int(b)) for a, b in category.get("skeleton") or ()]
    return Label(category["name"], "skeleton", id=label_id, sublabels=tuple(Label(n, "points") for n in names),
                 svg=skeleton_svg(names, edges))


def annotation_to_shape(annotation: dict[str, Any], label: str, width: int, height: int, frame: int = 0,
                        source: str = "manual", keypoints: Sequence[str] = ()) -> Shape | None:
    """A COCO annotation (ground truth or result) → a shape: a polygon, a mask (RLE) or a rectangle (bbox); four
    corners with a ``rotation`` attribute (a rotated rectangle as ``to_coco`` writes it) → that rotated rectangle;
    with ``keypoints`` (its category's names) and ``keypoints`` in it, a skeleton — or, for a category of one keypoint
    named as itself, a points shape (None when that point is outside)."""
    segmentation = annotation.get("segmentation")
    attributes = dict(annotation.get("attributes") or {})
    common = {"label": label, "frame": frame, "score": annotation.get("score"), "source": source,
              "occluded": bool(attributes.pop("occluded", False)), "group": int(attributes.pop("group", 0) or 0),
              "track_id": attributes.pop("track_id", None)}
    rotation = attributes.pop("rotation", None)
    attributes.pop("keyframe", None)
    common["attributes"] = {k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in attributes.items()}
    if keypoints and annotation.get("keypoints"):
        triplets = [float(v) for v in annotation["keypoints"]]
        if len(triplets) != 3 * len(keypoints):
            raise ValueError(f"keypoints holds {len(triplets) / 3:g} points, its category {len(keypoints)}")
        elements = [Shape(name, "points", triplets[3 * i:3 * i + 2], frame=frame, source=source,
                          outside=triplets[3 * i + 2] == OUTSIDE, occluded=triplets[3 * i + 2] == OCCLUDED)
                    for i, name in enumerate(keypoints)]
        skeleton = Shape(type="skeleton", points=[], elements=elements, **common)
        return from_skeleton(skeleton, Label(label, "points")) if list(keypoints) == [label] else skeleton
    if isinstance(segmentation, dict):
        bitmap = masks.coco_rle_to_bitmap(segmentation)
        return Shape(type="mask", points=masks.bitmap_to_cvat_rle(bitmap), **common)
    if isinstance(segmentation, list) and segmentation and len(segmentation[0]) >= 6:
        if len(segmentation) == 1 and len(segmentation[0]) == 8 and rotation:  # our export of a rotated rectangle
            points, turned = unrotated_rectangle(segmentation[0], float(rotation))
            return Shape(type="rectangle", points=points, rotation=turned, **common)
        if len(segmentation) == 1:
            return Shape(type="polygon", points=[float(v) for v in segmentation[0]], **common)
        bitmap = masks.polygon_to_bitmap(segmentation, width, height)  # several parts: one mask instance
        return Shape(type="mask", points=masks.bitmap_to_cvat_rle(bitmap), **common)
    x, y, w, h = (float(v) for v in annotation["bbox"])
    return Shape(type="rectangle", points=[x, y, x + w, y + h], **common)


def unrotated_rectangle(corners: Sequence[float], rotation: float) -> tuple[list[float], float]:
    """The four corners of a rectangle turned ``rotation`` degrees (as ``Shape.polygon`` gives them, the way the
    export writes a rotated rectangle) → CVAT's rectangle: the unrotated box about their centre, and the rotation."""
    xy = np.asarray(corners, dtype=float).reshape(4, 2)
    centre = xy.mean(axis=0)
    angle = np.radians(rotation)
    back = (xy - centre) @ np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    low, high = back.min(axis=0) + centre, back.max(axis=0) + centre
    return [round(float(v), 3) for v in (*low, *high)], float(rotation) % 360


def from_coco(dataset: dict[str, Any]) -> tuple[list[Label], list[tuple[FrameAnnotations, str]]]:
    """A COCO instances or keypoints dataset → labels (in category order; ``category_label``) and
    ``(frame, file_name)`` pairs."""
    ordered = sorted(dataset["categories"], key=lambda c: c["id"])
    labels = [category_label(c, i) for i, c in enumerate(ordered, start=1)]
    name_of = {c["id"]: c["name"] for c in ordered}
    keypoints_of = dataset_keypoints(dataset)
    frames: dict[int, FrameAnnotations] = {}
    names: dict[int, str] = {}
    for position, image in enumerate(dataset["images"]):
        frames[image["id"]] = FrameAnnotations(frame=int(image.get("frame", position)), width=int(image["width"]),
                                               height=int(image["height"]), name=image["file_name"])
        names[image["id"]] = image["file_name"]
    for annotation in dataset["annotations"]:
        frame = frames[annotation["image_id"]]
        shape = annotation_to_shape(annotation, name_of[annotation["category_id"]], frame.width, frame.height,
                                    frame.frame, keypoints=keypoints_of.get(annotation["category_id"], ()))
        if shape is not None:
            frame.shapes.append(shape)
    return labels, [(frames[i], names[i]) for i in frames]


def to_results(frames: Iterable[tuple[int, FrameAnnotations]], labels: Sequence[Label]) -> list[dict[str, Any]]:
    """Predictions as a COCO results array (``image_id`` given per frame, ``category_id`` by label order)."""
    category_of = {label.name: i for i, label in enumerate(labels, start=1)}
    results = []
    for image_id, frame in frames:
        for shape in frame.shapes:
            geometry = shape_to_annotation(shape, frame.width, frame.height)
            if geometry is None or shape.label not in category_of:
                continue
            result = {"image_id": image_id, "category_id": category_of[shape.label], "bbox": geometry["bbox"],
                      "score": round(float(shape.score if shape.score is not None else 1.0), 5)}
            if geometry["segmentation"]:
                result["segmentation"] = geometry["segmentation"]
            results.append(result)
    return results


def to_keypoint_results(frames: Iterable[tuple[int, FrameAnnotations]], labels: Sequence[Label]
                        ) -> list[dict[str, Any]]:
    """Predicted skeletons (and one-point points shapes) as COCO keypoint results, for pycocotools' keypoint
    evaluation: ``image_id`` given per frame, ``category_id`` by label order as in ``to_coco_keypoints``."""
    label_of = {label.name: label for label in labels if label.type in KEYPOINT_TYPES}
    category_of = {label.name: i for i, label in enumerate(labels, start=1)}
    results = []
    for image_id, frame in frames:
        for shape in frame.shapes:
            if shape.label not in label_of or shape.type not in KEYPOINT_TYPES or \
                    (shape.type == "points" and len(shape.points) != 2):
                continue
            keypoints = skeleton_to_annotation(as_skeleton(shape), keypoint_names(label_of[shape.label]))
            results.append({"image_id": image_id, "category_id": category_of[shape.label],
                            "keypoints": keypoints["keypoints"], "bbox": keypoints["bbox"],
                            "score": round(float(shape.score if shape.score is not None else 1.0), 5)})
    return results


# ------------------------------------------------------------------------------------- files a person gives

def read_file(path: str | os.PathLike) -> tuple[bytes, Any]:
    """A COCO dataset or results file: its bytes and its JSON; a ``ValueError`` when it is not JSON."""
    raw = Path(path).read_bytes()
    try:
        return raw, json.loads(raw)
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not a JSON file (it is not even text)") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not a JSON file ({error.msg.lower()} at line {error.lineno}, column "
                         f"{error.colno})") from None
    except RecursionError:
        raise ValueError(f"{path} nests its JSON too deep to be a COCO file") from None


def dataset_images(dataset: Any, file: str) -> list[tuple[Any, str]]:
    """A COCO dataset's images as ``(id, file_name)``; a ``ValueError`` when ``dataset`` is no COCO dataset or an
    image lacks either."""
    if not isinstance(dataset, dict) or not isinstance(dataset.get("images"), list):
        raise ValueError(f"{file} is not a COCO dataset (an object with images, annotations and categories)")
    images = []
    for index, image in enumerate(dataset["images"]):
        if not isinstance(image, dict) or not isinstance(image.get("file_name"), str) or "id" not in image:
            raise ValueError(f"{file}: image #{index + 1} needs an id and a file_name")
        images.append((image["id"], image["file_name"]))
    return images


def dataset_categories(dataset: dict[str, Any], file: str) -> dict[Any, str]:
    """A COCO dataset's category id → name."""
    try:
        return {c["id"]: c["name"] for c in dataset.get("categories") or []}
    except (KeyError, TypeError):
        raise ValueError(f"{file}: every category needs an id and a name") from None


def dataset_keypoints(dataset: dict[str, Any]) -> dict[Any, tuple[str, ...]]:
    """A COCO dataset's category id → its keypoint names, for the categories that have some."""
    return {c["id"]: tuple(str(n) for n in c["keypoints"]) for c in dataset.get("categories") or []
            if isinstance(c, dict) and c.get("keypoints")}


def read_shapes(items: Sequence[Any], kind: str, file: str, label_of: Callable[[Any], str],
                images: Mapping[Any, tuple[int, int, int]], source: str = "manual",
                keypoints: Mapping[Any, Sequence[str]] | None = None) -> tuple[dict[int, list[Shape]], list[Any]]:
    """COCO annotations or results (``kind``: ``annotation``, ``result``) of ``file`` → frame → shapes, for the
    items whose ``image_id`` is one of ``images`` (image id → frame, width, height); and the image ids of the items
    left out. ``label_of`` names a category id (or raises a ``ValueError`` that says why not). An item that is not
    COCO is a ``ValueError`` naming it (``file: result #3 ...``)."""
    shapes: dict[int, list[Shape]] = {}
    elsewhere = []
    for index, item in enumerate(items):
        where = f"{file}: {kind} #{index + 1}"
        if not isinstance(item, dict):
            raise ValueError(f"{where} is not a JSON object")
        image_id = item.get("image_id")
        image = images.get(image_id) if isinstance(image_id, Hashable) else None  # a list is no id
        if image is None:
            elsewhere.append(image_id)
            continue
        bbox, segmentation = item.get("bbox"), item.get("segmentation")
        names = (keypoints or {}).get(item.get("category_id"), ()) if isinstance(item.get("category_id"),
                                                                                 Hashable) else ()
        if not segmentation and not names and (not isinstance(bbox, list) or len(bbox) != 4
                                 or not all(isinstance(v, (int, float)) for v in bbox)):
            raise ValueError(f"{where}: bbox must be [x, y, width, height] (4 numbers), not {bbox!r}"[:300])
        frame, width, height = image
        label = label_of(item.get("category_id"))
        try:
            shape = annotation_to_shape(item, label, width, height, frame=frame, source=source, keypoints=names)
        except (KeyError, TypeError, ValueError, IndexError) as error:
            if names and item.get("keypoints"):
                raise ValueError(f"{where}: its keypoints are not [x, y, v] for each of its category's "
                                 f"{len(names)} keypoints ({error})") from None
            raise ValueError(f"{where}: its segmentation is neither polygons nor COCO RLE") from None
        if shape is not None:
            shapes.setdefault(frame, []).append(shape)
    return shapes, elsewhere
