"""Pictures a person looks at after a training run, in the spirit of Ultralytics' ``results.png`` and mosaics.

``write_report`` leaves two PNGs in a run directory:

* ``report.png``: the training losses (total and each component) and the learning rate against steps (from
  ``metrics.jsonl``), mAP@.5 and mAP@[.5:.95] at each validation, AP@.5 per class at the best validation, and
  precision–recall curves per class at IoU .5 of the detector given, run over the validation frames with no score
  threshold and scored with pycocotools (``evaluation.coco_metrics(curves=True)``) in the frames' own pixels; then
  what a reviewer would pay: each label's review edits per 100 true objects against the threshold, its served
  threshold starred (``training.edits``), and the confusion matrix at the served thresholds (labels and background:
  a miss is a true object matched to nothing, a false positive a prediction matched to nothing);
* ``predictions.png`` (``prediction_grid``): validation frames, upscaled, with their ground truth (dashed white on
  black) and the detections at the served thresholds (solid, a colour per label, tagged "label 0.93"); a missed
  object's label is on red, a false positive's tag ends in ✗. Learned attributes follow the label, on the
  detections and on the truth (``attribute_text``: "box 0.93 red striped large");
* ``attributes.png``, for a model that learned attributes (``attributes_figure``): each attribute's accuracy on the
  validation frames' true boxes beside the majority-class peer's, and the share it answers.

A classifier's report (its detector returns tags) has top-1 and top-5 accuracy at each validation, the accuracy per
class at the best one, and the confusion matrix of its tags on the validation frames in place of the mAP, AP and
precision-recall panels; its grid shows each frame's true tag and the predicted one.

Only matplotlib's object API draws them (a ``Figure`` rendered by ``FigureCanvasAgg``): no pyplot, and no global
backend or rcParams is touched, so this is safe in a server process beside other users of matplotlib.
"""

from __future__ import annotations

import json
import math
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.legend_handler import HandlerTuple
from matplotlib.lines import Line2D
from matplotlib.patches import Polygon, Rectangle

from preannotate.formats import masks
from preannotate.frames import FrameImages, decode_rgb
from preannotate.models.keypoints import KEYPOINT_TYPES, skeleton_edges
from preannotate.shapes import LEARNED_ATTRIBUTE_TYPES, TAG, FrameAnnotations, Label, Shape
from preannotate.training import edits
from preannotate.training.edits import threshold_text
from preannotate.training.evaluation import (  # noqa: F401 - detect_frames and its batch: part of this module's API
    DETECT_BATCH,
    RECALL_POINTS,
    SAMPLE_FRAMES,
    detect_frames,
    headline,
    sample_detections,
    score_keypoints,
    score_shapes,
    spread,
)

__all__ = ["PR_FRAMES", "detect_frames", "precision_recall", "prediction_grid", "report_figure", "review_work",
           "threshold_text", "write_report"]

DPI = 100
PR_FRAMES = SAMPLE_FRAMES  # validation frames the precision-recall curves are computed over, at most
MIN_CELL_PX = 560  # frames narrower than this are upscaled by a whole factor to at least this width
MAX_CELL_PX = 800  # and wider ones shown at most this wide
MAX_DRAWN = 40  # predictions drawn per frame at most, the most confident (its caption says so when it cuts)
# Vivid colours that stand out on photographs and on white plots alike; the first four differ from the synthetic
# objects' own colours (red boxes, blue discs, green triangles, yellow blobs) so an outline never vanishes into them.
PALETTE = ("#ff37c7", "#00c8ff", "#ff8c1a", "#9b5cff", "#48d10a", "#ff3838", "#e6b800", "#1a6dff", "#00b386",
           "#ff95c8", "#8c564b", "#6473ff", "#00d4bb", "#c71585", "#7f7f00", "#ff6f61")
NOT_LOSSES = {"event", "step", "total_steps", "lr", "images_per_s", "data_wait", "eta_s", "elapsed_s"}
TRUTH_UNDER = {"color": "black", "linewidth": 3.0}
TRUTH_OVER = {"color": "white", "linewidth": 1.3, "linestyle": (0, (4, 3))}
PREDICTION_UNDER = {"color": "black", "linewidth": 4.4}
PREDICTION_WIDTH = 2.8


# --- write_report ---------------------------------------------------------------------------------------------------

