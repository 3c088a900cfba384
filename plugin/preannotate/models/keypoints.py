"""What a keypoint model's numbers mean, from a project's labels alone (no framework): which keypoint channel is which
label's which keypoint, the box an object of keypoints is detected by, a skeleton's edges, and how OKS is scored.

* **One channel range per label.** Keypoint R-CNN has one keypoint head for every class; each skeleton label gets
  its own consecutive channels (as many as its sublabels, in their order) and a ``points`` label one channel (a
  one-point skeleton). An object of a label is taught only its own channels (the others have COCO visibility 0:
  not learned) and read only from them. Channels are cheap (one 56×56 heatmap each); sharing them between labels
  (padding to the longest skeleton) would make a dog's knee and a forklift's corner one output.
* **Visibility.** CVAT's ``outside`` keypoint is COCO's visibility 0 (not learned, not scored); any other is 2.
  Keypoint R-CNN learns where a keypoint is, not whether it is seen: a served keypoint is marked ``outside`` when
  its heatmap is not sure where it is (``VISIBLE_CONFIDENCE``), which is what a hidden joint looks like to it.
* **A points shape of several points** is several one-point objects (CVAT's points shape is a set); each
  prediction comes back as a points shape of one point.
* **OKS** (the keypoint AP) scales distances by the object's box area, and a lone point's by ``POINT_SCALE``.
* **The box** of an object is its visible keypoints' box grown by ``BOX_MARGIN`` of its size on each side and to at
  least ``MIN_BOX`` of the frame's shorter side (a single point has no extent; Keypoint R-CNN learns only keypoints
  inside the box, and one on its very edge is lost to rounding).
"""

from __future__ import annotations

import math
import re
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass

from preannotate.shapes import Label, Shape

KEYPOINT_TYPES = ("skeleton", "points")
BOX_MARGIN = 0.1
MIN_BOX = 0.08
# OKS sigma of every keypoint. COCO defines sigmas for a person's 17 (0.025 for eyes to 0.107 for hips, mean 0.072)
# measured against the *segmentation* area; a skeleton of a project has no such study and we score against the
# padded keypoint box, about 1.5-2x a person's segmentation area: 0.072 / sqrt(1.7) ~ 0.055, rounded to a uniform 0.05
# (a keypoint 5 % of the object's size off scores OKS 0.61 on its own).
OKS_SIGMA = 0.05
# The scale OKS judges a lone point by (a points label's object has no size of its own): as if it belonged to an
# object a quarter of the frame's shorter side across, so a point 2 % of that side off scores OKS 0.73, 4 % off 0.28.
POINT_SCALE = 0.25
# A keypoint is served visible when its heatmap gives its most likely cell at least this probability (softmax over
# the 56x56 cells the loss is a cross-entropy over); bench/keypoints.py measures how often that agrees with people.
VISIBLE_CONFIDENCE = 0.1


def keypoint_names(label: Label) -> list[str]:
    """A keypoint label's keypoints, in order: a skeleton's sublabels; a points label is its own one keypoint."""
    if label.type == "points":
        return [label.name]
    if label.type == "skeleton":
        if not label.sublabels:
            raise ValueError(f"skeleton label {label.name!r} has no sublabels: a keypoint model needs its keypoints")
        return [sublabel.name for sublabel in label.sublabels]
    return []


@dataclass(frozen=True)
class KeypointLayout:
    """Each keypoint label's ``(first channel, count)`` in the model's keypoint head (see the module docstring)."""

    slots: dict[str, tuple[int, int]]
    total: int

    @classmethod
    def of(cls, labels: Sequence[Label]) -> KeypointLayout:
        slots, total = {}, 0
        for label in sorted(labels, key=lambda label: (label.id is None, label.id or 0)):
            count = len(keypoint_names(label))
            if count:
                slots[label.name] = (total, count)
                total += count
        return cls(slots, total)

    def channels(self, label: str) -> range:
        first, count = self.slots.get(label, (0, 0))
        return range(first, first + count)


def object_keypoints(shape: Shape, label: Label) -> list[list[tuple[float, float, bool]]]:
    """The objects a shape is to a keypoint model, each its keypoints ``(x, y, visible)`` in the label's order: a
    skeleton is one (a keypoint it lacks is invisible), a points shape one per point. Empty for other shapes."""
    if label.type == "skeleton" and shape.type == "skeleton":
        by_name = {element.label: element for element in shape.elements if len(element.points) >= 2}
        found = []
        for name in keypoint_names(label):
            element = by_name.get(name)
            found.append((float(element.points[0]), float(element.points[1]), not element.outside)
                         if element is not None else (0.0, 0.0, False))
        return [found]
    if label.type == "points" and shape.type == "points":
        return [[(float(x), float(y), not shape.outside)] for x, y in zip(shape.points[0::2], shape.points[1::2],
                                                                            strict=False)]
    return []


