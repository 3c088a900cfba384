"""CVAT annotation JSON → per-frame shapes, checked against CVAT 2.42's own export of the same task."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from collections import Counter
from typing import Any

import pytest
from preannotate.cvat.annotations import attribute_names, frames_from_annotations, read_labels
from preannotate.cvat.meta import FrameInfo, frame_meta
from preannotate.shapes import AnnotationSet, Shape

from tests.conftest import FIXTURES

API = FIXTURES / "api"


def load(name: str) -> Any:
    return json.loads((API / name).read_text())


TASK = load("GET_api_tasks_ID_annotations.json")
LABELS = load("GET_api_labels__task_id=ID.json")
META = load("GET_api_tasks_ID_data_meta.json")
CAR, PERSON, ROAD, SIGN = 18, 19, 20, 21  # label ids; car has attributes color (id 1, immutable), parked (id 2)


def job_range(number: int) -> range:
    job = load(f"GET_api_jobs_ID.job{number}.json")
    return range(job["start_frame"], job["stop_frame"] + 1)


# --- CVAT for images 1.1 export, parsed into comparable records -----------------------------------------------

def _floats(text: str) -> list[float]:
    return [float(v) for v in text.replace(";", ",").split(",")]


def _geometry(element: ET.Element) -> list[float]:
    numbers = {"box": ("xtl", "ytl", "xbr", "ybr"), "ellipse": ("cx", "cy", "rx", "ry"),
               "mask": ("left", "top", "width", "height")}.get(element.tag)
    if numbers is None:  # polygon, polyline, points
        return _floats(element.get("points"))
    runs = _floats(element.get("rle")) if element.tag == "mask" else []
    return runs + [float(element.get(name)) for name in numbers]


def xml_frames() -> dict[int, tuple[list[dict], list[str]]]:
    """frame → (shape records, tag labels) from ``export/annotations.xml``; also checks the image sizes."""
    root = ET.parse(FIXTURES / "export" / "annotations.xml").getroot()
    frames = {}
    for image in root.iter("image"):
        frame = int(image.get("id"))
        info = META["frames"][frame]
        assert (image.get("name"), int(image.get("width")), int(image.get("height"))) == (
            info["name"], info["width"], info["height"])
        records, tags = [], []
        for element in image:
            if element.tag == "tag":
                tags.append(element.get("label"))
                continue
            get = element.get
            records.append({"kind": element.tag, "label": get("label"), "geometry": _geometry(element),
                            "rotation": float(get("rotation", "0")), "occluded": get("occluded") == "1",
                            "z_order": int(get("z_order")), "group": int(get("group_id", "0")),
                            "source": get("source"),
                            "attributes": {a.get("name"): a.text or "" for a in element.findall("attribute")}})
        frames[frame] = (records, tags)
    return frames


def as_record(shape: Shape) -> dict:
    """Our shape in the export's terms (box corners, ellipse radii, mask runs + left/top/width/height)."""
    kind = {"rectangle": "box"}.get(shape.type, shape.type)
    geometry = list(shape.points)
    if shape.type == "ellipse":
        cx, cy, right, top = geometry
        geometry = [cx, cy, right - cx, cy - top]
    elif shape.type == "mask":
        *runs, left, top, right, bottom = geometry
        geometry = runs + [left, top, right - left + 1, bottom - top + 1]
    return {"kind": kind, "label": shape.label, "geometry": geometry, "rotation": shape.rotation,
            "occluded": shape.occluded, "z_order": shape.z_order, "group": shape.group, "source": shape.source,
            "attributes": shape.attributes}


def same(ours: dict, theirs: dict) -> bool:
    close = len(ours["geometry"]) == len(theirs["geometry"]) and all(
        abs(a - b) <= 0.01 for a, b in zip(ours["geometry"], theirs["geometry"], strict=True))
    rest = ("kind", "label", "occluded", "z_order", "group", "source", "attributes")
    return close and abs(ours["rotation"] - theirs["rotation"]) <= 0.01 and all(ours[k] == theirs[k] for k in rest)


# --- the recorded task against CVAT's own export ---------------------------------------------------------------

def test_every_frame_matches_cvats_export_interpolated_track_frames_included():
    result = frames_from_annotations(TASK, LABELS, META)
    expected = xml_frames()
    assert sorted(result.frames) == sorted(expected) == list(range(6))
    for frame, (records, tags) in expected.items():
        annotations = result.frames[frame]
        assert (annotations.name, annotations.width, annotations.height) == (
            META["frames"][frame]["name"], META["frames"][frame]["width"], META["frames"][frame]["height"])
        assert sorted(annotations.tags) == sorted(tags)
        ours = [as_record(shape) for shape in annotations.shapes]
        for theirs in records:
            match = next((o for o in ours if same(o, theirs)), None)
            assert match is not None, f"frame {frame}: {theirs} not found in {ours}"
            ours.remove(match)
        assert not ours, f"frame {frame}: shapes the export does not have: {ours}"


