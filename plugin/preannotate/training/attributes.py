"""Training and validating the attribute classifier (``models.attributes``) on the frames a detector learns from.

It runs inside the one training run, when the detector's best weights are about to be published
(``runs.publish_run``), for every family and framework: the crops of the true shapes of the training frames (each
cut once, at ``STORED`` pixels; every step takes a random ``CROP`` window of each, a shift of the box as a
detector's box is shifted) teach one network all the labels' learned attributes, each shape teaching the heads of
its label whose value it has. Its budget is fitted to the data (``steps_for``), seeded by the run's seed.

**Validation** is on the *true boxes* of the validation frames, not on detections: it measures the attributes alone,
whatever the detector finds and at any threshold (what a reviewer sees on a found object is the same crop give or
take the box's fit). Per head: its accuracy, the majority-class peer's (always the value most common in training),
the share answered at ``MIN_CONFIDENCE`` and the accuracy of those answers. A head that does not beat the peer is
not trusted and never served (``models.attributes.Head.trusted``).
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from preannotate.models.attributes import (
    CROP,
    STORED,
    AttributeModel,
    AttributeNet,
    Head,
    cut,
    geometry,
    learnable,
    picture,
    values_of,
)
from preannotate.shapes import TAG, Label

log = logging.getLogger(__name__)

BATCH = 64                    # crops a step
LEARNING_RATE = 3e-3
EPOCHS = 30                   # over the training crops; within MIN_STEPS .. MAX_STEPS optimizer steps
MIN_STEPS, MAX_STEPS = 60, 600
UNKNOWN = -1                  # a shape without a (valid) value of a head, or of another label: no loss there


def steps_for(crops: int) -> int:
    """Optimizer steps for ``crops`` training crops: ``EPOCHS`` epochs, ``MIN_STEPS`` to ``MAX_STEPS``."""
    return min(MAX_STEPS, max(MIN_STEPS, EPOCHS * math.ceil(crops / BATCH)))


def examples(items: Sequence[Any], heads: Sequence[Head]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The crops (``N×3×STORED×STORED`` uint8), geometries (``N×4``) and per-head targets (``N×heads``: the value's
    index, ``UNKNOWN`` where the shape has none) of every true shape of a label with heads on ``items``."""
    by_label: dict[str, list[int]] = {}
    for index, head in enumerate(heads):
        by_label.setdefault(head.label, []).append(index)
    crops, geometries, targets = [], [], []
    for frame, images in items:
        shapes = [s for s in frame.shapes if s.type != TAG and s.label in by_label and not s.outside]
        if not shapes:
            continue
        _, array = next(iter(images.decoded([frame.frame])))
        image = picture(array)
        width, height = image.size
        for shape in shapes:
            box = shape.bbox()
            if box[2] - box[0] < 1 or box[3] - box[1] < 1:
                continue
            crops.append(cut(image, box))
            geometries.append(geometry(box, width, height))
            row = [UNKNOWN] * len(heads)
            for index in by_label[shape.label]:
                value = shape.attributes.get(heads[index].name)
                if value is not None and str(value).lower() in _lowered(heads[index].values):
                    row[index] = _lowered(heads[index].values).index(str(value).lower())
            targets.append(row)
    if not crops:
        return (torch.zeros((0, 3, STORED, STORED), dtype=torch.uint8), torch.zeros((0, 4)),
                torch.zeros((0, len(heads)), dtype=torch.long))
    return (torch.from_numpy(np.stack(crops)), torch.tensor(geometries, dtype=torch.float32),
            torch.tensor(targets, dtype=torch.long))


def _lowered(values: Sequence[str]) -> list[str]:
    return [value.lower() for value in values]  # CVAT writes checkboxes "true"/"false"; COCO files may say True


