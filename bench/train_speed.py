"""Training speed (issue 5): our training loop against a plain torchvision-references-style loop.

Same model (random init), same synthetic frames, same batch, same number of data-loading workers, in the same
process, interleaved (ours, plain, ours, plain, ...). Each run takes ``--warmup`` steps, then ``--steps`` timed
steps; images/s = timed steps × batch / their wall time. Ours is timed by its own step clock (``elapsed_s`` in
``metrics.jsonl``, which counts everything in the loop: loading, logging, checkpoints due); the plain loop by a
clock around its steps.

To show that data loading is never the bottleneck, the report adds the share of each of our steps spent waiting
for a batch (``data_wait``) and the images/s of each data pipeline alone (no model).

Writes the "Training speed (issue 5)" section of bench/RESULTS.md (``--no-write`` to skip); ``--check`` exits 1
when the median ratio ours/plain is under the target.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import _results  # bench/_results.py: the script's own folder is on sys.path
import torch
from _plain_loop import coco_dataset, endless, plain_loader, plain_train, write_coco_folder
from preannotate.models import get_architecture
from preannotate.training import data
from preannotate.training.logs import MetricsLog
from preannotate.training.loop import train
from preannotate.training.runs import effective_hyperparameters
from preannotate.training.synthetic import generate

SECTION = "## Training speed (issue 5)"
TARGET = 1.0
LR, WEIGHT_DECAY = 0.003, 1e-4


def ours(architecture, labels, items, batch, warmup, steps, workers, output: Path) -> dict:
    hp = (f"init=random; num-steps={warmup + steps}; batch-size={batch}; optimizer=adamw; "
          f"initial-learning-rate={LR}; weight-decay={WEIGHT_DECAY}; schedule=one-cycle; augment=flip")
    train(architecture, labels, items, [], output, hyperparameters=hp, progress=False, workers=workers)
    records = {r["step"]: r for r in MetricsLog.read(output / "metrics.jsonl") if r["event"] == "train"}
    seconds = records[warmup + steps]["elapsed_s"] - records[warmup]["elapsed_s"]
    waits = [records[s]["data_wait"] for s in range(warmup + 1, warmup + steps + 1) if s in records]
    return {"images_per_s": steps * batch / seconds, "data_wait": statistics.mean(waits)}


def plain(architecture, labels, loader, batch, warmup, steps) -> dict:
    times = {}
    plain_train(architecture, labels, loader, warmup + steps, LR, WEIGHT_DECAY,
                on_step=lambda step, seconds: times.__setitem__(step, seconds))
    return {"images_per_s": steps * batch / (times[warmup + steps] - times[warmup])}


def loading_alone(loader_batches, batch: int, count: int) -> float:
    next(loader_batches)  # workers started
    start = time.perf_counter()
    for _ in range(count):
        next(loader_batches)
    return count * batch / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="ssdlite320_mobilenet_v3_large")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=30, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each loop, interleaved")
    parser.add_argument("--frames", type=int, default=200)
    parser.add_argument("--workers", type=int, default=None, help="data-loading workers (default: ours)")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args(argv)
    workers = data.default_workers() if args.workers is None else args.workers
    started = time.monotonic()
    task = generate(args.frames, width=320, height=240, seed=0)
    labels = task.annotations.labels
    items = [(frame, task.images) for frame in task.annotations.frames.values()]
    rows = []
    with tempfile.TemporaryDirectory(prefix="preannotate-train-speed-") as tmp:
        images, annotations = write_coco_folder(Path(tmp) / "coco", items, labels)
        plain_data = coco_dataset(images, annotations, args.arch, train=True)
        for repeat in range(args.repeats):
            mine = ours(args.arch, labels, items, args.batch, args.warmup, args.steps, workers,
                        Path(tmp) / f"r{repeat}")
            theirs = plain(args.arch, labels, plain_loader(plain_data, args.batch, workers, seed=repeat), args.batch,
                           args.warmup, args.steps)
            rows.append((mine, theirs))
            print(f"run {repeat + 1}: ours {mine['images_per_s']:.2f} img/s (waiting for data "
                  f"{100 * mine['data_wait']:.1f} % of the step), plain {theirs['images_per_s']:.2f} img/s, "
                  f"ratio {mine['images_per_s'] / theirs['images_per_s']:.3f}", flush=True)
        hp = effective_hyperparameters(args.arch, f"batch-size={args.batch}; augment=flip", len(items))
        arch = get_architecture(args.arch)
        ours_data = data.DetectionDataset(items, labels, data.transforms(hp, arch.fixed_size, True),
                                          arch.output == "mask")
        sampler = data.StepBatchSampler(len(items), args.batch, 0, 0, 10 ** 6)
        ours_loading = loading_alone(iter(data.loader(ours_data, batch_sampler=sampler, workers=workers)),
                                     args.batch, 20)
        plain_loading = loading_alone(endless(plain_loader(plain_data, args.batch, workers)), args.batch, 20)
    ratios = [mine["images_per_s"] / theirs["images_per_s"] for mine, theirs in rows]
    ratio = statistics.median(ratios)
    machine = _results.machine()
    lines = [
        SECTION, "",
        "Command: `.venv/bin/python bench/train_speed.py`"
        + (f" (`{' '.join(argv if argv is not None else sys.argv[1:])}`)" if (argv or sys.argv[1:]) else "") + ".",
        "",
        f"Machine: {machine['cpu']}, {machine['cores']} cores (torch threads: {torch.get_num_threads()}); "
        f"torch {torch.__version__}, Python {machine['python']}; run {machine['date']}, "
        f"{time.monotonic() - started:.0f} s in all.",
        "",
        f"Method: `{args.arch}` from random init on {args.frames} synthetic 320x240 frames (4 labels), batch "
        f"{args.batch}, {workers} data-loading worker(s) for both; AdamW + one-cycle; {args.warmup} untimed then "
        f"{args.steps} timed steps per run, {args.repeats} runs of each loop interleaved in one process. *ours*: "
        "`preannotate.training.train` (checkpointing, logging, progress as in a real run), timed by its own step "
        "clock; *plain*: a torchvision-references-style loop (`CocoDetection` + transforms v2, `RandomSampler`, "
        "`OneCycleLR`) over a COCO export of the same frames (bench/_plain_loop.py).",
        "",
        "| run | ours img/s | plain img/s | ratio | ours: share of step waiting for data |",
        "|---:|---:|---:|---:|---:|",
    ]
    for i, ((mine, theirs), r) in enumerate(zip(rows, ratios, strict=True), start=1):
        lines.append(f"| {i} | {mine['images_per_s']:.2f} | {theirs['images_per_s']:.2f} | {r:.3f} | "
                     f"{100 * mine['data_wait']:.1f} % |")
    lines += [
        "",
        f"Median ratio ours/plain: **{ratio:.3f}** (target >= {TARGET}: {'pass' if ratio >= TARGET else 'FAIL'}).",
        "",
        f"Data pipelines alone (no model, same workers): ours {ours_loading:.1f} img/s, plain {plain_loading:.1f} "
        f"img/s, against {statistics.median(m['images_per_s'] for m, _ in rows):.2f} img/s of training: loading is "
        f"{ours_loading / statistics.median(m['images_per_s'] for m, _ in rows):.0f}x faster than training "
        "consumes, so it is not the bottleneck.",
    ]
    text = "\n".join(lines) + "\n"
    _results.publish(SECTION, text, write=not args.no_write)
    return 1 if args.check and ratio < TARGET else 0


if __name__ == "__main__":
    sys.exit(main())