def write_report(run_dir: Path, detector, val_items: Sequence[tuple[FrameAnnotations, FrameImages]],
                 labels: Sequence[Label], *, threshold: float | Mapping[str, float], name: str = "",
                 sample: tuple[list[tuple[FrameAnnotations, FrameImages]], list[list[Shape]]] | None = None,
                 max_frames: int = 16) -> list[Path]:
    """Write ``run_dir/report.png`` and ``run_dir/predictions.png``; return their paths.

    The detector runs once, with no threshold, over up to ``PR_FRAMES`` validation frames spread over
    ``val_items`` (or ``sample`` is what it found there, ``evaluation.sample_detections``): all its detections make
    the precision-recall and edit curves, those scoring ``threshold`` or more (one for all labels, or each label's
    served one) the confusion matrix and, on up to ``max_frames`` of those frames, the prediction grid. ``name``
    (the model's name) heads the report, else the run directory's."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    records = read_records(run_dir / "metrics.jsonl")
    scored, predicted = sample if sample is not None else sample_detections(detector, list(val_items), PR_FRAMES)
    frames = [frame for frame, _ in scored]
    shown = spread(list(range(len(scored))), max(0, max_frames))
    thresholds = _thresholds(threshold, labels)
    tags = getattr(detector, "output", None) == TAG
    if tags:  # a classifier's frames: their true tag, and no shapes to draw
        frames = [FrameAnnotations(f.frame, f.width, f.height, f.name, tags=f.tags) for f in frames]
    curves = (confusion(frames, predicted, labels) if tags else precision_recall(frames, predicted, labels)) \
        if frames else None
    review = review_work(frames, predicted, labels, thresholds) if frames and not tags else None
    manifest = getattr(detector, "manifest", None)
    architecture = getattr(manifest, "architecture", "") or type(detector).__name__
    report = run_dir / "report.png"
    _save(report_figure(records, curves, labels, frames=len(frames), title=f"{name or run_dir.name} — {architecture}",
                        review=review), report)
    grid = []
    for i in shown:
        frame, images = scored[i]
        kept = [s for s in predicted[i] if edits.score_of(s) >= thresholds.get(s.label, 0.0)]
        grid.append((next(iter(images.decoded([frame.frame])))[1], frames[i],
                     FrameAnnotations(frame.frame, frame.width, frame.height, frame.name, kept)))
    title = (f"{name or architecture} on {len(grid)} of {len(val_items)} validation frames, "
             f"{'tags' if tags else 'detections'} {threshold_text(thresholds)}")
    predictions = prediction_grid(grid, run_dir / "predictions.png", title=title, labels=labels)
    attribute_model = getattr(detector, "attribute_model", None)  # models.attributes.AttributedDetector
    if attribute_model is None:
        return [report, predictions]
    chart = run_dir / "attributes.png"
    _save(attributes_figure(attribute_model.metrics, title=f"{name or run_dir.name} — attributes"), chart)
    return [report, predictions, chart]


def attributes_figure(heads: Mapping[str, Mapping[str, Any]], title: str = "") -> Figure:
    """``attributes.png``: each learned attribute's accuracy on the validation frames' true boxes beside the
    majority-class peer's (always its commonest training value), with the share it answers (the rest it leaves
    unset) and the accuracy of those answers; an attribute not served (it did not beat the peer) is marked."""
    keys = list(heads)
    figure = Figure(figsize=(9, 1.6 + 0.55 * max(1, len(keys))), dpi=DPI, layout="constrained")
    ax = figure.add_subplot()
    ax.set_title(title or "Attributes", fontsize=12, fontweight="bold")
    if not keys:
        _say(ax, "no learned attributes")
        return figure
    rows = np.arange(len(keys))
    accuracy = [_nan(heads[k].get("accuracy")) for k in keys]
    peer = [_nan(heads[k].get("majority")) for k in keys]
    ax.barh(rows - 0.2, np.nan_to_num(accuracy), height=0.38, color=PALETTE[1], edgecolor="black", linewidth=0.6,
            label="accuracy (true boxes)")
    ax.barh(rows + 0.2, np.nan_to_num(peer), height=0.38, color="#bbbbbb", edgecolor="black", linewidth=0.6,
            label="majority-class peer")
    for row, key in zip(rows, keys, strict=True):
        head = heads[key]
        if head.get("accuracy") is None:
            text = "no validation shapes"
        else:
            answered, right = head.get("answered"), head.get("answered_accuracy")
            text = f"{head['accuracy']:.3f}; answers {answered:.0%}"
            text += "" if right is None else f" ({right:.3f} right)"
            text += "" if head.get("trusted", True) else "; not served"
        ax.text(np.nan_to_num(accuracy[row]) + 0.01, row - 0.2, text, va="center", fontsize=9)
    ax.set_yticks(rows, [f"{k} ({heads[k].get('shapes', 0)})" for k in keys], fontsize=10)
    ax.set_ylim(len(keys) - 0.5, -0.6)
    ax.set_xlim(0, 1.45)
    ax.set_xticks(np.linspace(0, 1, 6))
    ax.set_xlabel("share right on the validation frames (label/attribute (shapes))", fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncols=2, fontsize=9, frameon=False)
    return figure


def attribute_text(attributes: Mapping[str, str], names: Sequence[str] | None = None) -> str:
    """Attribute values for a caption: a select's or radio's value, a checkbox's name when true and ``no name``
    when false (only ``names`` when given)."""
    words = []
    for name, value in attributes.items():
        if names is not None and name not in names:
            continue
        lowered = str(value).lower()
        words.append(name if lowered == "true" else f"no {name}" if lowered == "false" else str(value))
    return " ".join(words)


def _thresholds(threshold: float | Mapping[str, float], labels: Sequence[Label]) -> dict[str, float]:
    if isinstance(threshold, Mapping):
        return {label.name: float(threshold.get(label.name, 0.0)) for label in labels}
    return {label.name: float(threshold) for label in labels}


def review_work(frames: Sequence[FrameAnnotations], predicted: Sequence[Sequence[Shape]], labels: Sequence[Label],
                thresholds: Mapping[str, float]) -> dict[str, Any]:
    """What the review panels draw (``training.edits``): each label's edits per 100 true objects at each of
    ``edits.CURVE_POINTS`` and at its served threshold, the whole at the served thresholds, and the confusion
    matrix there."""
    truth = [frame.shapes for frame in frames]
    curves = edits.edit_curves(truth, predicted, labels)
    served = {name: curve.at(thresholds.get(name, 0.0)) for name, curve in curves.items()}
    return {"thresholds": dict(thresholds), "points": [float(t) for t in edits.CURVE_POINTS],
            "per_100": {name: curve.per_100() for name, curve in curves.items()},
            "served": {name: found.to_dict() for name, found in served.items()},
            "total": sum(served.values(), edits.Edits()).to_dict(),
            "confusion": edits.confusion(truth, predicted, labels, lambda name: thresholds.get(name, 0.0))}


def read_records(path: Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` (none when it is missing; a torn last line is skipped)."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def precision_recall(frames: Sequence[FrameAnnotations], predictions: Sequence[Sequence[Shape]],
                     labels: Sequence[Label]) -> dict[str, Any]:
    """Box COCO metrics of ``predictions`` (the shapes found on each frame, scored) against the frames' ground
    truth, in the frames' own pixels, with each class's precision at IoU .5 over COCO's 101 recall points
    (``per_class[name]["precision50"]``, see ``coco_metrics``); a keypoint model's (skeleton and points labels) by
    OKS in place of IoU (``score_keypoints``)."""
    if any(label.type in KEYPOINT_TYPES for label in labels):
        return score_keypoints(frames, predictions, labels, curves=True)
    return score_shapes(frames, predictions, labels, curves=True)


def confusion(frames: Sequence[FrameAnnotations], predictions: Sequence[Sequence[Shape]], labels: Sequence[Label]
              ) -> dict[str, Any]:
    """A classifier's confusion matrix: ``matrix[true][predicted]`` frame counts over ``labels`` (the last column:
    no tag predicted), of each frame's first tag against its best predicted tag."""
    index = {label.name: i for i, label in enumerate(labels)}
    matrix = np.zeros((len(labels), len(labels) + 1), int)
    for frame, predicted in zip(frames, predictions, strict=True):
        if frame.tags and frame.tags[0] in index:
            best = max((s for s in predicted if s.label in index), key=_score, default=None)
            matrix[index[frame.tags[0]], len(labels) if best is None else index[best.label]] += 1
    return {"confusion": matrix.tolist(), "labels": [label.name for label in labels]}


