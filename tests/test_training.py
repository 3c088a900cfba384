"""Training pieces on their own: schedules and optimizers, COCO evaluation, datasets and transforms, logs, defaults."""

from __future__ import annotations

import json
import math
import os
import signal
import struct
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from preannotate.formats import coco, masks
from preannotate.frames import InMemoryFrames
from preannotate.hyperparameters import HyperparameterError, Hyperparameters
from preannotate.models import ARCHITECTURES, create_detector
from preannotate.models.torchvision_family import freeze_backbone
from preannotate.shapes import FrameAnnotations, Label, Shape
from preannotate.training import data, optim
from preannotate.training.evaluation import CocoAccumulator, coco_metrics, recalibrate_batch_norm
from preannotate.training.logs import EventWriter, MetricsLog, crc32c
from preannotate.training.loop import train
from preannotate.training.runs import RunMismatch, effective_hyperparameters

from tests.conftest import encode

# --- learning-rate schedules and optimizers ---------------------------------------------------------------------

BASE = 0.1


def lr_curve(text: str, total: int) -> list[float]:
    """The learning rate of each optimizer step of a real optimizer driven by the real scheduler."""
    hp = Hyperparameters().updated(f"initial-learning-rate={BASE}; optimizer=sgd; {text}")
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = optim.build_optimizer([parameter], hp.recipe)
    scheduler = optim.build_scheduler(optimizer, hp.recipe, total)
    rates = []
    for _ in range(total):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return rates


WARM = optim.WARMUP_START


@pytest.mark.parametrize("text, total, expected", [
    ("schedule=constant", 5, [BASE] * 5),
    ("schedule=constant; warmup-steps=4", 6,
     [BASE * WARM, BASE * (WARM + (1 - WARM) / 4), BASE * (WARM + (1 - WARM) / 2), BASE * (WARM + 3 * (1 - WARM) / 4),
      BASE, BASE]),
    ("schedule=multi-step; schedule-step-1=3; schedule-lr-1=0.01; schedule-step-2=5; schedule-lr-2=0.001", 7,
     [BASE, BASE, BASE, 0.01, 0.01, 0.001, 0.001]),
    ("schedule=multi-step; schedule-step-1=2; schedule-step-2=4; schedule-gamma=0.5", 6,
     [BASE, BASE, BASE / 2, BASE / 2, BASE / 4, BASE / 4]),
    ("schedule=step; schedule-step-size=3; schedule-gamma=0.5", 7,
     [BASE, BASE, BASE, BASE / 2, BASE / 2, BASE / 2, BASE / 4]),
    ("schedule=step; schedule-gamma=0.1", 6, [BASE, BASE, BASE / 10, BASE / 10, BASE / 100, BASE / 100]),
    ("schedule=exponential; schedule-gamma=0.01", 5, [BASE * 0.01 ** (s / 5) for s in range(5)]),
    ("schedule=cosine", 4, [BASE * 0.5 * (1 + math.cos(math.pi * s / 4)) for s in range(4)]),
    ("schedule=cosine; warmup-steps=2", 6,
     [BASE * WARM, BASE * (WARM + (1 - WARM) / 2)] + [BASE * 0.5 * (1 + math.cos(math.pi * s / 4)) for s in range(4)]),
])
def test_schedule_learning_rates_step_by_step(text, total, expected):
    assert lr_curve(text, total) == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_one_cycle_rises_over_the_warmup_then_anneals_far_down():
    rates = lr_curve("schedule=one-cycle; warmup-steps=10", 40)
    peak = int(np.argmax(rates))
    assert rates[0] == pytest.approx(BASE / 25)
    assert peak == 10 and rates[peak] == pytest.approx(BASE)
    assert all(a < b for a, b in zip(rates[:peak], rates[1:peak + 1], strict=True))
    assert all(a > b for a, b in zip(rates[peak:-1], rates[peak + 1:], strict=True))
    assert rates[-1] < BASE / 1000
    default = lr_curve("schedule=one-cycle", 100)  # without a warm-up: torch's 30 % rise
    assert int(np.argmax(default)) == 30 - 1


