"""CVAT's tracker and reid contracts — the JSON such Nuclio functions receive and return — in this one module.

Both are read from CVAT 2.42's lambda manager (``cvat/apps/lambda_manager/views.py``, ``LambdaFunction.invoke`` and
``LambdaJob._call_reid``); ``tests/fixtures/cvat-2.42/lambda/`` holds the request shapes.

**Tracker** (``metadata.annotations.type: tracker``, ``supported_shape_types: rectangle``). CVAT's AI Tools →
Trackers first *starts* the shapes a person marked, on the frame where they were drawn, then *continues* them on each
next frame::

    start:    {"image": "<base64>", "shapes": [{"type": "rectangle", "points": [x1, y1, x2, y2]}, ...], "states": []}
    continue: {"image": "<base64>", "shapes": [null, ...], "states": [<state>, ...]}
    answer:   {"shapes": [{"type": "rectangle", "points": [...]}, ...], "states": [<state>, ...]}   # one per shape

CVAT signs each state before it reaches the browser and checks the signature when it comes back, so a state arrives
as this function made it (or CVAT answers 400 itself), but it travels with every call: it is small JSON. Ours::

    {"v": 1, "label": "car", "box": [x1, y1, x2, y2], "velocity": [dx1, dy1, dx2, dy2], "missed": 0,
     "look": "<base64 of int8 values>"}

``label`` is null until a detection names it; ``look`` (the drawn box's appearance, int8-quantized: one byte a value)
is absent for a model without an appearance layer. CVAT 2.42's UI sends no label with a shape; a caller may add
``"label": "car"`` to one, which must then be a label of the served model.

**Reid** (``type: reid``): CVAT's *Automatic annotation* menu links the boxes already in a task into tracks, one pair
of consecutive frames per call::

    {"image0": "<base64>", "image1": "<base64>", "boxes0": [<CVAT shape>, ...], "boxes1": [<CVAT shape>, ...],
     "threshold": 0.5, "max_distance": 50}      # both only when the user's values are non-zero
    answer: [<index into boxes1, or -1>, ...]    # one per box of boxes0

A CVAT shape here is the task's own: ``{"id", "label_id", "type": "rectangle", "frame", "points", ...}``.
"""

from __future__ import annotations

import base64
import binascii
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from preannotate.serving.contract import ContractError, describe, image_field, json_object
from preannotate.suggest import did_you_mean

STATE_VERSION = 1
TRACKER_EXAMPLE = ('{"image": "<base64 of the frame>", "shapes": [{"type": "rectangle", "points": [x1, y1, x2, y2]}], '
                   '"states": []}')
REID_EXAMPLE = '{"image0": "<base64>", "image1": "<base64>", "boxes0": [...], "boxes1": [...]}'
REID_THRESHOLD = 0.5       # CVAT's UI default, and that of its own reid function: a distance, lower matches better
REID_MAX_DISTANCE = 50.0   # the same: pixels between box centres
MAX_LOOK_VALUES = 4096     # more than any appearance layer gives: a longer look is not one this function made

Box = tuple[float, float, float, float]


@dataclass
class Followed:
    """One shape CVAT asks the tracker to follow: where it was last seen and how it moved (the state)."""

    box: Box
    label: str | None = None
    velocity: Box = (0.0, 0.0, 0.0, 0.0)   # per frame, of each coordinate
    missed: int = 0                         # frames carried over since a detection last continued it
    look: np.ndarray | None = None          # int8, the quantized unit appearance vector of the drawn box

    def to_json(self) -> dict[str, Any]:
        state: dict[str, Any] = {"v": STATE_VERSION, "label": self.label, "box": _rounded(self.box),
                                 "velocity": _rounded(self.velocity), "missed": self.missed}
        if self.look is not None:
            state["look"] = base64.b64encode(self.look.astype(np.int8).tobytes()).decode("ascii")
        return state

    @classmethod
    def from_json(cls, state: Any, where: str) -> Followed:
        again = "mark the shape for tracking again"
        if not isinstance(state, dict):
            raise ContractError(f"{where} must be a state this tracker answered, not {describe(state)}: {again}")
        if state.get("v") != STATE_VERSION:
            raise ContractError(f"{where} was made by another tracker (or another version of this one): {again}")
        label, missed, look = state.get("label"), state.get("missed"), state.get("look")
        if label is not None and not isinstance(label, str):
            raise ContractError(f"{where}: 'label' must be a label name or null, not {describe(label)}")
        if isinstance(missed, bool) or not isinstance(missed, int) or missed < 0:
            raise ContractError(f"{where}: 'missed' must be a whole number of frames, not {describe(missed)}")
        return cls(box=box_of(state.get("box"), f"{where}: 'box'"),
                   label=label, velocity=_numbers(state.get("velocity"), f"{where}: 'velocity'"), missed=missed,
                   look=None if look is None else _look(look, f"{where}: 'look'"))


@dataclass
class Drawn:
    """A shape a person drew, to start following."""

    box: Box
    label: str | None = None


@dataclass
class TrackRequest:
    image: Image.Image
    shapes: list[Drawn | Followed]  # in CVAT's order: what is answered comes back in the same one


@dataclass
class ReidBox:
    box: Box
    label: Any  # CVAT's label_id: only compared


@dataclass
class ReidRequest:
    image0: Image.Image
    image1: Image.Image
    boxes0: list[ReidBox]
    boxes1: list[ReidBox]
    threshold: float = REID_THRESHOLD
    max_distance: float = REID_MAX_DISTANCE


