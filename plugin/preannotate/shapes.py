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
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any
from xml.sax.saxutils import quoteattr

import numpy as np

# Label types a CVAT label may have, and shape types a CVAT shape may have.
LABEL_TYPES = ("any", "rectangle", "polygon", "polyline", "points", "ellipse", "cuboid", "mask", "skeleton", "tag")
SHAPE_TYPES = ("rectangle", "polygon", "polyline", "points", "ellipse", "cuboid", "mask", "skeleton")
# Shapes a detector can learn from and predict; the others are counted and reported by the readers.
DETECTABLE_TYPES = ("rectangle", "polygon", "mask", "ellipse")
ATTRIBUTE_INPUT_TYPES = ("number", "checkbox", "text", "select", "radio")
LEARNED_ATTRIBUTE_TYPES = ("select", "radio", "checkbox")  # what a model learns (models.attributes); number and
# text attributes are left to people
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


# ------------------------------------------------------------------------------------------ skeletons and points
# A model learns keypoints as skeletons. A ``points`` label is learned as a one-point skeleton (its one keypoint named
# as the label): one shape, one point. A points shape with several points cannot be learned: CVAT stores them as one
# shape with no order among its points, so nothing says which point is which (``as_skeleton`` refuses it and says
# so); those are drawn as a skeleton label, or each point as its own shape.

def keypoint_names(label: Label) -> tuple[str, ...]:
    """The keypoints a model learns for ``label``: a skeleton's sublabels in order, a points label's one point."""
    if label.type == "skeleton":
        return tuple(sublabel.name for sublabel in label.sublabels)
    if label.type == "points":
        return (label.name,)
    raise ValueError(f"label {label.name!r} is a {label.type} label: only skeleton and points labels have keypoints")


def as_skeleton(shape: Shape) -> Shape:
    """``shape`` as the skeleton a model learns: a skeleton as it is; a points shape of one point as a skeleton of
    one keypoint named as its label; a ``ValueError`` that says why for a points shape of several points."""
    if shape.type == "skeleton":
        return shape
    if shape.type != "points":
        raise ValueError(f"a {shape.type} has no keypoints")
    if len(shape.points) != 2:
        raise ValueError(f"a points shape of label {shape.label!r} on frame {shape.frame} holds "
                         f"{len(shape.points) // 2} points: a model learns one point per points shape (nothing says "
                         f"which of several points is which); draw each point as its own shape, or use a skeleton "
                         f"label")
    keypoint = Shape(shape.label, "points", list(shape.points), frame=shape.frame, occluded=shape.occluded)
    return Shape(shape.label, "skeleton", [], frame=shape.frame, score=shape.score, attributes=dict(shape.attributes),
                 group=shape.group, z_order=shape.z_order, source=shape.source, elements=[keypoint])


def from_skeleton(shape: Shape, label: Label) -> Shape | None:
    """A predicted skeleton back in ``label``'s type: a skeleton label's as it is; a points label's as the points
    shape of its one keypoint (None when that keypoint is not visible)."""
    if label.type != "points":
        return shape
    seen = [e for e in shape.elements if not e.outside]
    if not seen:
        return None
    return Shape(shape.label, "points", list(seen[0].points[:2]), frame=shape.frame, score=shape.score,
                 attributes=dict(shape.attributes), occluded=seen[0].occluded, source=shape.source)


# How near two skeletons are: COCO's object keypoint similarity (OKS), the IoU of keypoints. One sigma for every
# keypoint, COCO's mean over a person's 17 (0.072: a skeleton COCO does not define has no measured ones), and a
# scale of at least a 32x32 box (COCO's small objects), so that a points label's one point has one.
KEYPOINT_SIGMA = 0.072
MIN_KEYPOINT_AREA = 32.0 * 32.0


def is_keypoint_shape(shape: Shape) -> bool:
    """A skeleton, or a points shape of one point (a skeleton of one keypoint, ``as_skeleton``)."""
    return shape.type == "skeleton" or (shape.type == "points" and len(shape.points) == 2)


