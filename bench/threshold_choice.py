"""Threshold-choice rules judged on many cases (issue 21): which served threshold saves review edits on frames the
choice never saw.

A few small detectors are trained (the registry's default ``ssdlite320_mobilenet_v3_large`` from random init, as
``bench/review_work.py`` trains it) to different strengths: runs of several lengths on the easy synthetic task and
on the ``HARD`` one (smaller objects, look-alike distractors). Each detects ONCE, at score 0, on a
validation pool and on a held-out set of the same kind of task (other seeds). Then, many times over, a validation set
is drawn from the pool (``--draws`` draws of each of ``--sizes`` frames); each rule chooses every label's threshold
from the drawn frames' ``EditCurve`` (``training.edits``), and the edits a reviewer needs on the held-out set at
those thresholds are read off the held-out curves (adds + deletes + moves per 100 true objects, as
``count_edits`` counts them). A label a rule says nothing about keeps the model's ``score-threshold``, 0.5.

Rules:

* ``0.5``: every label at 0.5 (what every model was served at before issue 21).
* ``fewest, lowest``: the fewest edits on the drawn frames, the lowest threshold among equals (served before this
  benchmark: the edge of the optimal plateau just above the strongest false positive it drops).
* ``fewest, middle``: the fewest edits, in the middle of the widest run of thresholds that need them (the largest
  margin between the weakest prediction it keeps and the strongest it drops): ``EditCurve.best``, served since.
* ``0.5 unless it saves 2``: the fewest-edits choice (middle) only where it saves at least 2 edits over 0.5 on the
  drawn frames of that label; 0.5 otherwise (a saving of one edit is the size of sampling noise).
* ``fewest, smoothed``: the fewest edits averaged over a window of ±0.05 around each threshold (on a grid of 0.01),
  the middle of the best ones: a choice that does not rest on one prediction's score.

The drawn frames' curves are the per-frame curves (``edit_curves`` of each frame, computed once) put together; the
benchmark checks on one draw that this is ``edit_curves`` of the drawn frames.

The section "Threshold choice (issue 21)" of bench/RESULTS.md is rewritten; ``--quick`` checks that it runs.
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torchvision  # noqa: F401  before anything imports TensorFlow

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

import numpy as np  # noqa: E402
from _results import machine, publish  # noqa: E402
from preannotate.demo import DEFAULT_ARCHITECTURE, DEFAULT_HYPERPARAMETERS  # noqa: E402
from preannotate.models import ModelStore, hyperparameters_for, load_model  # noqa: E402
from preannotate.training import data  # noqa: E402
from preannotate.training.edits import EditCurve, edit_curves  # noqa: E402
from preannotate.training.evaluation import detect_frames  # noqa: E402
from preannotate.training.recipe import TrainingData, train_and_publish  # noqa: E402
from preannotate.training.synthetic import HARD, generate  # noqa: E402

SECTION = "## Threshold choice (issue 21)"
WIDTH, HEIGHT = 320, 240
SCORE_THRESHOLD = 0.5  # the model's score-threshold, where a rule says nothing
# name, task kind, training steps, seed: models of different strength
MODELS = (("easy, 120 steps", "easy", 120, 0), ("easy, 40 steps", "easy", 40, 1),
          ("hard, 120 steps", "hard", 120, 2), ("hard, 40 steps", "hard", 40, 3), ("hard, 20 steps", "hard", 20, 4))
QUICK_MODELS = (("easy, 8 steps", "easy", 8, 0),)


def say(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def task(kind: str, frames: int, seed: int):
    return generate(frames, width=WIDTH, height=HEIGHT, seed=seed, **(HARD if kind == "hard" else {}))


# --- the rules: an EditCurve -> a threshold, or None (the label keeps SCORE_THRESHOLD) ---------------------------

def cut_points(curve: EditCurve) -> tuple[list[int], list[int]]:
    """The predictions kept at each possible cut (ties kept or dropped together) and the edits there."""
    scores = curve.scores
    cuts = [0, *(k for k in range(1, len(scores)) if scores[k] < scores[k - 1]), len(scores)]
    return cuts, [curve._kept(k).total for k in cuts]


def interval(curve: EditCurve, kept: int) -> tuple[float, float]:
    """The thresholds that keep the first ``kept`` predictions: (the highest dropped score or 0, the lowest kept)."""
    high = float(curve.scores[kept - 1]) if kept else 1.0
    low = float(curve.scores[kept]) if kept < len(curve.scores) else 0.0
    return low, high


def fixed(curve: EditCurve) -> float | None:
    return SCORE_THRESHOLD


def fewest_lowest(curve: EditCurve) -> float | None:
    """Served before this benchmark: the lowest threshold of the fewest edits, half-way to the score below it."""
    if not curve.objects or not len(curve.scores):
        return None
    cuts, totals = cut_points(curve)
    kept = max(k for k, total in zip(cuts, totals, strict=True) if total == min(totals))
    if kept == len(curve.scores):  # every prediction kept: just below the lowest one
        higher = float(curve.scores[-1])
        return next((cut for digits in range(2, 7) if (cut := math.floor(higher * 10 ** digits) / 10 ** digits)),
                    higher)
    lower, higher = interval(curve, kept)
    middle = (higher + lower) / 2
    return next((rounded for digits in range(2, 7) if lower < (rounded := round(middle, digits)) <= higher), middle)


def fewest_middle(curve: EditCurve) -> float | None:
    """Served since: the middle of the widest run of thresholds with the fewest edits (``EditCurve.best``)."""
    return curve.best()


def margin(edits: int = 2) -> Callable[[EditCurve], float | None]:
    def rule(curve: EditCurve) -> float | None:
        chosen = fewest_middle(curve)
        if chosen is None:
            return None
        saving = curve.at(SCORE_THRESHOLD).total - curve.at(chosen).total
        return chosen if saving >= edits else SCORE_THRESHOLD
    return rule


def smoothed(window: float = 0.05) -> Callable[[EditCurve], float | None]:
    grid = np.round(np.arange(0.0, 1.0001, 0.01), 2)

    def rule(curve: EditCurve) -> float | None:
        if not curve.objects or not len(curve.scores):
            return None
        totals = np.array([curve.at(float(t)).total for t in grid], float)
        reach = int(round(window / 0.01))
        padded = np.pad(totals, reach, mode="edge")
        averaged = np.convolve(padded, np.ones(2 * reach + 1) / (2 * reach + 1), mode="valid")
        best = np.flatnonzero(averaged <= averaged.min() + 1e-9)
        run = best[: np.argmax(np.diff(np.append(best, best[-1] + 2)) > 1) + 1]  # the first contiguous run
        return float(grid[run].mean())
    return rule


RULES: dict[str, Callable[[EditCurve], float | None]] = {
    "0.5": fixed, "fewest, lowest (before)": fewest_lowest, "fewest, middle (served)": fewest_middle,
    "0.5 unless it saves 2": margin(2), "fewest, smoothed ±0.05": smoothed(0.05)}


# --- curves -------------------------------------------------------------------------------------------------------

def detect_all(detector, items) -> tuple[list, list]:
    truth, found = [], []
    for frame, _, shapes in detect_frames(detector, items, 0.0):
        truth.append(frame.shapes)
        found.append(shapes)
    return truth, found


def merged(parts: Sequence[EditCurve]) -> EditCurve:
    """The curve of several frames' curves together: what ``edit_curves`` gives on those frames."""
    scores = np.concatenate([p.scores for p in parts])
    order = np.argsort(-scores, kind="stable")
    return EditCurve(parts[0].label, sum(p.objects for p in parts), scores[order],
                     np.concatenate([p.matched for p in parts])[order], np.concatenate([p.loose for p in parts])[order])