def test_on_plateau_decays_after_a_validation_without_improvement_and_survives_a_restart():
    hp = Hyperparameters().updated(f"initial-learning-rate={BASE}; schedule=on-plateau; schedule-gamma=0.5; "
                                   "early-stopping-delta=0.01")
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = optim.build_optimizer([parameter], hp.recipe)
    scheduler = optim.build_scheduler(optimizer, hp.recipe, 100)
    for metric, expected in [(0.30, BASE), (0.35, BASE), (0.355, BASE / 2), (0.2, BASE / 4), (0.5, BASE / 4)]:
        optimizer.step()
        scheduler.step()
        optim.validated(scheduler, metric)
        assert optimizer.param_groups[0]["lr"] == pytest.approx(expected)
    saved_optimizer, saved_scheduler = optimizer.state_dict(), scheduler.state_dict()
    restored_optimizer = optim.build_optimizer([torch.nn.Parameter(torch.zeros(1))], hp.recipe)
    restored = optim.build_scheduler(restored_optimizer, hp.recipe, 100)
    restored_optimizer.load_state_dict(saved_optimizer)
    restored.load_state_dict(saved_scheduler)
    restored_optimizer.step()
    restored.step()
    assert restored_optimizer.param_groups[0]["lr"] == pytest.approx(BASE / 4)
    optim.validated(restored, 0.45)  # the best (0.5) came before the restart
    assert restored_optimizer.param_groups[0]["lr"] == pytest.approx(BASE / 8)


@pytest.mark.parametrize("name, cls, options", [
    ("sgd", torch.optim.SGD, {"momentum": 0.8}),
    ("adam", torch.optim.Adam, {}),
    ("adamw", torch.optim.AdamW, {}),
    ("rmsprop", torch.optim.RMSprop, {"momentum": 0.8}),
    ("adamax", torch.optim.Adamax, {}),
    ("adagrad", torch.optim.Adagrad, {}),
    ("adadelta", torch.optim.Adadelta, {}),
])
def test_every_optimizer_is_built_as_asked_and_descends(name, cls, options):
    hp = Hyperparameters().updated(f"optimizer={name}; initial-learning-rate=0.05; momentum=0.8; "
                                   "weight-decay=0.001; schedule=one-cycle")
    target = torch.tensor([1.0, -2.0, 3.0])
    weights = torch.nn.Parameter(torch.zeros(3))
    frozen = torch.nn.Parameter(torch.zeros(3), requires_grad=False)
    optimizer = optim.build_optimizer([weights, frozen], hp.recipe)
    optim.build_scheduler(optimizer, hp.recipe, 50)  # one-cycle takes every optimizer (momentum cycled where there is)

    assert type(optimizer) is cls and len(optimizer.param_groups[0]["params"]) == 1
    assert optimizer.defaults["fused" if name in optim.FUSED else "foreach"] is True  # the fast kernels
    assert optimizer.defaults["weight_decay"] == 0.001
    for key, value in options.items():
        assert optimizer.defaults[key] == value
    before = ((weights - target) ** 2).sum().item()
    for _ in range(20):
        optimizer.zero_grad()
        loss = ((weights - target) ** 2).sum()
        loss.backward()
        optimizer.step()
    assert ((weights - target) ** 2).sum().item() < before


# --- evaluation ---------------------------------------------------------------------------------------------------

LABELS = [Label("car", "rectangle", id=1), Label("person", "polygon", id=2)]


def ground_truth(*boxes_per_image):
    images, annotations = [], []
    for image_id, boxes in enumerate(boxes_per_image, start=1):
        images.append({"id": image_id, "width": 100, "height": 100})
        for category, (x, y, w, h) in boxes:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": category,
                                "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0})
    return {"images": images, "annotations": annotations}


def result(image_id, category, box, score):
    return {"image_id": image_id, "category_id": category, "bbox": list(box), "score": score}


def test_perfect_predictions_score_one():
    gt = ground_truth([(1, (10, 10, 30, 20)), (2, (50, 50, 20, 40))], [(1, (0, 0, 50, 50))])
    results = [result(a["image_id"], a["category_id"], a["bbox"], 0.9) for a in gt["annotations"]]
    metrics = coco_metrics(gt, results, LABELS)
    assert (metrics["map"], metrics["map50"], metrics["map75"]) == (1.0, 1.0, 1.0)
    assert metrics["per_class"] == {"car": {"ap": 1.0, "ap50": 1.0}, "person": {"ap": 1.0, "ap50": 1.0}}


