"""Following shapes with the served detector: CVAT's tracker and reid calls (``serving.tracker``) answered by the
model a team trained, from two cues — motion and appearance.

**Tracker.** On each new frame the detector runs once, keeping detections down to ``WEAK_SHARE`` of its threshold
(where a shape was, a weaker detection is still the object). A followed shape is continued by a detection when

* it has the shape's label (a shape whose label is not known yet takes any, and keeps the first one's);
* motion: its IoU with the shape's last box, moved by the shape's velocity for each frame since, is at least
  ``MIN_IOU``;

and, among such pairs, one detection continues at most one shape: the assignment with the largest total score
(Hungarian), a pair's score being its IoU or, where the model gives an appearance (``Detector.appearance``),
``(1 - APPEARANCE_WEIGHT) * IoU + APPEARANCE_WEIGHT * similarity`` — the cosine similarity of the detection's crop
with the box the person drew. A shape no detection continues is carried over unchanged (``missed`` counts the frames,
so the prediction keeps moving while the object is hidden).

At the start a shape's label is the one it names, else that of the detection on the drawn frame that overlaps it most
(IoU at least ``LABEL_IOU``); its look is the appearance of the drawn box, kept: it never drifts onto another object.

**Reid.** A box of frame 0 matches one of frame 1 of the same label whose centre is at most ``max_distance`` away and
whose distance is at most ``threshold``: the appearance distance (1 - cosine) where the model gives one, else
1 - IoU; one to one, the smallest total distance (Hungarian) — the rule of CVAT's own reid function, on our cues.

Cost: one detection pass a frame, plus one appearance pass over the crops that could match (none for a model
without an appearance layer); reid runs no detection at all.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image
from scipy.optimize import linear_sum_assignment

from preannotate import uncertainty
from preannotate.serving.tracker import Box, Drawn, Followed, ReidRequest, TrackRequest, quantized
from preannotate.shapes import box_iou

MIN_IOU = 0.3            # the motion gate: below it a detection is somewhere else
APPEARANCE_WEIGHT = 0.3  # appearance breaks near ties of motion; it never outweighs a clearly better overlap
WEAK_SHARE = 0.5         # detections down to half the served threshold may continue a shape
LABEL_IOU = 0.5          # a drawn box takes the label of a detection overlapping it at least this much
_NEVER = 1e9             # the cost of a pair the rules exclude


def follow(detector, request: TrackRequest, threshold: float) -> tuple[list[Box], list[Followed]]:
    """The box and the state of each shape of ``request`` on its image, in the request's order."""
    image = request.image
    detections = [shape for shape in detector.detect([image], threshold * WEAK_SHARE)[0] if shape.type != "tag"]
    found = [shape.bbox() for shape in detections]
    answers: dict[int, tuple[Box, Followed]] = {}

    starting = [index for index, shape in enumerate(request.shapes) if isinstance(shape, Drawn)]
    if starting:
        drawn = [request.shapes[index].box for index in starting]
        drawn_looks = looks(detector, image, drawn)
        overlap = iou(drawn, found)
        for row, index in enumerate(starting):
            shape = request.shapes[index]
            label = shape.label
            if label is None and found and overlap[row].max() >= LABEL_IOU:
                label = detections[int(overlap[row].argmax())].label
            look = None if drawn_looks is None else quantized(drawn_looks[row])
            answers[index] = shape.box, Followed(shape.box, label, look=look)

    continuing = [index for index, shape in enumerate(request.shapes) if isinstance(shape, Followed)]
    if continuing:
        states: list[Followed] = [request.shapes[index] for index in continuing]  # type: ignore[misc]
        matches = _continuations(detector, image, states, detections, found)
        for row, (index, state) in enumerate(zip(continuing, states, strict=True)):
            column = matches.get(row)
            if column is None:  # nothing fits: carried over unchanged
                answers[index] = state.box, Followed(state.box, state.label, state.velocity, state.missed + 1,
                                                     state.look)
                continue
            box, frames = found[column], state.missed + 1
            velocity = tuple((new - old) / frames for new, old in zip(box, state.box, strict=True))
            answers[index] = box, Followed(box, state.label or detections[column].label, velocity, 0, state.look)
    ordered = [answers[index] for index in range(len(request.shapes))]
    return [box for box, _ in ordered], [state for _, state in ordered]


