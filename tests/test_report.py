"""Training reports: COCO precision-recall curves, ``report.png`` and the prediction grid, drawn from real frames,
real COCO scoring and real (or ground-truth-echoing) detectors."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from preannotate.frames import decode_rgb
from preannotate.shapes import FrameAnnotations, Shape
from preannotate.training import report
from preannotate.training.evaluation import RECALL_POINTS, coco_metrics
from preannotate.training.synthetic import generate

from tests.test_training import LABELS, ground_truth, result  # the hand-made COCO cases' helpers

CHECK_DIR = os.environ.get("PREANNOTATE_REPORT_CHECK")  # set it to keep the pictures for a look

# --- coco_metrics(curves=True) on hand-made cases -------------------------------------------------------------------

PERFECT = ground_truth([(1, (10, 10, 30, 20)), (2, (50, 50, 20, 40))], [(1, (0, 0, 50, 50))])
CASES = {  # name: (ground truth, results, what coco_metrics answered before curves existed)
    "perfect": (PERFECT, [result(a["image_id"], a["category_id"], a["bbox"], 0.9) for a in PERFECT["annotations"]],
                {"map": 1.0, "map50": 1.0, "map75": 1.0,
                 "per_class": {"car": {"ap": 1.0, "ap50": 1.0}, "person": {"ap": 1.0, "ap50": 1.0}}}),
    "false positive first": (ground_truth([(1, (10, 10, 30, 30))], []),
                             [result(2, 1, (10, 10, 30, 30), 0.9), result(1, 1, (10, 10, 30, 30), 0.8)],
                             {"map": 0.5, "map50": 0.5, "map75": 0.5,
                              "per_class": {"car": {"ap": 0.5, "ap50": 0.5}, "person": {"ap": None, "ap50": None}}}),
    "half found": (ground_truth([(1, (10, 10, 30, 30)), (1, (60, 60, 30, 30))]), [result(1, 1, (10, 10, 30, 30), 0.9)],
                   {"map": 0.50495, "map50": 0.50495, "map75": 0.50495,
                    "per_class": {"car": {"ap": 0.50495, "ap50": 0.50495}, "person": {"ap": None, "ap50": None}}}),
    "nothing found": (ground_truth([(1, (10, 10, 30, 20)), (2, (50, 50, 20, 40))]), [],
                      {"map": 0.0, "map50": 0.0, "map75": 0.0,
                       "per_class": {"car": {"ap": 0.0, "ap50": 0.0}, "person": {"ap": 0.0, "ap50": 0.0}}}),
    "nothing there": (ground_truth([]), [],
                      {"map": None, "map50": None, "map75": None,
                       "per_class": {"car": {"ap": None, "ap50": None}, "person": {"ap": None, "ap50": None}}}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_without_curves_coco_metrics_answers_exactly_what_it_did(case):
    truth, results, before = CASES[case]
    assert coco_metrics(copy.deepcopy(truth), copy.deepcopy(results), LABELS) == before
    assert coco_metrics(truth, results, LABELS, "bbox", curves=False) == coco_metrics(truth, results, LABELS)


@pytest.mark.parametrize("case", list(CASES))
def test_curves_only_add_precision50_per_class(case):
    truth, results, _ = CASES[case]
    plain, with_curves = coco_metrics(truth, results, LABELS), coco_metrics(truth, results, LABELS, curves=True)
    for values in with_curves["per_class"].values():
        assert len(values.pop("precision50")) == 101 == len(RECALL_POINTS)
    assert with_curves == plain


def precision50(case):
    truth, results, _ = CASES[case]
    return {name: values["precision50"]
            for name, values in coco_metrics(truth, results, LABELS, curves=True)["per_class"].items()}


def test_perfect_predictions_give_a_flat_precision_of_one():
    assert precision50("perfect") == {"car": [1.0] * 101, "person": [1.0] * 101}


def test_a_confident_false_positive_caps_the_precision_at_a_half_and_no_truth_is_undefined():
    curves = precision50("false positive first")
    assert curves["car"] == [0.5] * 101  # the false positive ranks first: 1 of 2 right at recall 1
    assert curves["person"] == [-1.0] * 101  # no person anywhere: undefined


def test_half_the_truth_found_is_precision_one_up_to_recall_half_then_zero():
    curves = precision50("half found")
    assert curves["car"] == [1.0] * 51 + [0.0] * 50
    assert RECALL_POINTS[50] == 0.5


def test_nothing_found_is_precision_zero_where_there_was_something_to_find():
    assert precision50("nothing found") == {"car": [0.0] * 101, "person": [0.0] * 101}
    assert precision50("nothing there") == {"car": [-1.0] * 101, "person": [-1.0] * 101}


# --- detectors over synthetic frames --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def task():
    """30 frames of 320×240 with every shape type (rectangles, rotated ones, ellipses, polygons, masks)."""
    return generate(30, width=320, height=240, seed=7, objects=(1, 3))


def items(task):
    return [(frame, task.images) for frame in task.annotations.frames.values()]


def key(image) -> str:
    return hashlib.sha1(np.ascontiguousarray(image).tobytes()).hexdigest()


class Echo:
    """A Detector that answers each frame's own ground truth with a score (and any extra shapes given per frame):
    what a perfect model finds, or a perfect model plus chosen mistakes."""

    def __init__(self, task, extra: dict[int, list[Shape]] | None = None, score: float = 0.9):
        self.labels = list(task.annotations.labels)
        self.manifest = None
        self.calls: list[tuple[int, float]] = []
        self.answers = {}
        for number, image in task.images.decoded(task.annotations.frames):
            frame = task.annotations.frames[number]
            self.answers[key(image)] = [dataclasses.replace(s, score=score, source="auto") for s in frame.shapes] + \
                list((extra or {}).get(number, []))

    def detect(self, images, threshold):
        self.calls.append((len(images), threshold))
        return [[s for s in self.answers[key(image)] if s.score >= threshold] for image in images]


def test_the_perfect_detector_scores_ap_one_with_a_flat_curve_for_every_class(task):
    frames, images, found = zip(*report.detect_frames(Echo(task), items(task), 0.0), strict=True)
    metrics = report.precision_recall(frames, found, task.annotations.labels)
    assert metrics["map50"] == 1.0 and metrics["map"] == 1.0
    types = {s.type for frame in frames for s in frame.shapes}
    assert {"rectangle", "ellipse", "polygon", "mask"} <= types
    for name, values in metrics["per_class"].items():
        assert values["ap50"] == 1.0, name
        assert values["precision50"] == [1.0] * 101, name
    assert images[0].shape == (240, 320, 3)


def test_a_confident_false_positive_lowers_that_class_precision_only(task):
    frames = task.annotations.frames
    boxes = sum(s.label == "box" for frame in frames.values() for s in frame.shapes)
    empty = next(n for n, frame in frames.items() if not any(s.label == "box" for s in frame.shapes))
    wrong = Shape("box", "rectangle", [5.0, 5.0, 60.0, 50.0], frame=empty, score=0.99)  # no box there
    found = [shapes for _, _, shapes in report.detect_frames(Echo(task, {empty: [wrong]}), items(task), 0.0)]
    metrics = report.precision_recall(list(frames.values()), found, task.annotations.labels)
    box = metrics["per_class"]["box"]
    # ranked first, the false positive leaves at best n right of n + 1 at every recall
    assert box["precision50"] == pytest.approx([boxes / (boxes + 1)] * 101, abs=1e-6)
    assert box["ap50"] < 1.0
    assert all(v["ap50"] == 1.0 for name, v in metrics["per_class"].items() if name != "box")


# --- the pictures -----------------------------------------------------------------------------------------------------

def png_size(path: Path) -> tuple[int, int]:
    data = Path(path).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


def write_metrics(run_dir: Path, steps: int = 120, validations: int = 3, masks: bool = False,
                  labels=("box", "disc", "triangle", "blob")) -> None:
    """A metrics.jsonl as the trainer writes it: train records with per-loss keys, validations, the end."""
    run_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    records = []
    for step in range(1, steps + 1):
        classification = 6 * math.exp(-step / 40) + 1 + rng.normal(0, 0.2)
        regression = 2.5 * math.exp(-step / 80) + 0.5 + rng.normal(0, 0.1)
        records.append({"event": "train", "step": step, "total_steps": steps,
                        "lr": 0.003 * min(1, step / 20) * 0.5 * (1 + math.cos(math.pi * step / steps)),
                        "loss": round(classification + regression, 5), "bbox_regression": round(regression, 5),
                        "classification": round(classification, 5), "images_per_s": 5.2, "data_wait": 0.01,
                        "eta_s": 10.0, "elapsed_s": step * 1.5})
        if step % (steps // validations) == 0:
            level = 1 - math.exp(-step / 50)
            per_class = {name: {"ap": round(0.7 * level, 4), "ap50": round(level * (0.8 + 0.05 * i), 4)}
                         for i, name in enumerate(labels)}
            bbox = {"map": 0.7 * level, "map50": level, "map75": 0.6 * level, "per_class": per_class}
            record = {"event": "validation", "step": step, "total_steps": steps, "map": bbox["map"],
                      "map50": bbox["map50"], "bbox": bbox, "images": 12}
            if masks:
                segm = {**bbox, "map": 0.6 * level, "map50": 0.9 * level,
                        "per_class": {n: {"ap": v["ap"] * 0.9, "ap50": v["ap50"] * 0.9} for n, v in per_class.items()}}
                record.update({"map": segm["map"], "map50": segm["map50"], "segm": segm})
            records.append(record)
    records.append({"event": "end", "step": steps, "total_steps": steps, "stopped": "completed",
                    "best_step": steps})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def keep(path: Path, name: str) -> None:
    if CHECK_DIR:
        Path(CHECK_DIR).mkdir(parents=True, exist_ok=True)
        (Path(CHECK_DIR) / name).write_bytes(Path(path).read_bytes())


def texts(figure) -> list[str]:
    return [t.get_text() for t in figure.findobj(lambda artist: hasattr(artist, "get_text"))]


def test_write_report_writes_both_pictures_from_one_pass_of_the_detector(task, tmp_path):
    run = tmp_path / "run"
    write_metrics(run)
    echo = Echo(task)
    paths = report.write_report(run, echo, items(task), task.annotations.labels, threshold=0.5)
    assert paths == [run / "report.png", run / "predictions.png"]
    assert png_size(paths[0]) == (1700, 1500)
    width, height = png_size(paths[1])  # 16 frames of 320×240 doubled, 4 a row: 4 rows
    assert 4 * 640 <= width <= 4 * 640 + 100 and 4 * 480 + 100 <= height <= 4 * 480 + 400
    assert sum(n for n, _ in echo.calls) == 30 and {t for _, t in echo.calls} == {0.0}  # every frame, once
    assert max(n for n, _ in echo.calls) <= report.DETECT_BATCH
    assert not list(run.glob("*.partial"))
    keep(paths[0], "report.png")
    keep(paths[1], "predictions.png")


def test_report_panels_show_losses_validations_per_class_ap_and_curves(task, tmp_path):
    write_metrics(tmp_path)
    frames, _, found = zip(*report.detect_frames(Echo(task), items(task), 0.0), strict=True)
    curves = report.precision_recall(frames, found, task.annotations.labels)
    figure = report.report_figure(report.read_records(tmp_path / "metrics.jsonl"), curves,
                                  task.annotations.labels, frames=len(frames), title="run")
    loss, lr, maps, per_class, pr, review, matrix = figure.axes
    assert {t.get_text() for t in loss.get_legend().get_texts()} == {"total", "bbox_regression", "classification"}
    assert lr.get_lines()[0].get_xdata()[-1] == 120
    assert [len(line.get_xdata()) for line in maps.get_lines()[:2]] == [3, 3]  # mAP@.5 and mAP at 3 validations
    assert "kept: step 120" in [t.get_text() for t in maps.get_legend().get_texts()]
    assert "best validation, step 120" in per_class.get_title()
    assert [f"{bar.get_width():.4f}" for bar in per_class.patches[:4]] == ["0.7274", "0.7729", "0.8184", "0.8638"]
    assert [t.get_text() for t in pr.get_legend().get_texts()] == [
        "box  AP@.5 1.000", "disc  AP@.5 1.000", "triangle  AP@.5 1.000", "blob  AP@.5 1.000",
        "all classes  mAP@.5 1.000"]
    for ax in figure.axes:  # titles, axis labels and a legend on every panel (the matrix labels its own axes)
        assert ax.get_title() and (ax in (review, matrix) or ax.get_xlabel() and ax.get_legend() is not None)
    assert [t.get_text() for t in review.texts] == [t.get_text() for t in matrix.texts] == ["not computed"]
    assert "120 of 120 steps" in figure.get_suptitle()


def test_a_mask_model_shows_box_and_mask_ap_and_its_headline_is_the_masks(task, tmp_path):
    write_metrics(tmp_path, masks=True)
    records = report.read_records(tmp_path / "metrics.jsonl")
    curves = report.precision_recall(list(task.annotations.frames.values()), [[]] * 30, task.annotations.labels)
    figure = report.report_figure(records, curves, task.annotations.labels, frames=30)
    _, _, maps, per_class, pr, _, _ = figure.axes
    assert {"mAP@.5 (masks)", "mAP@.5 (boxes)"} <= {t.get_text() for t in maps.get_legend().get_texts()}
    assert [t.get_text() for t in per_class.get_legend().get_texts()] == ["box AP@.5", "mask AP@.5 (hatched)"]
    assert "all classes  mAP@.5 0.000" in [t.get_text() for t in pr.get_legend().get_texts()]  # nothing found
    assert pr.get_ylim()[0] < 0  # a curve at zero stays in sight


def noisy(task):
    """``Echo`` with mistakes: each frame's first object missed, a false box on every other frame scored 0.95 (a
    confident mistake), and a loose one on every third frame that has two objects."""
    frames = task.annotations.frames
    extra = {}
    for number, frame in frames.items():
        found = [Shape("box", "rectangle", [2.0, 2.0, 40.0, 30.0], frame=number, score=0.95)] if number % 2 else []
        if number % 3 == 0 and len(frame.shapes) > 1:
            a1, b1, a2, b2 = frame.shapes[1].bbox()
            found.append(Shape(frame.shapes[1].label, "rectangle", [a1, b1, a2, b1 + 0.6 * (b2 - b1)], score=0.5))
        extra[number] = found
    echo = Echo(task, extra, score=0.9)
    for _, image in task.images.decoded(frames):
        echo.answers[key(image)] = echo.answers[key(image)][1:]  # the first object: missed
    return echo


def test_a_detectors_report_draws_edits_against_the_threshold_and_its_confusion_matrix(task, tmp_path):
    write_metrics(tmp_path)
    detector = noisy(task)
    labels = task.annotations.labels
    thresholds = {"box": 0.97, "disc": 0.5, "triangle": 0.5, "blob": 0.5}  # box: above its confident mistakes
    paths = report.write_report(tmp_path, detector, items(task), labels, threshold=thresholds, name="shapes")
    frames, _, found = zip(*report.detect_frames(detector, items(task), 0.0), strict=True)
    work = report.review_work(frames, found, labels, thresholds)
    figure = report.report_figure(report.read_records(tmp_path / "metrics.jsonl"),
                                  report.precision_recall(frames, found, labels), labels, frames=len(frames),
                                  title="shapes — ssdlite320_mobilenet_v3_large", review=work)
    *_, review, matrix = figure.axes
    legend = [t.get_text() for t in review.get_legend().get_texts()]
    box = work["served"]["box"]
    assert legend[0] == f"box: {box['per_100']:.0f} at 0.97 ({box['objects']} objects)"
    assert any(text.startswith("all labels at one threshold; at the served ones") for text in legend)
    stars = [line for line in review.get_lines() if line.get_marker() == "*"]
    assert (float(stars[0].get_xdata()[0]), float(stars[0].get_ydata()[0])) == (0.97, box["per_100"])
    counts = np.asarray(work["confusion"]["matrix"])
    assert counts[:-1].sum() == sum(len(frame.shapes) for frame in frames)  # every true object: found or missed
    assert counts[:-1, -1].sum() == work["total"]["adds"] >= len(frames)  # the first of each frame missed
    assert counts[-1, 0] == 0  # the confident false boxes are above no served threshold ...
    wide = report.review_work(frames, found, labels, dict.fromkeys(thresholds, 0.5))["confusion"]["matrix"]
    # ... but at 0.5 they are false positives in the background row (but where one lands on a true object)
    assert len(frames) // 2 - 2 <= wide[-1][0] <= len(frames) // 2
    assert [t.get_text() for t in matrix.get_xticklabels()][-1] == "nothing (missed)"
    assert "at the served thresholds" in matrix.get_title()
    keep(paths[0], "report-noisy.png")
    keep(paths[1], "predictions-noisy.png")


def test_the_pictures_are_titled_with_the_models_name_and_the_thresholds_they_use(task, tmp_path, monkeypatch):
    drawn = {}
    monkeypatch.setattr(report, "_save", lambda figure, path: drawn.setdefault(path.name, figure))
    run = tmp_path / "run-20261206-182702"
    write_metrics(run)
    thresholds = {"box": 0.97, "disc": 0.5, "triangle": 0.5, "blob": 0.5}
    report.write_report(run, noisy(task), items(task), task.annotations.labels, threshold=thresholds, name="shapes",
                        max_frames=4)
    title = drawn["report.png"].get_suptitle()
    assert title.startswith("shapes — Echo") and run.name not in title  # the model's name, not the run folder's
    grid = " ".join(t.get_text() for t in drawn["predictions.png"].texts).replace("\n", " ")
    assert grid.startswith("shapes on 4 of 30 validation frames, detections at the served thresholds: box ≥ 0.97, "
                           "disc ≥ 0.5") and run.name not in grid


def test_the_precision_recall_panel_stays_readable_when_every_curve_sits_at_precision_one(task):
    frames, _, found = zip(*report.detect_frames(Echo(task), items(task), 0.0), strict=True)
    figure = report.report_figure([], report.precision_recall(frames, found, task.annotations.labels),
                                  task.annotations.labels, frames=len(frames))
    pr = figure.axes[4]
    classes = pr.get_lines()[:4]
    assert all(set(line.get_ydata()) == {1.0} for line in classes)  # all four on top of each other
    assert pr.get_ylim()[1] > 1.05  # below the frame's top border, not on it
    assert len({line.get_marker() for line in classes}) == 4  # each class its own marker ...
    marked = [set(np.asarray(line.get_xdata())[line.get_markevery()[0]::line.get_markevery()[1]].round(2))
              for line in classes]
    assert all(not (a & b) for i, a in enumerate(marked) for b in marked[i + 1:])  # ... at recalls of its own


def test_the_prediction_grid_marks_misses_and_false_positives_and_says_its_thresholds(task, tmp_path):
    detector = noisy(task)
    thresholds = {"box": 0.5, "disc": 0.4, "triangle": 0.5, "blob": 0.5}
    paths = report.write_report(tmp_path, detector, items(task), task.annotations.labels, threshold=thresholds,
                                name="shapes", max_frames=4)
    assert png_size(paths[1])[0] > 0
    frames = [task.annotations.frames[n] for n in (0, 1)]
    grid = []
    for frame in frames:
        image = next(iter(task.images.decoded([frame.frame])))[1]
        kept = [s for s in detector.answers[key(image)] if s.score >= 0.5]
        grid.append((image, frame, FrameAnnotations(frame.frame, frame.width, frame.height, frame.name, kept)))
    figure = report._grid_figure(grid, "t", 2, task.annotations.labels)
    legend = [t.get_text() for t in figure.legends[0].get_texts()]
    assert any(text.startswith("missed: no prediction at IoU ≥ 0.5") for text in legend)
    assert any(text.startswith("false positive") for text in legend)
    first, second = figure.axes
    assert "(1 missed" in first.get_title() and "(1 missed, 1 false" in second.get_title()
    red = [t.get_text() for t in first.texts if t.get_bbox_patch().get_facecolor()[:3] == (224 / 255, 0.0, 0.0)]
    assert red == [frames[0].shapes[0].label]  # the missed object's label, on red
    assert [t.get_text() for t in second.texts if t.get_text().endswith("✗")] == ["box 0.95 ✗"]
    assert report.threshold_text(thresholds) == \
        "at the served thresholds: box ≥ 0.5, disc ≥ 0.4, triangle ≥ 0.5, blob ≥ 0.5"
    assert report.threshold_text(dict.fromkeys(thresholds, 0.5)) == "with score ≥ 0.5"


def test_a_run_without_validation_frames_still_shows_its_losses(task, tmp_path):
    write_metrics(tmp_path, validations=1)
    paths = report.write_report(tmp_path, Echo(task), [], task.annotations.labels, threshold=0.5)
    assert [p.name for p in paths] == ["report.png", "predictions.png"]
    assert png_size(paths[0]) == (1700, 1500)
    figure = report.report_figure(report.read_records(tmp_path / "metrics.jsonl"), None, task.annotations.labels)
    loss, lr, *others = figure.axes
    assert len(loss.get_lines()) == 6 and len(lr.get_lines()) == 1  # 3 series, as logged and smoothed
    for ax in others:
        assert [t.get_text() for t in ax.texts] == ["no validation frames"]
    assert "no validation frames" in texts(report._grid_figure([], "t", 4, None))
    keep(paths[0], "report-no-validation.png")


def test_a_run_with_no_metrics_yet_says_so_rather_than_drawing_blank_panels(task, tmp_path):
    figure = report.report_figure(report.read_records(tmp_path / "missing.jsonl"), None, task.annotations.labels)
    assert [t.get_text() for t in figure.axes[0].texts] == ["no training steps logged"]
    (tmp_path / "metrics.jsonl").write_text('{"event": "train", "step": 1, "lr": 0.1, "loss": 2.0}\n{"event": "tr')
    assert len(report.read_records(tmp_path / "metrics.jsonl")) == 1  # a torn last line is skipped


def test_a_diverged_run_with_nan_and_infinite_losses_still_gets_its_report(task, tmp_path):
    records = [{"event": "train", "step": step, "total_steps": 4, "lr": 0.01, "loss": loss, "classification": loss}
               for step, loss in enumerate([3.0, 40.0, float("inf"), float("nan")], start=1)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))  # NaN, Infinity
    assert math.isnan(report.read_records(tmp_path / "metrics.jsonl")[-1]["loss"])
    paths = report.write_report(tmp_path, Echo(task), items(task)[:3], task.annotations.labels, threshold=0.5)
    assert png_size(paths[0]) == (1700, 1500)
    figure = report.report_figure(report.read_records(tmp_path / "metrics.jsonl"), None, task.annotations.labels)
    assert 40 < figure.axes[0].get_ylim()[1] < 100


def test_prediction_grid_takes_bytes_or_arrays_and_outlines_every_shape_type(task, tmp_path):
    frames = list(task.annotations.frames.values())
    chosen = sorted(frames, key=lambda f: -len({s.type for s in f.shapes}))[:5]
    grid = []
    for i, frame in enumerate(chosen):
        data = next(task.images.encoded([frame.frame]))[1]
        predicted = [dataclasses.replace(s, score=0.5 + 0.1 * j) for j, s in enumerate(frame.shapes)]
        grid.append((data if i % 2 else decode_rgb(data), frame,
                     FrameAnnotations(frame.frame, frame.width, frame.height, frame.name, predicted)))
    path = report.prediction_grid(grid, tmp_path / "grid.png", title="five frames", columns=3)
    width, height = png_size(path)
    assert 3 * 640 <= width <= 3 * 640 + 80 and 2 * 480 + 80 <= height <= 2 * 480 + 300
    figure = report._grid_figure(grid, "five frames", 3, task.annotations.labels)
    assert len(figure.axes) == 5
    outlines = sum(len(report._outlines(s, 320, 240)) for _, f, _ in grid for s in f.shapes)
    for ax, (_, truth, predicted) in zip(figure.axes, grid, strict=True):
        assert ax.get_images()[0].get_array().shape == (240, 320, 3)
        tags = [t.get_text() for t in ax.texts]
        assert sorted(tags) == sorted([s.label for s in truth.shapes] +
                                      [f"{s.label} {s.score:.2f}" for s in predicted.shapes])
    assert sum(len(ax.patches) for ax in figure.axes) == 4 * outlines  # truth and prediction, each over a stroke
    legend = [t.get_text() for t in figure.legends[0].get_texts()]
    assert legend[0].startswith("ground truth (dashed")
    assert all(text.startswith("predicted ") for text in legend[1:])
    dashes = {p.get_linestyle() for ax in figure.axes for p in ax.patches}
    assert "--" in dashes or any(isinstance(d, tuple) for d in dashes)  # truth dashed, predictions solid
    assert "solid" in dashes or "-" in dashes


def test_a_mask_is_outlined_region_by_region_in_pixel_edges():
    from preannotate.formats import masks

    bitmap = np.zeros((40, 60), dtype=bool)
    bitmap[5:15, 10:20] = True  # two separate regions of one mask
    bitmap[25:35, 40:50] = True
    outlines = report._outlines(Shape("blob", "mask", masks.bitmap_to_cvat_rle(bitmap)), 60, 40)
    assert len(outlines) == 2 and all(closed for _, closed in outlines)
    boxes = sorted((float(o[:, 0].min()), float(o[:, 1].min()), float(o[:, 0].max()), float(o[:, 1].max()))
                   for o, _ in outlines)
    assert boxes == [(10.0, 5.0, 20.0, 15.0), (40.0, 25.0, 50.0, 35.0)]  # along the pixels' outer edges


def test_drawing_leaves_pyplot_and_the_global_backend_alone(tmp_path):
    code = ("import sys, matplotlib, numpy as np\n"
            "from pathlib import Path\n"
            "peek = lambda: dict.__getitem__(matplotlib.rcParams, 'backend')  # get_backend() would resolve it\n"
            "before = peek()\n"
            "from preannotate.training import report\n"
            "from preannotate.shapes import FrameAnnotations\n"
            f"report.prediction_grid([(np.zeros((24, 32, 3), np.uint8), FrameAnnotations(0, 32, 24), "
            f"FrameAnnotations(0, 32, 24))], Path({str(tmp_path / 'g.png')!r}))\n"
            "assert 'matplotlib.pyplot' not in sys.modules\n"
            "assert peek() == before\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    assert png_size(tmp_path / "g.png")[0] > 0


def test_a_random_init_ssdlite_gets_a_report_of_its_own(task, tmp_path):
    from preannotate.models import create_detector

    torch.manual_seed(0)
    detector = create_detector("ssdlite320_mobilenet_v3_large", task.annotations.labels, init="random")
    write_metrics(tmp_path, steps=40, validations=2)
    started = time.perf_counter()
    paths = report.write_report(tmp_path, detector, items(task), task.annotations.labels,
                                threshold=detector.manifest.score_threshold)
    seconds = time.perf_counter() - started
    print(f"write_report of 30 frames of 320x240 with ssdlite: {seconds:.1f} s")
    assert all(p.is_file() and png_size(p)[0] > 1000 for p in paths)
    keep(paths[0], "report-ssdlite.png")
    keep(paths[1], "predictions-ssdlite.png")