def test_a_box_with_iou_0_62_counts_at_three_of_the_ten_thresholds():
    gt = ground_truth([(1, (0, 0, 50, 50))])
    # the same height, shifted right: IoU = 50*(50-s) / (50*(50+s)); s = 11.7 gives 0.6207
    metrics = coco_metrics(gt, [result(1, 1, (11.7, 0, 50, 50), 0.8)], LABELS)
    assert metrics["map50"] == 1.0 and metrics["map75"] == 0.0
    assert metrics["map"] == pytest.approx(0.3)  # matched at .50, .55 and .60
    assert metrics["per_class"]["person"] == {"ap": None, "ap50": None}  # no person anywhere


def test_a_confident_false_positive_halves_the_precision():
    gt = ground_truth([(1, (10, 10, 30, 30))], [])
    results = [result(2, 1, (10, 10, 30, 30), 0.9), result(1, 1, (10, 10, 30, 30), 0.8)]
    assert coco_metrics(gt, results, LABELS)["map"] == pytest.approx(0.5)


def test_per_class_average_and_nothing_found():
    gt = ground_truth([(1, (10, 10, 30, 20)), (2, (50, 50, 20, 40))])
    metrics = coco_metrics(gt, [result(1, 1, (10, 10, 30, 20), 0.9), result(1, 1, (50, 50, 20, 40), 0.7)], LABELS)
    assert metrics["per_class"]["car"]["ap"] == 1.0 and metrics["per_class"]["person"]["ap"] == 0.0
    assert metrics["map"] == pytest.approx(0.5)
    nothing = coco_metrics(gt, [], LABELS)
    assert nothing["map"] == 0.0 and nothing["per_class"]["person"] == {"ap": 0.0, "ap50": 0.0}
    assert coco_metrics(ground_truth([]), [], LABELS)["map"] is None


def test_accumulator_scores_boxes_and_masks_of_model_outputs():
    mask = torch.zeros(1, 40, 60, dtype=torch.uint8)
    mask[0, 10:30, 5:25] = 1
    target = {"boxes": torch.tensor([[5.0, 10.0, 25.0, 30.0]]), "labels": torch.tensor([2]), "masks": mask}
    perfect = {"boxes": target["boxes"], "labels": target["labels"], "scores": torch.tensor([0.9]),
               "masks": mask[:, None].float()}
    half = mask.clone()
    half[0, 20:30] = 0  # the right box but half the mask: mask IoU 0.5
    wrong = {**perfect, "masks": half[:, None].float()}
    accumulator = CocoAccumulator(with_masks=True)
    accumulator.add(target, perfect, 40, 60)
    assert accumulator.metrics(LABELS)["segm"]["map"] == 1.0
    accumulator = CocoAccumulator(with_masks=True)
    accumulator.add(target, wrong, 40, 60)
    metrics = accumulator.metrics(LABELS)
    assert metrics["bbox"]["map"] == 1.0 and metrics["segm"]["map50"] == 1.0 and metrics["segm"]["map"] == 0.1
    assert metrics["map"] == metrics["segm"]["map"]  # a mask model is judged by its masks


class ListModel(torch.nn.Module):
    """Takes a list of images as detection models do."""

    def __init__(self):
        super().__init__()
        self.first, self.second = torch.nn.BatchNorm2d(3, momentum=0.03), torch.nn.BatchNorm2d(3)

    def forward(self, images):
        return self.second(self.first(torch.stack(images)))


def test_batch_norm_recalibration_measures_the_current_statistics_exactly():
    model = ListModel()
    generator = torch.Generator().manual_seed(0)
    batches = [([5 + 2 * torch.randn(3, 8, 8, generator=generator) for _ in range(4)], None) for _ in range(10)]
    pixels = torch.stack([image for images, _ in batches for image in images])
    assert recalibrate_batch_norm(model, batches, frozen=[model.second]) == 1

    per_batch_means = torch.stack([torch.stack(images).mean(dim=(0, 2, 3)) for images, _ in batches])
    assert torch.allclose(model.first.running_mean, per_batch_means.mean(dim=0))  # a plain average, no momentum
    assert torch.allclose(model.first.running_mean, pixels.mean(dim=(0, 2, 3)), atol=1e-5)
    assert torch.allclose(model.first.running_var, torch.full((3,), 4.0), rtol=0.15)
    assert model.first.momentum == 0.03 and not model.training and not model.first.training
    assert torch.equal(model.second.running_mean, torch.zeros(3))  # frozen: untouched