def _score(shape: Shape) -> float:
    return 1.0 if shape.score is None else float(shape.score)  # unscored counts as sure, as coco.to_results has it


def _save(figure: Figure, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(figure)
    partial = path.with_name(path.name + ".partial")
    figure.savefig(partial, format="png", dpi=DPI, facecolor="white")
    partial.replace(path)  # a watcher never sees half a picture


def _colours(names: Sequence[str]) -> dict[str, str]:
    return {name: PALETTE[i % len(PALETTE)] for i, name in enumerate(names)}


def _say(ax, text: str) -> None:
    """An empty panel that says why it is empty."""
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", fontsize=13, color="#555555")
    ax.set_xticks([])
    ax.set_yticks([])


# --- report.png -----------------------------------------------------------------------------------------------------

def report_figure(records: Sequence[dict[str, Any]], curves: dict[str, Any] | None, labels: Sequence[Label], *,
                  frames: int = 0, title: str = "", review: dict[str, Any] | None = None) -> Figure:
    """The report: losses, learning rate, validation mAP, AP@.5 per class, precision-recall curves, and for a
    detector its review edits against the threshold and its confusion matrix. ``curves`` is ``precision_recall``'s
    answer over ``frames`` validation frames (a classifier's: ``confusion``'s), None when there were none;
    ``review`` is ``review_work``'s."""
    train = sorted((r for r in records if r.get("event") == "train" and "step" in r), key=lambda r: r["step"])
    validations = sorted((r for r in records if r.get("event") == "validation" and "step" in r),
                         key=lambda r: r["step"])
    end = next((r for r in reversed(records) if r.get("event") == "end"), None)
    best = _best(validations, end)
    detector = curves is None or "confusion" not in curves
    figure = Figure(figsize=(17, 15 if detector else 10), dpi=DPI, layout="constrained")
    grid = figure.add_gridspec(3 if detector else 2, 3, width_ratios=(1, 1, 1),
                               height_ratios=(1, 1.15, 1.15) if detector else (1, 1.15))
    loss_ax, lr_ax, map_ax = (figure.add_subplot(grid[0, i]) for i in range(3))
    ap_ax, pr_ax = figure.add_subplot(grid[1, 0]), figure.add_subplot(grid[1, 1:])
    edits_ax, matrix_ax = (figure.add_subplot(grid[2, :2]), figure.add_subplot(grid[2, 2])) if detector else (None,
                                                                                                            None)
    interrupted = [r["step"] for r in records if r.get("event") == "interrupted" and "step" in r]
    _losses(loss_ax, train, interrupted)
    _learning_rate(lr_ax, train)
    if curves is None:
        for ax, what in ((map_ax, "Validation score"), (ap_ax, "Score per class"), (pr_ax, "Errors"),
                         (edits_ax, "Review edits"), (matrix_ax, "Confusion matrix")):
            ax.set_title(what, fontsize=12)
            _say(ax, "no validation frames")
    elif "confusion" in curves:  # a classifier
        _accuracies(map_ax, validations, best)
        _class_accuracy(ap_ax, best, curves)
        _confusion(pr_ax, curves, frames)
    else:
        _maps(map_ax, validations, best)
        _per_class(ap_ax, best, curves, labels, frames)
        _precision_recall(pr_ax, curves, labels, frames)
        if review is None:
            for ax, what in ((edits_ax, "Review edits"), (matrix_ax, "Confusion matrix")):
                ax.set_title(what, fontsize=12)
                _say(ax, "not computed")
        else:
            _review_edits(edits_ax, review, labels, frames)
            _detector_confusion(matrix_ax, review, frames)
    figure.suptitle(_headline(title, train, validations, best, end), fontsize=14, fontweight="bold")
    return figure


def _best(validations: Sequence[dict[str, Any]], end: dict[str, Any] | None) -> dict[str, Any] | None:
    """The validation whose weights were kept: the end record's ``best_step``, else the first of the best mAP."""
    if end and end.get("best_step") is not None:
        kept = [r for r in validations if r["step"] == end["best_step"]]
        if kept:
            return kept[-1]
    scored = [r for r in validations if headline(r) is not None]
    return max(scored, key=headline) if scored else (validations[-1] if validations else None)


def _headline(title: str, train: Sequence[dict], validations: Sequence[dict], best: dict | None,
              end: dict | None) -> str:
    parts = [title] if title else []
    last = max([r["step"] for r in [*train, *validations, *([end] if end else [])]], default=None)
    total = next((r.get("total_steps") for r in reversed([*train, *validations]) if r.get("total_steps")), None)
    if last is not None:
        parts.append(f"{last} of {total} steps" if total else f"{last} steps")
    if end and end.get("stopped") and end["stopped"] != "completed":
        parts.append(f"stopped: {end['stopped']}")
    if best and best.get("top1") is not None:
        parts.append(f"best top-1 {_fmt(best['top1'])}, top-5 {_fmt(best.get('top5'))} at step {best['step']}")
    elif best and best.get("map") is not None:
        parts.append(f"best mAP@.5 {_fmt(best.get('map50'))}, mAP@[.5:.95] {_fmt(best['map'])} at step "
                     f"{best['step']}")
    return " · ".join(parts) or "Training report"


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _smooth(values: np.ndarray) -> np.ndarray:
    """A centred moving average (edges averaged over what they have) of about a twentieth of the series."""
    window = max(3, len(values) // 20) | 1
    kernel = np.ones(window)
    padded = np.convolve(values, kernel, mode="same")
    counts = np.convolve(np.ones_like(values), kernel, mode="same")
    return padded / counts


def _losses(ax, train: Sequence[dict[str, Any]], interrupted: Sequence[int]) -> None:
    ax.set_title("Training loss", fontsize=12)
    keys = ["loss"] if any("loss" in r for r in train) else []
    for record in train:
        keys += [k for k, v in record.items() if k not in NOT_LOSSES and k not in keys and isinstance(v, (int, float))
                 and not isinstance(v, bool)]
    if not keys:
        _say(ax, "no training steps logged")
        return
    smooth = len(train) > 30
    colours = ["black", "#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf"]
    for i, key in enumerate(keys):
        points = [(r["step"], r[key]) for r in train if isinstance(r.get(key), (int, float))]
        steps, values = np.array([p[0] for p in points], float), np.array([p[1] for p in points], float)
        colour, width = colours[i % len(colours)], 2.2 if key == "loss" else 1.4
        name = "total" if key == "loss" else key
        if smooth:
            ax.plot(steps, values, color=colour, linewidth=0.8, alpha=0.3)
            ax.plot(steps, _smooth(values), color=colour, linewidth=width, label=name)
        else:
            ax.plot(steps, values, color=colour, linewidth=width, label=name, marker="o" if len(steps) < 12 else None,
                    markersize=3)
    for j, step in enumerate(interrupted):
        ax.axvline(step, color="#888888", linestyle=":", linewidth=1.2, label="interrupted" if j == 0 else None)
    ax.set_xlabel("step", fontsize=11)
    ax.set_ylabel("loss" + (" (faint: as logged, solid: smoothed)" if smooth else ""), fontsize=11)
    ax.set_ylim(0, _top(*[line.get_ydata() for line in ax.get_lines()]) * (1.2 + 0.06 * len(keys)))  # room: legend
    ax.grid(alpha=0.3)
    ax.legend(fontsize=9, loc="best", framealpha=0.85)


def _top(*series) -> float:
    """The highest finite value of the series (a diverged run logs NaN and inf), 1 when there is none above 0."""
    values = np.concatenate([np.asarray(s, dtype=float).ravel() for s in series]) if series else np.zeros(0)
    values = values[np.isfinite(values)]
    return float(values.max()) if values.size and values.max() > 0 else 1.0


def _learning_rate(ax, train: Sequence[dict[str, Any]]) -> None:
    ax.set_title("Learning rate", fontsize=12)
    points = [(r["step"], r["lr"]) for r in train if isinstance(r.get("lr"), (int, float))]
    if not points:
        _say(ax, "no training steps logged")
        return
    ax.plot([p[0] for p in points], [p[1] for p in points], color="#1f77b4", linewidth=2, label="learning rate",
            marker="o" if len(points) < 12 else None, markersize=3)
    ax.set_xlabel("step", fontsize=11)
    ax.set_ylabel("learning rate", fontsize=11)
    ax.set_ylim(0, _top([p[1] for p in points]) * 1.2)  # headroom for the legend
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=9, loc="best", framealpha=0.85)


def _maps(ax, validations: Sequence[dict[str, Any]], best: dict[str, Any] | None) -> None:
    masks_too = any("segm" in r for r in validations)
    _scores(ax, validations, best, "Validation mAP", "mAP", "map", masks_too,
            (("map50", "mAP@.5", "#d62728"), ("map", "mAP@[.5:.95]", "#1f77b4")))


def _accuracies(ax, validations: Sequence[dict[str, Any]], best: dict[str, Any] | None) -> None:
    _scores(ax, validations, best, "Validation accuracy", "accuracy", "top1", False,
            (("top1", "top-1", "#d62728"), ("top5", "top-5", "#1f77b4")))


def _scores(ax, validations: Sequence[dict[str, Any]], best: dict[str, Any] | None, title: str, unit: str,
            kept: str, masks_too: bool, series: Sequence[tuple[str, str, str]]) -> None:
    """Scores at each validation (``series``: key, name, colour), the kept one starred by its ``kept`` key; for a
    mask model the box scores dashed beside the mask ones."""
    ax.set_title(title, fontsize=12)
    if not validations:
        _say(ax, "no validation in metrics.jsonl yet")
        return
    what = " (masks)" if masks_too else ""
    steps = [r["step"] for r in validations]
    for key, name, colour in series:
        ax.plot(steps, [_nan(r.get(key)) for r in validations], color=colour, linewidth=2, marker="o",
                markersize=5, label=name + what)
        if masks_too:
            ax.plot(steps, [_nan((r.get("bbox") or {}).get(key)) for r in validations], color=colour, linewidth=1.2,
                    linestyle="--", marker=".", label=name + " (boxes)")
    if best is not None and best.get(kept) is not None:
        ax.plot([best["step"]], [best[kept]], marker="*", markersize=16, color="#ffbf00", markeredgecolor="black",
                linestyle="none", label=f"kept: step {best['step']}")
    ax.set_xlabel("step", fontsize=11)
    ax.set_ylabel(unit, fontsize=11)
    ax.set_ylim(0, 1.02)
    if len(set(steps)) == 1:
        ax.set_xlim(steps[0] - 1, steps[0] + 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=9, loc="best", framealpha=0.85)


def _class_accuracy(ax, best: dict[str, Any] | None, curves: dict[str, Any]) -> None:
    """Top-1 accuracy per class at the best validation (else of these weights, from the confusion matrix)."""
    names = curves["labels"]
    if best is not None and best.get("per_class"):
        values = [(best["per_class"].get(name) or {}).get("accuracy") for name in names]
        source = f"best validation, step {best['step']}"
    else:
        rows = np.asarray(curves["confusion"], float).reshape(len(names), -1)
        values = [rows[i, i] / rows[i].sum() if rows[i].sum() else None for i in range(len(names))]
        source = "these weights"
    ax.set_title(f"Top-1 accuracy per class ({source})", fontsize=12)
    if not names:
        _say(ax, "no labels")
        return
    colours = _colours(names)
    bars = ax.barh(np.arange(len(names)), [v or 0.0 for v in values], height=0.75,
                   color=[colours[n] for n in names], edgecolor="black", linewidth=0.6)
    for bar, value in zip(bars, values, strict=True):
        ax.text(bar.get_width() + 0.01, bar.get_y() + bar.get_height() / 2,
                "no frames" if value is None else f"{value:.3f}", va="center", fontsize=9)
    ax.set_yticks(np.arange(len(names)), names, fontsize=10 if len(names) <= 20 else 7)
    ax.set_ylim(len(names) - 0.5, -0.5)
    ax.set_xlim(0, 1.2)
    ax.set_xticks(np.linspace(0, 1, 6))
    ax.set_xlabel("accuracy", fontsize=11)
    ax.grid(axis="x", alpha=0.3)


def _confusion(ax, curves: dict[str, Any], frames: int) -> None:
    names = curves["labels"]
    matrix = np.asarray(curves["confusion"], int).reshape(len(names), len(names) + 1)
    ax.set_title(f"Confusion matrix (these weights on {frames} validation frames)", fontsize=12)
    if not matrix.sum():
        _say(ax, "no tagged validation frames")
        return
    ax.imshow(matrix, cmap="Blues", aspect="auto", vmin=0)
    for (row, column), count in np.ndenumerate(matrix):
        if count:
            dark = count > matrix.max() / 2
            ax.text(column, row, str(count), ha="center", va="center", fontsize=9 if len(names) <= 20 else 6,
                    color="white" if dark else "black")
    small = 10 if len(names) <= 20 else 6
    ax.set_xticks(np.arange(len(names) + 1), [*names, "no tag"], fontsize=small, rotation=45, ha="right")
    ax.set_yticks(np.arange(len(names)), names, fontsize=small)
    ax.set_xlabel("predicted (the best tag, whatever its score)", fontsize=11)
    ax.set_ylabel("true tag", fontsize=11)


def _nan(value: float | None) -> float:
    return float("nan") if value is None else float(value)


def _per_class(ax, best: dict[str, Any] | None, curves: dict[str, Any], labels: Sequence[Label], frames: int) -> None:
    names = [label.name for label in labels]
    if best is not None and (best.get("bbox") or {}).get("per_class"):
        series = [("box AP@.5", best["bbox"]["per_class"])]
        if (best.get("segm") or {}).get("per_class"):
            series.append(("mask AP@.5", best["segm"]["per_class"]))
        source = f"best validation, step {best['step']}"
    else:  # nothing validated in the log: the detector's own score over the frames
        series = [("box AP@.5", curves["per_class"])]
        source = f"these weights on {frames} validation frames"
    ax.set_title(f"AP@.5 per class ({source})", fontsize=12)
    if not names:
        _say(ax, "no labels")
        return
    height = 0.8 / len(series)
    colours = _colours(names)
    for j, (what, per_class) in enumerate(series):
        positions = np.arange(len(names)) + (j - (len(series) - 1) / 2) * height
        values = [(per_class.get(name) or {}).get("ap50") for name in names]
        bars = ax.barh(positions, [v or 0.0 for v in values], height=height * 0.92,
                       color=[colours[n] for n in names], edgecolor="black", linewidth=0.6,
                       hatch="//" if j else None)
        ax.add_patch(Rectangle((0, 0), 0, 0, facecolor="#cccccc", edgecolor="black", linewidth=0.6,
                               hatch="//" if j else None, label=f"{what}" + (" (hatched)" if j else "")))
        for bar, value in zip(bars, values, strict=True):
            ax.text(bar.get_width() + 0.01, bar.get_y() + bar.get_height() / 2,
                    "no ground truth" if value is None else f"{value:.3f}", va="center", fontsize=9)
    ax.set_yticks(np.arange(len(names)), names, fontsize=10 if len(names) <= 20 else 7)
    ax.set_ylim(len(names) - 0.5 + 0.6 + 0.12 * len(names), -0.5)  # an empty strip at the bottom: the legend
    ax.set_xlim(0, 1.25)
    ax.set_xticks(np.linspace(0, 1, 6))
    ax.set_xlabel("AP at IoU 0.5", fontsize=11)
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=9, loc="lower right", framealpha=0.85)


MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">", "h", "p")
LINESTYLES = ("-", "--", "-.", ":")
MARK_EVERY = 10  # a class's markers every tenth recall point, each class from its own offset


def _class_style(i: int) -> dict[str, Any]:
    """How class ``i``'s curve is told apart where it runs on top of another (every class at precision 1): its own
    marker at recall points no other class of the first ``MARK_EVERY`` marks, and its own dashes."""
    return {"marker": MARKERS[i % len(MARKERS)], "markevery": (i % MARK_EVERY, MARK_EVERY), "markersize": 6,
            "markeredgecolor": "black", "markeredgewidth": 0.5, "linestyle": LINESTYLES[i % len(LINESTYLES)]}


def _precision_recall(ax, curves: dict[str, Any], labels: Sequence[Label], frames: int) -> None:
    ax.set_title(f"Precision–recall at IoU 0.5 (boxes; every detection on {frames} validation frames)", fontsize=12)
    colours = _colours([label.name for label in labels])
    defined, missing = [], []
    for i, label in enumerate(labels):
        values = (curves["per_class"].get(label.name) or {}).get("precision50")
        if values is None or min(values) < 0:
            missing.append(label.name)
            continue
        curve = np.asarray(values, dtype=float)
        defined.append(curve)
        ap50 = curves["per_class"][label.name].get("ap50")
        ax.plot(RECALL_POINTS, curve, color=colours[label.name], linewidth=1.6, **_class_style(i),
                label=f"{label.name}  AP@.5 {_fmt(ap50)}")
    if not defined:
        _say(ax, "no ground truth among the validation frames")
        return
    ax.plot(RECALL_POINTS, np.mean(defined, axis=0), color="black", linewidth=3.5, zorder=1.9,  # under the classes
            label=f"all classes  mAP@.5 {_fmt(curves.get('map50'))}")
    if missing:
        ax.plot([], [], linestyle="none", label="no ground truth: " + _shorten(", ".join(missing), 40))
    ax.set_xlabel("recall", fontsize=11)
    ax.set_ylabel("precision", fontsize=11)
    ax.set_xlim(0, 1.0)
    ax.set_ylim(-0.04, 1.1)  # a curve at 0 stays above the axis, one at 1 below the frame
    ax.set_yticks(np.linspace(0, 1, 6))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=10, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0,
              ncols=1 if len(defined) <= 24 else 2)


