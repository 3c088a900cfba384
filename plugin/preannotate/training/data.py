"""Annotated frames → what torchvision detection models train on: ``(image tensor, {"boxes", "labels", "masks"?})``
(a classifier: ``{"labels": [the class of the frame's tag]}``; a keypoint model: ``"keypoints"`` ``N×K×3`` too, COCO's
``x, y, visibility`` in the model's channels, ``models.keypoints``).

Geometry comes from ``formats.coco.shape_to_annotation`` — the box and outline the COCO export writes — so training
sees exactly what an export holds (rotated rectangles by their corners, ellipses and masks by their pixels). Images
and targets go through ``torchvision.transforms.v2`` together (boxes and masks are ``tv_tensors``), so a flip, a
resize or a letterbox moves them with the pixels.

Skeleton and points shapes are objects of a keypoint model only: their box is their visible keypoints' box, padded
(``keypoints.object_box``), and a keypoint's visibility is 2, or 0 (not learned) where CVAT has it ``outside``, where
another label owns the channel, or where an augmentation moved it off the frame. A keypoint model's frames are never
flipped: a flip turns a left paw into a right one, and a project's skeleton does not say which keypoints pair up.

Resizing happens here, not only inside the model, so that batches are small before they cross process boundaries;
it is the model's own rule (so serving, which hands the model the original image, sees the same geometry):
SSD squashes to ``image-size`` squared, the others scale the shorter side to ``image-size`` with the longer at most
``max-image-size``. ``letterbox=true`` instead keeps the aspect ratio and pads to an ``image-size`` square; the
manifest records it, and the detector pads frames the same way when it serves.

The order of samples and every random augmentation are functions of ``(seed, draw)`` — the position of the sample
in the run — not of worker processes or of how often the run was restarted, so a resumed run sees the very batches
an uninterrupted one would have seen.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision import tv_tensors
from torchvision.transforms import v2

from preannotate.formats import coco, masks
from preannotate.frames import FrameImages, decode_rgb
from preannotate.hyperparameters import Hyperparameters
from preannotate.models.keypoints import KeypointLayout, object_box, object_keypoints
from preannotate.shapes import AnnotationSet, FrameAnnotations, Label

Item = tuple[FrameAnnotations, FrameImages]  # a frame's annotations and where its image comes from


def split_task(annotations: AnnotationSet, images: FrameImages, val_fraction: float, seed: int = 0
               ) -> tuple[list[Item], list[Item]]:
    """A task's frames as training and validation items, split as an export splits them (``formats.dataset.
    split_frames``: deterministic, video tracks kept on one side)."""
    from preannotate.formats.dataset import split_frames

    splits = split_frames(sorted(annotations.frames.items()), val_fraction, seed)
    return ([(annotations.frames[key], images) for key in splits["train"]],
            [(annotations.frames[key], images) for key in splits.get("val", [])])


def transforms(hp: Hyperparameters, fixed_size: bool, train: bool, boxes: bool = True, keypoints: bool = False
               ) -> v2.Transform:
    """Resize (or letterbox) to ``image-size`` (``hp.network``), then the ``augment`` augmentations (``hp.recipe``)
    when training; ``boxes``: the targets have boxes to keep on the image (a classifier's have none); ``keypoints``:
    and keypoints (never flipped, see the module docstring), dropped with their boxes."""
    size = hp.network.image_size
    steps: list[v2.Transform] = []
    if size:
        if hp.network.letterbox:  # longer side to size, then centred on a size × size canvas (CenterCrop pads)
            steps += [v2.Resize(size=None, max_size=size, antialias=True), v2.CenterCrop(size)]
        elif fixed_size:
            steps.append(v2.Resize((size, size), antialias=True))
        elif hp.network.max_image_size and hp.network.max_image_size <= size:  # the longer side always decides
            steps.append(v2.Resize(size=None, max_size=hp.network.max_image_size, antialias=True))
        else:
            steps.append(v2.Resize(size, max_size=hp.network.max_image_size, antialias=True))
    if train:
        if "flip" in hp.recipe.augment and not keypoints:
            steps.append(v2.RandomHorizontalFlip())
        if "scale" in hp.recipe.augment:
            steps.append(v2.RandomAffine(degrees=0, translate=(0.1, 0.1), scale=(0.7, 1.3),
                                         fill={tv_tensors.Image: 114, "others": 0}))
        if "colour" in hp.recipe.augment:
            steps.append(v2.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.3, hue=0.02))
    if boxes:
        steps += [v2.ClampBoundingBoxes(),
                  v2.SanitizeBoundingBoxes(min_size=1, labels_getter=_per_object if keypoints else "default")]
    steps.append(v2.ToDtype({tv_tensors.Image: torch.float32, "others": None}, scale=True))
    return v2.Compose(steps)


def _per_object(inputs: Any) -> tuple[torch.Tensor, ...]:
    """What is dropped with a box that left the frame: its class, keypoints and their visibility."""
    target = inputs[1]
    return tuple(target[key] for key in ("labels", "keypoints", "visibility") if key in target)


def decode(data: bytes) -> torch.Tensor:
    """Image file bytes → uint8 ``3×H×W`` RGB tensor, decoded as every other reader of frames decodes them."""
    return torch.from_numpy(np.array(decode_rgb(data))).permute(2, 0, 1)  # a writable copy: transforms may write


def targets(frame: FrameAnnotations, labels: Sequence[Label], with_masks: bool
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Boxes ``(N, 4)`` xyxy, class indices ``(N,)`` and, when asked, bitmaps ``(N, H, W)`` of the frame's shapes
    whose label is among ``labels`` (class index = ``Label.id``)."""
    class_of = {label.name: label.id for label in labels}
    boxes, classes, bitmaps = [], [], []
    for shape in frame.shapes:
        annotation = coco.shape_to_annotation(shape, frame.width, frame.height) if shape.label in class_of else None
        if annotation is None:
            continue
        x, y, w, h = annotation["bbox"]
        boxes.append([x, y, x + w, y + h])
        classes.append(class_of[shape.label])
        if with_masks:
            bitmaps.append(_bitmap(annotation, frame.width, frame.height))
    masks_array = (np.stack(bitmaps) if bitmaps else np.zeros((0, frame.height, frame.width), bool)) \
        if with_masks else None
    return (np.asarray(boxes, np.float32).reshape(-1, 4), np.asarray(classes, np.int64), masks_array)


def keypoint_targets(frame: FrameAnnotations, labels: Sequence[Label], layout: KeypointLayout
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Boxes ``(N, 4)``, class indices ``(N,)`` and keypoints ``(N, K, 3)`` (``x, y, visibility`` in the layout's
    channels) of a keypoint model's objects on the frame: one per skeleton, one per point of a points shape (an
    object with no visible keypoint teaches nothing and is left out), and the boxes of its other labels' shapes."""
    label_of = {label.name: label for label in labels}
    boxes, classes, keypoints = [], [], []
    for shape in frame.shapes:
        label = label_of.get(shape.label)
        if label is None:
            continue
        if shape.label in layout.slots:
            for found in object_keypoints(shape, label):
                box = object_box(found, frame.width, frame.height)
                if box is None:
                    continue
                row = np.zeros((layout.total, 3), np.float32)
                for channel, (x, y, visible) in zip(layout.channels(shape.label), found, strict=True):
                    row[channel] = (x, y, 2.0) if visible else (0.0, 0.0, 0.0)
                boxes.append(box)
                classes.append(label.id)
                keypoints.append(row)
            continue
        annotation = coco.shape_to_annotation(shape, frame.width, frame.height)
        if annotation is not None:
            x, y, w, h = annotation["bbox"]
            boxes.append((x, y, x + w, y + h))
            classes.append(label.id)
            keypoints.append(np.zeros((layout.total, 3), np.float32))
    return (np.asarray(boxes, np.float32).reshape(-1, 4), np.asarray(classes, np.int64),
            np.asarray(keypoints, np.float32).reshape(-1, layout.total, 3))


def _bitmap(annotation: dict[str, Any], width: int, height: int) -> np.ndarray:
    segmentation = annotation["segmentation"]
    if isinstance(segmentation, dict):
        return masks.coco_rle_to_bitmap(segmentation)
    if segmentation:
        return masks.polygon_to_bitmap(segmentation, width, height)
    x, y, w, h = annotation["bbox"]  # an unrotated rectangle: its box is its mask
    bitmap = np.zeros((height, width), bool)
    bitmap[int(y): int(np.ceil(y + h)), int(x): int(np.ceil(x + w))] = True
    return bitmap


class DetectionDataset(Dataset):
    """``(image, target)`` pairs of annotated frames. A key is an index, or ``(index, draw)`` where ``draw`` seeds
    the sample's augmentations (see the module docstring). With ``tags`` the target is the class of the frame's
    first tag (``{"labels": [class]}``, see ``tag_examples``) instead of its shapes. With ``keypoints`` (a keypoint
    model's targets, ``keypoint_targets``) the transform must be ``transforms(..., keypoints=True)``."""

    def __init__(self, items: Sequence[Item], labels: Sequence[Label], transform: v2.Transform,
                 with_masks: bool = False, seed: int = 0, tags: bool = False, keypoints: bool = False):
        self.items, self.labels, self.transform = list(items), list(labels), transform
        self.with_masks, self.seed, self.tags = with_masks, seed, tags
        self.layout = KeypointLayout.of(self.labels) if keypoints else None
        self.class_of = {label.name: label.id for label in self.labels}

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        index, draw = key if isinstance(key, tuple) else (key, None)
        frame, images = self.items[index]
        _, data = next(iter(images.encoded([frame.frame])))
        image = decode(data)
        if tuple(image.shape[1:]) != (frame.height, frame.width):
            raise ValueError(f"frame {frame.frame} ({frame.name}): image is {image.shape[2]}x{image.shape[1]}, "
                             f"annotations are for {frame.width}x{frame.height}")
        if self.tags:
            target: dict[str, Any] = {"labels": torch.tensor([self.class_of[frame.tags[0]]])}
        else:
            target = self._shapes(frame)
        with torch.random.fork_rng(devices=[]):
            seed = np.random.SeedSequence([self.seed, index if draw is None else draw]).generate_state(1)[0]
            torch.manual_seed(int(seed))
            image, target = self.transform(tv_tensors.Image(image), target)
        if self.layout is not None:
            target = _with_visibility(target, tuple(image.shape[-2:]), self.layout.total)
        # plain tensors: models index and stack them, and tv_tensor subclasses only slow that down
        return image.as_subclass(torch.Tensor), {k: v.as_subclass(torch.Tensor) for k, v in target.items()}

    def _shapes(self, frame: FrameAnnotations) -> dict[str, Any]:
        if self.layout is not None:
            boxes, classes, keypoints = keypoint_targets(frame, self.labels, self.layout)
            return {"boxes": tv_tensors.BoundingBoxes(torch.from_numpy(boxes), format="XYXY",
                                                      canvas_size=(frame.height, frame.width)),
                    "labels": torch.from_numpy(classes),
                    "keypoints": tv_tensors.KeyPoints(torch.from_numpy(keypoints[..., :2]),
                                                      canvas_size=(frame.height, frame.width)),
                    "visibility": torch.from_numpy(keypoints[..., 2])}
        boxes, classes, bitmaps = targets(frame, self.labels, self.with_masks)
        target: dict[str, Any] = {
            "boxes": tv_tensors.BoundingBoxes(torch.from_numpy(boxes), format="XYXY",
                                              canvas_size=(frame.height, frame.width)),
            "labels": torch.from_numpy(classes)}
        if bitmaps is not None:
            target["masks"] = tv_tensors.Mask(torch.from_numpy(bitmaps.astype(np.uint8)))
        return target


def _with_visibility(target: dict[str, Any], size: tuple[int, int], keypoints: int) -> dict[str, Any]:
    """Transformed keypoints and their visibility as Keypoint R-CNN takes them (``N×keypoints×3``); one moved off
    the frame is not visible."""
    height, width = size
    xy = target.pop("keypoints").as_subclass(torch.Tensor).reshape(len(target["labels"]), keypoints, 2)
    visibility = target.pop("visibility").reshape(xy.shape[:2]).clone()
    visibility[(xy[..., 0] < 0) | (xy[..., 1] < 0) | (xy[..., 0] >= width) | (xy[..., 1] >= height)] = 0
    xy = xy * (visibility > 0).unsqueeze(-1)
    return {**target, "keypoints": torch.cat([xy, visibility.unsqueeze(-1).to(xy.dtype)], -1)}


class StepBatchSampler(Sampler[list[tuple[int, int]]]):
    """The batches of optimizer steps ``start .. total - 1``. Samples are drawn from an endless stream of
    per-epoch permutations (each a function of ``(seed, epoch)``); step ``k`` takes the ``batch_size × world``
    positions from ``k × batch_size × world``, and this process (``rank``) its slice of them."""

    def __init__(self, size: int, batch_size: int, seed: int, start: int, total: int, rank: int = 0,
                 world: int = 1):
        if size < 1:
            raise ValueError("no training frames")
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.start, self.total, self.rank, self.world = start, total, rank, world

    def __len__(self) -> int:
        return max(0, self.total - self.start)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch, order = -1, np.arange(0)
        for step in range(self.start, self.total):
            first = (step * self.world + self.rank) * self.batch_size
            batch = []
            for draw in range(first, first + self.batch_size):
                if draw // self.size != epoch:
                    epoch = draw // self.size
                    order = np.random.default_rng([self.seed, epoch]).permutation(self.size)
                batch.append((int(order[draw % self.size]), draw))
            yield batch


def collate(batch: list[tuple[Any, Any]]) -> tuple[tuple[Any, ...], ...]:
    """As torchvision's references do: detection models take lists of images and targets of any size."""
    return tuple(zip(*batch, strict=True))


def default_workers() -> int:
    """Data-loading processes: ``PREANNOTATE_DATA_WORKERS``, else one per spare core (up to 8). Decoding and
    augmenting a frame costs far less than a training step on it, so a few workers keep any model fed."""
    if os.environ.get("PREANNOTATE_DATA_WORKERS"):
        return int(os.environ["PREANNOTATE_DATA_WORKERS"])
    return max(1, min(8, (os.cpu_count() or 2) - 1))


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # workers decode one frame at a time; threads would only fight the training step
    # Ctrl-C (and a server's SIGTERM to a job's process group) reaches every process of the group: the trainer
    # checkpoints and stops; its workers must not die first, or the trainer dies of their death before it saves.
    # They end when the trainer shuts its loader down, or with it (torch's watchdog of the parent).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def loader(dataset: DetectionDataset, *, batch_sampler: Sampler | None = None, batch_size: int = 1,
           workers: int | None = None, pin_memory: bool = False) -> DataLoader:
    """A DataLoader over ``dataset``: in ``batch_sampler`` order (training) or in order by ``batch_size``."""
    workers = default_workers() if workers is None else workers
    options: dict[str, Any] = {"num_workers": workers, "collate_fn": collate, "pin_memory": pin_memory}
    if workers:
        options.update(worker_init_fn=_worker_init, prefetch_factor=4, persistent_workers=batch_sampler is None)
    if batch_sampler is not None:
        return DataLoader(dataset, batch_sampler=batch_sampler, **options)
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, **options)