def parse_track_request(body: Any, labels: list[str]) -> TrackRequest:
    """A tracker call, its shapes checked against ``labels`` (the served model's) where a shape names one."""
    data = json_object(body, TRACKER_EXAMPLE)
    shapes, states = data.get("shapes"), data.get("states")
    if shapes is None and states is None:
        raise ContractError(f"request has neither 'shapes' nor 'states': send JSON like {TRACKER_EXAMPLE}")
    for key, value in (("shapes", shapes), ("states", states)):
        if value is not None and not isinstance(value, list):
            raise ContractError(f"'{key}' must be an array, not {describe(value)}")
    shapes, states = shapes or [], states or []
    if states and shapes and len(shapes) != len(states):
        raise ContractError(f"'shapes' has {len(shapes)} items and 'states' {len(states)}: they go in pairs, one per "
                            "followed shape")
    count = max(len(shapes), len(states))
    followed: list[Drawn | Followed] = []
    for index in range(count):
        state = states[index] if index < len(states) else None
        if state is not None:
            followed.append(Followed.from_json(state, f"states[{index}]"))
        else:
            followed.append(_drawn(shapes[index] if index < len(shapes) else None, f"shapes[{index}]", labels))
    return TrackRequest(image=image_field(data), shapes=followed)


def track_response(boxes: list[Box], states: list[Followed]) -> dict[str, Any]:
    return {"shapes": [{"type": "rectangle", "points": _rounded(box)} for box in boxes],
            "states": [state.to_json() for state in states]}


def parse_reid_request(body: Any) -> ReidRequest:
    data = json_object(body, REID_EXAMPLE)
    boxes = {}
    for key in ("boxes0", "boxes1"):
        if key not in data:
            raise ContractError(f"request has no '{key}' (the boxes of one frame)")
        if not isinstance(data[key], list):
            raise ContractError(f"'{key}' must be an array of CVAT shapes, not {describe(data[key])}")
        boxes[key] = [_reid_box(item, f"{key}[{index}]") for index, item in enumerate(data[key])]
    threshold = _positive(data.get("threshold"), "threshold", REID_THRESHOLD)
    if threshold > 1:
        raise ContractError(f"'threshold' must be a distance between 0 and 1, got {describe(data['threshold'])}")
    return ReidRequest(image_field(data, "image0"), image_field(data, "image1"), boxes["boxes0"], boxes["boxes1"],
                       threshold, _positive(data.get("max_distance"), "max_distance", REID_MAX_DISTANCE))


# ----------------------------------------------------------------------------------------------- parts

def box_of(points: Any, where: str) -> Box:
    """``[x1, y1, x2, y2]`` of a CVAT rectangle: four finite numbers, the second corner not before the first."""
    x1, y1, x2, y2 = _numbers(points, where)
    if x2 < x1 or y2 < y1:
        raise ContractError(f"{where} must be [x1, y1, x2, y2] with x1 <= x2 and y1 <= y2")
    return x1, y1, x2, y2


def _numbers(value: Any, where: str) -> Box:
    if (not isinstance(value, list) or len(value) != 4
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)):
        got = f"{len(value)} items" if isinstance(value, list) else describe(value)
        raise ContractError(f"{where} must be four finite numbers [x1, y1, x2, y2], not {got}")
    return tuple(float(v) for v in value)  # type: ignore[return-value]


def _drawn(shape: Any, where: str, labels: list[str]) -> Drawn:
    if not isinstance(shape, dict):
        hint = " (declare supported_shape_types: rectangle)" if isinstance(shape, list) else ""
        raise ContractError(f"{where} must be a shape like {{\"type\": \"rectangle\", \"points\": [x1, y1, x2, y2]}}"
                            f" or have a state, not {describe(shape)}{hint}")
    kind = shape.get("type", "rectangle")
    if kind != "rectangle":
        raise ContractError(f"{where} is of type {kind if isinstance(kind, str) else describe(kind)}: this tracker "
                            "follows rectangles only")
    label = shape.get("label")
    if label is not None and label not in labels:
        name = label if isinstance(label, str) else describe(label)
        raise ContractError(f"{where}: the served model has no label {name!r}"
                            f"{did_you_mean(label, labels) if isinstance(label, str) else ''}; its labels: "
                            f"{', '.join(labels) or 'none'}")
    return Drawn(box_of(shape.get("points"), f"{where} 'points'"), label)


def _reid_box(item: Any, where: str) -> ReidBox:
    if not isinstance(item, dict):
        raise ContractError(f"{where} must be a CVAT shape (an object with 'points' and 'label_id'), not "
                            f"{describe(item)}")
    if item.get("type", "rectangle") != "rectangle":
        raise ContractError(f"{where} is not a rectangle: reid links boxes only")
    label = item.get("label_id", item.get("label"))
    if label is None or isinstance(label, (dict, list)):
        raise ContractError(f"{where} has no 'label_id'")
    return ReidBox(box_of(item.get("points"), f"{where} 'points'"), label)


def _positive(value: Any, key: str, default: float) -> float:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or not math.isfinite(value):
        raise ContractError(f"'{key}' must be a positive number, got {describe(value)}")
    return float(value)


def _look(text: Any, where: str) -> np.ndarray:
    try:
        raw = base64.b64decode(text, validate=True) if isinstance(text, str) else b""
    except (binascii.Error, ValueError):
        raw = b""
    if not raw or len(raw) > MAX_LOOK_VALUES:
        raise ContractError(f"{where} is not an appearance this tracker made: mark the shape for tracking again")
    return np.frombuffer(raw, dtype=np.int8).copy()


def _rounded(values) -> list[float]:
    return [round(float(v), 2) for v in values]


def quantized(vector: np.ndarray) -> np.ndarray:
    """A unit appearance vector as int8 (one byte a value; cosine similarity barely moves: 1/127 per value)."""
    return np.clip(np.round(np.asarray(vector, np.float32) * 127), -127, 127).astype(np.int8)