def _review_edits(ax, review: dict[str, Any], labels: Sequence[Label], frames: int) -> None:
    """Each label's edits per 100 of its true objects against the threshold, its served threshold starred; all
    labels together at one threshold (black), and drawing everything from scratch (100)."""
    ax.set_title(f"Review edits against the threshold ({frames} validation frames)", fontsize=12)
    points = np.asarray(review["points"], float)
    colours = _colours([label.name for label in labels])
    served, drawn, missing = review["served"], [], []
    weighted = np.zeros(len(points))
    for i, label in enumerate(labels):
        values = review["per_100"].get(label.name)
        objects = (served.get(label.name) or {}).get("objects", 0)
        if not objects or values is None:
            missing.append(label.name)
            continue
        curve = np.asarray([_nan(v) for v in values], float)
        weighted += curve * objects
        threshold, at = review["thresholds"].get(label.name, 0.0), served[label.name]["per_100"]
        style = {k: v for k, v in _class_style(i).items() if k not in ("marker", "markevery")}
        ax.plot(points, curve, color=colours[label.name], linewidth=1.8, **style,
                label=f"{_shorten(label.name, 24)}: {at:.0f} at {threshold:.2g} ({objects} objects)")
        ax.plot([threshold], [at], marker="*", markersize=17, color=colours[label.name], markeredgecolor="black",
                linestyle="none", zorder=5)
        drawn.append(at)
    if not drawn:
        _say(ax, "no true objects among the validation frames")
        return
    total = review["total"]
    ax.plot(points, weighted / total["objects"], color="black", linewidth=3.0, zorder=1.9,
            label=f"all labels at one threshold; at the served ones ★: {total['per_100']:.0f} "
                  f"({total['adds']} adds, {total['deletes']} deletes, {total['moves']} moves)")
    ax.axhline(100, color="#888888", linestyle=":", linewidth=1.4, label="drawing every object from scratch: 100")
    if missing:
        ax.plot([], [], linestyle="none", label="no true objects: " + _shorten(", ".join(missing), 40))
    ax.set_xlim(0, 1)
    ax.set_ylim(0, max(150.0, 1.6 * max(drawn)))  # near threshold 0 the false positives run off the top
    ax.set_xlabel("score threshold (★ each label's served threshold)", fontsize=11)
    ax.set_ylabel(f"edits per 100 true objects\n(adds + deletes + moves at IoU < {edits.MOVE_IOU:g})", fontsize=11)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=9, loc="best", framealpha=0.85)