# --- datasets and transforms ----------------------------------------------------------------------------------

def bright_box(image: torch.Tensor) -> tuple[float, float, float, float] | None:
    """The extent of the brightest pixels (the white rectangle, whatever the colour jitter did) of a CHW image."""
    darkest = image.min(dim=0).values
    ys, xs = torch.nonzero(darkest > (darkest.max() + darkest.min()) / 2, as_tuple=True)
    if not len(xs):
        return None
    return float(xs.min()), float(ys.min()), float(xs.max()) + 1, float(ys.max()) + 1


def white_rectangle_frame(width=200, height=100, box=(30, 20, 90, 60)) -> tuple[FrameAnnotations, InMemoryFrames]:
    image = Image.new("RGB", (width, height), (40, 60, 80))
    ImageDraw.Draw(image).rectangle([box[0], box[1], box[2] - 1, box[3] - 1], fill=(255, 255, 255))
    frame = FrameAnnotations(0, width, height, "f.png", [Shape("car", "rectangle", list(map(float, box)))])
    return frame, InMemoryFrames({0: encode(image, "PNG")})


@pytest.mark.parametrize("augment", ["flip", "flip,scale", "flip,scale,colour"])
def test_boxes_and_masks_move_with_the_pixels(augment):
    frame, images = white_rectangle_frame()
    hp = Hyperparameters().updated({"image_size": 64, "max_image_size": 160, "augment": augment})
    dataset = data.DetectionDataset([(frame, images)], LABELS, data.transforms(hp, False, True), with_masks=True)
    lefts = set()
    for draw in range(12):
        image, target = dataset[(0, draw)]
        assert image.dtype == torch.float32 and image.shape[1] == 64 and image.shape[2] == 128
        box = target["boxes"][0].tolist()
        if "colour" not in augment:  # colour jitter leaves the geometry alone but blurs "white"
            assert box == pytest.approx(bright_box(image), abs=1.5)
        mask = target["masks"][0].bool()
        mask_ys, mask_xs = torch.nonzero(mask, as_tuple=True)
        mask_box = [float(mask_xs.min()), float(mask_ys.min()), float(mask_xs.max()) + 1, float(mask_ys.max()) + 1]
        assert mask_box == pytest.approx(box, abs=1.5)
        brightness = image.mean(dim=0)
        assert brightness[mask].mean() > brightness[~mask].mean() + 0.2  # the mask lies on the rectangle
        assert target["labels"].tolist() == [1]
        lefts.add(round(box[0]))
    assert len(lefts) > 1  # flipped and not flipped among the draws
    again, _ = dataset[(0, 5)]
    assert torch.equal(again, dataset[(0, 5)][0])  # a draw's augmentation is a function of the draw


def test_letterbox_scales_keeping_the_aspect_and_pads_to_a_square():
    frame, images = white_rectangle_frame(200, 100, (30, 20, 90, 60))
    hp = Hyperparameters().updated({"image_size": 80, "letterbox": True, "augment": "none"})
    image, target = data.DetectionDataset([(frame, images)], LABELS, data.transforms(hp, False, False))[0]
    assert image.shape == (3, 80, 80)
    scale, pad = 80 / 200, (80 - 100 * 80 / 200) / 2  # 0.4, 20 px above and below
    expected = [30 * scale, 20 * scale + pad, 90 * scale, 60 * scale + pad]
    assert target["boxes"][0].tolist() == pytest.approx(expected)
    assert bright_box(image) == pytest.approx(expected, abs=1)
    assert float(image[:, :int(pad) - 1].max()) == 0.0  # black bars


@pytest.mark.parametrize("fixed, hp_values, size", [
    (True, {"image_size": 96}, (96, 96)),                              # SSD squashes to a square
    (False, {"image_size": 50, "max_image_size": 200}, (50, 100)),     # shorter side to image-size
    (False, {"image_size": 80, "max_image_size": 120}, (60, 120)),     # ... unless the longer passes the max
    (False, {"image_size": 64, "max_image_size": 64}, (32, 64)),
])
def test_resize_follows_the_models_own_rule(fixed, hp_values, size):
    frame, images = white_rectangle_frame(200, 100, (30, 20, 90, 60))
    hp = Hyperparameters().updated({**hp_values, "augment": "none"})
    image, target = data.DetectionDataset([(frame, images)], LABELS, data.transforms(hp, fixed, False))[0]
    assert tuple(image.shape[1:]) == size
    sx, sy = size[1] / 200, size[0] / 100
    assert target["boxes"][0].tolist() == pytest.approx([30 * sx, 20 * sy, 90 * sx, 60 * sy], abs=1e-4)