def _continuations(detector, image: Image.Image, states: list[Followed], detections, found: list[Box]
                   ) -> dict[int, int]:
    """Which detection (its index) continues which state (its row): the rule of the module docstring."""
    if not found:
        return {}
    motion = iou([predicted(state) for state in states], found)
    same_label = np.array([[state.label is None or state.label == shape.label for shape in detections]
                           for state in states])
    allowed = same_label & (motion >= MIN_IOU)
    score = motion.copy()
    candidates = [int(column) for column in np.flatnonzero(allowed.any(axis=0))]
    if candidates and any(state.look is not None for state in states):
        vectors = looks(detector, image, [found[column] for column in candidates])
        for row, state in enumerate(states):
            if vectors is None or state.look is None or len(state.look) != vectors.shape[1]:
                continue  # no appearance, or one from another model version: motion alone
            similarity = vectors @ uncertainty.normalized(state.look[None].astype(np.float32))[0]
            score[row, candidates] = ((1 - APPEARANCE_WEIGHT) * motion[row, candidates]
                                      + APPEARANCE_WEIGHT * similarity)
    rows, columns = linear_sum_assignment(np.where(allowed, -score, _NEVER))
    return {int(row): int(column) for row, column in zip(rows, columns, strict=True) if allowed[row, column]}


def predicted(state: Followed) -> Box:
    """Where the shape should be now: its last box moved by its velocity for each frame since it was seen."""
    frames = state.missed + 1
    return tuple(value + step * frames for value, step in zip(state.box, state.velocity, strict=True))


def reid(detector, request: ReidRequest) -> list[int]:
    """For each box of frame 0, the index of the box of frame 1 that is the same object, or -1."""
    boxes0, boxes1 = [b.box for b in request.boxes0], [b.box for b in request.boxes1]
    if not boxes0 or not boxes1:
        return [-1] * len(boxes0)
    centres0, centres1 = _centres(boxes0), _centres(boxes1)
    apart = np.linalg.norm(centres0[:, None, :] - centres1[None, :, :], axis=2)
    same_label = np.array([[a.label == b.label for b in request.boxes1] for a in request.boxes0])
    allowed = same_label & (apart <= request.max_distance)
    distance = 1.0 - iou(boxes0, boxes1)
    rows, columns = np.flatnonzero(allowed.any(axis=1)), np.flatnonzero(allowed.any(axis=0))
    if len(rows):
        looks0 = looks(detector, request.image0, [boxes0[row] for row in rows])
        looks1 = looks(detector, request.image1, [boxes1[column] for column in columns])
        if looks0 is not None and looks1 is not None:
            distance[np.ix_(rows, columns)] = 1.0 - looks0 @ looks1.T
    allowed &= distance <= request.threshold
    matches = [-1] * len(boxes0)
    for row, column in zip(*linear_sum_assignment(np.where(allowed, distance, _NEVER)), strict=True):
        if allowed[row, column]:
            matches[int(row)] = int(column)
    return matches


# ----------------------------------------------------------------------------------------------- cues

def iou(boxes: Sequence[Box], others: Sequence[Box]) -> np.ndarray:
    """The IoU of every box with every other."""
    return box_iou(boxes, others)


def looks(detector, image: Image.Image, boxes: Sequence[Box]) -> np.ndarray | None:
    """The unit appearance vector of each box's crop, in one pass; None for a model without an appearance layer."""
    if not boxes:
        return None
    # the early depth only: colours and edges tell two objects apart, and 80-odd values keep a state small
    vectors = detector.appearance([image.crop(_pixels(box, image.size)) for box in boxes], depth="early")
    return None if vectors is None else uncertainty.normalized(vectors)


def _pixels(box: Box, size: tuple[int, int]) -> tuple[int, int, int, int]:
    """The box as a crop of at least one pixel inside the image."""
    width, height = size
    x1 = int(np.clip(np.floor(box[0]), 0, width - 1))
    y1 = int(np.clip(np.floor(box[1]), 0, height - 1))
    return x1, y1, max(x1 + 1, int(np.clip(np.ceil(box[2]), 0, width))), \
        max(y1 + 1, int(np.clip(np.ceil(box[3]), 0, height)))


def _centres(boxes: Sequence[Box]) -> np.ndarray:
    array = np.asarray(boxes, np.float64)
    return np.stack([(array[:, 0] + array[:, 2]) / 2, (array[:, 1] + array[:, 3]) / 2], axis=1)
