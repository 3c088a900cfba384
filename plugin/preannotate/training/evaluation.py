"""COCO metrics with pycocotools: mAP@[.5:.95], mAP@.5, mAP@.75 and per-class AP, for boxes, masks and keypoints.

A keypoint model is scored by COCO's keypoint AP: object keypoint similarity (OKS) in place of IoU, with a uniform
per-keypoint sigma (``models.keypoints.OKS_SIGMA``: COCO defines sigmas for a person only; that module says why
0.05) and the object's padded keypoint box as its area; keypoints CVAT has ``outside`` are not scored. Its
headline ``map`` is the keypoint AP (what it hands CVAT), its boxes are scored beside it.

``evaluate`` runs a torch model over a validation loader and scores it in the coordinates the loader gives (the
resized frames: IoU does not care about scale); ``score_detector`` runs any ``Detector`` over frames and scores its
shapes in the frames' own pixels (the Keras adapter's validation); ``coco_metrics`` scores COCO ground truth
against COCO results and is what the trainers, the benchmarks and the tests share. torch is imported only by the
functions that take torch models, so a TensorFlow run scores without it.

A classifier is scored by ``accuracy``: top-1, top-5 and each class's top-1 accuracy (``evaluate_tags`` over a
validation loader; ``score_classifier`` through a ``Detector``'s ``detect``). ``headline`` is the one number a run
and a promotion compare, whatever the model: mAP, or top-1 accuracy.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import itertools
import math
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from pycocotools import mask as coco_mask
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from preannotate.formats import coco
from preannotate.frames import FrameImages
from preannotate.models.keypoints import OKS_SIGMA, KeypointLayout, object_box, object_keypoints, oks_area
from preannotate.shapes import FrameAnnotations, Label, Shape

if TYPE_CHECKING:
    import torch

DETECT_BATCH = 8  # frames decoded and detected at once when scoring a detector
SAMPLE_FRAMES = 200  # validation frames the report and the served thresholds are computed over, at most

# The recall points at which COCO interpolates precision (0, 0.01, ..., 1): those of ``precision50`` below.
RECALL_POINTS = np.linspace(0.0, 1.0, 101)


def coco_metrics(ground_truth: dict[str, Any], results: list[dict[str, Any]], labels: Sequence[Label],
                 iou_type: str = "bbox", *, curves: bool = False) -> dict[str, Any]:
    """``{"map", "map50", "map75", "per_class": {name: {"ap", "ap50"}}}`` of ``results`` against ``ground_truth``
    (category id = ``Label.id``). A metric with no ground truth to score against is None.

    With ``curves``, each class also has ``precision50``: its interpolated precision at IoU .5 at each of COCO's
    101 ``RECALL_POINTS`` (0 past the highest recall reached; -1 throughout for a class with no ground truth)."""
    gt = COCO()
    gt.dataset = {"info": {}, "categories": [{"id": label.id, "name": label.name} for label in labels],
                  **{k: ground_truth[k] for k in ("images", "annotations")}}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress and table
        gt.createIndex()
        if not results:  # loadRes cannot take an empty list: nothing found scores zero where there was something
            return _empty(gt, labels, curves)
        evaluation = COCOeval(gt, gt.loadRes(results), iou_type)
        if iou_type == "keypoints":
            evaluation.params.kpt_oks_sigmas = np.full(len(results[0]["keypoints"]) // 3, OKS_SIGMA)
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    stats = evaluation.stats
    # precision[T iou thresholds, R recall points, K classes, A area ranges, M max-detection settings]
    precision = evaluation.eval["precision"]
    per_class = {}
    for k, category in enumerate(evaluation.params.catIds):
        name = next(label.name for label in labels if label.id == category)
        per_class[name] = {"ap": _mean(precision[:, :, k, 0, -1]), "ap50": _mean(precision[0, :, k, 0, -1])}
        if curves:
            per_class[name]["precision50"] = [round(float(v), 6) for v in precision[0, :, k, 0, -1]]
    return {"map": _value(stats[0]), "map50": _value(stats[1]), "map75": _value(stats[2]), "per_class": per_class}


def _empty(gt: COCO, labels: Sequence[Label], curves: bool = False) -> dict[str, Any]:
    counts = {label.id: len(gt.getAnnIds(catIds=[label.id])) for label in labels}
    zero = 0.0 if any(counts.values()) else None
    per_class = {label.name: {"ap": 0.0 if counts[label.id] else None, "ap50": 0.0 if counts[label.id] else None}
                 for label in labels}
    if curves:  # as COCOeval has it: nothing found is precision 0 where there was something to find
        for label in labels:
            per_class[label.name]["precision50"] = [0.0 if counts[label.id] else -1.0] * len(RECALL_POINTS)
    return {"map": zero, "map50": zero, "map75": zero, "per_class": per_class}


def score_text(value: float | None, missing: str = "none") -> str:
    """A metric as people read it: three decimals, or ``missing`` where there was nothing to score."""
    return missing if value is None else f"{value:.3f}"


def _value(stat: float) -> float | None:
    return None if stat < 0 else round(float(stat), 6)


def _mean(values: np.ndarray) -> float | None:
    valid = values[values > -1]
    return round(float(valid.mean()), 6) if valid.size else None


def _rle(bitmap: np.ndarray) -> dict[str, Any]:
    rle = coco_mask.encode(np.asfortranarray(bitmap.astype(np.uint8)))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


class CocoAccumulator:
    """Ground truth and detections, image by image, as COCO dicts (image ids from 1); with ``keypoints`` (a keypoint
    model's channels) the targets' and outputs' keypoints too."""

    def __init__(self, with_masks: bool, keypoints: KeypointLayout | None = None):
        self.with_masks, self.keypoints = with_masks, keypoints
        self._counts = {} if keypoints is None else {first: count for first, count in keypoints.slots.values()}
        self.images: list[dict[str, Any]] = []
        self.annotations: list[dict[str, Any]] = []
        self.results: dict[str, list[dict[str, Any]]] = {"bbox": [], "segm": [], "keypoints": []}

    def add(self, target: dict[str, torch.Tensor], output: dict[str, torch.Tensor], height: int, width: int) -> None:
        image_id = len(self.images) + 1
        self.images.append({"id": image_id, "height": height, "width": width})
        target_masks = target["masks"].cpu().numpy().astype(bool) if self.with_masks else None
        for i, (box, label) in enumerate(zip(target["boxes"].tolist(), target["labels"].tolist(), strict=True)):
            x1, y1, x2, y2 = box
            annotation = {"id": len(self.annotations) + 1, "image_id": image_id, "category_id": int(label),
                          "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1), "iscrowd": 0}
            if target_masks is not None:
                annotation["segmentation"] = _rle(target_masks[i])
                annotation["area"] = float(target_masks[i].sum())
            if self.keypoints is not None:
                points = target["keypoints"][i].tolist()
                annotation.update(_coco_keypoints(points))
                first = next((channel for channel, point in enumerate(points) if point[2] > 0), None)
                annotation["area"] = oks_area(box, self._counts.get(first, 0), width, height)
            self.annotations.append(annotation)
        boxes, scores, labels = (output[k].detach().cpu() for k in ("boxes", "scores", "labels"))
        output_masks = (output["masks"][:, 0] > 0.5).cpu().numpy() if self.with_masks else None
        for i, (box, score, label) in enumerate(zip(boxes.tolist(), scores.tolist(), labels.tolist(), strict=True)):
            x1, y1, x2, y2 = box
            result = {"image_id": image_id, "category_id": int(label), "bbox": [x1, y1, x2 - x1, y2 - y1],
                      "score": float(score)}
            self.results["bbox"].append(result)
            if self.keypoints is not None:
                xy = output["keypoints"][i, :, :2].tolist()
                self.results["keypoints"].append({**result, "keypoints": [v for x, y in xy for v in (x, y, 1)]})
            if output_masks is not None:
                self.results["segm"].append({**result, "segmentation": _rle(output_masks[i])})

    def metrics(self, labels: Sequence[Label]) -> dict[str, Any]:
        """``{"bbox": {...}, "segm": {...}}`` (segm for mask models), plus the headline ``map``/``map50``: those of
        masks for a mask model (what it hands CVAT), of boxes otherwise."""
        ground_truth = {"images": self.images, "annotations": self.annotations}
        out = {"bbox": coco_metrics(ground_truth, self.results["bbox"], labels, "bbox"), "images": len(self.images)}
        if self.with_masks:
            out["segm"] = coco_metrics(ground_truth, self.results["segm"], labels, "segm")
        if self.keypoints is not None:
            out["keypoints"] = coco_metrics(ground_truth, self.results["keypoints"], labels, "keypoints")
        headline = out["segm" if self.with_masks else "keypoints" if self.keypoints is not None else "bbox"]
        return {"map": headline["map"], "map50": headline["map50"], **out}


def _coco_keypoints(keypoints: Sequence[Sequence[float]]) -> dict[str, Any]:
    """COCO's ``keypoints`` (flat ``x, y, v``) and ``num_keypoints`` of one object's ``K×3`` keypoints."""
    return {"keypoints": [float(v) for point in keypoints for v in point[:3]],
            "num_keypoints": sum(1 for point in keypoints if point[2] > 0)}


def headline(metrics: dict[str, Any]) -> float | None:
    """The number validations are ranked by: a detector's mAP, a classifier's top-1 accuracy."""
    return metrics.get("top1") if "top1" in metrics else metrics.get("map")


def headline_name(metrics: dict[str, Any]) -> str:
    return "top-1 accuracy" if "top1" in metrics else "keypoint AP (OKS)" if "keypoints" in metrics else "mAP"


def summary(metrics: dict[str, Any], missing: str = "none") -> str:
    """The scores people read, as one phrase: ``mAP@.5 0.912, mAP 0.640`` or ``top-1 0.950, top-5 1.000``."""
    if "top1" in metrics:
        return f"top-1 {score_text(metrics.get('top1'), missing)}, top-5 {score_text(metrics.get('top5'), missing)}"
    what = "keypoint AP" if "keypoints" in metrics else "mAP"  # a keypoint model's headline is OKS's
    return f"{what}@.5 {score_text(metrics.get('map50'), missing)}, {what} {score_text(metrics.get('map'), missing)}"


def accuracy(truth: Sequence[int], ranked: Sequence[Sequence[int]], labels: Sequence[Label]) -> dict[str, Any]:
    """``{"top1", "top5", "per_class": {name: {"accuracy", "frames"}}, "images"}`` of a classifier: ``truth`` the
    class index (``Label.id``) of each frame, ``ranked`` its classes best first. A class without frames has no
    accuracy (None)."""
    hits1 = [bool(len(r)) and r[0] == t for t, r in zip(truth, ranked, strict=True)]
    hits5 = [t in list(r)[:5] for t, r in zip(truth, ranked, strict=True)]
    per_class = {}
    for label in labels:
        mine = [hit for hit, t in zip(hits1, truth, strict=True) if t == label.id]
        per_class[label.name] = {"accuracy": float(np.mean(mine)) if mine else None, "frames": len(mine)}
    mean = (lambda hits: float(np.mean(hits)) if hits else None)  # noqa: E731 - none scored: no accuracy
    return {"top1": mean(hits1), "top5": mean(hits5), "per_class": per_class, "images": len(truth)}


def score_classifier(detector, items: Sequence[tuple[FrameAnnotations, FrameImages]], labels: Sequence[Label]
                     ) -> dict[str, Any]:
    """Top-1 accuracy of a classifier ``Detector`` on ``items`` (each with its one tag) through ``detect`` at
    threshold 0 — what serving runs (top-5 needs the ranking, which only ``evaluate`` sees: it is left out)."""
    class_of = {label.name: i for i, label in enumerate(labels, start=1)}
    truth, ranked = [], []
    for frame, _, tags in detect_frames(detector, items, 0.0):
        truth.append(class_of[frame.tags[0]])
        ranked.append([class_of[tag.label] for tag in tags if tag.label in class_of])
    scored = accuracy(truth, ranked, [Label(label.name, label.type, label.attributes, i)
                                      for i, label in enumerate(labels, start=1)])
    return {k: v for k, v in scored.items() if k != "top5"}


def recalibrate_batch_norm(model: torch.nn.Module, batches: Iterable[tuple[Sequence[torch.Tensor], Any]],
                           device: torch.device | str = "cpu", frozen: Sequence[torch.nn.Module] = ()) -> int:
    """Recompute the running statistics of the model's batch norms (all but ``frozen``) as the plain average over
    ``batches`` of training frames ("precise BN"); returns how many norms were updated.

    Running averages with torchvision's momenta trail the weights by dozens of steps; early in a run from scratch
    the network's features change faster than that, and a model in eval mode then sees statistics of weights it
    no longer has (a model that finds everything with batch statistics can score near zero with running ones).
    Averaging over a few hundred frames of the current weights, just before a validation, fixes that."""
    import torch

    with torch.no_grad():
        return _recalibrate(model, batches, device, frozen)


def _recalibrate(model, batches, device, frozen) -> int:
    import torch

    skip = {id(module) for module in frozen}
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and id(m) not in skip]
    if not norms:
        return 0
    momenta = [norm.momentum for norm in norms]
    model.eval()  # inference path (no targets needed) ...
    squares: dict[int, torch.Tensor] = {}  # each norm's sum over batches of its batch mean squared

    def measure(module, inputs) -> None:
        x = inputs[0].detach().float()
        mean = x.mean([0, *range(2, x.dim())])
        squares[id(module)] = squares.get(id(module), 0) + mean * mean

    hooks = [norm.register_forward_pre_hook(measure) for norm in norms]
    for norm in norms:  # ... with the norms measuring
        norm.reset_running_stats()
        norm.momentum = None  # a cumulative average
        norm.train()
    try:
        for images, _ in batches:
            model([image.to(device, non_blocking=True) for image in images])
    finally:
        for hook in hooks:
            hook.remove()
    for norm, momentum in zip(norms, momenta, strict=True):
        norm.momentum = momentum
        batches_seen = int(norm.num_batches_tracked)
        if batches_seen and id(norm) in squares:
            # The population variance is the batches' mean variance plus the variance of their means: averaging
            # variances alone misses the second, which is large when batches differ (night frames in one, day in
            # another) and then leaves the model blind to the very difference it learned.
            between = squares[id(norm)] / batches_seen - norm.running_mean.float() ** 2
            norm.running_var += between.clamp(min=0).to(norm.running_var.dtype)
    model.eval()
    return len(norms)


def evaluate(model: torch.nn.Module, batches: Iterable[tuple[Sequence[torch.Tensor], Sequence[dict]]],
             labels: Sequence[Label], with_masks: bool = False, device: torch.device | str = "cpu",
             keypoints: KeypointLayout | None = None) -> dict[str, Any]:
    """COCO metrics of ``model`` on ``batches`` of ``(images, targets)`` (a validation loader; ``keypoints``: a
    keypoint model's, scored by OKS too). The model is left in eval mode."""
    import torch

    model.eval()
    accumulator = CocoAccumulator(with_masks, keypoints)
    with torch.inference_mode():
        _accumulate(model, batches, device, accumulator)
    return accumulator.metrics(labels)


def evaluate_tags(model: torch.nn.Module, batches: Iterable[tuple[Sequence[torch.Tensor], Sequence[dict]]],
                  labels: Sequence[Label], device: torch.device | str = "cpu") -> dict[str, Any]:
    """``accuracy`` of a classifier (``classifier_family.TagModel``) on a validation loader of tag targets. The
    model is left in eval mode."""
    import torch

    model.eval()
    truth, ranked = [], []
    with torch.inference_mode():
        for images, targets in batches:
            outputs = model([image.to(device, non_blocking=True) for image in images])
            truth += [int(target["labels"][0]) for target in targets]
            ranked += [output["labels"].tolist() for output in outputs]
    return accuracy(truth, ranked, labels)


def _accumulate(model, batches, device, accumulator: CocoAccumulator) -> None:
    for images, targets in batches:
        outputs = model([image.to(device, non_blocking=True) for image in images])
        for image, target, output in zip(images, targets, outputs, strict=True):
            accumulator.add(target, output, int(image.shape[-2]), int(image.shape[-1]))


def detect_frames(detector, items: Sequence[tuple[FrameAnnotations, FrameImages]], threshold: float,
                  batch: int = DETECT_BATCH) -> Iterator[tuple[FrameAnnotations, np.ndarray, list[Shape]]]:
    """``(frame, its RGB array, the shapes the detector finds on it)`` for each item, decoded and detected a few
    frames at a time (so hundreds of large frames are never all held at once)."""
    for start in range(0, len(items), batch):
        chunk = items[start:start + batch]
        arrays: list[np.ndarray] = []
        for _, group in itertools.groupby(chunk, key=lambda item: id(item[1])):  # one read per frame source
            group = list(group)
            arrays += [array for _, array in group[0][1].decoded([frame.frame for frame, _ in group])]
        for (frame, _), array, shapes in zip(chunk, arrays, detector.detect(arrays, threshold), strict=True):
            yield frame, array, list(shapes)


def spread(items: Sequence[Any], count: int) -> list:
    """Up to ``count`` of ``items``, evenly spread over them, in order."""
    if len(items) <= count:
        return list(items)
    if count <= 0:
        return []
    return [items[i] for i in sorted({round(i) for i in np.linspace(0, len(items) - 1, count)})]


def sample_detections(detector, items: Sequence[tuple[FrameAnnotations, FrameImages]], count: int = SAMPLE_FRAMES
                      ) -> tuple[list[tuple[FrameAnnotations, FrameImages]], list[list[Shape]]]:
    """Up to ``count`` of ``items`` spread over them, and every shape the detector finds on each (threshold 0): the
    one pass over the validation frames that publishing chooses the served thresholds from and the report draws."""
    sample = spread(items, count)
    return sample, [shapes for _, _, shapes in detect_frames(detector, sample, 0.0)]


def score_shapes(frames: Sequence[FrameAnnotations], predictions: Sequence[Sequence[Shape]],
                 labels: Sequence[Label], *, curves: bool = False, iou_type: str = "bbox") -> dict[str, Any]:
    """COCO metrics of ``predictions`` (the shapes found on each frame, scored) against the frames' ground truth, in
    the frames' own pixels (``coco_metrics``; ``curves``: each class's precision at IoU .5). ``iou_type``: ``bbox``
    judges every shape by its upright box; ``segm`` by its outline (a rotated rectangle by its corners, an ellipse
    by its pixels, an upright rectangle by itself): the mAP of rotated rectangles and ellipses."""
    ordered = [dataclasses.replace(label, id=i) for i, label in enumerate(labels, start=1)]
    outlined = _outlined if iou_type == "segm" else list
    truth = coco.to_coco([(FrameAnnotations(frame.frame, frame.width, frame.height, frame.name,
                                            outlined(frame.shapes)), frame.name) for frame in frames], ordered)
    found = [FrameAnnotations(frame.frame, frame.width, frame.height, frame.name, outlined(shapes))
             for frame, shapes in zip(frames, predictions, strict=True)]
    results = [r if iou_type == "segm" else {k: v for k, v in r.items() if k != "segmentation"}
               for r in coco.to_results(list(enumerate(found, start=1)), ordered)]
    return coco_metrics(truth, results, ordered, iou_type, curves=curves)


def _outlined(shapes: Iterable[Shape]) -> list[Shape]:
    """Upright rectangles as the polygons of their corners: COCO writes no segmentation for them, and ``segm``
    scores every shape by one."""
    return [Shape(shape.label, "polygon", shape.polygon(), frame=shape.frame, score=shape.score)
            if shape.type == "rectangle" and not shape.rotation % 360 else shape for shape in shapes]


def score_detector(detector, items: Sequence[tuple[FrameAnnotations, FrameImages]], labels: Sequence[Label]
                   ) -> dict[str, Any]:
    """The validation metrics of a box detector on ``items`` (as ``evaluate`` gives them: ``map``, ``map50``,
    ``bbox``, ``images``), through its own ``detect`` — what serving will run."""
    frames, predicted = [], []
    for frame, _, shapes in detect_frames(detector, items, 0.0):
        frames.append(frame)
        predicted.append(shapes)
    box = score_shapes(frames, predicted, labels)
    return {"map": box["map"], "map50": box["map50"], "bbox": box, "images": len(frames)}


def score_keypoints(frames: Sequence[FrameAnnotations], predictions: Sequence[Sequence[Shape]],
                    labels: Sequence[Label], *, curves: bool = False) -> dict[str, Any]:
    """Keypoint AP (OKS, ``coco_metrics`` with ``iou_type="keypoints"``) of the skeleton and points shapes a
    detector served on each frame against the frames' own, in the frames' pixels: what CVAT receives, scored. Also
    ``visibility``: the share of truly visible and of truly hidden keypoints of matched objects that came back so
    (a prediction is matched to the true object of its label with the nearest visible keypoints). ``curves``: each
    class's precision at OKS .5 (as ``coco_metrics`` gives it at IoU .5)."""
    ordered = [dataclasses.replace(label, id=i) for i, label in enumerate(labels, start=1)]
    layout, by_name = KeypointLayout.of(ordered), {label.name: label for label in ordered}
    images, annotations, results = [], [], []
    agree = {"visible": [0, 0], "hidden": [0, 0]}  # [came back so, of]
    for image_id, (frame, found) in enumerate(zip(frames, predictions, strict=True), start=1):
        images.append({"id": image_id, "width": frame.width, "height": frame.height})
        truths = []
        for shape in frame.shapes:
            label = by_name.get(shape.label)
            for points in (object_keypoints(shape, label) if label is not None else []):
                box = object_box(points, frame.width, frame.height)
                if box is None:
                    continue
                row = _in_layout(layout, label.name, [(x, y, 2 if seen else 0) for x, y, seen in points])
                x1, y1, x2, y2 = box
                area = oks_area(box, len(layout.channels(label.name)), frame.width, frame.height)
                annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": label.id,
                                    "bbox": [x1, y1, x2 - x1, y2 - y1], "area": area,
                                    "iscrowd": 0, **_coco_keypoints(row)})
                truths.append((label.name, points))
        for shape in sorted(found, key=lambda shape: -(shape.score or 0.0)):  # best first: it takes its truth
            label = by_name.get(shape.label)
            points = (object_keypoints(shape, label) or [[]])[0] if label is not None else []
            if not points or label.name not in layout.slots:
                continue
            row = _in_layout(layout, label.name, [(x, y, 1) for x, y, _ in points])
            results.append({"image_id": image_id, "category_id": label.id, "score": float(shape.score or 0.0),
                            "keypoints": [v for point in row for v in point]})
            _count_visibility(agree, label.name, points, truths)
    scored = coco_metrics({"images": images, "annotations": annotations}, results, ordered, "keypoints",
                          curves=curves)
    scored["visibility"] = {kind: (round(came / total, 4) if total else None) for kind, (came, total) in
                            agree.items()}
    return scored