def test_targets_of_every_shape_type_agree_with_the_coco_export():
    width, height = 64, 48
    bitmap = np.zeros((height, width), bool)
    bitmap[5:15, 40:60] = True
    shapes = [Shape("car", "rectangle", [2, 3, 20, 15], rotation=30),
              Shape("person", "polygon", [30, 30, 50, 30, 40, 45]), Shape("car", "ellipse", [15, 35, 25, 30]),
              Shape("person", "mask", masks.bitmap_to_cvat_rle(bitmap)),
              Shape("dog", "rectangle", [1, 1, 5, 5]), Shape("car", "points", [3, 3])]
    frame = FrameAnnotations(0, width, height, "f.png", shapes)
    boxes, classes, bitmaps = data.targets(frame, LABELS, with_masks=True)
    exported = [coco.shape_to_annotation(s, width, height) for s in shapes[:4]]

    assert classes.tolist() == [1, 2, 1, 2]  # the unknown label and the points are left out
    for box, annotation in zip(boxes, exported, strict=True):
        x, y, w, h = annotation["bbox"]
        assert box.tolist() == pytest.approx([x, y, x + w, y + h], abs=1e-4)
    assert np.array_equal(bitmaps[3], bitmap)
    assert np.array_equal(bitmaps[1], masks.polygon_to_bitmap([shapes[1].points], width, height))
    for i in range(4):  # every mask fills its box
        ys, xs = np.nonzero(bitmaps[i])
        assert [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1] == pytest.approx(boxes[i].tolist(), abs=1.01)


class _Numbers(torch.utils.data.Dataset):
    def __len__(self):
        return 64

    def __getitem__(self, index):
        return torch.full((1,), float(index)), {"index": index}


def test_loader_workers_outlive_the_signals_that_stop_their_trainer():
    """A server stopping sends SIGTERM to its job's process group (Ctrl-C: SIGINT to the terminal's): the trainer
    checkpoints and stops; a worker that died first would kill the trainer before it saved."""
    batches = iter(data.loader(_Numbers(), batch_size=1, workers=1))
    first = next(batches)
    [worker] = batches._workers
    for signum in (signal.SIGTERM, signal.SIGINT):
        os.kill(worker.pid, signum)
    # a worker killed here would surface as torch's "DataLoader worker ... is killed by signal" below
    rest = [images[0].item() for images, _ in batches]
    assert [first[0][0].item(), *rest] == [float(i) for i in range(64)]


def test_batches_resume_where_they_stopped_and_ranks_share_each_step():
    full = list(data.StepBatchSampler(10, 4, seed=1, start=0, total=8))
    assert list(data.StepBatchSampler(10, 4, seed=1, start=5, total=8)) == full[5:]
    draws = [draw for batch in full for _, draw in batch]
    assert draws == list(range(32))
    first_epoch = [index for batch in full for index, draw in batch if draw < 10]
    assert sorted(first_epoch) == list(range(10))  # an epoch visits every frame once
    assert first_epoch != list(range(10))
    rank0 = list(data.StepBatchSampler(10, 2, seed=1, start=0, total=8, rank=0, world=2))
    rank1 = list(data.StepBatchSampler(10, 2, seed=1, start=0, total=8, rank=1, world=2))
    assert [a + b for a, b in zip(rank0, rank1, strict=True)] == full


# --- defaults, backbones, logs -----------------------------------------------------------------------------------

