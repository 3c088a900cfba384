"""bench/tracking.py's scoring: the review work counted on tracks and on per-frame shapes, and the MOT metrics with
objects hidden behind others left as don't care."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("bench_tracking", Path(__file__).resolve().parents[1] / "bench" /
                                               "tracking.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

A = lambda f: (10.0 + 2 * f, 10.0, 40.0 + 2 * f, 40.0)  # noqa: E731  object 1 moving right
B = lambda f: (200.0 - 2 * f, 100.0, 230.0 - 2 * f, 130.0)  # noqa: E731  object 2 moving left
FRAMES = range(10)


def truth(hidden=()):
    return {f: [(1, "box", A(f), (f, 1) not in hidden), (2, "disc", B(f), True)] for f in FRAMES}


def perfect():
    return {f: [("t1", "box", A(f)), ("t2", "disc", B(f))] for f in FRAMES}


def test_perfect_tracks_need_no_edits_and_score_one():
    assert sum(bench.review_edits(truth(), perfect(), tracked=True).values()) == 0
    metrics = bench.mot_metrics(truth(), perfect())
    assert metrics["mota"] == metrics["idf1"] == 1.0 and metrics["num_switches"] == 0


def test_a_swap_of_two_ids_costs_two_splits_and_two_merges():
    swapped = {f: [("t1" if f < 5 else "t2", "box", A(f)), ("t2" if f < 5 else "t1", "disc", B(f))] for f in FRAMES}
    edits = bench.review_edits(truth(), swapped, tracked=True)
    assert edits["split"] == 2 and edits["merge"] == 2
    assert bench.mot_metrics(truth(), swapped)["num_switches"] == 2


def test_a_track_lost_for_one_frame_costs_one_keyframe_and_a_longer_gap_more():
    one = {f: [h for h in boxes if not (f == 4 and h[0] == "t1")] for f, boxes in perfect().items()}
    assert bench.review_edits(truth(), one, tracked=True) == {"keyframe": 1}
    four = {f: [h for h in boxes if not (3 <= f <= 6 and h[0] == "t1")] for f, boxes in perfect().items()}
    assert bench.review_edits(truth(), four, tracked=True)["keyframe"] == 2  # its first and last: it moves linearly
    # as per-frame shapes, each missing frame is a box to draw
    assert bench.review_edits(truth(), four, tracked=False) == {"add": 4}


def test_false_tracks_are_deleted_once_and_false_stretches_hidden_once():
    ghost = {f: [*boxes, ("t3", "box", (100.0, 200.0, 120.0, 220.0))] for f, boxes in perfect().items()}
    assert bench.review_edits(truth(), ghost, tracked=True) == {"delete track": 1}
    assert bench.review_edits(truth(), ghost, tracked=False) == {"delete": 10}
    lingering = {f: boxes if f < 8 else [boxes[0], ("t2", "disc", (0.0, 200.0, 30.0, 230.0))]
                 for f, boxes in perfect().items()}
    edits = bench.review_edits(truth(), lingering, tracked=True)
    assert edits["hide"] == 1 and edits["keyframe"] == 2  # the stray stretch ended; the object's own frames redrawn


def test_a_loose_box_is_dragged_and_a_wrong_label_fixed_once_per_track():
    loose = {f: [("t1", "box", (A(f)[0] + 6, 10.0, A(f)[2] + 6, 40.0)) if f == 2 else boxes[0], boxes[1]]
             for f, boxes in perfect().items()}
    assert bench.review_edits(truth(), loose, tracked=False) == {"move": 1}
    assert bench.review_edits(truth(), loose, tracked=True) == {"keyframe": 1}
    relabelled = {f: [boxes[0], ("t2", "box", B(f))] for f, boxes in perfect().items()}
    assert bench.review_edits(truth(), relabelled, tracked=True) == {"relabel": 1}
    # per-frame shapes are counted as issue 21 counts them (training.edits): a wrong label is a delete and an add
    assert bench.review_edits(truth(), relabelled, tracked=False) == {"delete": 10, "add": 10}


def test_hidden_objects_are_dont_care():
    hidden = {(f, 1) for f in (4, 5)}
    gap = {f: [h for h in boxes if not (f in (4, 5) and h[0] == "t1")] for f, boxes in perfect().items()}
    assert sum(bench.review_edits(truth(hidden), gap, tracked=True).values()) == 0
    assert bench.mot_metrics(truth(hidden), gap)["mota"] == 1.0
    # and a box kept on the hidden object is no false positive either
    assert bench.mot_metrics(truth(hidden), perfect())["precision"] == pytest.approx(1.0)
