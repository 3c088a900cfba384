"""The model designer adds nothing (issue 14): the composed ``resnet50 + fpn (P3-P7) + retinanet`` against
torchvision's own ``retinanet_resnet50_fpn``, same input, same process, interleaved.

* Inference: ms per 512x384 frame through each detector's ``detect`` (the same ``TorchvisionDetector`` runs both).
* Training: images/s of optimizer steps (the model's own losses, AdamW) on the same batch of synthetic frames.

Both are built from random weights at ``--size`` px. Target: composed / torchvision ≈ 1.0 (it is the same network:
the composition only names where torchvision's builder fixes). Writes the "Model designer (issue 14)" section of
bench/RESULTS.md (``--no-write`` to skip).
"""

from __future__ import annotations

import argparse
import statistics
import time

import _results  # bench/_results.py: the script's own folder is on sys.path
import numpy as np
import torch
from preannotate.models import create_detector
from preannotate.shapes import parse_label_list

SECTION = "## Model designer (issue 14)"
COMPOSED = "backbone=resnet50;neck=fpn;neck-levels=3-7;neck-channels=256;head=retinanet"


def detectors(size: int):
    labels = parse_label_list("car,person,bus")
    common = f"init=random;image-size={size};max-image-size={size}"
    return {"torchvision retinanet_resnet50_fpn": create_detector("retinanet_resnet50_fpn", labels,
                                                                  hyperparameters=common),
            "composed resnet50 + fpn + retinanet": create_detector("custom", labels,
                                                                   hyperparameters=f"{common};{COMPOSED}")}


def detect_ms(detector, image, repeats: int) -> float:
    detector.detect([image], 0.5)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        detector.detect([image], 0.5)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def train_images_per_s(detector, batch: int, steps: int, size: int) -> float:
    model = detector.model
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    generator = torch.Generator().manual_seed(0)
    images = [torch.rand(3, size, size, generator=generator) for _ in range(batch)]
    targets = [{"boxes": torch.tensor([[20.0, 30.0, 120.0, 150.0]]), "labels": torch.tensor([1])} for _ in images]

    def step():
        loss = sum(model(images, targets).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    step()  # warm-up
    start = time.perf_counter()
    for _ in range(steps):
        step()
    model.eval()
    return steps * batch / (time.perf_counter() - start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=384)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    built = detectors(args.size)
    image = np.random.default_rng(0).integers(0, 255, (384, 512, 3), dtype=np.uint8)
    inference = {name: [] for name in built}
    training = {name: [] for name in built}
    for _ in range(args.rounds):  # interleaved: the machine's drift hits both alike
        for name, detector in built.items():
            inference[name].append(detect_ms(detector, image, args.repeats))
            training[name].append(train_images_per_s(detector, args.batch, args.steps, args.size))
    reference, composed = list(built)
    params = {name: sum(p.numel() for p in d.model.parameters()) for name, d in built.items()}
    machine = _results.machine()
    lines = [SECTION, "",
             f"Machine: {machine['cpu']}, {machine['cores']} cores, Python {machine['python']}, {machine['date']}. "
             f"`python bench/composed_speed.py`: random weights at {args.size} px, {args.rounds} interleaved rounds "
             f"(median); inference on a 512x384 frame, {args.repeats} calls; training {args.steps} AdamW steps of "
             f"batch {args.batch}.", "",
             "| model | parameters | detect ms | training images/s |", "|---|---|---|---|"]
    for name in built:
        lines.append(f"| {name} | {params[name] / 1e6:.1f} M | {statistics.median(inference[name]):.0f} | "
                     f"{statistics.median(training[name]):.2f} |")
    ratio_detect = statistics.median(inference[composed]) / statistics.median(inference[reference])
    ratio_train = statistics.median(training[composed]) / statistics.median(training[reference])
    lines += ["", f"Composed / torchvision: detection time {ratio_detect:.2f}x, training speed {ratio_train:.2f}x "
                  "(target ≈ 1.0)."]
    _results.publish(SECTION, "\n".join(lines) + "\n", write=not args.no_write)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