def test_registry_budgets_shrink_to_small_data_with_their_warmup_and_boundaries():
    ssd = effective_hyperparameters("ssdlite320_mobilenet_v3_large", None, 50)
    # 15000 steps → 100 epochs (300)
    assert (ssd.recipe.batch_size, ssd.recipe.num_steps, ssd.recipe.warmup_steps) == (24, 300, 10)
    rcnn = effective_hyperparameters("fasterrcnn_resnet50_fpn", "", 40)
    assert (rcnn.recipe.num_steps, rcnn.recipe.schedule_steps, rcnn.recipe.warmup_steps) == (4000, [3600], 40)
    tiny = effective_hyperparameters("ssdlite320_mobilenet_v3_large", {"warmup-steps": 7}, 5)
    assert (tiny.recipe.batch_size, tiny.recipe.num_steps, tiny.recipe.warmup_steps) == (5, 300, 7)
    assert effective_hyperparameters("ssdlite320_mobilenet_v3_large", None, 50, previous=True).recipe.init == "previous"
    random = effective_hyperparameters("ssdlite320_mobilenet_v3_large", "init=random", 50, previous=True)
    assert random.recipe.init == "random"
    one = effective_hyperparameters("fasterrcnn_mobilenet_v3_large_320_fpn", None, 1)
    assert one.recipe.batch_size == 2  # never below two by default (SSD's batch norms need it)
    longer = effective_hyperparameters("ssdlite320_mobilenet_v3_large", "num-steps=30000", 50)
    assert (longer.recipe.num_steps, longer.recipe.warmup_steps) == (30000, 1000)  # the recipe's warm-up share is kept
    by_epochs = effective_hyperparameters("ssdlite320_mobilenet_v3_large", "epochs=3; batch-size=10", 50)
    assert by_epochs.recipe.num_steps is None and by_epochs.recipe.total_steps(50) == 15


def test_trainable_backbone_layers_freeze_the_early_stages():
    labels = [Label("a", id=1)]
    for arch in ("ssdlite320_mobilenet_v3_large", "fasterrcnn_mobilenet_v3_large_320_fpn"):
        model = create_detector(arch, labels, hyperparameters={"image_size": 64}).model
        backbone = model.backbone.features if arch.startswith("ssd") else model.backbone.body
        freeze_backbone(model, None, "random")
        assert all(p.requires_grad for p in model.parameters())  # from scratch: everything learns
        freeze_backbone(model, 0, "random")
        assert not any(p.requires_grad for p in backbone.parameters())
        assert all(p.requires_grad for p in model.head.parameters()) if arch.startswith("ssd") else all(
            p.requires_grad for p in model.roi_heads.parameters())
    model = create_detector("fasterrcnn_mobilenet_v3_large_320_fpn", labels, hyperparameters={"image_size": 64}).model
    norms = freeze_backbone(model, 2, "pretrained")
    blocks = list(model.backbone.body.children())
    assert norms and all(not p.requires_grad for n in norms for p in n.parameters())
    assert not any(p.requires_grad for p in blocks[0].parameters())
    assert any(p.requires_grad for p in blocks[-1].parameters())


def test_metrics_log_drops_what_a_killed_run_wrote_after_its_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    log = MetricsLog(path)
    for step in range(1, 8):
        log.write({"step": step})
    MetricsLog(path, resume_step=4).write({"step": 5, "again": True})
    assert [r["step"] for r in MetricsLog.read(path)] == [1, 2, 3, 4, 5]
    MetricsLog(path)  # a fresh run starts a fresh file
    assert MetricsLog.read(path) == []