def test_tracks_carry_their_id_and_stop_at_outside_keyframes():
    result = frames_from_annotations(TASK, LABELS, META)
    tracks = {frame: sorted(s.track_id for s in f.shapes if s.track_id is not None)
              for frame, f in result.frames.items()}
    # Track 4 (the job-7 piece) ends at the synthetic outside shape on frame 3; track 5 is outside on frame 5.
    assert tracks == {0: [4], 1: [4], 2: [4], 3: [5, 6], 4: [5, 6], 5: [6]}
    polygon = next(s for s in result.frames[4].shapes if s.track_id == 6)
    assert polygon.points == pytest.approx([15, 12.5, 35, 12.5, 25, 35])  # the recorded interpolated frame
    box = next(s for s in result.frames[1].shapes if s.track_id == 4)
    assert box.points == pytest.approx([15, 10, 36, 26.25])
    assert box.attributes == {"color": "blue", "parked": "false"}
    assert next(s for s in result.frames[4].shapes if s.track_id == 5).attributes == {"color": "blue",
                                                                                      "parked": "true"}


def test_points_and_polylines_are_kept_and_counted_and_tags_become_label_names():
    result = frames_from_annotations(TASK, LABELS, META)
    assert result.skipped == Counter({"points": 1, "polyline": 1})
    assert [s.type for s in result.frames[4].shapes].count("points") == 1
    assert [s.type for s in result.frames[5].shapes].count("polyline") == 1
    assert result.frames[0].tags == ["daytime"]
    assert [label.name for label in result.labels] == ["car", "person", "road", "sign", "daytime"]


def test_labels_are_numbered_in_cvat_order_with_attribute_specs():
    labels = read_labels(LABELS)  # the whole page is accepted as well as its results
    assert labels == read_labels(LABELS["results"])
    car = labels[0]
    assert (car.name, car.type, car.id) == ("car", "rectangle", 1)  # CVAT's id is 18: class indices are 1..N
    assert [label.id for label in labels] == list(range(1, len(labels) + 1))
    assert [(a.name, a.input_type, a.values, a.default_value, a.mutable) for a in car.attributes] == [
        ("color", "select", ("red", "blue"), "red", False), ("parked", "checkbox", ("false",), "false", True)]
    assert attribute_names(LABELS) == {1: "color", 2: "parked"}


def test_skeleton_parts_are_not_labels_of_their_own():
    skeleton = {"id": 30, "name": "body", "type": "skeleton", "attributes": [], "parent_id": None,
                "sublabels": [{"id": 31, "name": "head", "type": "points", "attributes": []}]}
    part = {"id": 31, "name": "head", "type": "points", "attributes": [], "parent_id": 30, "has_parent": True}
    assert [label.name for label in read_labels([skeleton, part])] == ["body"]


# --- jobs ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("number", [1, 2])
def test_job_annotations_give_the_task_frames_of_their_range(number):
    frames = job_range(number)
    assert frames == (range(0, 3) if number == 1 else range(3, 6))
    job = load(f"GET_api_jobs_ID_annotations.job{number}.json")
    job_meta = load(f"GET_api_jobs_ID_data_meta.job{number}.json")
    from_job = frames_from_annotations(job, LABELS, job_meta, frames)
    assert sorted(from_job.frames) == list(frames)
    assert from_job.frames == frames_from_annotations(job, LABELS, META, frames).frames  # task meta works too
    assert from_job.frames == frames_from_annotations(TASK, LABELS, META, frames).frames
    whole_task = frames_from_annotations(TASK, LABELS, META)
    assert from_job.frames == {n: whole_task.frames[n] for n in frames}


def test_a_track_after_its_last_keyframe_runs_to_the_end_of_the_range():
    job1 = load("GET_api_jobs_ID_annotations.job1.json")
    # The job-7 piece of the rectangle track ends with a visible keyframe on frame 2, the job's last frame.
    inside = frames_from_annotations(job1, LABELS, META, job_range(1))
    assert [s.points for s in inside.frames[2].shapes if s.track_id == 4] == [[25.0, 15.0, 47.0, 32.5]]
    # Read over the whole task it would run on (the task-level JSON adds an outside shape on frame 3 to stop
    # it): this is why a job's annotations need the job's range.
    beyond = frames_from_annotations(job1, LABELS, META)
    assert [s.points for s in beyond.frames[5].shapes if s.track_id == 4] == [[25.0, 15.0, 47.0, 32.5]]


