"""TF Object Detection API records (one ``tf.train.Example`` per frame) and ``label_map.pbtxt`` — in this one module.

The keys are those the official ``TfExampleDecoder`` reads (``../shared/reference/formats.md``, section 1):
``image/encoded`` (the frame's file bytes as CVAT gave them; anything but JPEG or PNG is re-encoded as PNG),
``image/format``, ``image/filename``, ``image/source_id`` (unique: ``<frame>`` or ``<task>/<frame>``),
``image/key/sha256``, ``image/height``, ``image/width``, normalized ``image/object/bbox/{xmin,xmax,ymin,ymax}``,
``image/object/class/{text,label}`` (1-based, as in ``label_map.pbtxt``), ``image/object/{area,is_crowd}`` and,
when the dataset has masks, ``image/object/mask``: one single-channel 0/1 PNG per object at full image size (the
pipeline then needs ``load_instance_masks: true`` and ``mask_type: PNG_MASKS``). With masks every object has one
— rectangles get their filled (rotated) box — because the decoder expects as many masks as boxes.

Keypoints, when the labels have skeleton or points labels, as the TF OD API's ``create_coco_tf_record`` writes them:
``image/object/keypoint/{x,y}`` (normalized like the boxes), ``/visibility`` (COCO's 0 outside, 1 occluded, 2
visible), ``/text`` (the names) and ``/num`` (those not outside), the same count for every object, since the decoder
reshapes them by its ``num_keypoints``: the keypoints of all keypoint labels one after the other
(``keypoint_layout``; one label's alone in the usual case of one skeleton label), an object filling its label's
run and 0s elsewhere (a box: 0s only). A skeleton's box is that of its keypoints not outside (its mask, with
masks, the filled box), a points label's a skeleton of one keypoint (``shapes.as_skeleton``).

Boxes are those of the COCO export (``coco.shape_to_annotation``: rotated rectangles by their rotated corners,
masks and ellipses by their pixels; skeletons by ``coco.skeleton_to_annotation``), so both formats agree. TensorFlow
is imported only when records are written or read, since nothing else in the package needs it.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import re
import struct
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from preannotate.formats import coco, masks
from preannotate.shapes import FrameAnnotations, Label, Shape, as_skeleton, keypoint_names

MASK_TYPES = ("polygon", "mask", "ellipse")  # shapes that make a dataset a mask dataset


def tensorflow(with_torchvision: bool = True) -> Any:
    """TensorFlow, imported on first use with a clear message when it is missing, and without the lines its C++
    runtime prints while it starts (CPU features, "could not find cuda drivers"): they say nothing a user of
    TFRecords needs, before our own output. ``TF_CPP_MIN_LOG_LEVEL=0`` shows them again.

    torchvision imported *after* TensorFlow crashes the process (their bundled C++ libraries clash), so it is
    imported first when installed — unless ``with_torchvision`` is False: a process running only TensorFlow models
    (``models.keras_family``) never loads torch, and ``models.torchvision_family`` then refuses with a sentence."""
    if "tensorflow" in sys.modules:
        return sys.modules["tensorflow"]
    if with_torchvision:
        try:
            import torchvision  # noqa: F401
        except ImportError:
            pass
    quiet = os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2") != "0"
    try:
        with _stderr_silenced(quiet):  # some of those lines come before TensorFlow reads its log level
            import tensorflow as tf
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError("TFRecord export needs TensorFlow: pip install 'cvat-preannotate[tf]' "
                          "(or pip install tensorflow)") from error
    return tf


@contextlib.contextmanager
def _stderr_silenced(enabled: bool):
    """File descriptor 2 pointed at /dev/null for the block (C++ code writes there, not to ``sys.stderr``)."""
    if not enabled:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


# ----------------------------------------------------------------------------------------------- label_map.pbtxt

def label_map_text(labels: Sequence[Label]) -> str:
    """``label_map.pbtxt`` as Datumaro and the TF OD API tools write it: ids 1..N in CVAT's label order."""
    items = []
    for i, label in enumerate(labels, start=1):
        name = label.name.replace("\\", "\\\\").replace("'", "\\'")
        items.append(f"item {{\n\tid: {i}\n\tname: '{name}'\n}}\n")
    return "\n".join(items)


def write_label_map(path: str | Path, labels: Sequence[Label]) -> None:
    Path(path).write_text(label_map_text(labels), encoding="utf-8")


_ITEM = re.compile(r"item\s*\{(.*?)\}", re.S)
_FIELD = re.compile(r"""\b(id|name)\s*:\s*(?:(\d+)|'((?:[^'\\]|\\.)*)'|"((?:[^"\\]|\\.)*)")""")