def held_out_per_100(curves: dict[str, EditCurve], thresholds: dict[str, float]) -> tuple[int, int]:
    edits = sum(curve.at(thresholds[name]).total for name, curve in curves.items())
    return edits, sum(curve.objects for curve in curves.values())


def judge(labels, pool: tuple[list, list], held: tuple[list, list], sizes: Sequence[int], draws: int, seed: int
          ) -> dict[int, dict[str, list[tuple[int, int]]]]:
    """For each size, each rule's held-out (edits, objects) over ``draws`` validation sets drawn from the pool."""
    frame_curves = [edit_curves([t], [f], labels) for t, f in zip(*pool, strict=True)]
    held_curves = edit_curves(*held, labels)
    rng = np.random.default_rng(seed)
    results: dict[int, dict[str, list[tuple[int, int]]]] = {}
    for size in sizes:
        results[size] = {name: [] for name in RULES}
        for draw in range(draws):
            chosen = sorted(rng.choice(len(frame_curves), size=min(size, len(frame_curves)), replace=False))
            curves = {label.name: merged([frame_curves[i][label.name] for i in chosen]) for label in labels}
            if draw == 0:  # the merged curves are edit_curves of the drawn frames
                direct = edit_curves([pool[0][i] for i in chosen], [pool[1][i] for i in chosen], labels)
                for name, curve in curves.items():
                    assert curve.objects == direct[name].objects
                    assert np.array_equal(curve.scores, direct[name].scores)
                    assert all(curve.at(t) == direct[name].at(t) for t in np.linspace(0, 1, 21))
            for rule_name, rule in RULES.items():
                thresholds = {name: (t if (t := rule(curve)) is not None else SCORE_THRESHOLD)
                              for name, curve in curves.items()}
                results[size][rule_name].append(held_out_per_100(held_curves, thresholds))
    return results


def versus(edits: np.ndarray, other: np.ndarray) -> str:
    """Draws with fewer / as many / more edits than ``other``'s."""
    return f"{(edits < other).sum()} / {(edits == other).sum()} / {(edits > other).sum()}"