# --- synthetic tasks -----------------------------------------------------------------------------------------

def meta(size: int, **extra: Any) -> dict:
    frames = [{"width": 100 + i, "height": 80, "name": f"img_{i}.png"} for i in range(size)]
    return {"size": size, "start_frame": 0, "stop_frame": size - 1, "frame_filter": "", "frames": frames,
            "deleted_frames": [], "included_frames": None, **extra}


def keyframe(frame: int, points: list[float], kind: str = "rectangle", outside: bool = False,
             rotation: float = 0.0, attributes: list[dict] | None = None) -> dict:
    return {"type": kind, "frame": frame, "points": points, "outside": outside, "rotation": rotation,
            "occluded": False, "z_order": 0, "attributes": attributes or []}


def track(*keyframes: dict, label_id: int = CAR, track_id: int = 1, attributes: list[dict] | None = None) -> dict:
    return {"id": track_id, "label_id": label_id, "frame": keyframes[0]["frame"], "group": 0, "source": "manual",
            "shapes": list(keyframes), "attributes": attributes or [], "elements": []}


def annotations(tracks: list[dict] = (), shapes: list[dict] = (), tags: list[dict] = ()) -> dict:
    return {"version": 0, "tags": list(tags), "shapes": list(shapes), "tracks": list(tracks)}


def shapes_of(result: AnnotationSet, track_id: int = 1) -> dict[int, Shape]:
    return {frame: shape for frame, f in result.frames.items() for shape in f.shapes if shape.track_id == track_id}


def test_empty_frames_are_all_there():
    result = frames_from_annotations(annotations(), LABELS, META)
    assert sorted(result.frames) == list(range(6))
    assert all(not f.shapes and not f.tags for f in result.frames.values())
    assert result.skipped == Counter()


def test_frame_filter_and_start_frame_do_not_shift_task_frame_numbers():
    # Task frame i is source frame 10 + 2i; annotations and interpolation count task frames.
    filtered = meta(6, start_frame=10, stop_frame=20, frame_filter="step=2")
    box = {"id": 1, "label_id": SIGN, "type": "rectangle", "frame": 5, "points": [1, 2, 3, 4], "attributes": []}
    data = annotations([track(keyframe(0, [0, 0, 10, 10]), keyframe(4, [40, 0, 50, 10]), label_id=SIGN)], [box])
    result = frames_from_annotations(data, LABELS, filtered)
    assert sorted(result.frames) == list(range(6))
    assert [(f.name, f.width) for f in result.frames.values()] == [(f"img_{i}.png", 100 + i) for i in range(6)]
    assert shapes_of(result)[2].points == [20, 0, 30, 10]
    assert [s.points for s in result.frames[5].shapes if s.track_id is None] == [[1, 2, 3, 4]]
    part = frames_from_annotations(data, LABELS, filtered, range(2, 5))
    assert sorted(part.frames) == [2, 3, 4] and part.frames[2] == result.frames[2]


def test_deleted_frames_are_left_out_and_their_keyframes_ignored():
    data = annotations(
        [track(keyframe(0, [0, 0, 10, 10]), keyframe(2, [90, 90, 99, 99]), keyframe(4, [40, 40, 50, 50]),
               label_id=SIGN),
         track(keyframe(0, [0, 0, 5, 5]), keyframe(2, [0, 0, 5, 5], outside=True), label_id=SIGN, track_id=2)],
        shapes=[{"id": 7, "label_id": SIGN, "type": "rectangle", "frame": 2, "points": [1, 1, 2, 2]}],
        tags=[{"id": 1, "label_id": 22, "frame": 2}])
    result = frames_from_annotations(data, LABELS, meta(6, deleted_frames=[2, 5]))
    assert sorted(result.frames) == [0, 1, 3, 4]
    # The keyframe on deleted frame 2 does not count: frames 1 and 3 lie between the keyframes on 0 and 4.
    assert {frame: s.points for frame, s in shapes_of(result).items()} == {
        0: [0, 0, 10, 10], 1: [10, 10, 20, 20], 3: [30, 30, 40, 40], 4: [40, 40, 50, 50]}
    # Neither does the outside keyframe on frame 2: that object stays visible.
    assert sorted(shapes_of(result, 2)) == [0, 1, 3, 4]