def train_attribute_model(labels: Sequence[Label], train_items: Sequence[Any], val_items: Sequence[Any],
                          seed: int = 0, steps: int | None = None) -> AttributeModel | None:
    """The attribute classifier of ``labels`` trained on ``train_items`` and validated on ``val_items``
    (``(FrameAnnotations, FrameImages)`` pairs); None when no label has a learnable attribute or no training shape
    has a value of one."""
    heads = [Head(label, spec.name, spec.input_type, list(values_of(spec))) for label, spec in learnable(labels)]
    if not heads:
        return None
    crops, geometries, targets = examples(train_items, heads)
    known = (targets != UNKNOWN).sum(0)
    if not len(crops) or not known.any():
        log.info("no training shape has a value of %s: no attribute is learned",
                 ", ".join(head.key for head in heads))
        return None
    for index, head in enumerate(heads):  # the majority-class peer's answer
        counts = Counter(int(v) for v in targets[:, index] if v != UNKNOWN)
        head.default = head.values[counts.most_common(1)[0][0]] if counts else ""
    total = steps if steps is not None else steps_for(len(crops))
    threads = torch.get_num_threads()
    try:  # one thread: a network this small gains little from more, and loses ten times that when cores are shared
        torch.set_num_threads(1)
        with torch.random.fork_rng(devices=[]):  # the same frames and seed: the same weights
            torch.manual_seed(seed)
            net = AttributeNet([len(head.values) for head in heads])
            _fit(net, crops, geometries, targets, total, np.random.default_rng([seed, 23]))
    finally:
        torch.set_num_threads(threads)
    model = AttributeModel(net, heads)
    validate(model, val_items)
    log.info("attributes learned in %d steps on %d crops: %s", total, len(crops), summary(model))
    return model


def _fit(net: AttributeNet, crops: torch.Tensor, geometries: torch.Tensor, targets: torch.Tensor, steps: int,
         rng: np.random.Generator) -> None:
    net.train()
    optimizer = torch.optim.AdamW(net.parameters(), lr=LEARNING_RATE, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, LEARNING_RATE, total_steps=steps, pct_start=0.15)
    count, span = len(crops), STORED - CROP + 1
    for _ in range(steps):
        rows = torch.from_numpy(rng.integers(0, count, size=min(BATCH, max(2, count))))
        dx, dy = (int(v) for v in rng.integers(0, span, size=2))  # one shift per batch: cheap, and a box's misfit
        batch = crops[rows][..., dy:dy + CROP, dx:dx + CROP]
        logits = net(batch, geometries[rows])
        losses = [torch.nn.functional.cross_entropy(head_logits, targets[rows, index], ignore_index=UNKNOWN,
                                                    reduction="sum")
                  for index, head_logits in enumerate(logits)]
        loss = torch.stack(losses).sum() / max(int((targets[rows] != UNKNOWN).sum()), 1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    net.eval()


def validate(model: AttributeModel, val_items: Sequence[Any]) -> None:
    """Set each head's validation figures from the true boxes of ``val_items`` (None when it has no shape there)."""
    crops, geometries, targets = examples(val_items, model.heads)
    probabilities = model.probabilities(crops, geometries)
    for index, head in enumerate(model.heads):
        known = (targets[:, index] != UNKNOWN).numpy()
        head.shapes = int(known.sum())
        if not head.shapes:
            head.accuracy = head.majority = head.answered = head.answered_accuracy = None
            continue
        truth = targets[:, index].numpy()[known]
        chosen = probabilities[index][known]
        best = chosen.argmax(1)
        sure = chosen.max(1) >= model.min_confidence
        right = best == truth
        head.accuracy = round(float(right.mean()), 4)
        head.majority = round(float((truth == head.values.index(head.default)).mean()), 4) if head.default else 0.0
        head.answered = round(float(sure.mean()), 4)
        head.answered_accuracy = round(float(right[sure].mean()), 4) if sure.any() else None


def summary(model: AttributeModel) -> str:
    """``car/colour 0.93 (peer 0.40), ...``: each head's validation accuracy and the majority-class peer's."""
    return ", ".join(f"{head.key} " + ("not validated" if head.accuracy is None else
                                       f"{head.accuracy:.2f} (peer {head.majority:.2f})"
                                       + ("" if head.trusted else ", not served"))
                     for head in model.heads)
