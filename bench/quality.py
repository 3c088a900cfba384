"""Training quality (issue 5): mAP@.5 after a fixed budget, our training loop against a plain loop.

Both train the same architecture from random init on the same synthetic frames with the same budget (optimizer
steps × batch), the same optimizer recipe (AdamW + one-cycle at the same peak rate) and the same flip
augmentation, in the same process. Ours validates ``num-validations`` times on a validation split and publishes
its best checkpoint; the plain loop (torchvision-references style, bench/_plain_loop.py) keeps its last weights.
Both are then scored by the same COCO evaluation on a *test* split neither of them saw.

Writes the "Training quality (issue 5)" section of bench/RESULTS.md (``--no-write`` to skip); ``--check`` exits
1 when ours/plain mAP@.5 is under the target. For scale (issue 5): on such shapes a plain AdamW + one-cycle loop
takes ``ssdlite320_mobilenet_v3_large`` to about 0.9 mAP@.5 in 1,500 steps of batch 8 on 2 CPU cores (~20 min).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import _results  # bench/_results.py: the script's own folder is on sys.path
import torch
from _plain_loop import coco_dataset, plain_loader, plain_train, write_coco_folder
from preannotate.models import get_architecture, load_detector
from preannotate.training import data
from preannotate.training.evaluation import evaluate
from preannotate.training.synthetic import generate
from preannotate.training.trainer import effective_hyperparameters, train

SECTION = "## Training quality (issue 5)"
TARGET = 1.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="ssdlite320_mobilenet_v3_large")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=0.003)
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--frames", type=int, default=400, help="training frames")
    parser.add_argument("--val", type=int, default=50, help="our validation frames (the plain loop has none)")
    parser.add_argument("--test", type=int, default=100, help="held-out frames both are scored on")
    parser.add_argument("--extra", default="", help="more hyperparameters for our loop (key=value; ...)")
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args(argv)
    workers = data.default_workers() if args.workers is None else args.workers
    started = time.monotonic()
    task = generate(args.frames + args.val + args.test, width=320, height=240, seed=0)
    labels = task.annotations.labels
    items = [(frame, task.images) for frame in task.annotations.frames.values()]
    test_items, val_items, train_items = (items[:args.test], items[args.test:args.test + args.val],
                                          items[args.test + args.val:])
    arch = get_architecture(args.arch)
    hp = (f"init=random; num-steps={args.steps}; batch-size={args.batch}; optimizer=adamw; "
          f"initial-learning-rate={args.lr}; weight-decay={args.weight_decay}; schedule=one-cycle; warmup-steps=0; "
          f"augment=flip; num-validations=5; {args.extra}")
    effective = effective_hyperparameters(args.arch, hp, len(train_items))
    test_data = data.DetectionDataset(test_items, labels, data.transforms(effective, args.arch.startswith("ssd"),
                                                                          False), arch.output == "mask")

    def score(model: torch.nn.Module) -> dict:
        return evaluate(model, data.loader(test_data, batch_size=args.batch, workers=workers), labels,
                        arch.output == "mask")

    with tempfile.TemporaryDirectory(prefix="preannotate-quality-") as tmp:
        t0 = time.monotonic()
        result = train(args.arch, labels, train_items, val_items, Path(tmp) / "ours", store=Path(tmp) / "store",
                       hyperparameters=hp, progress=True, workers=workers)
        ours_minutes = (time.monotonic() - t0) / 60
        ours = score(load_detector(result.path, device="cpu").model)
        print(f"ours: test mAP@.5 {ours['map50']} (validation {result.metrics['map50']} at step "
              f"{result.metrics['best_step']}) in {ours_minutes:.1f} min", flush=True)
        images, annotations = write_coco_folder(Path(tmp) / "coco", train_items, labels)
        plain_data = coco_dataset(images, annotations, args.arch, train=True)
        t0 = time.monotonic()
        model = plain_train(args.arch, labels, plain_loader(plain_data, args.batch, workers), args.steps, args.lr,
                            args.weight_decay)
        plain_minutes = (time.monotonic() - t0) / 60
        plain = score(model)
        print(f"plain: test mAP@.5 {plain['map50']} in {plain_minutes:.1f} min", flush=True)
    ratio = (ours["map50"] or 0.0) / plain["map50"] if plain["map50"] else float("inf")
    machine = _results.machine()
    given = argv if argv is not None else sys.argv[1:]
    lines = [
        SECTION, "",
        "Command: `.venv/bin/python bench/quality.py`" + (f" (`{' '.join(given)}`)" if given else "") + ".",
        "",
        f"Machine: {machine['cpu']}, {machine['cores']} cores (torch threads: {torch.get_num_threads()}); "
        f"torch {torch.__version__}, Python {machine['python']}; run {machine['date']}, "
        f"{time.monotonic() - started:.0f} s in all.",
        "",
        f"Method: `{args.arch}` from random init, {args.steps} steps of batch {args.batch} (AdamW, one-cycle to "
        f"{args.lr}, weight decay {args.weight_decay}, horizontal flips) on {len(train_items)} synthetic 320x240 "
        f"frames (4 labels: rectangles, ellipses, polygons, masks); ours validates 5 times on {len(val_items)} more "
        f"frames and publishes its best checkpoint, the plain loop keeps its last weights; both scored on the same "
        f"{len(test_items)} held-out test frames by the same COCO evaluation.",
        "",
        "| loop | test mAP@.5 | test mAP@[.5:.95] | minutes |",
        "|---|---:|---:|---:|",
        f"| ours | {ours['map50']} | {ours['map']} | {ours_minutes:.1f} |",
        f"| plain | {plain['map50']} | {plain['map']} | {plain_minutes:.1f} |",
        "",
        f"Ratio ours/plain (mAP@.5): **{ratio:.3f}** (target >= {TARGET}: {'pass' if ratio >= TARGET else 'FAIL'}).",
    ]
    text = "\n".join(lines) + "\n"
    _results.publish(SECTION, text, write=not args.no_write)
    return 1 if args.check and ratio < TARGET else 0


if __name__ == "__main__":
    sys.exit(main())
