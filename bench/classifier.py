"""Classification as CVAT tags, and the model designer's quality (issue 14).

* **Speed**: images/s of optimizer steps of our trainer (``trainer.train``: tags → ``TagModel``, the detectors' loop)
  against a plain torchvision classification loop in the style of ``references/classification`` on the same frames
  exported ImageNet-style: ``torchvision.datasets.ImageFolder``, ``transforms.v2`` (resize, flip, normalize), a
  ``DataLoader`` with the same workers, ``torchvision.models.get_model(name, num_classes=...)``, cross-entropy and
  AdamW. Same architecture, batch, resolution and data, interleaved rounds. Target: ours / plain ≈ 1.0.
* **Quality**: from random weights on synthetic frames (``training.synthetic``), scored on a test split neither run
  saw: a classifier's top-1 accuracy on the lighting tags, and a composed detector's (``custom``: the designer)
  COCO mAP@.5, each after a stated budget of steps.

Writes the "Classification and the designer (issue 14)" section of bench/RESULTS.md (``--no-write`` to skip).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import _results  # bench/_results.py: the script's own folder is on sys.path
import torch
import torchvision
from preannotate.formats.dataset import export_dataset
from preannotate.models import load_detector
from preannotate.training import data, runs, synthetic
from preannotate.training.evaluation import score_classifier, score_detector
from preannotate.training.logs import MetricsLog
from preannotate.training.loop import train
from torch.utils.data import DataLoader, RandomSampler
from torchvision.transforms import v2

SECTION = "## Classification and the designer (issue 14)"
LR, WEIGHT_DECAY = 0.003, 1e-4
DESIGNED = "backbone=resnet18; neck=fpn; neck-levels=3-6; neck-channels=64; head=fcos"


def ours(name, labels, items, size, batch, warmup, steps, workers, output: Path) -> float:
    hp = (f"init=random; num-steps={warmup + steps}; batch-size={batch}; image-size={size}; optimizer=adamw; "
          f"initial-learning-rate={LR}; weight-decay={WEIGHT_DECAY}; schedule=constant; augment=flip")
    train(name, labels, items, [], output, hyperparameters=hp, progress=False, workers=workers)
    records = {r["step"]: r for r in MetricsLog.read(output / "metrics.jsonl") if r["event"] == "train"}
    return steps * batch / (records[warmup + steps]["elapsed_s"] - records[warmup]["elapsed_s"])


def plain(name, folder: Path, classes: int, size, batch, warmup, steps, workers) -> float:
    """torchvision's classification recipe, nothing of ours but the frames on disk."""
    transform = v2.Compose([v2.ToImage(), v2.Resize((size, size), antialias=True), v2.RandomHorizontalFlip(),
                            v2.ToDtype(torch.float32, scale=True),
                            v2.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    dataset = torchvision.datasets.ImageFolder(str(folder), transform=transform)
    sampler = RandomSampler(dataset, replacement=True, num_samples=(warmup + steps + 1) * batch)
    loader = DataLoader(dataset, batch_size=batch, sampler=sampler, num_workers=workers, drop_last=True,
                        persistent_workers=workers > 0)
    model = torchvision.models.get_model(name, weights=None, num_classes=classes)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    times = {}
    start = time.perf_counter()
    for step, (images, targets) in enumerate(loader, start=1):
        loss = torch.nn.functional.cross_entropy(model(images), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        times[step] = time.perf_counter() - start
        if step == warmup + steps:
            break
    return steps * batch / (times[warmup + steps] - times[warmup])


def speed(args, work: Path) -> list[str]:
    task = synthetic.generate(200, 160, 120, tags=True, seed=1)
    labels = [label for label in task.annotations.labels if label.type == "tag"]
    items = runs.tag_examples([(frame, task.images) for frame in task.annotations.frames.values()], labels)
    folder = work / "tags"
    export_dataset(folder, "imagenet", labels, sorted(task.annotations.frames.items()), task.images, progress=False)
    rows = []
    for round_ in range(args.rounds):  # interleaved: the machine's drift hits both alike
        mine = ours(args.classifier, labels, items, args.size, args.batch, args.warmup, args.steps, args.workers,
                    work / f"speed{round_}")
        theirs = plain(args.classifier, folder / "train", len(labels), args.size, args.batch, args.warmup,
                       args.steps, args.workers)
        print(f"round {round_ + 1}: ours {mine:.2f} img/s, plain {theirs:.2f} img/s", flush=True)
        rows.append((mine, theirs))
    ratio = statistics.median(m / t for m, t in rows)
    lines = [f"**Training speed** (`python bench/classifier.py`): {args.classifier} from random weights at "
             f"{args.size} px, batch {args.batch}, {args.steps} steps after {args.warmup} of warm-up, {args.workers} "
             f"data workers, {args.rounds} interleaved rounds, on 200 synthetic 160x120 frames.", "",
             "| round | ours img/s | plain torchvision loop img/s | ours / plain |", "|---|---|---|---|"]
    lines += [f"| {i} | {m:.2f} | {t:.2f} | {m / t:.3f} |" for i, (m, t) in enumerate(rows, start=1)]
    lines += ["", f"Median ours / plain: **{ratio:.3f}x** (target ≈ 1.0: the classifier trains in the detectors' "
                  "loop, with its checkpoints, logs and resumable sampling, at a plain loop's speed)."]
    return lines


def quality(args, work: Path) -> list[str]:
    lines = ["", "**Quality from scratch** on synthetic frames (random init, registry defaults for init=random, "
                 "scored on a test split neither training saw):", "",
             "| model | frames (train / val / test) | budget | score on test | seconds |", "|---|---|---|---|---|"]
    # a classifier on the lighting tags
    task = synthetic.generate(160, 160, 120, tags=True, seed=5)
    train_items, rest = data.split_task(task.annotations, task.images, 0.4, seed=5)
    val_items, test_items = rest[: len(rest) // 2], rest[len(rest) // 2:]
    started = time.perf_counter()
    result = train(args.classifier, task.annotations.labels, train_items, val_items, work / "quality-tags",
                   store=work / "store", name="tags", progress=False, workers=args.workers,
                   hyperparameters=f"init=random; num-steps={args.classifier_steps}; batch-size=16; "
                                   f"image-size={args.size}; num-validations=3")
    seconds = time.perf_counter() - started
    classifier = load_detector(result.path)
    tag_labels = [label for label in task.annotations.labels if label.type == "tag"]
    scored = score_classifier(classifier, runs.tag_examples(test_items, tag_labels), tag_labels)
    lines.append(f"| {args.classifier} (tags day / night / fog) | {len(train_items)} / {len(val_items)} / "
                 f"{len(test_items)} | {args.classifier_steps} steps of 16 at {args.size} px | top-1 "
                 f"**{scored['top1']:.3f}** | {seconds:.0f} |")
    # the designer: a composed detector
    task = synthetic.generate(240, 160, 120, seed=7)
    train_items, rest = data.split_task(task.annotations, task.images, 0.3, seed=7)
    val_items, test_items = rest[: len(rest) // 2], rest[len(rest) // 2:]
    started = time.perf_counter()
    result = train("custom", task.annotations.labels, train_items, val_items, work / "quality-designed",
                   store=work / "store", name="designed", progress=False, workers=args.workers,
                   hyperparameters=f"init=random; {DESIGNED}; num-steps={args.detector_steps}; batch-size=4; "
                                   "image-size=160; max-image-size=160; num-validations=3")
    seconds = time.perf_counter() - started
    scored = score_detector(load_detector(result.path), test_items, task.annotations.labels)
    lines.append(f"| custom: {DESIGNED} | {len(train_items)} / {len(val_items)} / {len(test_items)} | "
                 f"{args.detector_steps} steps of 4 at 160 px | mAP@.5 **{scored['map50']:.3f}** "
                 f"(mAP {scored['map']:.3f}) | {seconds:.0f} |")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classifier", default="efficientnet_b0")
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--classifier-steps", type=int, default=150)
    parser.add_argument("--detector-steps", type=int, default=400)
    parser.add_argument("--skip-quality", action="store_true")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as directory:
        work = Path(directory)
        lines = speed(args, work)
        if not args.skip_quality:
            lines += quality(args, work)
    machine = _results.machine()
    text = "\n".join([SECTION, "", f"Machine: {machine['cpu']}, {machine['cores']} cores, Python {machine['python']}, "
                                   f"{machine['date']}.", "", *lines]) + "\n"
    _results.publish(SECTION, text, write=not args.no_write)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