def _in_layout(layout: KeypointLayout, label: str, points: Sequence[tuple[float, float, float]]) -> list[list[float]]:
    row = [[0.0, 0.0, 0.0] for _ in range(layout.total)]
    for channel, point in zip(layout.channels(label), points, strict=True):
        row[channel] = [float(v) for v in point]
    return row


def _count_visibility(agree: dict[str, list[int]], label: str, predicted: Sequence[tuple[float, float, bool]],
                      truths: list[tuple[str, Sequence[tuple[float, float, bool]]]]) -> None:
    """Count whether each keypoint of ``predicted`` came back visible as the nearest true object of its label not
    yet taken (which it takes: predictions come best first, so duplicates find none left) has it."""
    def distance(truth: Sequence[tuple[float, float, bool]]) -> float:
        pairs = [(p, t) for p, t in zip(predicted, truth, strict=True) if t[2]]
        return sum(math.hypot(p[0] - t[0], p[1] - t[1]) for p, t in pairs) / len(pairs) if pairs else math.inf

    mine = [i for i, (name, _) in enumerate(truths) if name == label]
    if not mine:
        return
    nearest = min(mine, key=lambda i: distance(truths[i][1]))
    for (_, _, seen), (_, _, truly) in zip(predicted, truths.pop(nearest)[1], strict=True):
        kind = "visible" if truly else "hidden"
        agree[kind][0] += seen == truly
        agree[kind][1] += 1
