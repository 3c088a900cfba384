"""A video task arrives as tracks: detections linked across frames (``preannotate.tracking``), keyframed where CVAT's
interpolation would miss them, cut at job boundaries as CVAT cuts them, written idempotently and resumably beside a
person's tracks; and a reviewer's change to one keyframe is a finished job's work. Through the real cvat-sdk client
against the CVAT double, with a real video task (H.264 chunks) and a detector that finds coloured blocks."""

from __future__ import annotations

import dataclasses
import logging
import random

import numpy as np
import pytest
from cvat_sdk import make_client, models
from cvat_sdk.core.proxies.annotations import AnnotationUpdateAction
from PIL import Image
from preannotate.annotate import annotate_task, parse_annotate_as
from preannotate.cli import main as cli
from preannotate.cvat.annotations import frames_from_annotations, track_frames
from preannotate.cvat.client import CvatError
from preannotate.cvat.reader import read_finished, read_task
from preannotate.formats import masks
from preannotate.models.artifact import Manifest
from preannotate.shapes import Label, Shape, box_iou
from preannotate.tracking import (
    KEYFRAME_IOU,
    ByteTrackLinker,
    distinct,
    follow,
    iou,
    keyframes,
    link,
    smoothed,
    tracks_from,
)

from tests import cvat_double as double_module
from tests.conftest import encode

cvat_double = double_module.cvat_double
logging.getLogger("cvat_sdk").setLevel(logging.ERROR)  # cvat-sdk 2.80 warns about the 2.42 server

WIDTH, HEIGHT, FRAMES, JOB = 96, 64, 40, 20
LABELS = [{"name": "car", "type": "rectangle"}, {"name": "person", "type": "rectangle"}]


def car_box(frame: int) -> list[float]:
    """The red block: 16x16, right by 2 px a frame."""
    return [4.0 + 2 * frame, 8.0, 20.0 + 2 * frame, 24.0]


def person_box(frame: int) -> list[float] | None:
    """The green block: left by 2 px a frame, gone from frame 30 on (it left)."""
    return [76.0 - 2 * frame, 40.0, 92.0 - 2 * frame, 56.0] if frame < 30 else None


def clip() -> list[np.ndarray]:
    frames = []
    for frame in range(FRAMES):
        image = np.full((HEIGHT, WIDTH, 3), 64, dtype=np.uint8)
        for box, colour in ((car_box(frame), (220, 30, 30)), (person_box(frame), (30, 220, 30))):
            if box is not None:
                x1, y1, x2, y2 = (int(v) for v in box)
                image[y1:y2, x1:x2] = colour
        frames.append(image)
    return frames


class ColourDetector:
    """A ``Detector`` finding the clip's red block (car) and green block (person) by colour: a test of linking,
    not of a model."""

    labels = [Label("car", id=1), Label("person", id=2)]
    familiar = None
    model = None
    manifest = Manifest(architecture="colour", labels=labels, name="colours", version=1)

    def detect(self, images, threshold):
        return [shapes for shapes, _ in self.detect_scored(images, threshold)]

    def detect_scored(self, images, threshold):
        found = []
        for image in images:
            rgb = np.asarray(image).astype(int)
            shapes = []
            for label, pixels in (("car", (rgb[..., 0] > 150) & (rgb[..., 1] < 100)),
                                  ("person", (rgb[..., 1] > 150) & (rgb[..., 0] < 100))):
                ys, xs = np.nonzero(pixels)
                if len(xs) > 20:
                    shapes.append(Shape(label, "rectangle", [float(xs.min()), float(ys.min()), float(xs.max() + 1),
                                                             float(ys.max() + 1)], score=0.9, source="auto"))
            found.append((shapes, 0.0))
        return found

    def appearance(self, images, depth=None):
        return None


@pytest.fixture
def client(cvat_double):
    with make_client(cvat_double.base_url, credentials=cvat_double.credentials) as sdk_client:
        yield sdk_client


def add_video(cvat_double, segment_size=JOB) -> int:
    frames = [(f"{i}.png", encode(Image.fromarray(a), "PNG"), WIDTH, HEIGHT) for i, a in enumerate(clip())]
    return cvat_double.add_task("video", frames, LABELS, video="clip.mp4", segment_size=segment_size, chunk_size=10)