def test_rotation_takes_the_short_way_round():
    data = annotations([
        track(keyframe(0, [0, 0, 10, 10], rotation=350), keyframe(4, [0, 0, 10, 10], rotation=10), label_id=SIGN),
        track(keyframe(0, [5, 5, 9, 3], "ellipse", rotation=10), keyframe(4, [5, 5, 9, 3], "ellipse", rotation=350),
              label_id=SIGN, track_id=2),
        track(keyframe(0, [0, 0, 10, 10], rotation=0), keyframe(2, [0, 0, 10, 10], rotation=180), label_id=SIGN,
              track_id=3)])
    result = frames_from_annotations(data, LABELS, meta(6))
    assert [shapes_of(result)[f].rotation for f in range(6)] == pytest.approx([350, 355, 0, 5, 10, 10])
    assert [shapes_of(result, 2)[f].rotation for f in range(5)] == pytest.approx([10, 5, 0, 355, 350])
    assert shapes_of(result, 3)[1].rotation == pytest.approx(90)  # a half turn goes clockwise, as in CVAT's editor


def test_mask_tracks_repeat_the_previous_keyframe():
    first, second = [0, 4, 10, 10, 11, 11], [1, 3, 20, 20, 21, 21]  # 2x2 masks: runs then inclusive box
    data = annotations([track(keyframe(0, first, "mask"), keyframe(2, second, "mask"), label_id=ROAD)])
    result = frames_from_annotations(data, LABELS, meta(4))
    assert [shapes_of(result)[f].points for f in range(4)] == [first, first, second, second]


def test_points_move_only_when_single():
    data = annotations([
        track(keyframe(0, [0, 0], "points"), keyframe(2, [10, 20], "points"), label_id=SIGN),
        track(keyframe(0, [0, 0, 4, 4], "points"), keyframe(2, [10, 10, 14, 14], "points"), label_id=SIGN,
              track_id=2)])
    result = frames_from_annotations(data, LABELS, meta(3))
    assert shapes_of(result)[1].points == [5, 10]
    assert shapes_of(result, 2)[1].points == [0, 0, 4, 4]
    assert result.skipped == Counter({"points": 6})


def test_polygon_with_more_vertices_keeps_its_outline_and_gains_vertices_gradually():
    square = [0, 0, 10, 0, 10, 10, 0, 10]
    with_midpoints = [0, 0, 5, 0, 10, 0, 10, 5, 10, 10, 5, 10, 0, 10, 0, 5]
    data = annotations([track(keyframe(0, square, "polygon"), keyframe(10, with_midpoints, "polygon"),
                              label_id=PERSON)])
    result = shapes_of(frames_from_annotations(data, LABELS, meta(11)))
    # Early on the new vertices are still too close to their neighbours and merge with them (CVAT's thinning).
    assert result[1].points == pytest.approx([0.25, 0, 10, 0.25, 9.75, 10, 0, 9.75])
    assert result[5].points == pytest.approx([0, 0, 2.5, 0, 10, 0, 10, 2.5, 10, 10, 7.5, 10, 0, 10, 0, 7.5])
    for frame in range(11):
        xs, ys = result[frame].points[0::2], result[frame].points[1::2]
        assert all(min(x, 10 - x, y, 10 - y) < 1e-9 for x, y in zip(xs, ys, strict=True))  # on the square's outline
    assert result[10].points == with_midpoints


def test_triangle_to_square_pairs_vertices_by_position_along_the_outline():
    data = annotations([track(keyframe(0, [0, 0, 10, 0, 5, 10], "polygon"),
                              keyframe(2, [0, 0, 10, 0, 10, 10, 0, 10], "polygon"), label_id=PERSON)])
    result = shapes_of(frames_from_annotations(data, LABELS, meta(3)))
    # The apex pairs with both top corners of the square and splits in two.
    assert result[1].points == pytest.approx([0, 0, 10, 0, 7.5, 10, 2.5, 10])


def test_equal_vertex_counts_pair_by_position_not_by_index():
    # CVAT pairs vertices by relative arc length, so equal counts move vertex by vertex only when drawn alike.
    data = annotations([track(keyframe(0, [0, 0, 1, 0, 10, 0], "polyline"),
                              keyframe(2, [0, 0, 9, 0, 10, 0], "polyline"), label_id=SIGN)])
    result = shapes_of(frames_from_annotations(data, LABELS, meta(3)))
    assert result[1].points == pytest.approx([0, 0, 0.5, 0, 9.5, 0, 10, 0])


