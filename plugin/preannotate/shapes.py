"""The in-memory model every module speaks: labels, shapes and the annotations of one frame.

Geometry stays in CVAT's own encoding (``points`` exactly as the CVAT REST API stores them), so a shape read
from CVAT can be written back unchanged and every conversion lives in one place (``formats``):

* rectangle ``[xtl, ytl, xbr, ybr]`` of the *unrotated* box, plus ``rotation`` in degrees about its centre;
* polygon / polyline / points: flat ``[x1, y1, x2, y2, ...]``;
* ellipse ``[cx, cy, cx + rx, cy - ry]``;
* mask: CVAT's row-major run-length encoding followed by the inclusive box ``left, top, right, bottom``;
* skeleton: no points of its own; ``elements`` holds one ``points`` shape of one point per sublabel (keypoint), its
  label the sublabel's name, ``outside`` where the keypoint is not visible. Its label's ``sublabels`` name the
  keypoints in order and ``svg`` is CVAT's drawing of the skeleton (its edges).

A classifier's prediction is a ``Shape`` of type ``tag`` with no points: a frame-level label, which CVAT stores as a
tag, not a shape (``cvat.encoding``, ``cvat.upload``). What CVAT stores is read into ``FrameAnnotations.tags``.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

# Label types a CVAT label may have, and shape types a CVAT shape may have.
LABEL_TYPES = ("any", "rectangle", "polygon", "polyline", "points", "ellipse", "cuboid", "mask", "skeleton", "tag")
SHAPE_TYPES = ("rectangle", "polygon", "polyline", "points", "ellipse", "cuboid", "mask", "skeleton")
# Shapes a detector can learn from and predict; the others are counted and reported by the readers.
DETECTABLE_TYPES = ("rectangle", "polygon", "mask", "ellipse")
ATTRIBUTE_INPUT_TYPES = ("number", "checkbox", "text", "select", "radio")
TAG = "tag"  # a classifier's prediction: the frame's label, no geometry


@dataclass(frozen=True)
class AttributeSpec:
    """A label attribute as CVAT declares it (``values`` are strings; ``number`` is ``[min, max, step]``)."""

    name: str
    input_type: str = "text"
    values: tuple[str, ...] = ()
    default_value: str | None = None
    mutable: bool = False

    def __post_init__(self) -> None:
        if self.input_type not in ATTRIBUTE_INPUT_TYPES:
            raise ValueError(f"attribute {self.name!r}: input_type {self.input_type!r} is not one of "
                             f"{', '.join(ATTRIBUTE_INPUT_TYPES)}")

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "input_type": self.input_type, "values": list(self.values)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AttributeSpec:
        return cls(name=data["name"], input_type=data.get("input_type", "text"),
                   values=tuple(str(v) for v in data.get("values", ())),
                   default_value=data.get("default_value"), mutable=bool(data.get("mutable", False)))


@dataclass(frozen=True)
class Label:
    """A CVAT label. ``id`` is the model's class index for that label (1-based; 0 is background)."""

    name: str
    type: str = "any"
    attributes: tuple[AttributeSpec, ...] = ()
    id: int | None = None
    sublabels: tuple[Label, ...] = ()  # a skeleton's keypoints (each of type points), in CVAT's order
    svg: str = ""  # a skeleton's drawing as CVAT stores it: its edges (<line data-node-from data-node-to>)

    def __post_init__(self) -> None:
        if not self.name or not self.name.strip():
            raise ValueError("a label needs a non-empty name")
        if self.type not in LABEL_TYPES:
            raise ValueError(f"label {self.name!r}: type {self.type!r} is not one of {', '.join(LABEL_TYPES)}")

    def to_dict(self) -> dict[str, Any]:
        """The label as CVAT's function ``spec`` and our manifests write it."""
        data: dict[str, Any] = {"name": self.name, "type": self.type,
                                "attributes": [a.to_dict() for a in self.attributes]}
        if self.id is not None:
            data = {"id": self.id, **data}
        if self.type == "skeleton":
            data["sublabels"] = [sublabel.to_dict() for sublabel in self.sublabels]
            data["svg"] = self.svg
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Label:
        return cls(name=data["name"], type=data.get("type") or "any",
                   attributes=tuple(AttributeSpec.from_dict(a) for a in data.get("attributes") or ()),
                   id=data.get("id"), sublabels=tuple(cls.from_dict(s) for s in data.get("sublabels") or ()),
                   svg=data.get("svg") or "")


