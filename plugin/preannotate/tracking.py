"""Detections of consecutive frames → CVAT tracks: linked across frames, one label each, ``outside`` where the
object leaves or is lost, and keyframes only where CVAT's own interpolation would miss the detections.

* **One box per object** (``distinct``): before linking, a box that overlaps a stronger one of the same frame by
  IoU ≥ ``DUPLICATE_IOU`` (whatever its label) is left out. A detector's own suppression is per label and looser
  (SSDlite's 0.55), and a second box on one object starts a second track that takes the object over frame by frame
  (on bench/tracking.py's clips this halved the merges and false stretches; 0.45, not the 0.3 that measured best
  there, so that people side by side in a crowd keep their boxes). A team whose scenes are sparse can lower the
  model's own ``nms-iou-threshold``.
* **Linking** (``follow``): a ``Linker`` gives each frame's detections track ids, frame after frame. Ours is
  supervision's ByteTrack (``ByteTrackLinker``): maintained, numpy only, and it keeps a lost object for
  ``lost_frames`` frames so that one hidden for a moment comes back under its id. It links boxes: a mask or a polygon
  is linked by its box and keeps its own geometry. Any other tracker fits behind the protocol.
* **One label per track** (``tracks_from``): the label whose detections' scores add up highest (a score-weighted
  vote), so a car seen as a truck on a few blurred frames stays a car; the track keeps the geometry of every one of
  its detections. A track keeps the shape type most of its detections have (CVAT interpolates one type).
* **outside**: a keyframe on the first frame a track is not detected on after being seen (the object left, or the
  tracker lost it) hides it until it is detected again. A track still seen on the last frame stays to the end of
  the task unless ``close_at`` names the frame to hide it on (a job's tracks end on the next job's first frame:
  CVAT would give every later job a piece of a track left open).
* **Smoothing** (``smoothed``): a detector's box jitters from frame to frame around an object that moves smoothly;
  within each visible run the boxes (rectangles and ellipses) are smoothed by a Savitzky–Golay filter
  (``SMOOTH_FRAMES`` frames, quadratic: a steady or accelerating motion is kept exactly, the jitter averaged out —
  the offline smoothing StrongSORT's GSI does with a Gaussian process), which lands nearer the object and needs fewer
  keyframes. Polygons and masks keep their detected geometry (their vertices do not correspond frame to frame).
* **Keyframes** (``keyframes``): the first frame of every visible run and its end (the outside keyframe, placed
  where the motion would carry the object, or the run's last frame), then, Ramer–Douglas–Peucker style, the frame
  where CVAT's interpolation between the keyframes chosen so far overlaps the detection least, as long as that
  overlap is below ``min_iou`` (``KEYFRAME_IOU``, 0.85: the IoU of the interpolated shape and the detection; boxes
  exactly, rotated boxes, ellipses, polygons and masks by their pixels). The interpolation is CVAT's own
  (``cvat.annotations.interpolate``), so an object moving linearly needs two keyframes however long it is seen.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Protocol

import numpy as np

from preannotate.cvat.annotations import interpolate
from preannotate.formats import masks
from preannotate.shapes import TAG, Shape, Track, box_iou

KEYFRAME_IOU = 0.85  # between keyframes, CVAT's interpolation overlaps every detection at least this much
PER_FRAME_TYPES = ("skeleton", "points")  # arrive as per-frame shapes, not tracks (see ``linked``)
DUPLICATE_IOU = 0.45  # a box overlapping a stronger one this much is the same object (see the module doc)
SMOOTH_FRAMES = 7  # the window a track's boxes are smoothed over (bench/tracking.py measured 5 to 15)


class Linker(Protocol):
    """Gives one frame's detections their track ids, frame after frame (a new linker for each video or job)."""

    def assign(self, boxes: np.ndarray, scores: np.ndarray) -> np.ndarray:
        """Track ids (> 0; 0: in no track) of the detections ``boxes`` (N×4 ``x1, y1, x2, y2``) scoring ``scores``."""


class ByteTrackLinker:
    """supervision's ByteTrack. Every detection handed to it may start a track (they already passed the model's
    threshold: ByteTrack starts tracks only 0.1 above its activation threshold, so that is set 0.1 below
    ``threshold``); a track not detected for ``lost_frames`` frames (at ``frame_rate``) is given up."""

    def __init__(self, threshold: float = 0.0, lost_frames: int = 30, frame_rate: float = 30.0):
        import supervision as sv

        with warnings.catch_warnings():
            # supervision 0.28+ deprecates its ByteTrack for the `trackers` package, which needs the GUI build of
            # OpenCV (ours is headless); pyproject pins supervision below 0.31, which removed it.
            warnings.filterwarnings("ignore", message=".*ByteTrack.*", category=FutureWarning)
            self.tracker = sv.ByteTrack(track_activation_threshold=max(0.0, threshold - 0.1),
                                        lost_track_buffer=lost_frames, frame_rate=frame_rate)
        self._detections = sv.Detections

    def assign(self, boxes: np.ndarray, scores: np.ndarray) -> np.ndarray:
        ids = np.zeros(len(boxes), dtype=int)
        detections = self._detections(xyxy=np.asarray(boxes, dtype=float).reshape(-1, 4),
                                      confidence=np.asarray(scores, dtype=float),
                                      data={"index": np.arange(len(boxes))})
        tracked = self.tracker.update_with_detections(detections)
        if len(tracked):
            ids[tracked.data["index"]] = tracked.tracker_id
        return ids


