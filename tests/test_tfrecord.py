"""TF Object Detection API records, read back with TensorFlow itself (``TFRecordDataset`` + ``parse_single_example``)
the way the TF OD API's decoder reads them, and ``label_map.pbtxt``."""

from __future__ import annotations

import hashlib
import io
import math
import re

import numpy as np
import pytest
from PIL import Image
from preannotate.formats import masks, tfrecord
from preannotate.formats.dataset import export_dataset
from preannotate.shapes import FrameAnnotations, Label, Shape

from tests.conftest import encode, photo
from tests.test_dataset import LABELS, road_bitmap, synthetic_frames

tf = pytest.importorskip("tensorflow")  # imported once for the module

STRING = tf.io.FixedLenFeature([], tf.string)
SPEC = {
    **{f"image/{key}": STRING for key in ("encoded", "format", "filename", "source_id", "key/sha256")},
    "image/height": tf.io.FixedLenFeature([], tf.int64), "image/width": tf.io.FixedLenFeature([], tf.int64),
    **{f"image/object/bbox/{k}": tf.io.VarLenFeature(tf.float32) for k in ("xmin", "xmax", "ymin", "ymax")},
    "image/object/class/text": tf.io.VarLenFeature(tf.string),
    "image/object/class/label": tf.io.VarLenFeature(tf.int64),
    "image/object/area": tf.io.VarLenFeature(tf.float32),
    "image/object/is_crowd": tf.io.VarLenFeature(tf.int64),
    "image/object/mask": tf.io.VarLenFeature(tf.string),
}


def parsed_records(paths):
    """Every record, parsed by TensorFlow into plain Python values."""
    out = []
    for record in tf.data.TFRecordDataset([str(p) for p in paths]):
        example = tf.io.parse_single_example(record, SPEC)
        out.append({key: (tf.sparse.to_dense(value).numpy().tolist() if isinstance(value, tf.SparseTensor)
                          else value.numpy()) for key, value in example.items()})
    return out


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    frames, images = synthetic_frames()
    out = tmp_path_factory.mktemp("tfrecord") / "d"
    summary = export_dataset(out, "tfrecord", LABELS, [(f.frame, f) for f in frames], images, num_shards=2,
                             progress=False)
    records = parsed_records(p for p in summary.files if ".record-" in p.name)
    return frames, images, summary, {r["image/source_id"].decode(): r for r in records}


def rotated_hull(x1, y1, x2, y2, degrees):
    cx, cy, a = (x1 + x2) / 2, (y1 + y2) / 2, math.radians(degrees)
    corners = [(x, y) for x in (x1, x2) for y in (y1, y2)]
    turned = [(cx + (x - cx) * math.cos(a) - (y - cy) * math.sin(a),
               cy + (x - cx) * math.sin(a) + (y - cy) * math.cos(a)) for x, y in corners]
    return [min(p[0] for p in turned), min(p[1] for p in turned), max(p[0] for p in turned),
            max(p[1] for p in turned)]


def test_layout_shards_and_image_keys(exported):
    frames, images, summary, records = exported
    assert sorted(p.name for p in summary.files) == [
        "label_map.pbtxt", "labels.json", "train.record-00000-of-00002", "train.record-00001-of-00002"]
    assert sorted(records) == ["0", "1", "2"]  # one record per frame, source_id unique and non-empty
    for frame in frames:
        record = records[str(frame.frame)]
        data = images.files[frame.frame]
        assert record["image/encoded"] == data
        assert record["image/key/sha256"].decode() == hashlib.sha256(data).hexdigest()
        assert record["image/format"] == (b"png" if frame.name.endswith(".png") else b"jpeg")
        assert record["image/filename"].decode() == frame.name
        assert (record["image/height"], record["image/width"]) == (frame.height, frame.width)
        assert tf.io.decode_image(record["image/encoded"]).shape == (frame.height, frame.width, 3)


def test_boxes_are_normalized_and_exact(exported):
    _, _, _, records = exported
    first, second, empty = records["0"], records["1"], records["2"]

    def boxes(record):
        return np.array([record[f"image/object/bbox/{k}"] for k in ("xmin", "ymin", "xmax", "ymax")]).T

    hull = rotated_hull(50, 10, 80, 30, 30)
    expected = [[10.5 / 96, 8.25 / 64, 40 / 96, 28 / 64], [hull[0] / 96, hull[1] / 64, hull[2] / 96, hull[3] / 64],
                [5 / 96, 35 / 64, 30 / 96, 60 / 64]]  # points and the unknown label "bus" are left out
    assert np.allclose(boxes(first), expected, atol=1e-6)
    assert first["image/object/class/text"] == [b"car", b"car", b"person"]
    assert np.allclose(boxes(second)[0], [20 / 80, 10 / 60, 50 / 80, 30 / 60], atol=1e-6)  # the mask's pixels
    cx, cy, rx, ry = 40, 30, 15, 8
    assert np.allclose(boxes(second)[1] * [80, 60, 80, 60], [cx - rx, cy - ry, cx + rx, cy + ry], atol=1.0)
    assert np.allclose(boxes(second)[2], [70 / 80, 50 / 60, 1, 1], atol=1e-6)  # clipped to the image
    assert all(0 <= v <= 1 for v in boxes(second).ravel())
    assert second["image/object/is_crowd"] == [0, 0, 0]
    assert second["image/object/area"][0] == road_bitmap().sum()
    assert all(empty[f"image/object/bbox/{k}"] == [] for k in ("xmin", "xmax", "ymin", "ymax"))
    assert empty["image/object/mask"] == [] and empty["image/object/class/label"] == []