def test_tensorboard_events_are_framed_records_with_valid_checksums(tmp_path):
    writer = EventWriter(tmp_path, resume_step=3)
    writer.scalars(7, {"train/loss": 0.25})
    writer.close()
    (path,) = tmp_path.glob("events.out.tfevents.*")
    content, records = path.read_bytes(), []
    while content:
        (length,) = struct.unpack("<Q", content[:8])
        body = content[12:12 + length]
        (checksum,) = struct.unpack("<I", content[12 + length:16 + length])
        crc = crc32c(body)
        assert checksum == (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF
        records.append(body)
        content = content[16 + length:]
    assert len(records) == 3 and b"brain.Event:2" in records[0]
    assert b"train/loss" in records[2] and struct.pack("<f", 0.25) in records[2]
    assert crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value


def test_tensorflow_reads_our_tensorboard_events(tmp_path):
    """TensorFlow's own reader (what TensorBoard uses) checks the framing and decodes the protocol buffers."""
    writer = EventWriter(tmp_path, resume_step=4)
    writer.scalars(5, {"train/loss": 1.5, "val/map50": 0.75})
    writer.close()
    script = textwrap.dedent("""
        import glob, json, sys
        import tensorflow as tf
        events = [(e.step, e.file_version, e.session_log.status, {v.tag: v.simple_value for v in e.summary.value})
                  for e in tf.compat.v1.train.summary_iterator(glob.glob(sys.argv[1] + "/events.out.tfevents.*")[0])]
        print(json.dumps(events))
    """)
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert done.returncode == 0, done.stderr[-2000:]
    events = json.loads(done.stdout.strip().splitlines()[-1])
    assert events == [[0, "brain.Event:2", 0, {}], [4, "", 1, {}],  # START at the resume step
                      [5, "", 0, {"train/loss": 1.5, "val/map50": 0.75}]]


def test_a_directory_holding_another_run_is_refused(tmp_path):
    (tmp_path / "run.json").write_text(json.dumps({"run_id": "x", "architecture": "fasterrcnn_resnet50_fpn"}))
    frame, images = white_rectangle_frame()
    with pytest.raises(RunMismatch, match="another run"):
        train("ssdlite320_mobilenet_v3_large", LABELS, [(frame, images)], [], tmp_path,
              hyperparameters="init=random", progress=False)


def test_ssd_refuses_a_batch_of_one(tmp_path):
    frame, images = white_rectangle_frame()
    with pytest.raises(HyperparameterError, match="batch-size=2 or more"):
        train("ssdlite320_mobilenet_v3_large", LABELS, [(frame, images)], [], tmp_path,
              hyperparameters="batch-size=1")


def test_num_clones_without_torchrun_says_how_to_start_it(tmp_path):
    frame, images = white_rectangle_frame()
    with pytest.raises(RuntimeError, match="torchrun --nproc-per-node=2"):
        train("ssdlite320_mobilenet_v3_large", LABELS, [(frame, images)], [], tmp_path,
              hyperparameters="num-clones=2")


# --- one run, two frameworks: what --restart clears ----------------------------------------------------------------

def test_every_adapter_writes_only_what_a_restart_clears():
    from preannotate.training import keras_adapter, torch_adapter
    from preannotate.training.loop import ADAPTERS, RUN_FILES

    adapters = {"pytorch": torch_adapter.Adapter, "tensorflow": keras_adapter.Adapter}
    assert set(ADAPTERS) == set(adapters) == {a.framework for a in ARCHITECTURES.values()}
    for adapter in adapters.values():
        assert set(adapter.FILES) <= set(RUN_FILES), adapter


@pytest.mark.parametrize("architecture", ["ssdlite320_mobilenet_v3_large", pytest.param(
    "keras_ssd_mobilenet_v2_fpnlite_320", marks=pytest.mark.slow)])
def test_restart_clears_everything_the_last_run_wrote_whatever_the_framework(tmp_path, architecture):
    """A run with validation frames leaves its best weights (and a TensorFlow run its TFRecords); ``restart`` on
    other frames without validation must neither reuse those records nor publish those best weights."""
    from preannotate.training.synthetic import generate

    first = generate(6, width=96, height=72, seed=1, objects=(1, 2), size=(0.3, 0.5))
    second = generate(5, width=96, height=72, seed=2, objects=(1, 2), size=(0.3, 0.5))
    labels = first.annotations.labels
    items = [(frame, first.images) for frame in first.annotations.frames.values()]
    hp = "init=random; image-size=64; num-steps=2; batch-size=2; num-validations=1"
    out = tmp_path / "run"
    train(architecture, labels, items[:4], items[4:], out, hyperparameters=hp, progress=False, workers=0)
    assert list(out.glob("best.*")), "the first run kept its best validation's weights"
    restarted = time.time()
    result = train(architecture, labels, [(frame, second.images) for frame in second.annotations.frames.values()], [],
                   out, hyperparameters=hp, progress=False, workers=0, restart=True)
    assert result.steps == 2 and result.metrics["train_frames"] == 5 and result.metrics.get("map") is None
    assert not list(out.glob("best.*")), "unscored: nothing may stand for its best weights"
    left = [path.relative_to(out) for path in out.rglob("*") if path.is_file() and path.stat().st_mtime < restarted]
    assert not left, f"left by the first run: {left}"
    if (out / "records").exists():  # TensorFlow: the training records hold the second run's five frames
        from preannotate.training.keras_adapter import tf

        assert sum(1 for _ in tf.data.TFRecordDataset(str(next((out / "records").glob("train.record*"))))) == 5