def table(rows: list[tuple[str, float, int, dict[int, dict[str, list[tuple[int, int]]]]]]) -> list[str]:
    lines = ["| model (validation mAP@.5, held-out edits per 100 at 0.5) | validation frames | rule | held-out edits "
             "per 100: mean | sd over draws | beats / ties / loses to 0.5 | beats / ties / loses to *fewest, "
             "lowest* |", "|---|---:|---|---:|---:|---|---|"]
    for model, map50, _, results in rows:
        for size, by_rule in results.items():
            half = np.array([e for e, _ in by_rule["0.5"]])
            before = np.array([e for e, _ in by_rule["fewest, lowest (before)"]])
            objects = by_rule["0.5"][0][1]
            for rule_name, found in by_rule.items():
                edits = np.array([e for e, _ in found])
                per_100 = 100 * edits / objects
                lines.append(f"| {model} ({map50:.2f}, {100 * half[0] / objects:.1f}) | {size} | {rule_name} | "
                             f"**{per_100.mean():.2f}** | {per_100.std():.2f} | {versus(edits, half)} | "
                             f"{versus(edits, before)} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-frames", type=int, default=160, help="frames each model trains on (default 160)")
    parser.add_argument("--pool", type=int, default=400, help="validation pool frames per model (default 400)")
    parser.add_argument("--held-out", type=int, default=400, help="held-out frames per model (default 400)")
    parser.add_argument("--sizes", default="30,100", help="validation set sizes drawn (default 30,100)")
    parser.add_argument("--draws", type=int, default=50, help="validation sets drawn of each size (default 50)")
    parser.add_argument("--no-write", action="store_true", help="print, do not touch bench/RESULTS.md")
    parser.add_argument("--quick", action="store_true", help="one tiny model, small sets, --no-write: a check that "
                        "it runs, not figures to quote")
    args = parser.parse_args()
    models = MODELS
    if args.quick:
        models, args.train_frames, args.pool, args.held_out, args.draws = QUICK_MODELS, 40, 60, 60, 10
        args.no_write = True
    sizes = [int(s) for s in args.sizes.split(",")]
    started = time.monotonic()
    rows = []
    work = Path(tempfile.mkdtemp(prefix="bench-threshold-choice-"))
    try:
        for name, kind, steps, seed in models:
            say(f"{name}: training {DEFAULT_ARCHITECTURE} for {steps} steps on {args.train_frames} {kind} frames")
            seen = task(kind, args.train_frames + 20, seed)
            labels = seen.annotations.labels
            train_items, val_items = data.split_task(seen.annotations, seen.images,
                                                     val_fraction=20 / (args.train_frames + 20), seed=seed)
            store = ModelStore(work / f"store-{seed}")
            hp = hyperparameters_for(DEFAULT_ARCHITECTURE,
                                     f"{DEFAULT_HYPERPARAMETERS}; num-steps={steps}; seed={seed}")
            result = train_and_publish(TrainingData(labels, train_items, val_items),
                                       architecture=DEFAULT_ARCHITECTURE, hyperparameters=hp, store=store,
                                       name="shapes", output_dir=work / f"run-{seed}", progress=False)
            detector = load_model("shapes", store)
            say(f"{name}: detecting at score 0 on {args.pool} pool and {args.held_out} held-out frames")
            pool_task, held_task = task(kind, args.pool, seed + 500), task(kind, args.held_out, seed + 1000)
            pool = detect_all(detector, data.split_task(pool_task.annotations, pool_task.images, 0.0)[0])
            held = detect_all(detector, data.split_task(held_task.annotations, held_task.images, 0.0)[0])
            say(f"{name}: judging the rules")
            rows.append((name, result.metrics.get("map50") or 0.0, steps,
                         judge(labels, pool, held, sizes, args.draws, seed)))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    info = machine()
    minutes = (time.monotonic() - started) / 60
    text = "\n".join([
        SECTION, "",
        f"Machine: {info['cpu']}, {info['cores']} cores, Python {info['python']}; run {info['date']}, "
        f"{minutes:.1f} min in all. Command: `.venv/bin/python bench/threshold_choice.py` (`--train-frames "
        f"{args.train_frames} --pool {args.pool} --held-out {args.held_out} --sizes {args.sizes} --draws "
        f"{args.draws}`; model seeds {', '.join(str(m[3]) for m in models)}, pool seed +500, held-out +1000, "
        "draws seeded by the model's seed).", "",
        f"Models: `{DEFAULT_ARCHITECTURE}` from random init (`{DEFAULT_HYPERPARAMETERS}`), trained on "
        f"{args.train_frames} synthetic {WIDTH}x{HEIGHT} frames for the steps named (\"hard\": `synthetic.HARD`: "
        "smaller objects, look-alike distractors). Each detected once at score 0 on a pool of "
        f"{args.pool} frames and a held-out set of {args.held_out} frames of its kind; for each size, {args.draws} "
        "validation sets drawn from the pool, each rule choosing every label's threshold on them, judged by the "
        "held-out edits (adds + deletes + moves at IoU 0.75, `training.edits`) per 100 true objects. Beats / ties "
        "/ loses: draws with fewer / as many / more held-out edits.", "",
        *table(rows),
    ])
    publish(SECTION, text, write=not args.no_write)


if __name__ == "__main__":
    main()