def run(client, task_id, tmp_path, **options):
    return annotate_task(client, task_id, detector=ColourDetector(), state_dir=tmp_path / "state",
                         cache_dir=tmp_path / "chunks", progress=False, **options)


def tracks_of(cvat_double, task_id, source="auto"):
    """(label, [(frame, outside)]) of the stored tracks of ``source``, sorted."""
    names = {label["id"]: label["name"] for label in cvat_double.labels.values()}
    return sorted((names[t["label_id"]], [(s["frame"], s["outside"]) for s in t["shapes"]])
                  for t in cvat_double.annotations(task_id)["tracks"] if t["source"] == source)


def read_boxes(client, task_id, label) -> dict[int, list[float]]:
    """Frame → the box of ``label`` as CVAT interpolates the task's tracks."""
    return {number: shape.points for number, frame in read_task(client, task_id).frames.items()
            for shape in frame.shapes if shape.label == label}


def box(points) -> Shape:
    return Shape("car", "rectangle", list(points))


# ---------------------------------------------------------------------------------------- tracking, no CVAT

def test_an_object_moving_linearly_needs_two_keyframes_and_an_outside_where_it_leaves():
    detections = {f: [Shape("car", "rectangle", car_box(f), frame=f, score=0.9)]
                  + ([Shape("person", "rectangle", person_box(f), frame=f, score=0.8)] if person_box(f) else [])
                  for f in range(FRAMES)}
    car, person = link(detections)
    assert [(k.frame, k.outside) for k in car.keyframes] == [(0, False), (39, False)]
    # the outside keyframe sits where the motion carries the block, so frame 29 needs no keyframe of its own
    assert [(k.frame, k.outside) for k in person.keyframes] == [(0, False), (30, True)]
    assert (car.label, person.label) == ("car", "person")


def test_keyframes_follow_a_curved_motion_within_the_tolerance_through_cvats_interpolation():
    """An accelerating, jittery object: more keyframes, and CVAT's interpolation between them (the same code the
    reader uses) overlaps every detection at least ``KEYFRAME_IOU``; a looser tolerance needs fewer."""
    rng = random.Random(3)
    run = [Shape("car", "rectangle", [x := 0.05 * f * f + rng.uniform(-0.3, 0.3), 10.0, x + 30, 40.0], frame=f)
           for f in range(60)]
    chosen = keyframes(run)
    stored = {"shapes": [{"frame": k.frame, "type": "rectangle", "points": k.points, "outside": False}
                         for k in chosen]}
    between = {frame: points for frame, _, points, _, _ in track_frames(stored, 0, 60)}
    assert 3 <= len(chosen) < 20
    assert min(iou(shape, box(between[shape.frame])) for shape in run) >= KEYFRAME_IOU
    assert len(keyframes(run, min_iou=0.5)) < len(chosen)


def test_a_track_whose_detections_disagree_takes_the_label_with_the_highest_summed_score():
    detections = {f: [Shape("truck" if f in (3, 4) else "car", "rectangle", car_box(f), frame=f,
                            score=0.95 if f in (3, 4) else 0.4)] for f in range(8)}
    (track,) = link(detections)
    assert track.label == "car" and {k.label for k in track.keyframes} == {"car"}  # 6 x 0.4 beats 2 x 0.95


def test_a_track_takes_the_attributes_most_of_its_detections_give_and_leaves_the_undecided_unset():
    """Issue 23: CVAT keeps a label's immutable attributes on the track, so a track without them loses what the
    model learned; an attribute its detections do not agree on (no value with most of the score) stays unset."""
    def colour(f: int) -> dict[str, str]:
        return {"colour": "red" if f < 6 else "blue", "parked": "true" if f % 2 else "false"}

    detections = {f: [Shape("car", "rectangle", car_box(f), frame=f, score=0.9, attributes=colour(f))]
                  for f in range(8)}
    (track,) = link(detections)
    assert track.attributes == {"colour": "red"}  # 6 of 8 say red; parked is split 4 to 4
    assert all(k.attributes == colour(k.frame) for k in track.keyframes if not k.outside)


