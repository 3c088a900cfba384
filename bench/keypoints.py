"""Skeletons and points learned from scratch on a CPU (issue 23).

``keypointrcnn_mobilenet_v3_large_fpn`` from random weights, through the one training loop (``training.loop.train``),
on synthetic pose frames (``training.synthetic.generate_skeletons``: a 7-keypoint ``figure`` skeleton with some joints
hidden behind grey boards, and ``marker`` points), scored on a test split the run never saw through the published
model's own ``detect`` (what CVAT receives): COCO keypoint AP by OKS (``evaluation.score_keypoints``; uniform sigma
``models.keypoints.OKS_SIGMA``), and how often a keypoint comes back visible / ``outside`` as people marked it.

Bar: keypoint AP@OKS.5 ≥ 0.5 (half the objects placed within COCO's loosest keypoint similarity, ranked well) after a
few minutes of CPU training. Writes the "Skeletons and points (issue 23)" section of bench/RESULTS.md (``--no-write``
to skip).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import _results  # bench/_results.py: the script's own folder is on sys.path
import torch
from preannotate.models import load_detector
from preannotate.training import data, synthetic
from preannotate.training.evaluation import detect_frames, score_keypoints
from preannotate.training.loop import train

SECTION = "## Skeletons and points (issue 23)"
ARCHITECTURE = "keypointrcnn_mobilenet_v3_large_fpn"
BAR = 0.5


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=240)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--size", type=int, default=96, help="frames are 4:3, this tall")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="torch's threads (one is fastest on a shared CPU)")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)  # on a loaded machine two spinning threads run ~10x slower than one
    width, height = args.size * 4 // 3, args.size
    task = synthetic.generate_skeletons(args.frames, width, height, seed=23)
    labels = task.annotations.labels
    train_items, rest = data.split_task(task.annotations, task.images, 0.25, seed=23)
    val_items, test_items = rest[: len(rest) // 2], rest[len(rest) // 2:]
    hp = (f"init=random; num-steps={args.steps}; batch-size={args.batch}; image-size={height}; "
          f"max-image-size={width}; num-validations=3; augment=scale")
    with tempfile.TemporaryDirectory() as directory:
        work = Path(directory)
        started = time.perf_counter()
        result = train(ARCHITECTURE, labels, train_items, val_items, work / "run", store=work / "store",
                       name="pose", hyperparameters=hp, progress=False, workers=args.workers)
        seconds = time.perf_counter() - started
        detector = load_detector(result.path)
        frames, found = [], []
        for frame, _, shapes in detect_frames(detector, test_items, 0.0):
            frames.append(frame)
            found.append(shapes)
        scored = score_keypoints(frames, found, labels)
    per_class = scored["per_class"]
    objects = {label.name: sum(1 for f in frames for s in f.shapes if s.label == label.name) for label in labels}
    hidden = sum(1 for f in frames for s in f.shapes for e in s.elements if e.outside)
    shown = sum(1 for f in frames for s in f.shapes for e in s.elements if not e.outside)
    verdict = "meets" if (scored["map50"] or 0) >= BAR else "misses"
    machine = _results.machine()
    command = (f"python bench/keypoints.py --frames {args.frames} --steps {args.steps} --batch {args.batch} "
               f"--size {args.size} --workers {args.workers} --threads {args.threads}")
    lines = [
        SECTION, "",
        f"Machine: {machine['cpu']}, {machine['cores']} cores shared with other work (load average "
        f"{os.getloadavg()[0]:.0f} at the end), Python {machine['python']}, {machine['date']}.", "",
        f"`{command}`: {ARCHITECTURE} from random weights ({hp}), {args.steps} steps of {args.batch} frames in "
        f"**{seconds / 60:.1f} minutes** (validations and publishing included), on {len(train_items)} synthetic "
        f"{width}x{height} frames (`synthetic.generate_skeletons`: a 7-keypoint `figure` skeleton, boards hiding "
        f"joints of half the figures, `marker` points), validated on {len(val_items)}, scored on {len(test_items)} "
        f"test frames ({objects['figure']} figures with {shown} visible and {hidden} hidden keypoints, "
        f"{objects['marker']} markers) through the published model's `detect`:", "",
        "| label | keypoint AP@OKS.5 | keypoint AP@OKS[.5:.95] |", "|---|---|---|",
        *[f"| {name} | {_fmt(values['ap50'])} | {_fmt(values['ap'])} |" for name, values in per_class.items()],
        f"| **all** | **{_fmt(scored['map50'])}** | **{_fmt(scored['map'])}** |", "",
        f"Bar: keypoint AP@OKS.5 ≥ {BAR} — {verdict} it. OKS with a uniform sigma of 0.05 per keypoint against the "
        "padded keypoint box (`models.keypoints`). Visibility of matched figures' keypoints as served "
        f"(`outside` below a heatmap peak of `VISIBLE_CONFIDENCE`): visible ones came back visible "
        f"{_pct(scored['visibility']['visible'])}, hidden ones came back `outside` "
        f"{_pct(scored['visibility']['hidden'])}.",
    ]
    _results.publish(SECTION, "\n".join(lines) + "\n", write=not args.no_write)
    return 0


def _fmt(value: float | None) -> str:
    return "none" if value is None else f"{value:.3f}"


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.0f} %"


if __name__ == "__main__":
    raise SystemExit(main())
