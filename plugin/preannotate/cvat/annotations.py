"""CVAT's annotation JSON → the annotations of every frame, with tracks interpolated as CVAT interpolates them.

Pure functions, no network. Inputs are what ``GET /api/tasks/ID/annotations`` (or ``/api/jobs/ID/annotations``),
``GET /api/labels?task_id=ID`` and ``GET /api/tasks/ID/data/meta`` return, as plain JSON or as cvat-sdk models.
Geometry stays in CVAT's encoding (see ``preannotate.shapes``); the data meta is read by ``meta.frame_meta``.

A track stores only its keyframes; the other frames are derived the way CVAT's exports (server
``TrackManager.get_interpolated_shapes``) and its editor (cvat-core ``interpolatePosition``) derive them:

* rectangles, ellipses and cuboids move linearly; rotation turns the short way round (350° → 10° passes 0°;
  an exact half turn goes +180°, as in the editor);
* polygons and polylines pair vertices by their relative position along the outline, so keyframes may have
  different vertex counts (keyframes drawn alike with equal counts simply move vertex by vertex);
* points move only when both keyframes hold a single point; masks repeat the previous keyframe; a skeleton's
  keypoints are tracks of their own (its ``elements``), each a one-point track;
* an ``outside`` keyframe hides the object until the next keyframe that is not outside; after the last keyframe
  a visible object stays until the end of the range; keyframes on deleted frames are ignored (cvat#8834, #9059);
* mutable attributes come from the latest keyframe at or before the frame, immutable ones from the track.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from preannotate.cvat import encoding
from preannotate.cvat.meta import FrameMeta, frame_meta
from preannotate.cvat.review import CONFIDENCE_LABEL
from preannotate.shapes import DETECTABLE_TYPES, AnnotationSet, FrameAnnotations, Label, Shape


def read_labels(label_dicts: Iterable[Any] | Mapping[str, Any]) -> list[Label]:
    """``/api/labels`` results (the list, or the whole page) → labels numbered 1..N in CVAT's order: ``Label.id``
    is the model's class index (and the COCO category id), not CVAT's label id, which differs per task and
    server. Left out, as no class a model learns: our confidence tags' label (``review.CONFIDENCE_LABEL``, wherever
    it stands), and skeleton parts listed on their own (``parent_id``; CVAT 2.42 nests them in their skeleton's
    ``sublabels`` instead). A skeleton keeps its sublabels (without CVAT's ids) and its svg, whose nodes CVAT stores
    by sublabel id (``data-label-id``): they are named (``data-label-name``), as CVAT's exports and functions' specs
    name them. ``attribute_names`` maps CVAT's attribute ids to names."""
    labels = [Label.from_dict(item) for item in _label_dicts(label_dicts)
              if item.get("parent_id") is None and item["name"] != CONFIDENCE_LABEL]
    named_svg = {item["name"]: _named_svg(item) for item in _label_dicts(label_dicts) if item.get("sublabels")}
    return [Label(label.name, label.type, label.attributes, position,
                  tuple(Label(sub.name, sub.type, sub.attributes) for sub in label.sublabels),
                  named_svg.get(label.name, label.svg))
            for position, label in enumerate(labels, 1)]


def _named_svg(item: Mapping[str, Any]) -> str:
    """A skeleton's svg with its nodes named by sublabel (CVAT's exports do the same replacement)."""
    svg = item.get("svg") or ""
    for sublabel in item.get("sublabels") or ():
        svg = svg.replace(f'data-label-id="{sublabel["id"]}"', f'data-label-name="{sublabel["name"]}"')
    return svg


def attribute_names(label_dicts: Iterable[Any] | Mapping[str, Any]) -> dict[int, str]:
    """CVAT attribute id (the ``spec_id`` of annotation attributes) → attribute name. Ids are global in CVAT."""
    return {spec["id"]: spec["name"] for item in _label_dicts(label_dicts) for spec in item.get("attributes") or ()}


def frames_from_annotations(annotations: Any, labels: Iterable[Any] | Mapping[str, Any], meta: Any,
                            frame_range: range | None = None) -> AnnotationSet:
    """Turn CVAT's ``{version, tags, shapes, tracks}`` into the shapes and tags of every frame of ``frame_range``.

    Frame numbers are task-relative, as in the annotations. ``frame_range`` defaults to every frame of ``meta``;
    a job's annotations need the job's range (``range(job.start_frame, job.stop_frame + 1)``), since a track piece
    cut at the job's end would otherwise run on past it. ``meta`` may be the task's ``/data/meta`` or, with the
    job's range, the job's own. Frames in ``deleted_frames`` are left out.

    Shapes a detector cannot learn from (points, polylines, cuboids, skeletons) are counted per frame in
    ``skipped`` and kept in the frames as well, so filter on ``shapes.DETECTABLE_TYPES`` when building a detector
    dataset. A skeleton's ``elements`` are its keypoints, one ``points`` shape per sublabel in the label's order
    (a sublabel it lacks is ``outside`` at the centroid of the others, as CVAT fills one); a skeleton track is
    interpolated keypoint by keypoint (a keypoint moves like a one-point track).
    """
    data, meta = _plain(annotations), frame_meta(meta)
    label_dicts = _label_dicts(labels)
    label_names = {item["id"]: item["name"] for item in label_dicts}
    label_names.update({sub["id"]: sub["name"] for item in label_dicts for sub in item.get("sublabels") or ()})
    spec_names = attribute_names(label_dicts)
    frames = _empty_frames(meta, frame_range)
    result = AnnotationSet(frames=frames, labels=read_labels(label_dicts))

    def label_of(item: Mapping[str, Any]) -> str:
        try:
            return label_names[item["label_id"]]
        except KeyError:
            raise ValueError(f"label_id {item['label_id']} is not among the labels given") from None

    def named(values: Iterable[Mapping[str, Any]]) -> dict[str, str]:
        try:
            return {spec_names[value["spec_id"]]: str(value["value"]) for value in values}
        except KeyError as error:
            raise ValueError(f"attribute spec_id {error.args[0]} is not among the labels given") from None

    sublabel_order = {label.name: [sub.name for sub in label.sublabels] for label in result.labels}

    def add(shape: Shape) -> None:
        if shape.type not in DETECTABLE_TYPES:
            result.skipped[shape.type] += 1
        if shape.type == "skeleton":
            shape.elements = _in_order(shape.elements, sublabel_order.get(shape.label, ()))
        frames[shape.frame].shapes.append(shape)

    # Sorted by frame and id: the task-level GET does not sort, and job- and task-level reads must give equal frames.
    for tag in sorted(data.get("tags") or (), key=_id):
        if tag["frame"] in frames:
            frames[tag["frame"]].tags.append(label_of(tag))
    for raw in sorted(data.get("shapes") or (), key=_id):
        if raw["frame"] in frames:
            shape = encoding.shape_from_stored(raw, label_of(raw), named(raw.get("attributes") or ()))
            shape.elements = [encoding.shape_from_stored(element, label_of(element),
                                                         named(element.get("attributes") or ()))
                              for element in raw.get("elements") or ()]
            add(shape)
    if not frames:
        return result
    start, stop = min(frames), max(frames) + 1
    for track in sorted(data.get("tracks") or (), key=_id):
        immutable = named(track.get("attributes") or ())
        for frame, keyframe, points, rotation, mutable in track_frames(track, start, stop, meta.deleted):
            if frame in frames:
                add(Shape(label=label_of(track), type=keyframe["type"], points=points, frame=frame,
                          rotation=rotation, attributes={**named(mutable), **immutable},
                          group=track.get("group") or 0, occluded=bool(keyframe.get("occluded")),
                          z_order=keyframe.get("z_order") or 0, source=track.get("source") or "manual",
                          track_id=track.get("id"),
                          elements=[_keypoint_on(element, label_of(element), frame, meta.deleted)
                                    for element in track.get("elements") or ()]))
    return result


def _keypoint_on(track: Mapping[str, Any], label: str, frame: int, deleted: Collection[int]) -> Shape:
    """A skeleton track's keypoint (the track of one sublabel) on ``frame``: where it is interpolated to, or
    ``outside`` where it is hidden (at its latest keyframe's place, or its first one's before it starts)."""
    for _, keyframe, points, _, _ in track_frames(track, frame, frame + 1, deleted):
        return Shape(label, "points", points, frame=frame, occluded=bool(keyframe.get("occluded")))
    keyframes = sorted((s for s in track.get("shapes") or () if s["frame"] not in deleted), key=lambda s: s["frame"])
    latest = ([s for s in keyframes if s["frame"] <= frame] or keyframes or [{"points": [0.0, 0.0]}])[-1]
    return Shape(label, "points", [float(p) for p in latest["points"]], frame=frame, outside=True)


def _in_order(elements: list[Shape], names: Sequence[str]) -> list[Shape]:
    """A skeleton's keypoints in its label's sublabel order, one each; a missing one ``outside`` at the centroid
    of the others (CVAT's ``DetectionResultConverter`` fills a missing sublabel so)."""
    if not names:
        return elements
    by_name = {element.label: element for element in elements}
    xs = [p for e in elements for p in e.points[0:2:2]] or [0.0]
    ys = [p for e in elements for p in e.points[1:2:2]] or [0.0]
    centre = [sum(xs) / len(xs), sum(ys) / len(ys)]
    frame = elements[0].frame if elements else 0
    return [by_name.get(name) or Shape(name, "points", list(centre), frame=frame, outside=True) for name in names]


def track_frames(track: Mapping[str, Any], start: int, stop: int, deleted: Collection[int] = frozenset()
                 ) -> Iterator[tuple[int, Mapping[str, Any], list[float], float, list[dict[str, Any]]]]:
    """(frame, keyframe at or before it, points, rotation, mutable attribute values) for every frame in
    ``[start, stop)`` on which ``track`` (CVAT's JSON: ``shapes`` with ``frame``, ``type``, ``points``,
    ``rotation``, ``outside``) is visible: CVAT's interpolation, the one implementation of it."""
    keyframes = sorted((s for s in track.get("shapes") or () if s["frame"] not in deleted), key=lambda s: s["frame"])
    carried: dict[int, dict[str, Any]] = {}  # spec_id → value; a keyframe keeps the values it does not set
    for left, right in zip(keyframes, [*keyframes[1:], None], strict=True):
        carried = {**carried, **{value["spec_id"]: value for value in left.get("attributes") or ()}}
        if left.get("outside"):
            continue
        # Between keyframes the next one may lie beyond the range: interpolate towards it, keep what is inside.
        end = stop if right is None else min(right["frame"], stop)
        for frame in range(max(left["frame"], start), end):
            points, rotation = interpolate(left, right, frame)
            yield frame, left, points, rotation, list(carried.values())


def interpolate(left: Mapping[str, Any], right: Mapping[str, Any] | None, frame: int) -> tuple[list[float], float]:
    """Points and rotation of a track on ``frame``, between keyframe ``left`` (at or before) and ``right`` (None:
    after the last keyframe), as CVAT interpolates them."""
    points, rotation = [float(p) for p in left["points"]], float(left.get("rotation") or 0.0)
    if right is None or frame == left["frame"]:
        return points, rotation
    if right["type"] != left["type"]:
        raise ValueError(f"a track changes type between keyframes: {left['type']} on frame {left['frame']}, "
                         f"{right['type']} on frame {right['frame']}")
    target = [float(p) for p in right["points"]]
    t = (frame - left["frame"]) / (right["frame"] - left["frame"])
    kind = left["type"]
    if kind in ("rectangle", "ellipse", "cuboid") or (kind == "points" and len(points) == len(target) == 2):
        moved = [a + (b - a) * t for a, b in zip(points, target, strict=True)]
        return moved, _turn(rotation, float(right.get("rotation") or 0.0), t)
    if kind in ("polygon", "polyline"):
        return _polyshapeinterpolate(points, target, t, closed=kind == "polygon"), rotation
    return points, rotation  # masks, skeletons and several points: CVAT repeats the previous keyframe


def _turn(start: float, end: float, t: float) -> float:
    """The angle ``t`` of the way from ``start`` to ``end`` degrees, the short way round, in ``[0, 360)``."""
    diff = (end - start + 180.0) % 360.0 - 180.0
    if diff == -180.0:  # a half turn: CVAT's editor goes clockwise (+180°)
        diff = 180.0
    return (start + diff * t + 360.0) % 360.0


def _polyshapeinterpolate(left: list[float], right: list[float], t: float, closed: bool) -> list[float]:
    """CVAT's polygon/polyline interpolation, ``t`` of the way from ``left`` to ``right``.

    Both outlines are assumed to start at the same place and run the same way. Each left vertex pairs with the
    right vertex nearest in relative arc length, each right vertex left unpaired joins the left vertex nearest to
    it, every pair moves linearly, and the points that pile up or split apart are thinned (``_thin``), so the
    vertex count changes smoothly between keyframes with different counts."""
    a, b = np.reshape(left, (-1, 2)), np.reshape(right, (-1, 2))
    if closed:  # CVAT closes polygons for the computation and drops the last point of the result
        a, b = np.vstack([a, a[:1]]), np.vstack([b, b[:1]])
    arc_a, arc_b = _arc_positions(a), _arc_positions(b)
    matching = [[int(np.argmin(np.abs(arc_b - u)))] for u in arc_a]
    paired = {j for js in matching for j in js}
    for j in range(len(b)):
        if j not in paired:
            matching[int(np.argmin(np.abs(arc_a - arc_b[j])))].append(j)
    for js in matching:
        js.sort()
    moved = [a[i] + (b[j] - a[i]) * t for i, js in enumerate(matching) for j in js]
    points = _thin(moved, matching, a, b)
    if closed:
        points = points[:-1]
    return [float(v) for point in points for v in point]


def _thin(moved: list[np.ndarray], matching: list[list[int]], left: np.ndarray, right: np.ndarray
          ) -> list[np.ndarray]:
    """CVAT's ``reduceInterpolation``: within each run of left vertices paired with one right vertex, and within
    each group of right vertices paired with one left vertex, keep only points at least half the run's mean edge
    length apart (a run collapsed below that becomes its midpoint)."""
    first = np.cumsum([0] + [len(js) for js in matching[:-1]])  # where each left vertex's points start in `moved`
    thinned: list[np.ndarray] = []

    def keep_apart(base_length: float, count: int, begin: int, end: int) -> None:
        threshold = base_length / (2 * count)
        kept, last = [moved[begin]], begin
        for i in range(begin + 1, end):
            if np.linalg.norm(moved[i] - moved[last]) >= threshold:
                kept.append(moved[i])
                last = i
        kept.append(moved[end])
        if len(kept) == 2 and np.linalg.norm(moved[end] - moved[begin]) < threshold:
            kept = [(moved[begin] + moved[end]) / 2]
        thinned.extend(kept)

    def left_run(begin: int, end: int) -> None:  # left vertices begin..end, each paired with one right vertex only
        if begin == end:
            thinned.append(moved[first[begin]])
        else:
            keep_apart(_length(left[begin:end + 1]), end - begin + 1, first[begin], first[end])

    opened: int | None = None
    for i, js in enumerate(matching):
        if len(js) == 1:
            if opened is None:
                opened = i
            elif js[0] != matching[opened][0]:
                left_run(opened, i - 1)
                opened = i
        else:
            if opened is not None:
                left_run(opened, i - 1)
                opened = None
            keep_apart(_length(right[js[0]:js[-1] + 1]), js[-1] - js[0] + 1, first[i], first[i] + len(js) - 1)
    if opened is not None:
        left_run(opened, len(matching) - 1)
    return thinned


def _arc_positions(points: np.ndarray) -> np.ndarray:
    """Each vertex's distance along the outline as a fraction of its length (all 0 for a degenerate outline,
    which pairs like CVAT's NaNs: everything with the first vertex)."""
    steps = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(points, axis=0), axis=1))])
    return steps / steps[-1] if steps[-1] > 0 else np.zeros_like(steps)