def test_a_lost_object_is_outside_until_it_is_seen_again_under_the_same_track():
    detections = {f: [] if 10 <= f < 14 else [Shape("car", "rectangle", car_box(f), frame=f, score=0.9)]
                  for f in range(24)}
    (track,) = link(detections)
    assert [(k.frame, k.outside) for k in track.keyframes] == [(0, False), (10, True), (14, False), (23, False)]


def test_an_object_lost_for_longer_than_the_linker_waits_is_outside_from_its_last_detection():
    detections = {f: [] if 10 <= f < 15 else [Shape("car", "rectangle", car_box(f), frame=f, score=0.9)]
                  for f in range(24)}
    first, second = link(detections, linker=ByteTrackLinker(lost_frames=3))
    assert [(k.frame, k.outside) for k in first.keyframes] == [(0, False), (10, True)]
    assert not any(k.outside for k in second.keyframes) and second.keyframes[-1].frame == 23


def test_a_jittery_detector_arrives_smoothed_nearer_the_object_with_fewer_keyframes():
    """The detector's box wobbles by up to 2 px around a car moving on a curve: the smoothed track lies nearer the car
    on most frames than the detections themselves, and needs fewer keyframes than following every wobble."""
    rng = random.Random(5)

    def true_box(f: int) -> list[float]:
        x, y = 2.0 * f, 0.04 * f * f
        return [x, y, x + 24.0, y + 18.0]

    detections = {f: [Shape("car", "rectangle", [v + rng.uniform(-2, 2) for v in true_box(f)], frame=f, score=0.9)]
                  for f in range(50)}

    def arrived(track) -> dict[int, list[float]]:
        stored = {"shapes": [{"frame": k.frame, "type": "rectangle", "points": k.points, "outside": k.outside}
                             for k in track.keyframes]}
        return {frame: points for frame, _, points, _, _ in track_frames(stored, 0, 50)}

    (smooth,), (raw,) = link(detections), link(detections, smooth=1)
    truth = {f: box(true_box(f)) for f in range(50)}
    nearer = [iou(truth[f], box(arrived(smooth)[f])) for f in range(50)]
    as_detected = [iou(truth[f], detections[f][0]) for f in range(50)]
    assert np.mean(nearer) > np.mean(as_detected) + 0.02
    assert sum(a > b for a, b in zip(nearer, as_detected, strict=True)) > 30
    assert len(smooth.keyframes) < len(raw.keyframes)


def test_smoothing_keeps_a_steady_motion_exact_and_leaves_masks_as_detected():
    run = [Shape("car", "rectangle", car_box(f), frame=f) for f in range(12)]
    assert [s.points for s in smoothed(run)] == [s.points for s in run]
    blob = [Shape("car", "polygon", [f, 0, f + 5, 0, f + 5, 5], frame=f) for f in range(12)]
    assert smoothed(blob) == blob


def test_a_second_box_on_one_object_does_not_start_a_second_track_but_a_neighbour_keeps_its_own():
    """The detector puts a weaker box of another label on the car (IoU 0.6 with it) every frame: one track, the car's.
    A person walking beside the car, its box overlapping the car's by IoU 0.3, keeps a track of its own."""
    def frame(f: int) -> list[Shape]:
        car = car_box(f)
        return [Shape("car", "rectangle", car, frame=f, score=0.9),
                Shape("truck", "rectangle", [car[0] + 4, car[1], car[2] + 4, car[3]], frame=f, score=0.6),
                Shape("person", "rectangle", [car[0] + 8.6, car[1], car[2] + 8.6, car[3]], frame=f, score=0.5)]

    detections = {f: frame(f) for f in range(20)}
    assert box_iou(detections[0][0].bbox(), detections[0][1].bbox())[0, 0] == pytest.approx(0.6)
    assert box_iou(detections[0][0].bbox(), detections[0][2].bbox())[0, 0] == pytest.approx(0.3, abs=0.02)
    assert sorted(track.label for track in link(detections)) == ["car", "person"]
    assert len(link(detections, overlap=1.01)) == 3  # every box linked: the truck box makes a track of its own
    assert distinct(detections[0]) == [detections[0][0], detections[0][2]]