def object_box(keypoints: Sequence[tuple[float, float, bool]], width: int, height: int
               ) -> tuple[float, float, float, float] | None:
    """The box an object of ``keypoints`` is detected by (module docstring), inside the frame; None when none of
    them is visible (nothing to learn from or score against)."""
    seen = [(x, y) for x, y, visible in keypoints if visible]
    if not seen:
        return None
    xs, ys = [x for x, _ in seen], [y for _, y in seen]
    side = MIN_BOX * min(width, height)
    boxes = []
    for low, high, limit in ((min(xs), max(xs), width), (min(ys), max(ys), height)):
        margin = max(BOX_MARGIN * (high - low), (side - (high - low)) / 2)
        boxes.append((max(0.0, low - margin), min(float(limit), high + margin)))
    (x1, x2), (y1, y2) = boxes
    return x1, y1, x2, y2


POINT_REACH = 12.0  # pixels each side of a point: the extent a point is matched by (below)


def review_box(shape: Shape) -> tuple[float, float, float, float]:
    """The box a skeleton or points shape is matched by when review edits are counted (box IoU, ``training.edits``):
    its visible keypoints' box grown by ``BOX_MARGIN`` and by ``POINT_REACH`` on each side, so that a single point
    has an extent: a point served within about 3 px is right (IoU 0.75), up to 8 px off it is moved (IoU 0.5), and
    farther off it is another point (the 24 px square is about a fingertip on a 1080p frame)."""
    seen = [e.points[:2] for e in shape.elements if not e.outside] or [e.points[:2] for e in shape.elements] \
        if shape.type == "skeleton" else [shape.points[i:i + 2] for i in range(0, len(shape.points) - 1, 2)]
    xs, ys = [float(p[0]) for p in seen], [float(p[1]) for p in seen]
    grow_x = BOX_MARGIN * (max(xs) - min(xs)) + POINT_REACH
    grow_y = BOX_MARGIN * (max(ys) - min(ys)) + POINT_REACH
    return min(xs) - grow_x, min(ys) - grow_y, max(xs) + grow_x, max(ys) + grow_y


def oks_area(box: Sequence[float], keypoints: int, width: int, height: int) -> float:
    """The area OKS scales an object's keypoint distances by: its box's (``object_box``), or for a lone point (a
    points label) that of a square ``POINT_SCALE`` of the frame's shorter side across."""
    if keypoints == 1:
        return (POINT_SCALE * min(width, height)) ** 2
    x1, y1, x2, y2 = box
    return (x2 - x1) * (y2 - y1)


def skeleton_edges(label: Label) -> list[tuple[int, int]]:
    """A skeleton label's edges as pairs of keypoint indices (0-based, in ``sublabels`` order), read from its CVAT
    ``svg``: ``<line data-node-from data-node-to>`` between nodes, a node being the ``<circle>`` naming its sublabel
    (``data-label-name``) or, without one, the sublabel of its number (CVAT numbers nodes from 1 in order)."""
    if label.type != "skeleton" or not label.svg:
        return []
    names = keypoint_names(label)
    svg = re.sub(r"^\s*<svg[^>]*>|</svg>\s*$", "", label.svg.strip())
    try:
        root = ET.fromstring(f"<root>{svg}</root>")
    except ET.ParseError:
        return []
    index_of_node = {}
    for circle in root.iter("circle"):
        node, name = circle.get("data-node-id"), circle.get("data-label-name")
        if node and node.isdigit() and name in names:
            index_of_node[int(node)] = names.index(name)
    edges = []
    for line in root.iter("line"):
        ends = [line.get("data-node-from", ""), line.get("data-node-to", "")]
        if all(end.isdigit() for end in ends):
            a, b = (index_of_node.get(int(end), int(end) - 1) for end in ends)
            if 0 <= a < len(names) and 0 <= b < len(names) and a != b:
                edges.append((a, b))
    return edges


def skeleton_svg(names: Sequence[str], edges: Sequence[tuple[int, int]],
                 positions: Sequence[tuple[float, float]] | None = None) -> str:
    """A skeleton's drawing as CVAT's skeleton editor stores it: a ``<line>`` per edge (0-based indices into
    ``names``) between ``<circle>`` nodes numbered from 1, each naming its sublabel; ``positions`` on CVAT's 100×100
    canvas (default: on a circle)."""
    if positions is None:
        turns = [2 * math.pi * i / len(names) for i in range(len(names))]
        positions = [(50 + 40 * math.cos(turn), 50 + 40 * math.sin(turn)) for turn in turns]
    at = [(round(x, 3), round(y, 3)) for x, y in positions]
    lines = [f'<line x1="{at[a][0]}" y1="{at[a][1]}" x2="{at[b][0]}" y2="{at[b][1]}" data-type="edge" '
             f'data-node-from="{a + 1}" data-node-to="{b + 1}"></line>' for a, b in edges]
    circles = [f'<circle r="0.75" cx="{x}" cy="{y}" data-type="element node" data-element-id="{i}" '
               f'data-node-id="{i}" data-label-name="{name}"></circle>'
               for i, (name, (x, y)) in enumerate(zip(names, at, strict=True), start=1)]
    return "".join(lines + circles)


def skeleton_label(name: str, keypoints: Sequence[str], edges: Sequence[tuple[int, int]], label_id: int | None = None,
                   positions: Sequence[tuple[float, float]] | None = None) -> Label:
    """A CVAT skeleton label: ``keypoints`` its sublabels (points labels), ``edges`` 0-based pairs of them."""
    return Label(name, "skeleton", id=label_id, sublabels=tuple(Label(k, "points") for k in keypoints),
                 svg=skeleton_svg(keypoints, edges, positions))
