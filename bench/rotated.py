"""Rotated rectangles and ellipses: a mask model trained from random init serves them in their own shape.

A small Mask R-CNN of the model designer (ResNet-18, a two-level FPN of 64 channels, 24 proposals) learns the
synthetic task of long boxes (rotated rectangles) and discs (ellipses) turned at any angle
(``training.synthetic.generate_turned``) from their outlines; published, each label is served as people drew it
(``shapes.served_outline``: each predicted mask fitted by ``cv2.minAreaRect`` or ``cv2.fitEllipse``). Scored on
held-out frames by mAP@.5 of the **outlines** (COCO's segm IoU of the rotated rectangles and ellipses themselves,
not of their upright boxes), against the peer: the same detections served as the upright box around them, as every
model here served these labels before issue 23.

Writes the "Rotated boxes and ellipses (issue 23)" section of bench/RESULTS.md (``--no-write`` to skip);
``--check`` exits 1 when the outline mAP@.5 is under ``TARGET`` or not above the peer's.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import _results  # bench/_results.py: the script's own folder is on sys.path
import torchvision  # noqa: F401 - before anything imports TensorFlow
from preannotate.models import load_detector
from preannotate.shapes import Shape
from preannotate.training.evaluation import detect_frames, score_shapes
from preannotate.training.loop import train
from preannotate.training.synthetic import generate_turned

SECTION = "## Rotated boxes and ellipses (issue 23)"
TARGET = 0.5  # outline mAP@.5 a short CPU run must reach
MODEL = ("backbone=resnet18; top-level=4; neck=fpn; neck-levels=3-4; neck-channels=64; head=mask-rcnn; "
         "rpn-max-proposals=24; image-size=120; max-image-size=160")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--frames", type=int, default=200, help="training frames")
    parser.add_argument("--val", type=int, default=20, help="validation frames (the served thresholds)")
    parser.add_argument("--test", type=int, default=60, help="held-out frames both are scored on")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args(argv)
    task = generate_turned(args.frames + args.val + args.test, width=160, height=120, seed=0)
    labels = task.annotations.labels
    items = [(frame, task.images) for frame in task.annotations.frames.values()]
    test_items, val_items, train_items = (items[:args.test], items[args.test:args.test + args.val],
                                          items[args.test + args.val:])
    hyperparameters = f"init=random; num-steps={args.steps}; batch-size={args.batch}; num-validations=2; {MODEL}"
    with tempfile.TemporaryDirectory() as scratch:
        started = time.monotonic()
        result = train("custom", labels, train_items, val_items, Path(scratch) / "run", store=Path(scratch) / "store",
                       name="turned", progress=False, hyperparameters=hyperparameters)
        trained = time.monotonic() - started
        detector = load_detector(result.path, device="cpu")
        frames, served = [], []
        for frame, _, shapes in detect_frames(detector, test_items, 0.0):
            frames.append(frame)
            served.append(shapes)
    upright = [[Shape(s.label, "rectangle", list(s.bbox()), score=s.score) for s in shapes] for shapes in served]
    ours, peer = (score_shapes(frames, shapes, labels, iou_type="segm") for shapes in (served, upright))
    boxes = score_shapes(frames, served, labels, iou_type="bbox")
    kinds = sorted({(s.label, s.type) for shapes in served for s in shapes})
    passed = ours["map50"] is not None and ours["map50"] >= TARGET and ours["map50"] > (peer["map50"] or 0)
    machine = _results.machine()

    def per_class(metrics):
        return " / ".join(f"{metrics['per_class'][label.name]['ap50']:.3f}" for label in labels)

    text = "\n".join([
        SECTION, "",
        f"`python bench/rotated.py --steps {args.steps} --batch {args.batch} --frames {args.frames}` on "
        f"{machine['cpu']} ({machine['cores']} cores, shared with other work), {machine['date']}: "
        f"{len(train_items)} training, {len(val_items)} validation and {len(test_items)} held-out 160×120 frames of "
        "`generate_turned` (long boxes and discs at any angle, look-alike distractors); the model designer's small "
        f"Mask R-CNN (`{MODEL}`) from random init, {args.steps} steps of {args.batch} frames: "
        f"{trained / 60:.1f} min for the whole run (training, 2 validations, publishing; load average "
        f"{os.getloadavg()[0]:.1f} at the end). Published, it serves {', '.join(f'{n} as {t}' for n, t in kinds)} "
        f"(the manifest's outlines: {detector.manifest.outlines}).", "",
        "Held-out mAP@.5, IoU of the outlines (COCO segm: the rotated rectangles and ellipses themselves):", "",
        "| served as | mAP@.5 | mAP@[.5:.95] | AP@.5 box / disc |",
        "|---|---|---|---|",
        f"| its own shape (rotated rectangle, ellipse: fitted masks) | **{ours['map50']:.3f}** | {ours['map']:.3f} | "
        f"{per_class(ours)} |",
        f"| the upright box around it (before issue 23) | {peer['map50']:.3f} | {peer['map']:.3f} | "
        f"{per_class(peer)} |", "",
        f"The same detections' upright boxes against the true upright boxes score mAP@.5 {boxes['map50']:.3f}: the "
        "detector finds the objects; what the peer loses is the outline. "
        f"Bar: outline mAP@.5 ≥ {TARGET} and above the peer's — {'met' if passed else 'NOT met'}.",
    ])
    _results.publish(SECTION, text, write=not args.no_write)
    return 0 if passed or not args.check else 1


if __name__ == "__main__":
    sys.exit(main())