def linked(shape: Shape) -> bool:
    """Whether ``shape`` is linked into a track on a video task: not a tag (no object), nor a skeleton or a point
    (CVAT tracks a skeleton as one track per keypoint, which is not built here: they arrive frame by frame)."""
    return shape.type != TAG and shape.type not in PER_FRAME_TYPES


def link(detections: Mapping[int, Sequence[Shape]], frames: Sequence[int] | None = None, *,
         linker: Linker | None = None, close_at: int | None = None, min_iou: float = KEYFRAME_IOU,
         smooth: int = SMOOTH_FRAMES, overlap: float = DUPLICATE_IOU) -> list[Track]:
    """Detections (frame → shapes, as a detector gives them) → tracks with keyframes: ``follow`` then
    ``tracks_from``. ``frames``: the frames they cover, in order (default: the keys; a frame listed without
    detections hides every track there). Tags are no objects and are left out."""
    frames = sorted(detections) if frames is None else list(frames)
    return tracks_from(follow({f: detections.get(f, ()) for f in frames}, linker, overlap=overlap), frames,
                       close_at=close_at, min_iou=min_iou, smooth=smooth)


def follow(detections: Mapping[int, Sequence[Shape]], linker: Linker | None = None, *,
           overlap: float = DUPLICATE_IOU) -> dict[int, list[Shape]]:
    """Each frame's ``distinct`` detections (in frame order; ``overlap`` > 1: all of them) that ``linker`` (default a
    new ``ByteTrackLinker``) put in a track: copies with ``track_id`` set, every frame of ``detections`` present.
    What a tracking benchmark scores."""
    linker = linker or ByteTrackLinker()
    followed: dict[int, list[Shape]] = {}
    for frame in sorted(detections):
        objects = distinct([shape for shape in detections[frame] if linked(shape)], overlap)
        boxes = np.array([shape.bbox() for shape in objects], dtype=float).reshape(-1, 4)
        scores = np.array([1.0 if shape.score is None else shape.score for shape in objects], dtype=float)
        ids = linker.assign(boxes, scores) if objects else np.zeros(0, dtype=int)
        followed[frame] = [dataclasses.replace(shape, frame=frame, track_id=int(track_id))
                           for shape, track_id in zip(objects, ids, strict=True) if track_id > 0]
    return followed


def distinct(shapes: Sequence[Shape], overlap: float = DUPLICATE_IOU) -> list[Shape]:
    """One frame's shapes less those overlapping a stronger one (any label) by box IoU ≥ ``overlap``, strongest
    first (a shape without a score counts 1)."""
    order = sorted(range(len(shapes)), key=lambda k: -(1.0 if shapes[k].score is None else shapes[k].score))
    overlaps = box_iou([shapes[k].bbox() for k in order], [shapes[k].bbox() for k in order])
    kept: list[int] = []
    for position in range(len(order)):
        if all(overlaps[position, other] < overlap for other in kept):
            kept.append(position)
    return [shapes[order[position]] for position in kept]


def tracks_from(followed: Mapping[int, Sequence[Shape]], frames: Sequence[int] | None = None, *,
                close_at: int | None = None, min_iou: float = KEYFRAME_IOU, smooth: int = SMOOTH_FRAMES
                ) -> list[Track]:
    """Shapes with their ``track_id`` (``follow``) → one ``Track`` per id, in the order they appear: its label by
    score-weighted vote, its attributes too (``vote_attributes``: CVAT keeps a label's immutable attributes on the
    track; each keyframe keeps its own, for the mutable ones), its runs smoothed over ``smooth`` frames (1: as
    detected), an outside keyframe where it stops being seen, keyframes where CVAT's interpolation would miss (see the
    module doc). ``frames``: the frames covered, in order (default: the keys of ``followed``)."""
    frames = sorted(followed) if frames is None else list(frames)
    seen: dict[int, dict[int, Shape]] = defaultdict(dict)
    for frame in frames:
        for shape in followed.get(frame, ()):
            seen[shape.track_id][frame] = shape
    tracks = []
    for by_frame in seen.values():
        kind = Counter(shape.type for shape in by_frame.values()).most_common(1)[0][0]
        by_frame = {frame: shape for frame, shape in by_frame.items() if shape.type == kind}
        label = vote(by_frame.values())
        chosen: list[Shape] = []
        for run, after in _runs(frames, by_frame):
            chosen += keyframes(smoothed(run, smooth), outside_at=after if after is not None else close_at,
                                min_iou=min_iou)
        scores = [shape.score for shape in by_frame.values() if shape.score is not None]
        tracks.append(Track(label, [dataclasses.replace(k, label=label, track_id=None,
                                                        attributes=dict(k.attributes) if k.label == label else {})
                                    for k in chosen],
                            score=sum(scores) / len(scores) if scores else None,
                            attributes=vote_attributes([s for s in by_frame.values() if s.label == label])))
    return tracks