def test_masks_are_linked_by_their_box_and_keyframed_by_their_pixels():
    def mask(frame: int) -> Shape:
        bitmap = np.zeros((48, 96), dtype=bool)
        bitmap[10:30, 5 + frame:25 + frame] = True
        return Shape("car", "mask", masks.bitmap_to_cvat_rle(bitmap), frame=frame, score=0.9)

    (track,) = link({f: [mask(f)] for f in range(12)})
    # CVAT repeats a mask until its next keyframe: a keyframe wherever the drift passes the tolerance
    assert 3 <= len(track.keyframes) < 12 and all(k.type == "mask" for k in track.keyframes)
    followed = follow({f: [mask(f)] for f in range(12)})
    assert len({s.track_id for shapes in followed.values() for s in shapes}) == 1
    assert tracks_from(followed)[0].keyframes == track.keyframes


# ---------------------------------------------------------------------------------------- through CVAT

def test_a_video_task_arrives_as_tracks_cut_at_job_boundaries(cvat_double, client, tmp_path):
    task_id = add_video(cvat_double)
    report = run(client, task_id, tmp_path)
    # per job (0-19, 20-39) one car track and one person track; the person leaves at frame 30
    assert tracks_of(cvat_double, task_id) == [
        ("car", [(0, False), (19, False)]), ("car", [(20, False), (39, False)]),
        ("person", [(0, False), (19, False)]), ("person", [(20, False), (30, True)])]
    assert (report.tracks, report.keyframes, report.created) == (4, 8, 0)
    assert cvat_double.annotations(task_id)["shapes"] == []
    # read back as CVAT interpolates: every frame's box is where the block was
    for label, truth in (("car", car_box), ("person", person_box)):
        boxes = read_boxes(client, task_id, label)
        assert sorted(boxes) == [f for f in range(FRAMES) if truth(f) is not None]
        assert min(iou(box(boxes[f]), box(truth(f))) for f in boxes) >= KEYFRAME_IOU
    # each job holds its own pieces, as CVAT keeps them
    for job_id in cvat_double.tasks[task_id].job_ids:
        job = cvat_double.jobs[job_id]
        held = client.jobs.retrieve(job_id).get_annotations().tracks
        assert len(held) == 2 and all(job.start <= s.frame <= job.stop for t in held for s in t.shapes)
    # the confidence tags are per frame, on video too
    assert len(cvat_double.annotations(task_id)["tags"]) == FRAMES


def test_the_linker_is_chosen_per_call(cvat_double, client, tmp_path):
    made = []

    def linker(threshold):
        made.append(threshold)
        return ByteTrackLinker(threshold)

    task_id = add_video(cvat_double)
    run(client, task_id, tmp_path, linker=linker)
    assert made == [0.5, 0.5] and len(tracks_of(cvat_double, task_id)) == 4  # one linker per job


def test_a_rerun_replaces_the_models_tracks_and_never_touches_a_persons(cvat_double, client, tmp_path):
    task_id = add_video(cvat_double)
    person = cvat_double.label_id(task_id, "person")
    mine = models.LabeledTrackRequest(frame=2, label_id=person, source="manual", shapes=[
        models.TrackedShapeRequest(type="rectangle", frame=2, points=[1, 1, 9, 9]),
        models.TrackedShapeRequest(type="rectangle", frame=6, points=[5, 1, 13, 9], outside=True)])
    client.tasks.retrieve(task_id).update_annotations(models.PatchedLabeledDataRequest(tracks=[mine]),
                                                      action=AnnotationUpdateAction.CREATE)
    manual = [t for t in cvat_double.annotations(task_id)["tracks"] if t["source"] == "manual"]
    run(client, task_id, tmp_path)
    first = tracks_of(cvat_double, task_id)
    report = run(client, task_id, tmp_path)
    assert tracks_of(cvat_double, task_id) == first and len(first) == 4  # replaced, not duplicated
    assert report.deleted == 4 and report.tracks == 4
    assert [t for t in cvat_double.annotations(task_id)["tracks"] if t["source"] == "manual"] == manual