def _detector_confusion(ax, review: dict[str, Any], frames: int) -> None:
    """Labels × labels + background at the served thresholds: the diagonal is right, off it a wrong label, the last
    column true objects nothing matched (misses), the last row predictions that matched nothing (false
    positives)."""
    names, matrix = review["confusion"]["labels"], np.asarray(review["confusion"]["matrix"], int)
    ax.set_title(f"Confusion matrix at the served thresholds ({frames} validation frames)", fontsize=12)
    if not matrix.sum():
        _say(ax, "nothing true and nothing predicted")
        return
    ax.imshow(matrix, cmap="Blues", aspect="auto", vmin=0)
    small = 10 if len(names) <= 20 else 6
    for (row, column), count in np.ndenumerate(matrix):
        if count:
            ax.text(column, row, str(count), ha="center", va="center", fontsize=9 if len(names) <= 20 else 6,
                    color="white" if count > matrix.max() / 2 else "black")
    shown = [_shorten(name, 16) for name in names[:-1]]
    ax.set_xticks(np.arange(len(names)), [*shown, "nothing (missed)"], fontsize=small, rotation=45, ha="right")
    ax.set_yticks(np.arange(len(names)), [*shown, "nothing (false positive)"], fontsize=small)
    ax.set_xlabel("predicted (IoU ≥ 0.5, any label)", fontsize=11)
    ax.set_ylabel("true", fontsize=11)


def _shorten(text: str, length: int, keep_end: bool = False) -> str:
    if len(text) <= length:
        return text
    return "…" + text[len(text) - length + 1:] if keep_end else text[:length - 1] + "…"


# --- predictions.png ------------------------------------------------------------------------------------------------

def prediction_grid(frames: Sequence[tuple[bytes | np.ndarray, FrameAnnotations, FrameAnnotations]],
                    path: Path, *, title: str = "", columns: int = 4,
                    labels: Sequence[Label] | None = None) -> Path:
    """A grid of frames (encoded image bytes or an RGB HxWx3 uint8 array; the ground truth; the predictions, whose
    Shape.score is set) saved as a PNG at ``path``. Ground truth is dashed white on black, predictions solid in a
    colour per label (``labels``' order when given, else the order met) with a "label score" tag; small frames are
    upscaled by a whole factor so the tags stay legible."""
    path = Path(path)
    _save(_grid_figure(frames, title, columns, labels), path)
    return path


def _rgb(image: bytes | np.ndarray) -> np.ndarray:
    array = decode_rgb(bytes(image)) if isinstance(image, (bytes, bytearray, memoryview)) else np.asarray(image)
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    return array[:, :, :3]


def _text_px(text: str, fontsize: float) -> float:
    """About how wide ``text`` is drawn in DejaVu Sans at ``fontsize`` points, in pixels (for layout only)."""
    return len(text) * fontsize * 0.6 * DPI / 72


