"""Dataset folders on disk: a train/val split that keeps video tracks whole, writing COCO, TFRecord or an
ImageNet-style folder of tags, reading back.

Layouts written by ``export_dataset`` (and read by ``read_dataset``)::

    COCO                               TFRecord (TF Object Detection API)       ImageNet (frame tags, classifiers)
    annotations/instances_train.json   train.record-00000-of-00002, ...        train/<label>/<frame name>
    annotations/instances_val.json     val.record-00000-of-00001               val/<label>/<frame name>
    images/<frame name>                label_map.pbtxt                         labels.json
    labels.json                        labels.json

COCO has no place for tags; TFRecord keeps them as ``image/class/*``; the ImageNet layout is tags only
(``formats.imagenet`` says why that layout). When a label is a skeleton or a points label, the COCO folder also
holds ``annotations/person_keypoints_<split>.json`` (CVAT's *COCO Keypoints 1.0* layout, ``coco.to_coco_keypoints``)
with those shapes, and the records their ``image/object/keypoint/*`` keys; a COCO folder of keypoints files alone
(CVAT's own export) is read too.

``labels.json`` keeps the CVAT labels with their types and attributes (neither COCO categories nor the label map
can), so a model trained from the folder knows what shapes to predict.

Frames are identified by a *key*: the frame number for one task, ``(task_id, frame)`` for a project. With task
keys, image files and ``source_id`` are prefixed with the task (``task_12/frame_00.jpg``, ``12/0``), since frame
names repeat across tasks.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from preannotate.formats import coco, imagenet
from preannotate.frames import FrameImages, decode_rgb
from preannotate.shapes import FrameAnnotations, Label

FORMATS = ("coco", "tfrecord", "imagenet")
COCO_FILES = ("instances", "person_keypoints")  # annotations/<kind>_<split>.json: shapes, then skeletons and points
FRAMES_PER_SHARD = 1000  # default sharding: a few hundred MB per file for typical photos
ImageRef = Path | Callable[[], bytes]  # how read_dataset hands out a frame's image


@dataclass
class ExportSummary:
    """What ``export_dataset`` wrote: frames and objects per split, shapes left out by type, the files."""

    path: Path
    format: str
    frames: dict[str, int]
    objects: dict[str, int]
    skipped: Counter[str] = field(default_factory=Counter)
    masks: bool = False  # TFRecord: records carry PNG masks (pipeline: load_instance_masks, mask_type: PNG_MASKS)
    files: list[Path] = field(default_factory=list)


def task_of(key: Hashable) -> Hashable | None:
    """The task of a frame key: the first element of a ``(task, frame)`` pair, None for a bare frame number."""
    return key[0] if isinstance(key, tuple) and len(key) == 2 else None


def split_frames(items: Iterable[tuple[Hashable, FrameAnnotations]], val_fraction: float = 0.0, seed: int = 0
                 ) -> dict[str, list[Hashable]]:
    """Split frames into ``train`` (and ``val`` when ``val_fraction`` > 0), keys kept in the order given.

    Frames that share a video track (the same ``track_id`` within a task) stay on one side — otherwise the
    validation set would hold near-copies of training frames. Groups of linked frames are ranked by a hash of
    ``seed`` and their smallest key, so the split depends on neither the order of ``items`` nor Python's hash
    seed. In that order whole groups go to ``val`` while it stays within ``val_fraction`` of the frames, then any
    group that brings it closer still (so ``val`` has a frame when there are two groups or more; ``train`` is
    never emptied)."""
    items = list(items)
    keys = [key for key, _ in items]
    if len(set(keys)) != len(keys):
        raise ValueError("frame keys repeat; use (task_id, frame) keys for several tasks")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if not val_fraction:
        return {"train": keys}

    parent = {key: key for key in keys}  # union-find over frames linked by a track

    def root(key: Hashable) -> Hashable:
        while parent[key] != key:
            parent[key] = parent[parent[key]]
            key = parent[key]
        return key

    seen: dict[tuple[Hashable, int], Hashable] = {}
    for key, frame in items:
        for shape in frame.shapes:
            if shape.track_id is not None:
                other = seen.setdefault((task_of(key), shape.track_id), key)
                parent[root(key)] = root(other)
    groups: dict[Hashable, list[Hashable]] = defaultdict(list)
    for key in keys:
        groups[root(key)].append(key)

    def rank(members: list[Hashable]) -> bytes:
        return hashlib.sha256(f"{seed}\0{min(map(repr, members))}".encode()).digest()

    target = max(val_fraction * len(keys), 1.0 if len(groups) > 1 else 0.0)
    ranked = sorted(groups.values(), key=rank)
    val: set[Hashable] = set()
    for members in ranked:  # first without overshooting, so that smaller groups can fill up to the target
        if len(val) + len(members) <= target:
            val.update(members)
    for members in ranked:  # then any group that still brings val closer (big groups, a target of one frame)
        closer = abs(len(val) + len(members) - target) < abs(len(val) - target)
        if closer and not val.issuperset(members) and len(val) + len(members) < len(keys):
            val.update(members)
    return {"train": [k for k in keys if k not in val], "val": [k for k in keys if k in val]}


def export_dataset(out_dir: str | Path, fmt: str, labels: Sequence[Label],
                   items: Iterable[tuple[Hashable, FrameAnnotations]],
                   images: FrameImages | Mapping[Hashable, FrameImages] | None = None, *, val_fraction: float = 0.0,
                   seed: int = 0, num_shards: int | None = None, masks: bool | None = None,
                   progress: bool = True) -> ExportSummary:
    """Write frames (``(key, FrameAnnotations)``, see the module docstring for keys) as a COCO or TFRecord folder.

    ``images`` gives the frames' files: one ``FrameImages`` for a task, or a mapping task id → ``FrameImages``
    for ``(task, frame)`` keys. Images are streamed: fetched in frame order per task and written (COCO: as-is,
    named by CVAT's frame name, with the extension of their real format) or embedded (TFRecord) one at a time.
    COCO may be written without images (``images=None``: annotations only); TFRecord needs them.

    ``val_fraction`` and ``seed`` split the frames (``split_frames``). TFRecord only: ``num_shards`` per split
    (default one per 1000 frames, never more than frames) and ``masks`` — PNG instance masks in the records,
    by default when any exported shape is a polygon, mask or ellipse.
    """
    if fmt not in FORMATS:
        raise ValueError(f"format {fmt!r} is not one of {', '.join(FORMATS)}")
    if fmt in ("tfrecord", "imagenet") and images is None:
        raise ValueError(f"a {'TFRecord' if fmt == 'tfrecord' else 'ImageNet-style'} dataset holds the images: "
                         "give images")
    items = list(items)
    if not items:
        raise ValueError("no frames to export")
    frames = dict(items)
    splits = {name: keys for name, keys in split_frames(items, val_fraction, seed).items() if keys}
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):  # leftovers (an old val split, say) would be read back as data
        raise FileExistsError(f"{out} is not empty")
    out.mkdir(parents=True, exist_ok=True)
    (out / "labels.json").write_text(json.dumps([label.to_dict() for label in labels], indent=1) + "\n")
    summary = ExportSummary(path=out, format=fmt, frames={}, objects={}, files=[out / "labels.json"])
    if fmt == "tfrecord":
        from preannotate.formats import tfrecord

        if masks is None:
            names = {label.name for label in labels}
            masks = any(s.type in tfrecord.MASK_TYPES and s.label in names
                        for frame in frames.values() for s in frame.shapes)
        summary.masks = masks
        tfrecord.write_label_map(out / "label_map.pbtxt", labels)
        summary.files.append(out / "label_map.pbtxt")

    used_names: set[str] = set()
    bar = tqdm(total=len(items), desc=f"export {fmt}", unit="frame", disable=not progress)
    for split, keys in splits.items():
        skipped: Counter[str] = Counter()
        named = _named(keys, frames, images, used_names)
        if fmt == "coco":
            pairs = []
            for _, frame, data, name in named:
                if data is not None:
                    target = out / "images" / name
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(data)
                pairs.append((frame, name))
                bar.update()
            written = {"instances": coco.to_coco(pairs, labels, skipped)}
            if any(label.type in coco.KEYPOINT_TYPES for label in labels):
                # skeletons and points go to a keypoints file of their own, as CVAT's COCO Keypoints 1.0
                # writes it: what the instances file left out of them is there, or counted there
                for kind in coco.KEYPOINT_TYPES:
                    skipped.pop(kind, None)
                written["person_keypoints"] = coco.to_coco_keypoints(pairs, labels, skipped)
            objects = 0
            for prefix, dataset in written.items():
                path = out / "annotations" / f"{prefix}_{split}.json"
                path.parent.mkdir(exist_ok=True)
                path.write_text(json.dumps(dataset, separators=(",", ":")))
                summary.files.append(path)
                objects += len(dataset["annotations"])
        elif fmt == "imagenet":
            objects = sum(imagenet.write_frame(out, split, frame, data, name, labels, skipped)
                          for _, frame, data, name in _counted(named, bar))
            summary.files += [out / split] if (out / split).is_dir() else []
        else:
            examples = (tfrecord.frame_example(frame, data, labels, filename=name, source_id=_source_id(key, frame),
                                               with_masks=masks, skipped=skipped)
                        for key, frame, data, name in _counted(named, bar))
            shards = max(1, min(num_shards or math.ceil(len(keys) / FRAMES_PER_SHARD), len(keys)))
            summary.files += tfrecord.write_records(out / f"{split}.record", examples, shards)
            objects = sum(len(frames[k].shapes) for k in keys) - sum(skipped.values())
        summary.frames[split], summary.objects[split] = len(keys), objects
        summary.skipped.update(skipped)
    bar.close()
    return summary


def read_dataset(path: str | Path) -> tuple[list[Label], dict[str, list[tuple[FrameAnnotations, ImageRef]]]]:
    """A folder written by ``export_dataset`` (or any COCO folder of ``annotations/instances_<split>.json`` +
    ``images/``, TF OD API records ``<split>.record-*`` / ``<split>.tfrecord`` + ``label_map.pbtxt``, or an
    ImageNet-style ``<split>/<label>/<image>`` folder) →
    labels and, per split, ``(frame, image)``: the image file's path (COCO) or a function returning its bytes
    (TFRecord, read from the record when called). A ``val`` split is the validation set."""
    root = Path(path)
    saved = ([Label.from_dict(item) for item in json.loads((root / "labels.json").read_text())]
             if (root / "labels.json").exists() else None)
    splits: dict[str, list[tuple[FrameAnnotations, ImageRef]]] = {}
    files = {kind: {file.stem.removeprefix(f"{kind}_"): file
                    for file in sorted((root / "annotations").glob(f"{kind}_*.json"))}
             for kind in COCO_FILES}
    if any(files.values()):
        labels = None
        for split in sorted(set().union(*files.values())):
            frames: dict[str, FrameAnnotations] = {}  # by file name: the instances and keypoints of one image
            for kind in COCO_FILES:  # the keypoints file last: its categories know the skeletons' keypoints
                if split in files[kind]:
                    labels, pairs = coco.from_coco(json.loads(files[kind][split].read_text()))
                    for frame, name in pairs:
                        known = frames.setdefault(name, frame)
                        if known is not frame:
                            known.shapes += frame.shapes
            splits[split] = [(frame, root / "images" / name) for name, frame in frames.items()]
        return _prefer_saved(saved, labels), splits
    if (root / "label_map.pbtxt").exists():
        from preannotate.formats import tfrecord

        labels = tfrecord.read_label_map(root / "label_map.pbtxt")
        by_split: dict[str, list[Path]] = defaultdict(list)
        for file in sorted(root.iterdir()):
            match = re.fullmatch(r"(.+?)\.(?:record|tfrecord)(?:-\d{5}-of-\d{5})?", file.name)
            if match:
                by_split[match.group(1)].append(file)
        labels = _prefer_saved(saved, labels)  # with their keypoints, which the label map cannot hold
        splits = {split: list(tfrecord.read_records(paths, labels)) for split, paths in by_split.items()}
        if splits:
            return labels, splits
    if imagenet.is_folder(root):
        return imagenet.read(root, saved)
    raise ValueError(f"{root} holds no dataset: a COCO folder (annotations/instances_<split>.json, images/), "
                     "TFRecords (<split>.record-* with label_map.pbtxt) or an ImageNet-style folder of tags "
                     "(<split>/<label>/<image>, nothing else)")


def _prefer_saved(saved: list[Label] | None, labels: list[Label] | None) -> list[Label]:
    """``labels.json`` (with types and attributes) when it names the same labels as the dataset itself."""
    labels = labels or []
    if saved and [label.name for label in saved] == [label.name for label in labels]:
        return saved
    return labels


def _with_images(keys: Sequence[Hashable], frames: Mapping[Hashable, FrameAnnotations],
                 images: FrameImages | Mapping[Hashable, FrameImages] | None
                 ) -> Iterator[tuple[Hashable, FrameAnnotations, bytes | None]]:
    """``(key, frame, image bytes)`` for the keys, asking each task's images for all its frames at once (in the
    keys' order) so a CVAT source can fetch chunk by chunk; one image is held at a time."""
    by_task: dict[Hashable, list[Hashable]] = defaultdict(list)
    for key in keys:
        by_task[task_of(key)].append(key)
    for task, task_keys in by_task.items():
        if images is None:
            yield from ((key, frames[key], None) for key in task_keys)
            continue
        source = images[task] if isinstance(images, Mapping) else images
        fetched = source.encoded([frames[key].frame for key in task_keys])
        for key, (number, data) in zip(task_keys, fetched, strict=True):
            if number != frames[key].frame:
                raise ValueError(f"asked for frame {frames[key].frame}, the image source gave frame {number}")
            yield key, frames[key], data


def _named(keys: Sequence[Hashable], frames: Mapping[Hashable, FrameAnnotations],
           images: FrameImages | Mapping[Hashable, FrameImages] | None, used: set[str]
           ) -> Iterator[tuple[Hashable, FrameAnnotations, bytes | None, str]]:
    """``(key, frame, image bytes, file name)``, the image checked against the frame's size."""
    for key, frame, data in _with_images(keys, frames, images):
        real = None
        if data is not None:
            with Image.open(io.BytesIO(data)) as image:  # reads the header only
                real = image.format
                if image.size != (frame.width, frame.height):
                    raise ValueError(f"frame {key!r} ({frame.name}): the image is {image.size[0]}x{image.size[1]} "
                                     f"but CVAT says {frame.width}x{frame.height}")
        yield key, frame, data, _file_name(key, frame, real, used)


def _counted(items: Iterable[Any], bar: tqdm) -> Iterator[Any]:
    for item in items:
        yield item
        bar.update()


def _file_name(key: Hashable, frame: FrameAnnotations, real: str | None, used: set[str]) -> str:
    """CVAT's frame name as a safe relative path, with the extension of the image's real format ``real`` (video
    frames have none; a compressed chunk holds JPEGs whatever the original was), prefixed with the task for task
    keys."""
    parts = [p for p in PurePosixPath((frame.name or f"frame_{frame.frame:06d}").replace("\\", "/")).parts
             if p not in ("/", ".", "..")]
    name = "/".join(parts) or f"frame_{frame.frame:06d}"
    if real is not None:
        extensions = [ext for ext, fmt in Image.registered_extensions().items() if fmt == real]
        if extensions and PurePosixPath(name).suffix.lower() not in extensions:
            name += {"JPEG": ".jpg", "PNG": ".png"}.get(real, extensions[0])
    task = task_of(key)
    if task is not None:
        name = f"task_{task}/{name}"
    if name in used:
        raise ValueError(f"two frames would be written as {name!r}")
    used.add(name)
    return name


def _source_id(key: Hashable, frame: FrameAnnotations) -> str:
    task = task_of(key)
    return str(frame.frame) if task is None else f"{task}/{frame.frame}"



class StoredImage:
    """``FrameImages`` of one frame of a dataset folder (its file, or its bytes in a record): what lets the trainer
    read a folder written by ``export_dataset`` as it reads CVAT."""

    def __init__(self, ref: ImageRef):
        self.ref = ref

    def encoded(self, frames: Iterable[int]) -> Iterator[tuple[int, bytes]]:
        for frame in frames:
            yield frame, self.ref.read_bytes() if isinstance(self.ref, Path) else self.ref()

    def decoded(self, frames: Iterable[int]) -> Iterator[tuple[int, np.ndarray]]:
        for frame, data in self.encoded(frames):
            yield frame, decode_rgb(data)


def training_items(pairs: Iterable[tuple[FrameAnnotations, ImageRef]]) -> list[tuple[FrameAnnotations, StoredImage]]:
    """A split of ``read_dataset`` as the trainer's items."""
    return [(frame, StoredImage(ref)) for frame, ref in pairs]


def training_split(path: str | Path, val_fraction: float = 0.0, seed: int = 0
                   ) -> tuple[list[Label], list[tuple[FrameAnnotations, StoredImage]],
                              list[tuple[FrameAnnotations, StoredImage]]]:
    """A dataset folder as the trainer takes it: labels, training items, validation items. A ``val`` split there
    is the validation set; a folder without one holds out ``val_fraction`` of its frames, by frame, as the export
    would."""
    labels, splits = read_dataset(path)
    if "val" in splits:
        train = [pair for split, pairs in splits.items() if split != "val" for pair in pairs]
        return labels, training_items(train), training_items(splits["val"])
    pairs = [pair for pairs in splits.values() for pair in pairs]
    chosen = split_frames([(i, frame) for i, (frame, _) in enumerate(pairs)], val_fraction, seed)
    return (labels, training_items(pairs[i] for i in chosen.get("train", [])),
            training_items(pairs[i] for i in chosen.get("val", [])))
