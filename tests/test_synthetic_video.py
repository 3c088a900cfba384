"""The synthetic video generator (``training.synthetic.generate_video``): deterministic per seed, objects that really
cross, leave, enter and hide behind each other, and a truth that says what is drawn."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from preannotate.formats import masks
from preannotate.training.synthetic import COLOURS, generate_video

SEEDS = (0, 1, 2, 3)


@pytest.fixture(scope="module")
def videos():
    return {seed: generate_video(num_frames=120, seed=seed) for seed in SEEDS}


def test_same_seed_same_video_other_seed_other_video(videos):
    again = generate_video(num_frames=120, seed=0)
    assert again.images.files == videos[0].images.files
    assert again.tracks == videos[0].tracks
    assert again.visibility == videos[0].visibility
    assert videos[1].images.files != videos[0].images.files


@pytest.mark.parametrize("seed", SEEDS)
def test_objects_cross_leave_enter_and_hide(videos, seed):
    video = videos[seed]
    last = max(video.annotations.frames)
    entering = [t for t in video.tracks if t.keyframes[0].frame > 0]
    leaving = [t for t in video.tracks if any(k.outside for k in t.keyframes)]
    assert entering and leaving
    assert all(t.keyframes[-1].outside or t.keyframes[-1].frame == last for t in video.tracks)

    crossing = set()
    for frame in video.annotations.frames.values():
        boxes = {s.track_id: s.bbox() for s in frame.shapes}
        crossing |= {(a, b) for a in boxes for b in boxes if a < b and _overlaps(boxes[a], boxes[b])}
    assert crossing

    # hidden behind another (under a quarter visible), and seen again afterwards
    hidden = {}
    for (frame, object_id), share in sorted(video.visibility.items()):
        if share < 0.25:
            hidden.setdefault(object_id, frame)
    assert any(video.visibility.get((frame, object_id), 0) > 0.9
               for object_id, since in hidden.items() for frame in range(since + 1, last + 1))


@pytest.mark.parametrize("seed", SEEDS)
def test_truth_is_what_is_drawn(videos, seed):
    video = videos[seed]
    width, height = 320, 240
    checked = 0
    for number in range(0, 120, 7):
        image = np.asarray(Image.open(io.BytesIO(video.images.files[number])).convert("RGB"), dtype=float)
        shapes = sorted(video.annotations.frames[number].shapes, key=lambda s: -s.z_order)  # front first
        covered = np.zeros((height, width), dtype=bool)
        for shape in shapes:
            assert shape.occluded == (video.visibility[(number, shape.track_id)] < 1.0)
            drawn = masks.polygon_to_bitmap([shape.polygon()], width, height)
            visible = drawn & ~covered
            covered |= drawn
            # the truth's visibility is the share of its in-view pixels nothing in front of it covers
            assert visible.sum() / drawn.sum() == pytest.approx(video.visibility[(number, shape.track_id)], abs=0.08)
            inner = visible & ~_edge(visible)
            if inner.sum() > 30:  # the visible pixels have the label's colour
                mean = image[inner].mean(axis=0)
                assert np.abs(mean - COLOURS[shape.label]).max() < 60, (number, shape.track_id)
                checked += 1
    assert checked > 30


def test_tracks_are_the_annotations_with_outside_where_objects_are_gone(videos):
    video = videos[2]
    for track in video.tracks:
        object_id = track.keyframes[0].track_id
        in_view = {n: s for n, f in video.annotations.frames.items() for s in f.shapes if s.track_id == object_id}
        for keyframe in track.keyframes:
            if keyframe.outside:
                assert keyframe.frame not in in_view and keyframe.frame - 1 in in_view
            else:
                assert in_view[keyframe.frame] == keyframe and keyframe.label == track.label
        assert {k.frame for k in track.keyframes if not k.outside} == set(in_view)


def _overlaps(a, b) -> bool:
    return min(a[2], b[2]) > max(a[0], b[0]) and min(a[3], b[3]) > max(a[1], b[1])


def _edge(bitmap: np.ndarray) -> np.ndarray:
    """Pixels of ``bitmap`` next to one outside it (JPEG and anti-aliasing blur them)."""
    padded = np.pad(bitmap, 2)
    inner = np.ones_like(bitmap)
    for dy in range(-2, 3):
        for dx in range(-2, 3):
            inner &= padded[2 + dy:2 + dy + bitmap.shape[0], 2 + dx:2 + dx + bitmap.shape[1]]
    return bitmap & ~inner
