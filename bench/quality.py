"""Training quality: test mAP after a fixed budget, our training recipe *with its defaults* against a plain loop.

Ours is `preannotate train` as a user runs it: `-H "init=random; num-steps=N; batch-size=B"` and nothing else, so the
registry's from-scratch defaults decide the optimizer, rate, schedule, warm-up, clipping and augmentation
(`training.recipe.train_and_publish`: it validates `num-validations` times on a validation split and publishes its
best validation). The plain loop is torchvision-references style (bench/_plain_loop.py): AdamW at 3e-3 under
one-cycle, horizontal flips, gradients clipped at 10, its last weights kept. Both train the same architecture from
random init on the same synthetic frames — the *hard* set (`training.synthetic.HARD`: three labels, small objects,
look-alike distractors, lines), on which a short run does not saturate mAP@.5 — with the same steps and batch, in the
same process, and both are scored by the same COCO evaluation on a test split neither saw.

Writes the "Training quality" section of bench/RESULTS.md (``--no-write`` to skip); ``--check`` exits 1 when
ours/plain mAP@.5 is under the target.
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
from preannotate.models import ModelStore, get_architecture, hyperparameters_for, load_detector
from preannotate.training import data
from preannotate.training.evaluation import evaluate
from preannotate.training.recipe import TrainingData, train_and_publish
from preannotate.training.runs import effective_hyperparameters
from preannotate.training.synthetic import HARD, generate

SECTION = "## Training quality (issues 5 and 11)"
TARGET = 1.0
PLAIN = {"lr": 0.003, "weight_decay": 1e-4, "clip_norm": 10.0}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="ssdlite320_mobilenet_v3_large")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--frames", type=int, default=300, help="training frames")
    parser.add_argument("--val", type=int, default=50, help="our validation frames (the plain loop has none)")
    parser.add_argument("--test", type=int, default=100, help="held-out frames both are scored on")
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args(argv)
    workers = data.default_workers() if args.workers is None else args.workers
    started = time.monotonic()
    task = generate(args.frames + args.val + args.test, width=320, height=240, seed=0, **HARD)
    labels = task.annotations.labels
    items = [(frame, task.images) for frame in task.annotations.frames.values()]
    test_items, val_items, train_items = (items[:args.test], items[args.test:args.test + args.val],
                                          items[args.test + args.val:])
    arch = get_architecture(args.arch)
    hp = hyperparameters_for(arch.name, f"init=random; num-steps={args.steps}; batch-size={args.batch}")
    effective = effective_hyperparameters(arch.name, hp, len(train_items))
    recipe = effective.recipe
    described = (f"{recipe.optimizer} at {recipe.initial_learning_rate:g}, {recipe.schedule}"
                 f"{f' after {recipe.warmup_steps} warm-up steps' if recipe.warmup_steps else ''}, weight decay "
                 f"{recipe.weight_decay:g}, gradient clip {recipe.gradient_clip_norm}, augment "
                 f"{'+'.join(recipe.augment) or 'none'}, {recipe.num_validations} validations")
    print(f"ours, the registry's defaults: {described}", flush=True)
    test_data = data.DetectionDataset(test_items, labels, data.transforms(effective, arch.fixed_size, False),
                                      arch.output == "mask")

    def score(model: torch.nn.Module) -> dict:
        return evaluate(model, data.loader(test_data, batch_size=args.batch, workers=workers), labels,
                        arch.output == "mask")

    with tempfile.TemporaryDirectory(prefix="preannotate-quality-") as tmp:
        t0 = time.monotonic()
        result = train_and_publish(TrainingData(labels, train_items, val_items), architecture=arch.name,
                                   hyperparameters=hp, store=ModelStore(Path(tmp) / "store"), name="quality",
                                   output_dir=Path(tmp) / "ours", workers=workers)
        ours_minutes = (time.monotonic() - t0) / 60
        ours = score(load_detector(result.path, device="cpu").model)
        print(f"ours: test mAP@.5 {ours['map50']} (validation {result.metrics['map50']} at step "
              f"{result.metrics['best_step']}) in {ours_minutes:.1f} min", flush=True)
        images, annotations = write_coco_folder(Path(tmp) / "coco", train_items, labels)
        plain_data = coco_dataset(images, annotations, arch.name, train=True)
        t0 = time.monotonic()
        model = plain_train(arch.name, labels, plain_loader(plain_data, args.batch, workers), args.steps,
                            PLAIN["lr"], PLAIN["weight_decay"], clip_norm=PLAIN["clip_norm"])
        plain_minutes = (time.monotonic() - t0) / 60
        plain = score(model)
        print(f"plain: test mAP@.5 {plain['map50']} in {plain_minutes:.1f} min", flush=True)
    ratio = (ours["map50"] or 0.0) / plain["map50"] if plain["map50"] else float("inf")
    machine = _results.machine()
    given = argv if argv is not None else sys.argv[1:]
    per_class = ", ".join(f"{name} {values['ap50']:.3f} / {plain['bbox']['per_class'][name]['ap50']:.3f}"
                          for name, values in ours["bbox"]["per_class"].items())
    lines = [
        SECTION, "",
        "Command: `.venv/bin/python bench/quality.py`" + (f" (`{' '.join(given)}`)" if given else "") + ".",
        "",
        f"Machine: {machine['cpu']}, {machine['cores']} cores (torch threads: {torch.get_num_threads()}); "
        f"torch {torch.__version__}, Python {machine['python']}; run {machine['date']}, "
        f"{time.monotonic() - started:.0f} s in all.",
        "",
        f"Method: `{arch.name}` from random init, {args.steps} steps of batch {args.batch}, on "
        f"{len(train_items)} frames of the hard synthetic set (320x240; 3 labels, look-alike distractors). *Ours*: "
        f"`-H \"init=random; num-steps={args.steps}; batch-size={args.batch}\"` and the registry's defaults for the "
        f"rest ({described}), validating on {len(val_items)} more frames and publishing its best validation. *Plain*: "
        f"AdamW at {PLAIN['lr']}, one-cycle, weight decay {PLAIN['weight_decay']}, flips, clip "
        f"{PLAIN['clip_norm']}, last weights. Both scored on the same {len(test_items)} held-out test frames by the "
        "same COCO evaluation.",
        "",
        "| loop | test mAP@.5 | test mAP@[.5:.95] | minutes |",
        "|---|---:|---:|---:|",
        f"| ours (defaults) | {ours['map50']} | {ours['map']} | {ours_minutes:.1f} |",
        f"| plain | {plain['map50']} | {plain['map']} | {plain_minutes:.1f} |",
        "",
        f"Per-class AP@.5, ours / plain: {per_class}.",
        "",
        f"Ratio ours/plain (mAP@.5): **{ratio:.3f}** (target >= {TARGET}: {'pass' if ratio >= TARGET else 'FAIL'}).",
    ]
    text = "\n".join(lines) + "\n"
    _results.publish(SECTION, text, write=not args.no_write)
    return 1 if args.check and ratio < TARGET else 0


if __name__ == "__main__":
    sys.exit(main())