def parse_label_list(text: str, default_type: str = "any") -> list[Label]:
    """``"car,person:polygon"`` → labels numbered 1..N in the order given."""
    labels = []
    for position, item in enumerate((part.strip() for part in text.split(",") if part.strip()), start=1):
        name, _, label_type = item.partition(":")
        labels.append(Label(name=name.strip(), type=label_type.strip() or default_type, id=position))
    names = [label.name for label in labels]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"duplicate label names: {', '.join(duplicates)}")
    if not labels:
        raise ValueError("no labels given")
    return labels


@dataclass
class Shape:
    """One annotated or predicted object on one frame, in CVAT's encoding (see the module docstring)."""

    label: str
    type: str
    points: list[float]
    frame: int = 0
    score: float | None = None
    rotation: float = 0.0
    attributes: dict[str, str] = field(default_factory=dict)
    group: int = 0
    occluded: bool = False
    z_order: int = 0
    source: str = "manual"
    track_id: int | None = None
    outside: bool = False  # a track's keyframe that hides the object from its frame on; a skeleton's hidden keypoint
    elements: list[Shape] = field(default_factory=list)  # a skeleton's keypoints (points shapes of one point each)

    def __post_init__(self) -> None:
        if self.type not in SHAPE_TYPES and self.type != TAG:
            raise ValueError(f"shape type {self.type!r} is not one of {', '.join(SHAPE_TYPES)}")
        if self.type == TAG and self.points:
            raise ValueError("a tag is the frame's label: it has no points")

    def bbox(self) -> tuple[float, float, float, float]:
        """The axis-aligned box ``(x1, y1, x2, y2)`` that holds the shape (rotation included)."""
        if self.type == "mask":
            left, top, right, bottom = self.points[-4:]
            return float(left), float(top), float(right) + 1.0, float(bottom) + 1.0
        if self.type == "ellipse":  # exact: the sampled outline would fall short of a rotated ellipse's box
            cx, cy, right, top = (float(p) for p in self.points[:4])
            rx, ry = abs(right - cx), abs(cy - top)
            cos, sin = math.cos(math.radians(self.rotation)), math.sin(math.radians(self.rotation))
            half_width, half_height = math.hypot(rx * cos, ry * sin), math.hypot(rx * sin, ry * cos)
            return cx - half_width, cy - half_height, cx + half_width, cy + half_height
        if self.type == "skeleton":  # its visible keypoints (all of them when none is visible)
            seen = [e for e in self.elements if not e.outside] or self.elements
            polygon = [float(p) for e in seen for p in e.points[:2]]
        else:
            polygon = self.polygon()
        xs, ys = polygon[0::2], polygon[1::2]
        return min(xs), min(ys), max(xs), max(ys)

    def polygon(self) -> list[float]:
        """The outline as a flat polygon: rotated rectangle corners, the polygon itself, a sampled ellipse (the
        points of any other geometric shape as they are). Not of a mask: its outline is traced from its pixels by
        the mask codecs, a layer up (``formats.masks.cvat_rle_to_polygon``)."""
        if self.type == "rectangle":
            return rectangle_corners(self.points, self.rotation)
        if self.type == "ellipse":
            return ellipse_polygon(self.points, self.rotation)
        if self.type == "mask":
            raise ValueError("a mask's outline is traced from its pixels: formats.masks.cvat_rle_to_polygon")
        return [float(p) for p in self.points]


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``len(a) × len(b)`` intersection over union of two sets of ``x1, y1, x2, y2`` boxes (0 where both are empty):
    the one box IoU, for the edit count, the ranking, the tracks and the tracker."""
    a, b = np.asarray(a, np.float64).reshape(-1, 4), np.asarray(b, np.float64).reshape(-1, 4)
    width = np.clip(np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None)
    height = np.clip(np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]), 0, None)
    inter = width * height
    area_a, area_b = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1]), (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def rectangle_corners(points: list[float], rotation: float = 0.0) -> list[float]:
    """Corners of a CVAT rectangle (clockwise from top-left) rotated by ``rotation`` degrees about its centre."""
    x1, y1, x2, y2 = (float(p) for p in points[:4])
    corners = [(x1, y1), (x2, y1), (x2, y2), (x1, y2)]
    if rotation % 360:
        cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
        cos, sin = math.cos(math.radians(rotation)), math.sin(math.radians(rotation))
        # CVAT rotates clockwise on screen (y points down), which is the usual rotation matrix in image axes.
        corners = [(cx + (x - cx) * cos - (y - cy) * sin, cy + (x - cx) * sin + (y - cy) * cos) for x, y in corners]
    return [c for corner in corners for c in corner]


def ellipse_polygon(points: list[float], rotation: float = 0.0, segments: int = 32) -> list[float]:
    """A CVAT ellipse ``[cx, cy, cx + rx, cy - ry]`` sampled as a polygon."""
    cx, cy, right, top = (float(p) for p in points[:4])
    rx, ry = abs(right - cx), abs(cy - top)
    cos, sin = math.cos(math.radians(rotation)), math.sin(math.radians(rotation))
    out: list[float] = []
    for k in range(segments):
        t = 2 * math.pi * k / segments
        dx, dy = rx * math.cos(t), ry * math.sin(t)
        out += [cx + dx * cos - dy * sin, cy + dx * sin + dy * cos]
    return out


# What a mask model serves a label as (``served_outline``): its masks, or each mask fitted to the label's own shape.
OUTLINES = ("mask", "rectangle", "rotated-rectangle", "ellipse")


def is_turned(shape: Shape) -> bool:
    """A rectangle whose rotation is no multiple of 90° (within half a degree): turned a quarter or a half, a box is
    still upright."""
    return shape.type == "rectangle" and abs((float(shape.rotation) + 45) % 90 - 45) > 0.5


def served_outline(label: Label, shapes: Iterable[Shape]) -> str:
    """What a mask model serves ``label`` as (one of ``OUTLINES``), from its CVAT type and the shapes people made of
    it (``shapes``: any, those of other labels are passed over) — the one rule:

    * an ``ellipse`` label: ``ellipse``;
    * a ``rectangle`` label: ``rotated-rectangle`` when more of its rectangles are turned (``is_turned``) than
      upright, else ``rectangle``;
    * an ``any`` label: what most of its shapes are (ellipse, turned rectangle, upright rectangle, or mask for
      polygons and masks), ``mask`` on a tie or with none;
    * any other label (``polygon``, ``mask``): ``mask``.

    A box model serves every label as upright rectangles, whatever this says (``models.registry``)."""
    kinds = Counter(_outline_kind(shape) for shape in shapes if shape.label == label.name)
    kinds.pop(None, None)
    if label.type == "ellipse":
        return "ellipse"
    if label.type == "rectangle":
        return "rotated-rectangle" if kinds["rotated-rectangle"] > kinds["rectangle"] else "rectangle"
    if label.type == "any" and kinds:
        (first, count), *rest = kinds.most_common(2)
        return first if not rest or rest[0][1] < count else "mask"
    return "mask"


def served_outlines(labels: Iterable[Label], frames: Iterable[FrameAnnotations]) -> dict[str, str]:
    """``served_outline`` of each label over the shapes of ``frames``, for the labels not served as masks (what a
    mask model's manifest records: ``Manifest.outlines``)."""
    shapes = [shape for frame in frames for shape in frame.shapes]
    return {label.name: outline for label in labels if (outline := served_outline(label, shapes)) != "mask"}


def _outline_kind(shape: Shape) -> str | None:
    if shape.type == "ellipse":
        return "ellipse"
    if shape.type == "rectangle":
        return "rotated-rectangle" if is_turned(shape) else "rectangle"
    return "mask" if shape.type in ("polygon", "mask") else None


@dataclass
class Track:
    """One object across frames as CVAT stores it: one label, and keyframes (shapes on their frames, in frame
    order) between which CVAT interpolates; an ``outside`` keyframe hides the object from its frame until the next
    keyframe, and after the last visible keyframe the object stays until the end of its job. ``score`` is how sure
    the model was of it (the mean of its detections' scores); ``attributes`` are the track's own (immutable) ones."""

    label: str
    keyframes: list[Shape]
    score: float | None = None
    attributes: dict[str, str] = field(default_factory=dict)
    source: str = "auto"

    @property
    def frames(self) -> range:
        """From the first keyframe to the last one."""
        return range(self.keyframes[0].frame, self.keyframes[-1].frame + 1) if self.keyframes else range(0)


@dataclass
class FrameAnnotations:
    """Everything known about one frame: its size and name, its shapes (tracks already interpolated) and tags."""

    frame: int
    width: int
    height: int
    name: str = ""
    shapes: list[Shape] = field(default_factory=list)
    tags: list[str] = field(default_factory=list)

    def tags_among(self, names: Collection[str]) -> list[str]:
        """The frame's tags whose label is in ``names``, each once, in the order CVAT stores them."""
        return [tag for tag in dict.fromkeys(self.tags) if tag in names]


@dataclass
class AnnotationSet:
    """Every non-deleted frame of a task or job range — empty frames included, they are the negatives — the
    labels, and how many per-frame shapes of each type a detector cannot learn from (counted by the reader,
    ``preannotate.cvat.annotations``)."""

    frames: dict[int, FrameAnnotations]
    labels: list[Label]
    skipped: Counter[str] = field(default_factory=Counter)