def read_label_map(path: str | Path) -> list[Label]:
    """``label_map.pbtxt`` → labels ordered by id (``Label.id`` = the file's id; ``display_name`` is ignored)."""
    labels = []
    for body in _ITEM.findall(Path(path).read_text(encoding="utf-8")):
        fields = {}
        for key, number, single, double in _FIELD.findall(body):
            value = number or single or double
            fields[key] = re.sub(r"\\(.)", r"\1", value) if key == "name" else value
        if "id" not in fields or "name" not in fields:
            raise ValueError(f"{path}: an item without id or name: {body.strip()!r}")
        labels.append(Label(name=fields["name"], id=int(fields["id"])))
    labels.sort(key=lambda label: label.id)
    if [label.id for label in labels] != list(range(1, len(labels) + 1)):
        raise ValueError(f"{path}: label ids must be 1..N, got {[label.id for label in labels]}")
    return labels


# ------------------------------------------------------------------------------------------------------ writing

def image_format(data: bytes) -> str | None:
    """``"jpeg"``, ``"png"`` or None, from the file's magic bytes (what ``image/format`` may say)."""
    if data[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    return None


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def shape_bitmap(shape: Shape, width: int, height: int) -> np.ndarray:
    """The pixels of a shape at full image size (rectangles and ellipses through their outline)."""
    if shape.type == "mask":
        return masks.cvat_rle_to_bitmap(shape.points, width, height)
    return masks.polygon_to_bitmap([shape.polygon()], width, height)


def keypoint_layout(labels: Sequence[Label]) -> dict[str, tuple[int, tuple[str, ...]]]:
    """Where each keypoint label's keypoints lie among every object's: label name → (offset, keypoint names), over
    the skeleton and points labels in order."""
    layout, offset = {}, 0
    for label in labels:
        if label.type in coco.KEYPOINT_TYPES:
            layout[label.name] = (offset, keypoint_names(label))
            offset += len(layout[label.name][1])
    return layout


def _keypoint_geometry(shape: Shape, names: Sequence[str]) -> dict[str, Any] | None:
    """A skeleton's (or a one-point points shape's) COCO geometry; None for a points shape of several points."""
    if shape.type == "points" and len(shape.points) != 2:
        return None
    return coco.skeleton_to_annotation(as_skeleton(shape), names)


def frame_example(frame: FrameAnnotations, image: bytes, labels: Sequence[Label], *, filename: str,
                  source_id: str, with_masks: bool = False, skipped: Counter[str] | None = None) -> Any:
    """One frame → a ``tf.train.Example``. Shapes a detector cannot learn (or with a label not in ``labels``, or
    empty inside the image) are left out and counted by type in ``skipped``. The frame's tags of ``labels`` are
    the image-level ``image/class/text`` and ``image/class/label`` (what a classifier learns from)."""
    tf = tensorflow()
    fmt = image_format(image)
    with Image.open(io.BytesIO(image)) as decoded:
        size = decoded.size
        if fmt is None:  # the decoder reads JPEG and PNG; anything else becomes a lossless PNG
            image, fmt = png_bytes(np.asarray(decoded.convert("RGB"))), "png"
    if size != (frame.width, frame.height):
        raise ValueError(f"frame {frame.frame} ({filename}): the image is {size[0]}x{size[1]} but CVAT says "
                         f"{frame.width}x{frame.height}")
    class_of = {label.name: i for i, label in enumerate(labels, start=1)}
    layout = keypoint_layout(labels)
    total = sum(len(names) for _, names in layout.values())
    objects: dict[str, list] = {key: [] for key in ("xmin", "xmax", "ymin", "ymax", "text", "label", "area",
                                                    "mask", "kx", "ky", "kv", "knum")}
    for shape in frame.shapes:
        keypoints = shape.type in coco.KEYPOINT_TYPES and shape.label in layout
        geometry = (None if shape.label not in class_of else
                    _keypoint_geometry(shape, layout[shape.label][1]) if keypoints else
                    coco.shape_to_annotation(shape, frame.width, frame.height))
        if geometry is None:
            if skipped is not None:
                skipped[shape.type] += 1
            continue
        if layout:
            offset, names = layout[shape.label] if keypoints else (0, ())
            triplets = [0.0, 0.0, 0] * offset + list(geometry.get("keypoints", ())) + \
                [0.0, 0.0, 0] * (total - offset - len(names))
            objects["kx"] += [v / frame.width for v in triplets[0::3]]
            objects["ky"] += [v / frame.height for v in triplets[1::3]]
            objects["kv"] += [int(v) for v in triplets[2::3]]
            objects["knum"].append(geometry.get("num_keypoints", 0))
        x, y, w, h = geometry["bbox"]
        objects["xmin"].append(x / frame.width)
        objects["xmax"].append((x + w) / frame.width)
        objects["ymin"].append(y / frame.height)
        objects["ymax"].append((y + h) / frame.height)
        objects["text"].append(shape.label.encode("utf-8"))
        objects["label"].append(class_of[shape.label])
        objects["area"].append(float(geometry["area"]))
        if with_masks:
            bitmap = (masks.polygon_to_bitmap([[x, y, x + w, y, x + w, y + h, x, y + h]], frame.width, frame.height)
                      if keypoints else shape_bitmap(shape, frame.width, frame.height))
            objects["mask"].append(png_bytes(bitmap.astype(np.uint8)))

    def ints(values):
        return tf.train.Feature(int64_list=tf.train.Int64List(value=values))

    def floats(values):
        return tf.train.Feature(float_list=tf.train.FloatList(value=values))

    def blobs(values):
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=values))

    feature = {
        "image/encoded": blobs([image]),
        "image/format": blobs([fmt.encode()]),
        "image/filename": blobs([filename.encode("utf-8")]),
        "image/source_id": blobs([source_id.encode("utf-8")]),
        "image/key/sha256": blobs([hashlib.sha256(image).hexdigest().encode()]),
        "image/height": ints([frame.height]),
        "image/width": ints([frame.width]),
        **{f"image/object/bbox/{k}": floats(objects[k]) for k in ("xmin", "xmax", "ymin", "ymax")},
        "image/object/class/text": blobs(objects["text"]),
        "image/object/class/label": ints(objects["label"]),
        "image/object/area": floats(objects["area"]),
        "image/object/is_crowd": ints([0] * len(objects["label"])),
    }
    tags = frame.tags_among(class_of)
    if tags:
        feature["image/class/text"] = blobs([tag.encode("utf-8") for tag in tags])
        feature["image/class/label"] = ints([class_of[tag] for tag in tags])
    if with_masks:
        feature["image/object/mask"] = blobs(objects["mask"])
    if layout:
        all_names = [name.encode("utf-8") for _, names in layout.values() for name in names]
        feature.update({"image/object/keypoint/x": floats(objects["kx"]),
                        "image/object/keypoint/y": floats(objects["ky"]),
                        "image/object/keypoint/visibility": ints(objects["kv"]),
                        "image/object/keypoint/num": ints(objects["knum"]),
                        "image/object/keypoint/text": blobs(all_names * len(objects["label"]))})
    return tf.train.Example(features=tf.train.Features(feature=feature))