def test_class_ids_match_the_label_map(exported):
    _, _, summary, records = exported
    text = (summary.path / "label_map.pbtxt").read_text()
    assert text.startswith("item {\n\tid: 1\n\tname: 'car'\n}\n\nitem {\n\tid: 2\n\tname: 'person'\n}\n")
    id_of = {name: int(i) for i, name in re.findall(r"id: (\d+)\s+name: '([^']*)'", text)}
    assert id_of == {"car": 1, "person": 2, "road": 3, "sign": 4}
    for record in records.values():
        assert record["image/object/class/label"] == [id_of[t.decode()] for t in record["image/object/class/text"]]


def test_png_masks_match_the_rasterized_shapes(exported):
    frames, _, _, records = exported
    for frame in frames:
        kept = [s for s in frame.shapes if s.type != "points" and s.label != "bus"]
        pngs = records[str(frame.frame)]["image/object/mask"]
        assert len(pngs) == len(kept)  # one mask per box: the decoder reshapes them to N x H x W
        for png, shape in zip(pngs, kept, strict=True):
            decoded = tf.io.decode_png(png, channels=1).numpy()[..., 0]
            assert decoded.shape == (frame.height, frame.width) and set(np.unique(decoded)) <= {0, 1}
            if shape.type == "mask":
                expected = masks.cvat_rle_to_bitmap(shape.points, frame.width, frame.height)
            else:
                expected = masks.polygon_to_bitmap([shape.polygon()], frame.width, frame.height)
            assert np.array_equal(decoded > 0, expected), (frame.frame, shape.type)
    road = tf.io.decode_png(records["1"]["image/object/mask"][0]).numpy()[..., 0] > 0
    assert np.array_equal(road, road_bitmap())
    box = tf.io.decode_png(records["1"]["image/object/mask"][2]).numpy()[..., 0] > 0
    assert box.sum() == 10 * 10 and box[50:, 70:].all()  # the clipped rectangle, filled


def test_records_without_masks_have_no_mask_key(tmp_path):
    frames, images = synthetic_frames()
    summary = export_dataset(tmp_path / "d", "tfrecord", LABELS, [(f.frame, f) for f in frames], images,
                             masks=False, progress=False)
    for record in tf.data.TFRecordDataset([str(p) for p in summary.files if ".record-" in p.name]):
        assert "image/object/mask" not in tf.train.Example.FromString(record.numpy()).features.feature
    assert not summary.masks


def test_other_image_formats_become_png_and_sizes_are_checked():
    bmp = encode(photo(32, 24), "BMP")
    frame = FrameAnnotations(0, 32, 24, "a.bmp", [Shape("car", "rectangle", [1, 2, 10, 20])])
    example = tfrecord.frame_example(frame, bmp, LABELS, filename="a.bmp", source_id="0")
    feature = example.features.feature
    assert feature["image/format"].bytes_list.value == [b"png"]
    png = feature["image/encoded"].bytes_list.value[0]
    with Image.open(io.BytesIO(png)) as image, Image.open(io.BytesIO(bmp)) as original:
        assert np.array_equal(np.asarray(image), np.asarray(original.convert("RGB")))  # lossless
    assert feature["image/key/sha256"].bytes_list.value == [hashlib.sha256(png).hexdigest().encode()]
    with pytest.raises(ValueError, match="32x24 but CVAT says 64x64"):
        tfrecord.frame_example(FrameAnnotations(0, 64, 64), bmp, LABELS, filename="a.bmp", source_id="0")


def test_label_map_round_trip_and_foreign_files(tmp_path):
    labels = [Label("car", id=1), Label("it's", id=2), Label("Straße", id=3)]
    tfrecord.write_label_map(tmp_path / "a.pbtxt", labels)
    assert [(x.name, x.id) for x in tfrecord.read_label_map(tmp_path / "a.pbtxt")] == [
        ("car", 1), ("it's", 2), ("Straße", 3)]
    (tmp_path / "b.pbtxt").write_text('item {\n  name: "dog"\n  id: 2\n  display_name: "Dog"\n}\n'
                                      "item { id: 1 name: 'cat' }\n")
    assert [(x.name, x.id) for x in tfrecord.read_label_map(tmp_path / "b.pbtxt")] == [("cat", 1), ("dog", 2)]
    (tmp_path / "c.pbtxt").write_text("item { id: 2 name: 'cat' }\n")
    with pytest.raises(ValueError, match="1..N"):
        tfrecord.read_label_map(tmp_path / "c.pbtxt")


def test_read_records_gives_frames_and_lazy_images(exported):
    frames, images, summary, _ = exported
    paths = sorted(p for p in summary.files if ".record-" in p.name)
    read = {frame.frame: (frame, image) for frame, image in tfrecord.read_records(paths, LABELS)}
    assert sorted(read) == [0, 1, 2]
    for original in frames:
        frame, image = read[original.frame]
        assert image() == images.files[original.frame]
        assert [s.label for s in frame.shapes] == [s.label for s in original.shapes
                                                   if s.type != "points" and s.label != "bus"]


def test_project_source_ids_name_the_task(tmp_path):
    frames, images = synthetic_frames()
    items = [((task, f.frame), f) for task in (5, 6) for f in frames[:1]]
    summary = export_dataset(tmp_path / "d", "tfrecord", LABELS, items, {5: images, 6: images}, progress=False)
    records = parsed_records(p for p in summary.files if ".record-" in p.name)
    assert [(r["image/source_id"], r["image/filename"]) for r in records] == [
        (b"5/0", b"task_5/street/a.jpg"), (b"6/0", b"task_6/street/a.jpg")]
