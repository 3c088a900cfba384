"""Attributes learned from what objects look like (issue 23): the crop classifier of ``models.attributes``.

Synthetic frames (``training.synthetic.generate_attributed``: boxes and discs whose ``colour`` select, ``striped``
checkbox and ``size`` radio are drawn at random and painted as they say; a ``note`` text nothing shows) train the
attribute classifier from random weights, with the budget a run gives it (``training.attributes.steps_for``), on
this CPU. It is scored on test frames neither its training nor its validation saw, per label and attribute:

* **accuracy** on the test frames' true boxes, and on the same boxes **shifted** (each side moved by up to 10% of
  the box's size, at random: about the misfit of a detector's box, IoU ≈ 0.7-0.8 with the truth);
* the **majority-class peer**: always answering the value most common in training (what a person gets by leaving
  CVAT's default when the default is the commonest value);
* **answered**: the share served (probability ≥ ``MIN_CONFIDENCE``, by a trusted head); the rest is left unset;
* **edits per 100 objects**: the attribute changes a reviewer makes (``training.edits.attribute_edits``: a wrong
  value, or an unset one whose label default is wrong, is one click), against those with no model, every object
  arriving with its label's default value.

Two drawings: *as drawn* (``generate_attributed``'s defaults) and *hard* (colours varying by ±90 per channel, so a
red may pass for a green; stripes at 0.7 of the colour instead of 0.35, faint on a small object): the second shows
what the model does with an attribute it cannot learn well (it answers less, or is not served at all).

With ``--detector-steps N`` it also trains the whole version as a run does (SSDlite from random weights for N steps
with ``train_and_publish``'s loop: the detector, then the attributes in its publish) on the first seed's frames, and
scores the served version on the test frames through ``detect_served``: each attribute's accuracy on the detections
matched to true objects, at the served thresholds.

Bar: accuracy ≥ 0.9 on every attribute (true boxes, as drawn), above the peer. Writes the "Attributes (issue 23)"
section of bench/RESULTS.md (``--no-write`` to skip).

    python bench/attributes.py [--train-frames 240] [--seeds 2] [--detector-steps 0]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import _results  # bench/_results.py: the script's own folder is on sys.path
import numpy as np
import torch
from preannotate.models import ModelStore, detect_served, load_detector
from preannotate.shapes import Shape
from preannotate.training import edits, synthetic
from preannotate.training.attributes import train_attribute_model
from preannotate.training.loop import train

SECTION = "## Attributes (issue 23)"
BAR = 0.9
SHIFT = 0.10
DRAWINGS = {"as drawn": {}, "hard": {"colour_jitter": 90, "stripe_shade": 0.7}}


def items_of(task):
    return [(frame, task.images) for frame in task.annotations.frames.values()]


def shifted(shape: Shape, rng: np.random.Generator) -> Shape:
    """The shape's box with each side moved by up to ``SHIFT`` of its size: a detector's misfit."""
    x1, y1, x2, y2 = shape.bbox()
    w, h = x2 - x1, y2 - y1
    moved = [x1 + rng.uniform(-SHIFT, SHIFT) * w, y1 + rng.uniform(-SHIFT, SHIFT) * h,
             x2 + rng.uniform(-SHIFT, SHIFT) * w, y2 + rng.uniform(-SHIFT, SHIFT) * h]
    return Shape(shape.label, "rectangle", moved, score=0.9)


def score(model, test_task, boxes: str, seed: int) -> dict[str, dict[str, float]]:
    """Per ``label/attribute``: accuracy (unset counted wrong), answered share, peer accuracy, edits per 100."""
    rng = np.random.default_rng([seed, 7])
    items = items_of(test_task)
    truth = [frame.shapes for frame, _ in items]
    found = [[shifted(s, rng) if boxes == "shifted" else Shape(s.label, s.type, list(s.points), rotation=s.rotation,
                                                                score=0.9) for s in shapes] for shapes in truth]
    images = [image for _, image in test_task.images.decoded([frame.frame for frame, _ in items])]
    model.fill(images, found)
    names: dict[str, list[str]] = {}
    for head in model.heads:
        names.setdefault(head.label, []).append(head.name)
    labels = test_task.annotations.labels
    defaults = {(label.name, spec.name): spec.default_value for label in labels for spec in label.attributes}
    reviewed = edits.attribute_edits(truth, found, labels, names)
    rows = {}
    for head in model.heads:
        pairs = [(t.attributes.get(head.name), f.attributes.get(head.name))
                 for ts, fs in zip(truth, found, strict=True) for t, f in zip(ts, fs, strict=True)
                 if t.label == head.label]
        review = reviewed[head.key]
        answered = [want == got for want, got in pairs if got is not None]
        rows[head.key] = {"accuracy": sum(want == got for want, got in pairs) / len(pairs),
                          "answered": len(answered) / len(pairs),
                          "answered_accuracy": sum(answered) / len(answered) if answered else float("nan"),
                          "served": float(head.trusted),
                          "peer": sum(want == head.default for want, _ in pairs) / len(pairs),
                          "edits_per_100": 100 * review["edits"] / max(review["checked"], 1), "objects": len(pairs),
                          "default_edits_per_100": 100 * sum(want != defaults[head.label, head.name]
                                                             for want, _ in pairs) / len(pairs)}
    return rows


def through_a_detector(steps: int, args) -> list[str]:
    """Lines for RESULTS.md: a whole version trained (detector, then attributes) and served on the test frames."""
    train_task = synthetic.generate_attributed(args.train_frames, seed=0)
    val_task = synthetic.generate_attributed(args.val_frames, seed=1)
    test_task = synthetic.generate_attributed(args.test_frames, seed=2)
    with tempfile.TemporaryDirectory() as directory:
        start = time.perf_counter()
        result = train("ssdlite320_mobilenet_v3_large", train_task.annotations.labels, items_of(train_task),
                       items_of(val_task), Path(directory) / "run", store=ModelStore(Path(directory) / "store"),
                       name="attributes", progress=False,
                       hyperparameters=f"init=random; batch-size=8; num-steps={steps}; num-validations=2")
        seconds = time.perf_counter() - start
        detector = load_detector(result.path)
        items = items_of(test_task)
        images = [image for _, image in test_task.images.decoded([frame.frame for frame, _ in items])]
        found = [shapes for start_at in range(0, len(images), 8)
                 for shapes in detect_served(detector, images[start_at:start_at + 8])]
    truth = [frame.shapes for frame, _ in items]
    heads = detector.attribute_model.heads
    names: dict[str, list[str]] = {}
    for head in heads:
        names.setdefault(head.label, []).append(head.name)
    reviewed = edits.attribute_edits(truth, found, test_task.annotations.labels, names, detector.manifest.threshold_of)
    boxes = sum(edits.count_edits(truth, found, detector.manifest.threshold_of).values(), edits.Edits())
    cells = ", ".join(f"{key} {1 - review['edits'] / review['checked']:.3f}" for key, review in reviewed.items()
                      if review["checked"])
    matched = min(review["checked"] for review in reviewed.values())
    return ["", f"Through a detector (`--detector-steps {steps}`): SSDlite from random weights, {steps} steps, then "
                f"the attributes in its publish, {seconds / 60:.1f} min in all; served on the {args.test_frames} test "
                f"frames at its served thresholds (box mAP@.5 on validation {result.metrics.get('map50', 0):.3f}; "
                f"{boxes.per_100:.1f} box edits per 100 objects), the attributes of the detections matched to true "
                f"objects (at least {matched} a label) were right, per label/attribute (an unset one counts right "
                f"when the label's default is): {cells}."]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-frames", type=int, default=240)
    parser.add_argument("--val-frames", type=int, default=60)
    parser.add_argument("--test-frames", type=int, default=120)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--detector-steps", type=int, default=0, help="also train a whole version (0: skip)")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    seconds, crops, results = [], 0, {}
    for drawing, options in DRAWINGS.items():
        runs = []
        for seed in range(args.seeds):
            train_task = synthetic.generate_attributed(args.train_frames, seed=100 * seed, **options)
            val_task = synthetic.generate_attributed(args.val_frames, seed=100 * seed + 1, **options)
            test_task = synthetic.generate_attributed(args.test_frames, seed=100 * seed + 2, **options)
            crops = sum(len(frame.shapes) for frame in train_task.annotations.frames.values())
            start = time.perf_counter()
            model = train_attribute_model(train_task.annotations.labels, items_of(train_task), items_of(val_task),
                                          seed=seed)
            seconds.append(time.perf_counter() - start)
            runs.append({boxes: score(model, test_task, boxes, seed) for boxes in ("true", "shifted")})
            print(f"{drawing}, seed {seed}: trained in {seconds[-1]:.0f} s", flush=True)
        results[drawing] = runs
    machine = _results.machine()
    lines = [SECTION, "",
             f"`python bench/attributes.py --train-frames {args.train_frames} --seeds {args.seeds}"
             f"{f' --detector-steps {args.detector_steps}' if args.detector_steps else ''}` "
             f"({machine['cpu']}, {machine['cores']} cores, torch {torch.__version__}, {machine['date']}). The crop "
             f"classifier (`models.attributes`) from random weights on {args.train_frames} synthetic frames (about "
             f"{crops} objects; `synthetic.generate_attributed`), validated on {args.val_frames}, scored on "
             f"{args.test_frames} frames neither saw; means over {args.seeds} seeds (each its own frames). Training "
             f"took {statistics.mean(seconds):.0f} s on average ({min(seconds):.0f}-{max(seconds):.0f} s: the run's "
             "own budget, one thread, on a machine shared with other work). *Accuracy* counts an unset value as "
             "wrong; *answered* is the share served (p ≥ 0.6 by a trusted head) and *right when answered* their "
             "accuracy; *served*: the share of seeds whose validation trusted the attribute; *peer*: always the "
             "commonest training value; *edits*: a reviewer's attribute clicks per 100 found objects (a wrong "
             "value, or an unset one whose default is wrong), against *at the default* (no model: every object "
             "arrives with the label's default value). *Shifted boxes*: each "
             f"side moved by up to {SHIFT:.0%} of the box, as a detector's box misfits. Bar: accuracy ≥ {BAR} on "
             "true boxes, as drawn, and above the peer. `note` (a text) is never learned or set.",
             "",
             "| drawing | label/attribute | accuracy (true boxes) | accuracy (shifted boxes) | answered | right when "
             "answered | served | peer | edits / 100 | at the default | bar |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for drawing, runs in results.items():
        for key in runs[0]["true"]:
            def mean(boxes: str, what: str, runs=runs, key=key) -> float:
                values = [run[boxes][key][what] for run in runs if run[boxes][key][what] == run[boxes][key][what]]
                return statistics.mean(values) if values else float("nan")  # answered nothing: no accuracy

            accuracy, peer = mean("true", "accuracy"), mean("true", "peer")
            verdict = ("met" if accuracy >= BAR and accuracy > peer else "NOT met") if drawing == "as drawn" else "-"
            right = mean("true", "answered_accuracy")
            lines.append(f"| {drawing} | {key} | {accuracy:.3f} | {mean('shifted', 'accuracy'):.3f} | "
                         f"{mean('true', 'answered'):.2f} | {'-' if right != right else f'{right:.3f}'} | "
                         f"{mean('true', 'served'):.1f} | {peer:.3f} | {mean('true', 'edits_per_100'):.1f} | "
                         f"{mean('true', 'default_edits_per_100'):.1f} | {verdict} |")
    if args.detector_steps:
        lines += through_a_detector(args.detector_steps, args)
    _results.publish(SECTION, "\n".join(lines) + "\n", write=not args.no_write)


if __name__ == "__main__":
    main()