def shard_paths(prefix: str | Path, num_shards: int) -> list[Path]:
    """``<prefix>-00000-of-0000N`` …, the TF OD API's sharded naming (``input_path`` takes a glob of them)."""
    prefix = Path(prefix)
    return [prefix.with_name(f"{prefix.name}-{i:05d}-of-{num_shards:05d}") for i in range(num_shards)]


def write_records(prefix: str | Path, examples: Iterable[Any], num_shards: int = 1) -> list[Path]:
    """Write examples round-robin into ``num_shards`` files with TensorFlow's own writer (as the TF OD API's
    ``create_coco_tf_record`` does, so consecutive frames land in different shards)."""
    tf = tensorflow()
    paths = shard_paths(prefix, num_shards)
    with ExitStack() as stack:
        writers = [stack.enter_context(tf.io.TFRecordWriter(str(path))) for path in paths]
        for i, example in enumerate(examples):
            writers[i % num_shards].write(example.SerializeToString())
    return paths


# ------------------------------------------------------------------------------------------------------ reading

def parse_example(serialized: bytes, labels: Sequence[Label] | None = None
                  ) -> tuple[FrameAnnotations, bytes, dict[str, str]]:
    """A serialized Example → (frame with rectangles, or masks when the record has them; the image bytes;
    ``{"filename", "source_id", "format", "sha256"}``). Label names come from ``labels`` by ``class/label``
    when given (the label map wins, as in the TF OD API decoder), else from ``class/text``. An object of a
    skeleton or points label of ``labels`` (with their keypoints: ``labels.json``, not the label map) is read back
    from its keypoints as a skeleton or a points shape (``keypoint_layout``)."""
    tf = tensorflow()
    feature = tf.train.Example.FromString(serialized).features.feature

    def blobs(key):
        return list(feature[key].bytes_list.value) if key in feature else []

    def numbers(key, kind="float_list"):
        return list(getattr(feature[key], kind).value) if key in feature else []

    width = int(numbers("image/width", "int64_list")[0])
    height = int(numbers("image/height", "int64_list")[0])
    info = {key: (blobs(f"image/{key}") or [b""])[0].decode("utf-8")
            for key in ("filename", "source_id", "format", "key/sha256")}
    info["sha256"] = info.pop("key/sha256")
    tail = info["source_id"].rsplit("/", 1)[-1]
    frame = FrameAnnotations(frame=int(tail) if tail.isdigit() else 0, width=width, height=height,
                             name=info["filename"])
    names = [t.decode("utf-8") for t in blobs("image/object/class/text")]
    ids = numbers("image/object/class/label", "int64_list")
    if labels is not None and ids:
        names = [labels[i - 1].name for i in ids]
    tag_ids = numbers("image/class/label", "int64_list")
    frame.tags = ([labels[i - 1].name for i in tag_ids] if labels is not None and tag_ids
                  else [t.decode("utf-8") for t in blobs("image/class/text")])
    pngs = blobs("image/object/mask")
    boxes = zip(*(numbers(f"image/object/bbox/{k}") for k in ("xmin", "ymin", "xmax", "ymax")), strict=True)
    layout = keypoint_layout(labels or ())
    kx, ky = numbers("image/object/keypoint/x"), numbers("image/object/keypoint/y")
    kv = numbers("image/object/keypoint/visibility", "int64_list")
    per_object = len(kx) // len(names) if names and kx else 0
    for i, (name, (x1, y1, x2, y2)) in enumerate(zip(names, boxes, strict=True)):
        if name in layout and per_object:
            offset, keypoint_names_ = layout[name]
            start = i * per_object + offset
            triplets = [v for k in range(start, start + len(keypoint_names_))
                        for v in (kx[k] * width, ky[k] * height, kv[k])]
            shape = coco.annotation_to_shape({"keypoints": triplets}, name, width, height, frame.frame,
                                             keypoints=keypoint_names_)
            if shape is not None:
                frame.shapes.append(shape)
            continue
        if pngs:
            with Image.open(io.BytesIO(pngs[i])) as mask:
                bitmap = np.asarray(mask.convert("L")) > 0
            frame.shapes.append(Shape(name, "mask", masks.bitmap_to_cvat_rle(bitmap), frame=frame.frame))
        else:
            frame.shapes.append(Shape(name, "rectangle", [x1 * width, y1 * height, x2 * width, y2 * height],
                                      frame=frame.frame))
    return frame, blobs("image/encoded")[0] if "image/encoded" in feature else b"", info