def vote_attributes(shapes: Sequence[Shape]) -> dict[str, str]:
    """Each attribute's value whose shapes' scores add up to more than half of all the shapes' (a shape without a
    score counts 1): what most of a track says; an attribute no value has a majority for is left unset."""
    total = sum(1.0 if shape.score is None else shape.score for shape in shapes)
    weights: dict[tuple[str, str], float] = {}
    for shape in shapes:
        for name, value in shape.attributes.items():
            weights[name, value] = weights.get((name, value), 0.0) + (1.0 if shape.score is None else shape.score)
    return {name: value for (name, value), weight in weights.items() if weight > total / 2}


def vote(shapes: Iterable[Shape]) -> str:
    """The label whose shapes' scores add up highest (a shape without a score counts 1); ties: the first seen."""
    weights: dict[str, float] = {}
    for shape in shapes:
        weights[shape.label] = weights.get(shape.label, 0.0) + (1.0 if shape.score is None else shape.score)
    return max(weights, key=weights.__getitem__)


def smoothed(run: Sequence[Shape], window: int = SMOOTH_FRAMES) -> list[Shape]:
    """One visible run (shapes on consecutive frames) with its rectangles' and ellipses' points smoothed over
    ``window`` frames (see the module doc); shorter runs, other types and ``window`` < 4 as they are."""
    from scipy.signal import savgol_filter

    window = min(window, len(run) - (len(run) + 1) % 2)  # odd, at most the run
    if window < 4 or any(shape.type not in ("rectangle", "ellipse") for shape in run):
        return list(run)
    points = savgol_filter(np.array([shape.points[:4] for shape in run], dtype=float), window, 2, axis=0,
                           mode="interp")
    # to a hundredth of a pixel: a steady motion stays on the pixel grid the detections were on
    return [dataclasses.replace(shape, points=[round(float(v), 2) for v in row])
            for shape, row in zip(run, points, strict=True)]


def keyframes(run: Sequence[Shape], *, outside_at: int | None = None, min_iou: float = KEYFRAME_IOU) -> list[Shape]:
    """The keyframes of one visible run (the object's shapes on consecutive frames, in order) and, with
    ``outside_at``, the outside keyframe that ends it there: see the module doc."""
    samples = list(run)
    if outside_at is not None:
        samples.append(_beyond(samples, outside_at))
    chosen = {0, len(samples) - 1}
    spans = [(0, len(samples) - 1)]
    while spans:
        first, last = spans.pop()
        left, right = _stored(samples[first]), _stored(samples[last])
        worst, least = None, min_iou
        for k in range(first + 1, last):
            points, rotation = interpolate(left, right, samples[k].frame)
            overlap = iou(samples[k], dataclasses.replace(samples[k], points=points, rotation=rotation))
            if overlap < least:
                worst, least = k, overlap
        if worst is not None:
            chosen.add(worst)
            spans += [(first, worst), (worst, last)]
    return [samples[k] for k in sorted(chosen)]


def _runs(frames: Sequence[int], seen: Mapping[int, Shape]) -> Iterable[tuple[list[Shape], int | None]]:
    """The track's visible runs over ``frames``, each with the frame after it (None: it lasts to the end)."""
    run: list[Shape] = []
    for frame in frames:
        if frame in seen:
            run.append(seen[frame])
        elif run:
            yield run, frame
            run = []
    if run:
        yield run, None


def _beyond(run: Sequence[Shape], frame: int) -> Shape:
    """The outside keyframe ending ``run`` on ``frame``: where the run's last motion carries the object (so the run's
    last frame need not be a keyframe), or its last shape where that cannot be said."""
    last = run[-1]
    points = last.points
    if len(run) > 1 and last.type in ("rectangle", "ellipse", "polygon") and len(run[-2].points) == len(points):
        before = run[-2]
        step = (frame - last.frame) / (last.frame - before.frame)
        carried = [b + (b - a) * step for a, b in zip(before.points, last.points, strict=True)]
        if last.type != "rectangle" or (carried[2] > carried[0] and carried[3] > carried[1]):
            points = carried
    return dataclasses.replace(last, frame=frame, points=[float(p) for p in points], outside=True)


def _stored(shape: Shape) -> dict:
    """A keyframe as CVAT's interpolation reads it."""
    return {"frame": shape.frame, "type": shape.type, "points": shape.points, "rotation": shape.rotation,
            "outside": shape.outside}


def iou(a: Shape, b: Shape) -> float:
    """Intersection over union of two keyframes: ``formats.masks.shape_iou`` (boxes exactly, anything else by its
    pixels); 0 for shapes of different types (CVAT interpolates one type)."""
    return masks.shape_iou(a, b) if a.type == b.type else 0.0


__all__ = ["DUPLICATE_IOU", "KEYFRAME_IOU", "PER_FRAME_TYPES", "SMOOTH_FRAMES", "ByteTrackLinker", "Linker", "distinct",
           "follow", "iou", "keyframes", "link", "linked", "smoothed", "tracks_from", "vote"]