def _length(points: np.ndarray) -> float:
    return float(np.linalg.norm(np.diff(points, axis=0), axis=1).sum())


def _empty_frames(meta: FrameMeta, frame_range: range | None) -> dict[int, FrameAnnotations]:
    """An empty ``FrameAnnotations`` for every non-deleted frame of the range, sized from ``meta``."""
    if meta.included:  # a ground-truth job lists only the frames it includes
        numbers = list(meta.included)
    elif frame_range is not None and len(meta.entries) == len(frame_range):  # a job's meta lists its own frames
        numbers = list(frame_range)
    else:  # a task's meta: entry i is task frame i, whatever start_frame and frame_filter say about the source
        numbers = list(range(len(meta.entries)))
    by_number = meta.numbered(numbers)
    if frame_range is None:
        wanted = numbers
    else:
        wanted = [n for n in numbers if n in frame_range] if meta.included else list(frame_range)
    missing = [n for n in wanted if n not in by_number]
    if missing:
        raise ValueError(f"frames {missing[:5]} are not in the data meta, which describes frames "
                         f"{numbers[0] if numbers else '-'}..{numbers[-1] if numbers else '-'}")
    return {n: FrameAnnotations(frame=n, width=by_number[n].width, height=by_number[n].height, name=by_number[n].name)
            for n in wanted if n not in meta.deleted}


def _label_dicts(labels: Iterable[Any] | Mapping[str, Any]) -> list[dict[str, Any]]:
    labels = _plain(labels)
    if isinstance(labels, Mapping):  # a whole /api/labels page
        labels = labels["results"]
    return [_plain(item) for item in labels]


def _plain(value: Any) -> Any:
    """cvat-sdk models → plain dicts (``to_dict`` keeps the JSON field names)."""
    return value.to_dict() if hasattr(value, "to_dict") else value


def _id(item: Mapping[str, Any]) -> tuple[int, int]:
    return item["frame"], item.get("id") or 0