def record_offsets(path: str | Path) -> Iterator[tuple[int, int]]:
    """(offset, length) of each record's data in a TFRecord file, reading only the headers.

    The framing is TFRecord's documented ``uint64 length, uint32 crc, data, uint32 crc`` (little-endian); knowing
    where each record sits lets a reader fetch one frame's image later instead of holding them all."""
    with open(path, "rb") as file:
        offset = 0
        while header := file.read(12):
            if len(header) < 12:
                raise ValueError(f"{path}: truncated record header at byte {offset}")
            (length,) = struct.unpack("<Q", header[:8])
            yield offset + 12, length
            offset += 12 + length + 4
            file.seek(offset)


def read_record(path: str | Path, offset: int, length: int) -> bytes:
    with open(path, "rb") as file:
        file.seek(offset)
        data = file.read(length)
    if len(data) != length:
        raise ValueError(f"{path}: truncated record at byte {offset}")
    return data


def read_records(paths: Iterable[str | Path], labels: Sequence[Label] | None = None
                 ) -> Iterator[tuple[FrameAnnotations, Callable[[], bytes]]]:
    """Every frame of the given record files (in file order), each with a function that reads its image bytes
    when called (only annotations are kept in memory)."""
    for path in paths:
        for offset, length in record_offsets(path):
            frame, _, _ = parse_example(read_record(path, offset, length), labels)
            yield frame, _image_getter(path, offset, length)


def example_image(serialized: bytes) -> bytes:
    """Only ``image/encoded`` of a serialized Example (no masks decoded)."""
    return tensorflow().train.Example.FromString(serialized).features.feature["image/encoded"].bytes_list.value[0]


def _image_getter(path: str | Path, offset: int, length: int) -> Callable[[], bytes]:
    return lambda: example_image(read_record(path, offset, length))