def keypoint_similarity(predicted: Sequence[Shape], truth: Sequence[Shape], sigma: float = KEYPOINT_SIGMA
                        ) -> np.ndarray:
    """``len(predicted) × len(truth)`` OKS of keypoint shapes (``is_keypoint_shape``), as COCO computes it: over the
    true keypoints not outside, ``exp(-d² / (2 s² (2 sigma)²))`` averaged, ``s²`` the true box's area (at least
    ``MIN_KEYPOINT_AREA``); keypoints pair by name, a predicted one counts wherever it is (outside or not), one it
    lacks is missed; 0 for a truth with no keypoint in sight."""
    result = np.zeros((len(predicted), len(truth)))
    placed = [{e.label: e.points[:2] for e in as_skeleton(shape).elements} for shape in predicted]
    for j, true_shape in enumerate(truth):
        seen = [e for e in as_skeleton(true_shape).elements if not e.outside]
        if not seen:
            continue
        x1, y1, x2, y2 = true_shape.bbox()
        scale = 2 * max((x2 - x1) * (y2 - y1), MIN_KEYPOINT_AREA) * (2 * sigma) ** 2
        for i, points in enumerate(placed):
            near = [math.exp(-((points[e.label][0] - e.points[0]) ** 2 + (points[e.label][1] - e.points[1]) ** 2)
                             / scale) if e.label in points else 0.0 for e in seen]
            result[i, j] = sum(near) / len(seen)
    return result


def skeleton_edges(label: Label) -> list[tuple[int, int]]:
    """A skeleton label's edges as 1-based positions among its sublabels (COCO's ``skeleton``), from the ``<line
    data-node-from data-node-to>`` of its svg: a node is named by its ``<circle data-node-id data-label-name>``; a
    node without one is taken as the position itself, as CVAT's exports (Datumaro) take it."""
    if not label.svg:
        return []
    try:
        root = ET.fromstring(f"<root>{label.svg}</root>")
    except ET.ParseError:
        raise ValueError(f"skeleton {label.name!r}: its svg is not CVAT's drawing of a skeleton") from None
    position = {sublabel.name: i for i, sublabel in enumerate(label.sublabels, start=1)}
    node_position = {element.get("data-node-id"): position[element.get("data-label-name")] for element in root
                     if element.tag == "circle" and element.get("data-label-name") in position}
    edges = []
    for element in root:
        if element.tag == "line":
            ends = [element.get("data-node-from"), element.get("data-node-to")]
            if None not in ends:
                edges.append(tuple(node_position.get(end) or int(end) for end in ends))
    return edges


def skeleton_svg(names: Sequence[str], edges: Sequence[tuple[int, int]] = ()) -> str:
    """A skeleton's svg as CVAT's editor draws it (nodes on a circle in its 100x100 box, ``edges`` as 1-based
    positions), for a skeleton label made outside CVAT (a COCO file's category)."""
    wrong = [edge for edge in edges if not all(1 <= end <= len(names) for end in edge)]
    if wrong:
        raise ValueError(f"the skeleton edge {tuple(wrong[0])} joins keypoints it does not have (1 to {len(names)})")
    spots = [(50 + 40 * math.cos(2 * math.pi * i / max(len(names), 1)),
              50 + 40 * math.sin(2 * math.pi * i / max(len(names), 1))) for i in range(len(names))]
    lines = [f'<line x1="{spots[a - 1][0]:.2f}" y1="{spots[a - 1][1]:.2f}" x2="{spots[b - 1][0]:.2f}" '
             f'y2="{spots[b - 1][1]:.2f}" data-type="edge" data-node-from="{a}" data-node-to="{b}"></line>'
             for a, b in edges]
    circles = [f'<circle r="0.75" cx="{x:.2f}" cy="{y:.2f}" data-type="element node" data-element-id="{i}" '
               f'data-node-id="{i}" data-label-name={quoteattr(name)}></circle>'
               for i, (name, (x, y)) in enumerate(zip(names, spots, strict=True), start=1)]
    return "\n".join(lines + circles)


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
