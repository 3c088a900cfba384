"""The baseline both training benchmarks compare against: a plain loop in the style of torchvision's
``references/detection`` (``train.py`` + ``engine.train_one_epoch`` with the transforms-v2 data path).

It reads the frames as a COCO folder through ``torchvision.datasets.CocoDetection`` wrapped for transforms v2
(what the references do with ``--use-v2``), resizes and flips with ``transforms.v2``, batches with a
``RandomSampler`` and ``collate_fn = tuple(zip(*batch))``, and steps AdamW under ``OneCycleLR``: nothing of ours
but the model builder, so the comparison is our loop against torchvision's recipe on the same model and data.
"""

from __future__ import annotations

import contextlib
import io
import json
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from preannotate.formats import coco
from preannotate.models import create_detector, get_architecture
from torch.utils.data import DataLoader, RandomSampler, Subset
from torchvision.datasets import CocoDetection, wrap_dataset_for_transforms_v2
from torchvision.transforms import v2


def write_coco_folder(folder: Path, items, labels) -> tuple[Path, Path]:
    """The frames as a COCO folder (images + instances.json), as ``preannotate export`` would write them."""
    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    pairs = []
    for frame, source in items:
        (_, data), = source.encoded([frame.frame])
        (images / frame.name).write_bytes(data)
        pairs.append((frame, frame.name))
    annotations = folder / "instances.json"
    annotations.write_text(json.dumps(coco.to_coco(pairs, labels)))
    return images, annotations


def coco_dataset(images: Path, annotations: Path, architecture: str, train: bool, masks: bool = False):
    """The references resize nothing themselves: the model's transform does (SSD squashes to its square, which is
    done here too so that our data and theirs are the same tensors)."""
    steps = [v2.ToImage()]
    if architecture.startswith("ssd"):
        size = get_architecture(architecture).image_size
        steps.append(v2.Resize((size, size), antialias=True))
    if train:
        steps.append(v2.RandomHorizontalFlip(0.5))
    steps += [v2.ToDtype(torch.float32, scale=True), v2.SanitizeBoundingBoxes()]
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools announces its index
        dataset = CocoDetection(str(images), str(annotations), transforms=v2.Compose(steps))
    keys = ["image_id", "boxes", "labels"] + (["masks"] if masks else [])
    wrapped = wrap_dataset_for_transforms_v2(dataset, target_keys=keys)
    if not train:
        return wrapped
    # as the references' _coco_remove_images_without_annotations: frames without objects are not trained on
    annotated = [i for i, image_id in enumerate(dataset.ids) if dataset.coco.getAnnIds(imgIds=[image_id])]
    return Subset(wrapped, annotated)


def collate(batch):
    return tuple(zip(*batch, strict=True))


def plain_loader(dataset, batch_size: int, workers: int, seed: int = 0) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, sampler=RandomSampler(dataset, generator=generator),
                      num_workers=workers, collate_fn=collate, drop_last=True, persistent_workers=workers > 0)


def endless(loader: DataLoader) -> Iterator:
    while True:
        yield from loader


def plain_train(architecture: str, labels, loader: DataLoader, steps: int, lr: float, weight_decay: float,
                seed: int = 0, on_step=None, clip_norm: float | None = None) -> torch.nn.Module:
    """``steps`` optimizer steps as ``engine.train_one_epoch`` takes them (gradients clipped to ``clip_norm`` when
    given); ``on_step(step, seconds)`` is told the wall time after each."""
    torch.manual_seed(seed)
    model = create_detector(architecture, labels, init="random", device="cpu").model
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps)
    batches = endless(loader)
    start = time.perf_counter()
    for step in range(1, steps + 1):
        images, targets = next(batches)
        images = [image.to("cpu") for image in images]
        targets = [{k: v.to("cpu") for k, v in t.items() if k != "image_id"} for t in targets]
        loss_dict = model(images, targets)
        losses = sum(loss for loss in loss_dict.values())
        loss_value = losses.item()  # the references log every step (MetricLogger)
        if not torch.isfinite(torch.tensor(loss_value)):
            raise FloatingPointError(f"loss is {loss_value}")
        optimizer.zero_grad()
        losses.backward()
        if clip_norm:
            torch.nn.utils.clip_grad_norm_(params, clip_norm)
        optimizer.step()
        scheduler.step()
        if on_step:
            on_step(step, time.perf_counter() - start)
    return model