def test_an_upload_cut_off_mid_task_resumes_with_the_jobs_not_written(cvat_double, client, tmp_path):
    task_id = add_video(cvat_double)
    cvat_double.fail_next(r"action=create", 500, method="PATCH", after=2)  # job 0's tracks and tags, then job 1's
    with pytest.raises(CvatError, match="500"):
        run(client, task_id, tmp_path)
    assert {s[0][0] for _, s in [(n, f) for n, f in tracks_of(cvat_double, task_id)]} == {0}
    report = run(client, task_id, tmp_path)
    assert report.resumed == JOB and report.annotated == FRAMES - JOB
    assert len(tracks_of(cvat_double, task_id)) == 4
    fresh = add_video(cvat_double)
    run(client, fresh, tmp_path / "fresh")
    assert tracks_of(cvat_double, task_id) == tracks_of(cvat_double, fresh)


def test_shapes_when_asked_on_a_video_and_by_default_on_images(cvat_double, client, tmp_path):
    task_id = add_video(cvat_double)
    run(client, task_id, tmp_path)
    run(client, task_id, tmp_path, as_tracks=False)
    stored = cvat_double.annotations(task_id)
    assert stored["tracks"] == [] and len(stored["shapes"]) == 70  # 40 cars, 30 persons: the tracks replaced
    frames = [(f"{i}.png", encode(Image.fromarray(a), "PNG"), WIDTH, HEIGHT) for i, a in enumerate(clip()[:4])]
    images = cvat_double.add_task("images", frames, LABELS)
    run(client, images, tmp_path)
    assert cvat_double.annotations(images)["tracks"] == [] and len(cvat_double.annotations(images)["shapes"]) == 8


def test_the_double_cuts_a_task_level_track_at_job_boundaries_as_cvat_does(cvat_double, client):
    """``AnnotationIR.slice``: a track over jobs 0-19 and 20-39 is stored as one piece per job; job 0's piece gains
    a keyframe on its last frame, job 1's one on its first (both interpolated), and reading the task gives back
    every frame of the track as sent."""
    task_id = add_video(cvat_double)
    car = cvat_double.label_id(task_id, "car")
    sent = models.LabeledTrackRequest(frame=5, label_id=car, shapes=[
        models.TrackedShapeRequest(type="rectangle", frame=5, points=[0, 0, 10, 10]),
        models.TrackedShapeRequest(type="rectangle", frame=35, points=[30, 0, 40, 10]),
        models.TrackedShapeRequest(type="rectangle", frame=38, points=[30, 0, 40, 10], outside=True)])
    client.tasks.retrieve(task_id).update_annotations(models.PatchedLabeledDataRequest(tracks=[sent]),
                                                      action=AnnotationUpdateAction.CREATE)
    first, second = (client.jobs.retrieve(j).get_annotations().tracks for j in cvat_double.tasks[task_id].job_ids)
    assert [(s.frame, s.outside, s.points) for t in first for s in t.shapes] == [
        (5, False, [0, 0, 10, 10]), (19, False, [14, 0, 24, 10])]
    assert [(s.frame, s.outside, s.points) for t in second for s in t.shapes] == [
        (20, False, [15, 0, 25, 10]), (35, False, [30, 0, 40, 10]), (38, True, [30, 0, 40, 10])]
    whole = {"shapes": [s.to_dict() for s in sent.shapes]}
    expected = {frame: points for frame, _, points, _, _ in track_frames(whole, 0, FRAMES)}
    assert read_boxes(client, task_id, "car") == expected


# ---------------------------------------------------------------------------------------- item 3: training

