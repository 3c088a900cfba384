"""COCO instances (ground truth) and COCO results (predictions), from and to our shapes — in this one module.

Deliberate differences from CVAT's own ``COCO 1.0`` export (what a trainer needs, listed in the README too):

* masks and ellipses are RLE with ``iscrowd: 0`` (CVAT writes ``iscrowd: 1``, which trainers and COCOeval skip);
* a rotated rectangle is written as its rotated polygon with the box that holds it (CVAT writes the unrotated box
  and puts ``rotation`` in the attributes);
* every shape is its own instance: CVAT merges a ``group`` into one annotation under the leader's label, which
  would teach a detector the wrong class; the group id stays in ``attributes.group``;
* ``attributes.track_id`` is CVAT's track id (CVAT renumbers tracks from 0);
* points, polylines and tags are not exported (neither does CVAT); the readers count them.

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
from preannotate.shapes import DETECTABLE_TYPES, FrameAnnotations, Label, Shape


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
        images.append({"id": image_id, "file_name": file_name, "width": frame.width, "height": frame.height,
                       "frame": frame.frame})
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
            if shape.group:
                attributes["group"] = shape.group
            annotation = {"id": len(annotations) + 1, "image_id": image_id, "category_id": category_of[shape.label],
                          **geometry, "attributes": attributes}
            if shape.score is not None:
                annotation["score"] = shape.score
            annotations.append(annotation)
    return {"info": {"description": "exported by cvat-preannotate"}, "licenses": [], "images": images,
            "annotations": annotations, "categories": categories(labels)}


def annotation_to_shape(annotation: dict[str, Any], label: str, width: int, height: int, frame: int = 0,
                        source: str = "manual") -> Shape:
    """A COCO annotation (ground truth or result) → a shape: a polygon, a mask (RLE) or a rectangle (bbox); four
    corners with a ``rotation`` attribute (a rotated rectangle as ``to_coco`` writes it) → that rotated rectangle."""
    segmentation = annotation.get("segmentation")
    attributes = dict(annotation.get("attributes") or {})
    common = {"label": label, "frame": frame, "score": annotation.get("score"), "source": source,
              "occluded": bool(attributes.pop("occluded", False)), "group": int(attributes.pop("group", 0) or 0),
              "track_id": attributes.pop("track_id", None)}
    rotation = attributes.pop("rotation", None)
    attributes.pop("keyframe", None)
    common["attributes"] = {k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in attributes.items()}
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
    """A COCO instances dataset → labels (in category order) and ``(frame, file_name)`` pairs."""
    ordered = sorted(dataset["categories"], key=lambda c: c["id"])
    labels = [Label(name=c["name"], id=i) for i, c in enumerate(ordered, start=1)]
    name_of = {c["id"]: c["name"] for c in ordered}
    frames: dict[int, FrameAnnotations] = {}
    names: dict[int, str] = {}
    for position, image in enumerate(dataset["images"]):
        frames[image["id"]] = FrameAnnotations(frame=int(image.get("frame", position)), width=int(image["width"]),
                                               height=int(image["height"]), name=image["file_name"])
        names[image["id"]] = image["file_name"]
    for annotation in dataset["annotations"]:
        frame = frames[annotation["image_id"]]
        frame.shapes.append(annotation_to_shape(annotation, name_of[annotation["category_id"]], frame.width,
                                                frame.height, frame.frame))
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


def read_shapes(items: Sequence[Any], kind: str, file: str, label_of: Callable[[Any], str],
                images: Mapping[Any, tuple[int, int, int]], source: str = "manual"
                ) -> tuple[dict[int, list[Shape]], list[Any]]:
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
        if not segmentation and (not isinstance(bbox, list) or len(bbox) != 4
                                 or not all(isinstance(v, (int, float)) for v in bbox)):
            raise ValueError(f"{where}: bbox must be [x, y, width, height] (4 numbers), not {bbox!r}"[:300])
        frame, width, height = image
        label = label_of(item.get("category_id"))
        try:
            shape = annotation_to_shape(item, label, width, height, frame=frame, source=source)
        except (KeyError, TypeError, ValueError, IndexError):
            raise ValueError(f"{where}: its segmentation is neither polygons nor COCO RLE") from None
        shapes.setdefault(frame, []).append(shape)
    return shapes, elsewhere