def _grid_figure(frames: Sequence[tuple[bytes | np.ndarray, FrameAnnotations, FrameAnnotations]], title: str,
                 columns: int, labels: Sequence[Label] | None) -> Figure:
    if not frames:
        figure = Figure(figsize=(8, 3), dpi=DPI)
        if title:
            figure.text(0.5, 0.95, textwrap.fill(title, 90), ha="center", va="top", fontsize=12, fontweight="bold")
        figure.text(0.5, 0.45, "no validation frames", ha="center", va="center", fontsize=16, color="#555555")
        return figure
    images = [_rgb(image) for image, _, _ in frames]
    names = [label.name for label in labels or ()]
    for _, truth, predicted in frames:
        names += [s.label for s in [*truth.shapes, *predicted.shapes] if s.label not in names]
    colours = _colours(names)
    learned = {label.name: [spec.name for spec in label.attributes if spec.input_type in LEARNED_ATTRIBUTE_TYPES]
               for label in labels or ()}  # the attribute values the truth's captions show
    edges = {label.name: skeleton_edges(label) for label in labels or ()}
    widest = max(image.shape[1] for image in images)
    cell = widest * math.ceil(MIN_CELL_PX / widest) if widest < MIN_CELL_PX else min(widest, MAX_CELL_PX)
    scale = cell / widest  # screen pixels per frame pixel
    aspect = max(image.shape[0] / image.shape[1] for image in images)
    columns = max(1, min(columns, len(frames)))
    rows = math.ceil(len(frames) / columns)
    gap, caption = 14 / DPI, 28 / DPI  # inches: between cells, and for each frame's caption
    cell_w, cell_h = cell / DPI, cell * aspect / DPI
    width = columns * cell_w + (columns + 1) * gap
    # The header: the title, wrapped to the figure's width, then the legend, as many entries a row as fit.
    title_lines = textwrap.wrap(title, max(20, int(width * DPI * 0.95 / _text_px("x", 13)))) if title else []
    used = sorted({s.label for _, _, predicted in frames for s in predicted.shapes}, key=names.index)
    tagged = not any(t.shapes or any(s.type != TAG for s in p.shapes) for _, t, p in frames)
    reviews = [edits.review_frame(truth.shapes, predicted.shapes) for _, truth, predicted in frames]
    marked = (any(r.missed for r in reviews), any(r.false for r in reviews))
    handles = [] if tagged else _legend_handles(used, colours, *marked)  # a classifier's tags say what they are
    entry_px = max((_text_px(text, 12) for _, text in handles), default=0) * 0.85 + 100  # text, handle, spacing
    legend_columns = max(1, min(len(handles), int(width * DPI * 0.95 // entry_px)))
    legend_rows = math.ceil(len(handles) / legend_columns)
    title_h = 0.1 + 0.25 * len(title_lines)
    header = title_h + 0.27 * legend_rows + 0.2
    height = header + rows * (cell_h + caption + gap)
    figure = Figure(figsize=(width, height), dpi=DPI)
    if title_lines:
        figure.text(0.5, 1 - 0.1 / height, "\n".join(title_lines), ha="center", va="top", fontsize=13,
                    fontweight="bold", linespacing=1.15)
    if handles:
        figure.legend(handles=[h for h, _ in handles], labels=[n for _, n in handles], loc="upper center",
                      bbox_to_anchor=(0.5, 1 - title_h / height), ncols=legend_columns, fontsize=12,
                      frameon=False, handler_map={tuple: HandlerTuple(ndivide=1)}, handlelength=3.2,
                      columnspacing=1.6)
    for index, ((_, truth, predicted), image, review) in enumerate(zip(frames, images, reviews, strict=True)):
        row, column = divmod(index, columns)
        left = gap + column * (cell_w + gap)
        top = header + row * (cell_h + caption + gap) + caption
        ax = figure.add_axes((left / width, 1 - (top + cell_h) / height, cell_w / width, cell_h / height))
        _draw_frame(ax, image, truth, predicted, colours, scale, cell, review, learned, edges)
    return figure


MISSED = "#e00000"  # the background of a missed object's label
FALSE_MARK = " ✗"    # ends the tag of a prediction that matches no true object


def _legend_handles(used: Sequence[str], colours: dict[str, str], missed: bool = False, false: bool = False
                    ) -> list[tuple[Any, str]]:
    truth = (Line2D([], [], **TRUTH_UNDER), Line2D([], [], **TRUTH_OVER))
    handles: list[tuple[Any, str]] = [(truth, "ground truth (dashed, label below)")]
    if missed:
        handles.append((Rectangle((0, 0), 1, 1, facecolor=MISSED, edgecolor="black"),
                        f"missed: no prediction at IoU ≥ {edits.MATCH_IOU:g} (label on red)"))
    if false:
        handles.append((Line2D([], [], linestyle="none", marker="x", color="black", markersize=9, markeredgewidth=2),
                        "false positive: matches no true object (tag ends in ✗)"))
    for name in used:
        handles.append(((Line2D([], [], **PREDICTION_UNDER), Line2D([], [], color=colours[name],
                                                                     linewidth=PREDICTION_WIDTH)),
                        f"predicted {_shorten(name, 30)} (solid, score above)"))
    if not used:
        handles.append(((Line2D([], [], **PREDICTION_UNDER), Line2D([], [], color="#bbbbbb",
                                                                     linewidth=PREDICTION_WIDTH)),
                        "predictions (solid, score above): none on these frames"))
    return handles


def _draw_frame(ax, image: np.ndarray, truth: FrameAnnotations, predicted: FrameAnnotations,
                colours: dict[str, str], scale: float, cell: int, review: edits.FrameReview | None = None,
                learned: Mapping[str, Sequence[str]] | None = None,
                edges: Mapping[str, Sequence[tuple[int, int]]] | None = None) -> None:
    height, width = image.shape[:2]
    ax.imshow(image, extent=(0, width, height, 0), interpolation="nearest" if scale >= 1 else "antialiased")
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_color("#444444")
    tags = [shape for shape in predicted.shapes if shape.type == TAG]
    if truth.tags or tags:
        _frame_tags(ax, truth.tags, tags, colours, scale)
    shown = sorted((s for s in predicted.shapes if s.type != TAG), key=_score)[-MAX_DRAWN:]  # the most confident,
    # drawn last: on top
    # Truth's white dashes go over everything, its black under everything: a detection right on the truth shows
    # as its colour with the truth's dashes running along the middle, rather than hiding it.
    for shape in truth.shapes:
        for outline, closed in _outlines(shape, width, height, (edges or {}).get(shape.label, ())):
            ax.add_patch(Polygon(outline, closed=closed, fill=False, joinstyle="round", **TRUTH_UNDER, zorder=2))
            ax.add_patch(Polygon(outline, closed=closed, fill=False, **TRUTH_OVER, zorder=5))
    for shape in shown:
        colour = colours.get(shape.label, PALETTE[0])
        for outline, closed in _outlines(shape, width, height, (edges or {}).get(shape.label, ())):
            ax.add_patch(Polygon(outline, closed=closed, fill=False, joinstyle="round", **PREDICTION_UNDER, zorder=3))
            ax.add_patch(Polygon(outline, closed=closed, fill=False, color=colour, linewidth=PREDICTION_WIDTH,
                                 zorder=4))
    review = review or edits.FrameReview()
    missed, false = set(review.missed), {id(predicted.shapes[i]) for i in review.false}
    filled = sorted({name for shape in predicted.shapes for name in shape.attributes})  # what the model fills
    for index, shape in enumerate(truth.shapes):  # the true label under its outline, white on black (a miss: on
        # red), with the values of the attributes a model learns; predictions' tags go above
        names = (learned or {}).get(shape.label, filled)
        text = " ".join(filter(None, (shape.label, attribute_text(shape.attributes, names))))
        _tag(ax, shape, text, MISSED if index in missed else "#000000", width, height, scale, below=True)
    for shape in shown:  # tags above every outline
        text = f"{shape.label} {shape.score:.2f}" if shape.score is not None else shape.label
        text = " ".join(filter(None, (text, attribute_text(shape.attributes))))
        _tag(ax, shape, text + (FALSE_MARK if id(shape) in false else ""), colours.get(shape.label, PALETTE[0]),
             width, height, scale)
    counts = "" if not truth.shapes and all(s.type == TAG for s in predicted.shapes) else \
        f": {len(truth.shapes)} true, {len(predicted.shapes)} predicted"
    wrong = [f"{len(part)} {what}" for part, what in ((review.missed, "missed"), (review.false, "false"),
                                                       (review.loose, "loose")) if part]
    if wrong:
        counts += f" ({', '.join(wrong)})"
    if len(shown) < len(predicted.shapes) - len(tags):
        counts += f" ({len(shown)} most confident drawn)"
    room = int(cell * 0.98 // _text_px("x", 11)) - len(counts)
    name = _shorten(truth.name or predicted.name or f"frame {truth.frame}", max(8, room), keep_end=True)
    ax.set_title(name + counts, fontsize=11, pad=4)


def _frame_tags(ax, truth: Sequence[str], predicted: Sequence[Shape], colours: dict[str, str], scale: float) -> None:
    """A frame's tags in its top-left corner: the true ones white on black, the predicted ones below in their
    label's colour with their score (a wrong one is marked)."""
    lines = [(f"true: {', '.join(truth)}", "#000000")] if truth else []
    for shape in sorted(predicted, key=_score, reverse=True):
        mark = "" if not truth or shape.label in truth else "  ✗"
        score = f" {shape.score:.2f}" if shape.score is not None else ""
        lines.append((f"{shape.label}{score}{mark}", colours.get(shape.label, PALETTE[0])))
    if truth and not predicted:
        lines.append(("no tag predicted", "#bbbbbb"))
    y = 4 / scale
    for text, colour in lines:
        red, green, blue = (int(colour[i:i + 2], 16) / 255 for i in (1, 3, 5))
        ink = "black" if 0.299 * red + 0.587 * green + 0.114 * blue > 0.55 else "white"
        ax.text(4 / scale, y, text, fontsize=11, color=ink, ha="left", va="top", zorder=6, clip_on=True,
                bbox={"boxstyle": "square,pad=0.2", "facecolor": colour, "edgecolor": "black", "linewidth": 0.6})
        y += (11 * 1.9 * DPI / 72) / scale


def _tag(ax, shape: Shape, text: str, colour: str, width: int, height: int, scale: float,
         below: bool = False) -> None:
    """``text`` on a filled background at the shape's top-left corner (bottom-left ``below``), outside the box
    when there is room and inside it at the frame's edge; right-aligned when it would run off the right edge."""
    try:
        x1, y1, x2, y2 = shape.bbox()
    except (ValueError, IndexError):
        return
    fontsize = 8 if below else 10
    text_h = (fontsize * 1.45 * DPI / 72) / scale  # frame pixels
    text_w = (len(text) * fontsize * 0.62 * DPI / 72) / scale
    x, ha = (max(0.0, x1), "left") if x1 + text_w <= width else (min(float(width), x2), "right")
    if below:
        y, va = (y2, "top") if y2 + text_h <= height else (min(float(height), y2), "bottom")
    else:
        y, va = (y1, "bottom") if y1 >= text_h else (max(0.0, y1), "top")
    red, green, blue = (int(colour[i:i + 2], 16) / 255 for i in (1, 3, 5))
    ink = "black" if 0.299 * red + 0.587 * green + 0.114 * blue > 0.55 else "white"
    ax.text(x, y, text, fontsize=fontsize, color=ink, ha=ha, va=va, zorder=6, clip_on=True,
            bbox={"boxstyle": "square,pad=0.18", "facecolor": colour, "edgecolor": "black", "linewidth": 0.6})


def _outlines(shape: Shape, width: int, height: int, edges: Sequence[tuple[int, int]] = ()
              ) -> list[tuple[np.ndarray, bool]]:
    """The outlines to draw for a shape, as ``(N×2 points, closed)``: every region of a mask, a polygon, a sampled
    ellipse or rotated rectangle; a polyline open; points as a tiny closed square each; a skeleton its ``edges``
    (keypoint index pairs, ``keypoints.skeleton_edges``) between visible keypoints, open, and its visible keypoints
    as points (a hidden one is not drawn); anything else its box."""
    try:
        if shape.type == "skeleton":
            seen = {i: element.points[:2] for i, element in enumerate(shape.elements)
                    if not element.outside and len(element.points) >= 2}
            lines = [(np.asarray([seen[a], seen[b]], dtype=float), False) for a, b in edges if a in seen and b in seen]
            dots = Shape(shape.label, "points", [v for point in seen.values() for v in point])
            return lines + _outlines(dots, width, height)
        if shape.type == "mask":
            return [(outline, True) for outline in _mask_outlines(shape.points)]
        if shape.type in ("rectangle", "polygon", "ellipse"):
            points = np.asarray(shape.polygon(), dtype=float).reshape(-1, 2)
            return [(points, True)] if len(points) >= 2 else []
        if shape.type == "polyline":
            return [(np.asarray(shape.points, dtype=float).reshape(-1, 2), False)]
        if shape.type == "points":
            if not shape.points:
                return []
            r = max(2.0, min(width, height) / 120)
            return [(np.array([[x - r, y - r], [x + r, y - r], [x + r, y + r], [x - r, y + r]]), True)
                    for x, y in np.asarray(shape.points, dtype=float).reshape(-1, 2)]
        x1, y1, x2, y2 = shape.bbox()
        return [(np.array([[x1, y1], [x2, y1], [x2, y2], [x1, y2]]), True)]
    except (ValueError, IndexError):  # a malformed shape is not drawn rather than failing the picture
        return []


def _mask_outlines(points: Sequence[float]) -> list[np.ndarray]:
    """Every region's outline of a CVAT RLE mask, and of its holes, along the pixel edges in image coordinates
    (``masks.bitmap_to_polygon`` of each 4-connected region, as the mask codecs count regions)."""
    import cv2

    box, (left, top, _, _) = masks.cvat_rle_box(points)
    outlines = []
    for part in (box, ~np.pad(box, 1)):  # the regions, then the background: its parts off the border are holes
        count, regions = cv2.connectedComponents(part.astype(np.uint8), connectivity=4)
        offset = 0 if part is box else -1
        for region in range(1, count):
            bitmap = regions == region
            if part is not box and (bitmap[0].any() or bitmap[-1].any() or bitmap[:, 0].any() or bitmap[:, -1].any()):
                continue  # the background around the mask, not a hole
            outline = np.asarray(masks.bitmap_to_polygon(bitmap, tolerance=0), dtype=float).reshape(-1, 2)
            if len(outline) >= 3:
                outlines.append(outline + [left + offset, top + offset])
    return outlines