def test_a_reviewers_change_to_one_keyframe_is_the_finished_jobs_work(cvat_double, client, tmp_path):
    """Keyframes and the frames interpolated between them are truth; moving one keyframe in a finished job changes
    that job (the training trigger sees it) and what training reads there."""
    from preannotate.training.triggers import annotations_changed

    task_id = add_video(cvat_double)
    run(client, task_id, tmp_path)
    first_job, second_job = cvat_double.tasks[task_id].job_ids
    for job_id in (first_job, second_job):
        client.jobs.retrieve(job_id).update(models.PatchedJobWriteRequest(state="completed", stage="acceptance"))
    request, train_on = {"tasks": [task_id]}, ("completed", "acceptance")
    learned = {str(job.id): job.updated_date.isoformat() for job in client.tasks.retrieve(task_id).get_jobs()}
    assert annotations_changed(client, request, learned, "cars@1", train_on)[0] is False

    job = client.jobs.retrieve(second_job)
    track = next(t for t in job.get_annotations().tracks if t.shapes[-1].outside)  # the person's piece
    moved = track.to_dict()
    moved["shapes"][0]["points"] = [60.0, 40.0, 80.0, 60.0]  # the reviewer redraws the box on frame 20
    moved["source"] = "semi-auto"  # as CVAT's editor marks an edited auto track
    job.update_annotations(models.PatchedLabeledDataRequest(tracks=[models.LabeledTrackRequest(**{
        k: v for k, v in moved.items() if k in ("id", "frame", "label_id", "group", "source", "shapes")})]),
        action=AnnotationUpdateAction.UPDATE)

    assert annotations_changed(client, request, learned, "cars@1", train_on) == \
        (True, f"job(s) {second_job} finished, changed or reopened since cars@1")
    finished = read_finished(client, task_id, train_on).annotations.frames
    person = {f: s.points for f, frame in finished.items() for s in frame.shapes if s.label == "person"}
    assert person[20] == [60.0, 40.0, 80.0, 60.0]  # the keyframe as the reviewer left it
    assert person[25] == [38.0, 40.0, 56.0, 58.0]  # half way to the outside keyframe on 30, at [16, 40, 32, 56]
    assert 30 not in person  # still outside from frame 30


# ---------------------------------------------------------------------------------------- the doors

def test_the_command_line_takes_as_tracks_or_shapes_and_corrects_a_typo(cvat_double, capsys):
    code = cli(["annotate", "--cvat-url", cvat_double.base_url, "--task", "7", "--model", "x", "--as", "track"])
    assert code == 2
    assert capsys.readouterr().err.strip() == \
        "preannotate: error: --as 'track': give tracks or shapes (did you mean tracks?)"
    assert parse_annotate_as("Shapes") is False and parse_annotate_as(None) is None
    with pytest.raises(ValueError, match="PREANNOTATE_ANNOTATE_AS 'trax'"):
        parse_annotate_as("trax", "PREANNOTATE_ANNOTATE_AS")


def test_annotated_frames_are_shapes_of_one_type_per_track_as_cvat_reads_them(cvat_double, client, tmp_path):
    """What the writer sends reads back through the same reader training uses, every frame of every track."""
    task_id = add_video(cvat_double, segment_size=FRAMES)  # one job: one track per object
    run(client, task_id, tmp_path)
    assert [len(keys) for _, keys in tracks_of(cvat_double, task_id)] == [2, 2]
    data = client.tasks.retrieve(task_id)
    annotations = frames_from_annotations(data.get_annotations(), [m.to_dict() for m in data.get_labels()],
                                          data.get_meta())
    assert sum(len(frame.shapes) for frame in annotations.frames.values()) == 70
    assert {dataclasses.astuple(s)[1] for frame in annotations.frames.values() for s in frame.shapes} == {"rectangle"}


def test_skeletons_and_points_arrive_frame_by_frame_on_a_video_beside_the_tracks():
    """CVAT tracks a skeleton as a track per keypoint (not built): on a video task a keypoint model's skeletons and
    points are written as per-frame shapes, its boxes as tracks, its tags stay tags."""
    from preannotate.annotate import _as_tracks

    def dog(f: int) -> Shape:
        return Shape("dog", "skeleton", [], frame=f, score=0.9,
                     elements=[Shape("nose", "points", [10.0 + f, 10.0]), Shape("tail", "points", [30.0 + f, 20.0])])

    pending = {f: [Shape("car", "rectangle", car_box(f), frame=f, score=0.9), dog(f),
                   Shape("pin", "points", [5.0, 5.0 + f], frame=f, score=0.8), Shape("day", "tag", [], frame=f)]
               for f in range(10)}
    frames, tracks = _as_tracks(pending, list(range(10)), None, ByteTrackLinker())
    assert [track.label for track in tracks] == ["car"]
    assert all(sorted(s.type for s in frames[f]) == ["points", "skeleton", "tag"] for f in range(10))