def test_mutable_attributes_follow_keyframes_and_immutable_ones_the_track():
    parked = [{"spec_id": 2, "value": "true"}]
    data = annotations([track(keyframe(0, [0, 0, 1, 1], attributes=parked), keyframe(2, [0, 0, 1, 1]),
                              keyframe(3, [0, 0, 1, 1], attributes=[{"spec_id": 2, "value": "false"}]),
                              attributes=[{"spec_id": 1, "value": "red"}])])
    result = shapes_of(frames_from_annotations(data, LABELS, meta(5)))
    assert [result[f].attributes for f in range(5)] == [{"color": "red", "parked": "true"}] * 3 + [
        {"color": "red", "parked": "false"}] * 2


def test_a_track_reappears_after_an_outside_stretch():
    data = annotations([track(keyframe(0, [0, 0, 2, 2]), keyframe(2, [2, 2, 4, 4], outside=True),
                              keyframe(4, [4, 4, 6, 6]), keyframe(6, [6, 6, 8, 8], outside=True))])
    result = shapes_of(frames_from_annotations(data, LABELS, meta(8)))
    assert {f: s.points for f, s in result.items()} == {0: [0, 0, 2, 2], 1: [1, 1, 3, 3], 4: [4, 4, 6, 6],
                                                       5: [5, 5, 7, 7]}


def test_cuboids_are_counted_and_kept():
    cuboid = {"id": 2, "label_id": SIGN, "type": "cuboid", "frame": 0, "points": list(range(16))}
    result = frames_from_annotations(annotations(shapes=[cuboid]), LABELS, meta(1))
    assert [s.type for s in result.frames[0].shapes] == ["cuboid"]
    assert result.skipped == Counter({"cuboid": 1})


def test_video_meta_describes_every_frame_with_one_entry():
    video = {**meta(1), "size": 4}
    result = frames_from_annotations(annotations(), LABELS, video)
    assert [(f.name, f.width) for f in result.frames.values()] == [(f"frame_{i:06d}", 100) for i in range(4)]


def test_frame_meta_reads_images_videos_and_deleted_frames():
    images = frame_meta(meta(3, deleted_frames=[1]))
    assert images.size == 3 and images.present() == [0, 2] and not images.video
    assert images.numbered() == {0: FrameInfo("img_0.png", 100, 80), 1: FrameInfo("img_1.png", 101, 80),
                                 2: FrameInfo("img_2.png", 102, 80)}
    video = frame_meta({**meta(1), "size": 4})
    assert video.video and video.size == len(video.entries) == 4
    # a job of a video task lists its own frames: they are named by their number in the task
    assert [info.name for info in video.numbered(range(10, 14)).values()] == [f"frame_{n:06d}" for n in range(10, 14)]
    assert frame_meta(video) is video
    assert frame_meta({**meta(2), "included_frames": [1, 4]}).included == (1, 4)


def test_ground_truth_job_meta_lists_only_its_frames():
    gt = {**meta(2), "included_frames": [1, 4]}
    assert sorted(frames_from_annotations(annotations(), LABELS, gt).frames) == [1, 4]
    assert sorted(frames_from_annotations(annotations(), LABELS, gt, range(3, 6)).frames) == [4]


def test_cvat_sdk_models_are_accepted():
    from cvat_sdk.api_client import ApiClient, Configuration, models
    from cvat_sdk.api_client.model_utils import validate_and_convert_types

    configuration = ApiClient(Configuration(host="http://localhost")).configuration

    def model(data: Any, cls: type) -> Any:
        return validate_and_convert_types(data, (cls,), ["body"], True, True, configuration)

    result = frames_from_annotations(model(TASK, models.LabeledData), model(LABELS, models.PaginatedLabelList),
                                     model(META, models.DataMetaRead))
    assert result.frames == frames_from_annotations(TASK, LABELS, META).frames


def test_bad_input_says_what_is_wrong():
    unknown = {"id": 1, "label_id": 999, "type": "rectangle", "frame": 0, "points": [0, 0, 1, 1]}
    with pytest.raises(ValueError, match="label_id 999"):
        frames_from_annotations(annotations(shapes=[unknown]), LABELS, META)
    bad_spec = {**unknown, "label_id": CAR, "attributes": [{"spec_id": 77, "value": "x"}]}
    with pytest.raises(ValueError, match="spec_id 77"):
        frames_from_annotations(annotations(shapes=[bad_spec]), LABELS, META)
    with pytest.raises(ValueError, match=r"frames \[6, 7\]"):
        frames_from_annotations(annotations(), LABELS, META, range(4, 8))
    mixed = track(keyframe(0, [0, 0, 1, 1]), keyframe(2, [0, 0, 1, 1, 2, 2], "polygon"))
    with pytest.raises(ValueError, match="changes type between keyframes"):
        frames_from_annotations(annotations([mixed]), LABELS, META)
