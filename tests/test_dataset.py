"""Dataset folders: the train/val split, COCO export with images against CVAT's own export, reading back."""

from __future__ import annotations

import json
import random
import zipfile

import numpy as np
import pytest
from preannotate.cvat.annotations import frames_from_annotations
from preannotate.formats import masks
from preannotate.formats.dataset import export_dataset, read_dataset, split_frames
from preannotate.frames import InMemoryFrames
from preannotate.shapes import FrameAnnotations, Shape, parse_label_list

from tests.conftest import FIXTURES, encode, photo
from tests.test_coco import assert_like_cvat

LABELS = parse_label_list("car,person:polygon,road:mask,sign:ellipse")


def road_bitmap(width: int = 80, height: int = 60) -> np.ndarray:
    """Rows 10..29, columns 20..49, with a hole."""
    bitmap = np.zeros((height, width), dtype=bool)
    bitmap[10:30, 20:50] = True
    bitmap[15:20, 30:35] = False
    return bitmap


def synthetic_frames():
    """Three frames (a JPEG 96x64 with boxes and a polygon, a PNG 80x60 with a mask, an ellipse and a box running
    off the image, an empty JPEG) with every shape type, two of them not exportable; and their images."""
    frames = [
        FrameAnnotations(0, 96, 64, "street/a.jpg", [
            Shape("car", "rectangle", [10.5, 8.25, 40, 28], attributes={"color": "red"}),
            Shape("car", "rectangle", [50, 10, 80, 30], rotation=30),
            Shape("person", "polygon", [5, 40, 30, 35, 25, 60]),
            Shape("car", "points", [1, 1]),
            Shape("bus", "rectangle", [1, 1, 5, 5]),
        ]),
        FrameAnnotations(1, 80, 60, "street/b.png", [
            Shape("road", "mask", masks.bitmap_to_cvat_rle(road_bitmap())),
            Shape("sign", "ellipse", [40, 30, 55, 22]),
            Shape("car", "rectangle", [70, 50, 100, 80]),
        ]),
        FrameAnnotations(2, 96, 64, "street/c.jpg"),
    ]
    images = {0: encode(photo(96, 64, 0)), 1: encode(photo(80, 60, 1), "PNG"), 2: encode(photo(96, 64, 2))}
    return frames, InMemoryFrames(images)


def _load(name):
    return json.loads((FIXTURES / name).read_text())


@pytest.fixture(scope="module")
def recorded_task():
    annotation_set = frames_from_annotations(_load("api/GET_api_tasks_ID_annotations.json"),
                                             _load("api/GET_api_labels__task_id=ID.json"),
                                             _load("api/GET_api_tasks_ID_data_meta.json"))
    with zipfile.ZipFile(FIXTURES / "data/GET_api_tasks_ID_data__type=chunk,number=0,quality=original.zip") as z:
        files = {i: z.read(name) for i, name in enumerate(sorted(z.namelist()))}  # 000000.jpg … = frames 0 …
    return annotation_set, files


# ------------------------------------------------------------------------------------------------------ split

def _tracked(task_count=2, frames=60, tracks=25, rng=None):
    """Frames of several tasks with random tracks (runs of frames, some with gaps), keys ``(task, frame)``."""
    rng = rng or random.Random(0)
    items = {}
    for task in range(task_count):
        for frame in range(frames):
            items[(task, frame)] = FrameAnnotations(frame, 10, 10)
        for track_id in range(tracks):
            start = rng.randrange(frames)
            for frame in range(start, min(frames, start + rng.randint(1, 6)), rng.choice((1, 1, 2))):
                items[(task, frame)].shapes.append(Shape("car", "rectangle", [0, 0, 1, 1], frame, track_id=track_id))
    return list(items.items())


def _track_sides(items, split):
    sides = {}
    val = set(split.get("val", ()))
    for key, frame in items:
        for shape in frame.shapes:
            sides.setdefault((key[0], shape.track_id), set()).add(key in val)
    return sides


def test_split_keeps_tracks_whole_and_is_near_the_fraction():
    rng = random.Random(1)
    for trial in range(30):  # property-style: random tracks, random fractions
        items = _tracked(rng=random.Random(trial))
        fraction = rng.choice((0.1, 0.2, 0.3, 0.5))
        split = split_frames(items, fraction, seed=trial)
        assert sorted(split["train"] + split["val"]) == sorted(k for k, _ in items)
        assert not set(split["train"]) & set(split["val"])
        assert all(len(sides) == 1 for sides in _track_sides(items, split).values())
        assert abs(len(split["val"]) / len(items) - fraction) < 0.03


def test_split_is_deterministic_and_independent_of_order():
    items = _tracked()
    split = split_frames(items, 0.25, seed=3)
    shuffled = list(items)
    random.Random(9).shuffle(shuffled)
    again = split_frames(shuffled, 0.25, seed=3)
    assert set(again["val"]) == set(split["val"]) and set(again["train"]) == set(split["train"])
    assert again["train"] == [k for k, _ in shuffled if k in set(split["train"])]  # keys keep the order given
    assert set(split_frames(items, 0.25, seed=4)["val"]) != set(split["val"])


def test_split_tracks_link_frames_only_within_a_task():
    items = [((task, f), FrameAnnotations(f, 10, 10, shapes=[Shape("car", "rectangle", [0, 0, 1, 1], track_id=7)]))
             for task in (1, 2) for f in range(10)]
    split = split_frames(items, 0.5)
    assert {key[0] for key in split["val"]} in ({1}, {2}) and len(split["val"]) == 10  # one whole task each


def test_split_edge_cases():
    items = [(f, FrameAnnotations(f, 10, 10)) for f in range(4)]
    assert split_frames(items, 0.0) == {"train": [0, 1, 2, 3]}
    assert len(split_frames(items, 0.05)["val"]) == 1  # a val split asked for is never empty when it can be
    one_track = [(f, FrameAnnotations(f, 10, 10, shapes=[Shape("car", "rectangle", [0, 0, 1, 1], track_id=1)]))
                 for f in range(4)]
    assert split_frames(one_track, 0.9) == {"train": [0, 1, 2, 3], "val": []}  # train is never emptied
    with pytest.raises(ValueError, match="repeat"):
        split_frames(items + items[:1], 0.2)
    with pytest.raises(ValueError, match="val_fraction"):
        split_frames(items, 1.0)


# ------------------------------------------------------------------------------------------------------- COCO

def test_coco_export_with_images_matches_cvat_export(recorded_task, tmp_path):
    annotation_set, files = recorded_task
    summary = export_dataset(tmp_path / "coco", "coco", annotation_set.labels, sorted(annotation_set.frames.items()),
                             InMemoryFrames(files), progress=False)
    ours = json.loads((tmp_path / "coco/annotations/instances_train.json").read_text())
    cvat = _load("export/instances_default.json")
    assert [(i["id"], i["file_name"], i["width"], i["height"]) for i in ours["images"]] == [
        (i["id"], i["file_name"], i["width"], i["height"]) for i in cvat["images"]]
    assert ours["categories"] == cvat["categories"]
    assert_like_cvat(ours, cvat)
    for frame, data in files.items():  # images written as CVAT gave them, under CVAT's frame names
        assert (tmp_path / "coco/images" / annotation_set.frames[frame].name).read_bytes() == data
    assert summary.frames == {"train": 6} and summary.objects == {"train": len(ours["annotations"])}
    assert summary.skipped == {"points": 1, "polyline": 1}


def test_coco_round_trip(tmp_path):
    frames, images = synthetic_frames()
    summary = export_dataset(tmp_path / "d", "coco", LABELS, [(f.frame, f) for f in frames], images,
                             val_fraction=0.3, seed=0, progress=False)
    assert summary.frames == {"train": 2, "val": 1} and summary.skipped == {"points": 1, "rectangle": 1}
    labels, splits = read_dataset(tmp_path / "d")
    assert labels == LABELS  # labels.json keeps the types
    read = {frame.frame: (frame, path) for items in splits.values() for frame, path in items}
    assert sorted(read) == [0, 1, 2]
    for original in frames:
        frame, path = read[original.frame]
        assert path.read_bytes() == images.files[original.frame]
        assert (frame.width, frame.height, frame.name) == (original.width, original.height, original.name)
    first, second = read[0][0].shapes, read[1][0].shapes
    assert [(s.label, s.type) for s in first] == [("car", "rectangle"), ("car", "rectangle"), ("person", "polygon")]
    assert first[0].points == [10.5, 8.25, 40, 28] and first[0].attributes == {"color": "red"}
    rotated = frames[0].shapes[1]  # written as its corners with its rotation, read back as the rotated rectangle
    assert np.allclose(first[1].points, rotated.points, atol=1e-3) and first[1].rotation == rotated.rotation
    assert first[2].points == frames[0].shapes[2].points
    assert [(s.label, s.type) for s in second] == [("road", "mask"), ("sign", "mask"), ("car", "rectangle")]
    assert np.array_equal(masks.cvat_rle_to_bitmap(second[0].points, 80, 60), road_bitmap())
    ellipse = masks.polygon_to_bitmap([frames[1].shapes[1].polygon()], 80, 60)
    assert np.array_equal(masks.cvat_rle_to_bitmap(second[1].points, 80, 60), ellipse)
    assert second[2].points == [70, 50, 80, 60]  # clipped to the image


def test_project_export_prefixes_tasks(tmp_path):
    frames, images = synthetic_frames()
    items = [((task, f.frame), f) for task in (3, 4) for f in frames]  # the same frame names in two tasks
    export_dataset(tmp_path / "d", "coco", LABELS, items, {3: images, 4: images}, progress=False)
    written = json.loads((tmp_path / "d/annotations/instances_train.json").read_text())
    names = [image["file_name"] for image in written["images"]]
    assert names == [f"task_{t}/street/{c}" for t in (3, 4) for c in ("a.jpg", "b.png", "c.jpg")]
    assert all((tmp_path / "d/images" / name).is_file() for name in names)


def test_annotations_only_and_guards(tmp_path):
    frames, images = synthetic_frames()
    video = FrameAnnotations(7, 96, 64, "frame_000007")
    export_dataset(tmp_path / "a", "coco", LABELS, [(f.frame, f) for f in frames], progress=False)
    assert not (tmp_path / "a/images").exists()
    export_dataset(tmp_path / "v", "coco", LABELS, [(7, video)], InMemoryFrames({7: images.files[0]}),
                   progress=False)
    assert (tmp_path / "v/images/frame_000007.jpg").is_file()  # a video frame gets its image's extension
    with pytest.raises(FileExistsError):
        export_dataset(tmp_path / "a", "coco", LABELS, [(f.frame, f) for f in frames], progress=False)
    with pytest.raises(ValueError, match="give images"):
        export_dataset(tmp_path / "t", "tfrecord", LABELS, [(f.frame, f) for f in frames], progress=False)
    small = FrameAnnotations(0, 20, 20, "a.jpg")
    with pytest.raises(ValueError, match="96x64 but CVAT says 20x20"):
        export_dataset(tmp_path / "s", "coco", LABELS, [(0, small)], images, progress=False)


# --------------------------------------------------------------------------------------------------- TFRecord

def test_tfrecord_round_trip(tmp_path):
    pytest.importorskip("tensorflow")
    frames, images = synthetic_frames()
    summary = export_dataset(tmp_path / "d", "tfrecord", LABELS, [(f.frame, f) for f in frames], images,
                             val_fraction=0.3, num_shards=2, masks=False, progress=False)
    assert sorted(p.name for p in summary.files if "record" in p.name) == [
        "train.record-00000-of-00002", "train.record-00001-of-00002", "val.record-00000-of-00001"]
    labels, splits = read_dataset(tmp_path / "d")
    assert labels == LABELS and sorted(splits) == ["train", "val"]
    read = {frame.frame: (frame, image) for items in splits.values() for frame, image in items}
    for original in frames:
        frame, image = read[original.frame]
        assert image() == images.files[original.frame]
        assert (frame.width, frame.height, frame.name) == (original.width, original.height, original.name)
        kept = [s for s in original.shapes if s.type != "points" and s.label != "bus"]
        assert [s.label for s in frame.shapes] == [s.label for s in kept]
        for shape, before in zip(frame.shapes, kept, strict=True):
            x1, y1, x2, y2 = before.bbox()
            if before.type != "ellipse":  # ellipses are boxed by their pixels
                expected = [max(0, x1), max(0, y1), min(frame.width, x2), min(frame.height, y2)]
                assert shape.type == "rectangle" and np.allclose(shape.points, expected, atol=1e-4)
    (tmp_path / "d/labels.json").unlink()  # without it, the names come from label_map.pbtxt
    assert [label.name for label in read_dataset(tmp_path / "d")[0]] == [label.name for label in LABELS]


def test_tfrecord_with_masks_reads_back_masks(tmp_path):
    pytest.importorskip("tensorflow")
    frames, images = synthetic_frames()
    summary = export_dataset(tmp_path / "d", "tfrecord", LABELS, [(f.frame, f) for f in frames], images,
                             progress=False)
    assert summary.masks  # polygons, masks and ellipses are present
    _, splits = read_dataset(tmp_path / "d")
    frame = next(f for f, _ in splits["train"] if f.frame == 1)
    assert [s.type for s in frame.shapes] == ["mask"] * 3
    assert np.array_equal(masks.cvat_rle_to_bitmap(frame.shapes[0].points, 80, 60), road_bitmap())


def test_read_dataset_rejects_other_folders(tmp_path):
    with pytest.raises(ValueError, match="holds no dataset"):
        read_dataset(tmp_path)


def demo_output(root):
    """What `make demo` leaves: a store (versions, jobs, staging), a run, held-out frames, pictures and JSON."""
    files = ["demo.png", "predictions.json", "held-out/frame_000.png", "run/report.png", "run/last.pt",
             "store/demo/SERVING", "store/demo/v1/manifest.json", "store/demo/v1/model.pt",
             "store/demo/v1/report.png", "store/.jobs/20250101-000000-abcdef/job.json", "store/.staging/.keep"]
    for name in files:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix == ".png":
            photo(32, 24).save(path)
        else:
            path.write_text("{}")
    return root


@pytest.mark.parametrize("where", ["", "store", "held-out", "run"])
def test_a_folder_that_is_no_dataset_is_refused_naming_the_layouts(tmp_path, where):
    """Not read as an ImageNet-style folder whose subfolders (.jobs, .staging, demo ...) would be tag classes."""
    folder = demo_output(tmp_path / "demo-output") / where
    with pytest.raises(ValueError) as refused:
        read_dataset(folder)
    message = str(refused.value)
    assert message.startswith(f"{folder} holds no dataset: a COCO folder (annotations/instances_<split>.json")
    assert "TFRecords (<split>.record-* with label_map.pbtxt)" in message
    assert "ImageNet-style folder of tags (<split>/<label>/<image>" in message


def test_hidden_files_and_folders_are_no_tags(tmp_path):
    for path in ("train/cat/a.jpg", "train/dog/task_1/b.jpg", "val/cat/c.jpg", "train/.ipynb_checkpoints/d.jpg",
                 "train/cat/.thumbs/e.jpg"):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        photo(32, 24).save(tmp_path / path)
    (tmp_path / "train" / ".DS_Store").write_bytes(b"\0")
    (tmp_path / ".git").mkdir()
    labels, splits = read_dataset(tmp_path)
    assert [label.name for label in labels] == ["cat", "dog"]
    assert {split: sorted((f.name, *f.tags) for f, _ in pairs) for split, pairs in splits.items()} == {
        "train": [("a.jpg", "cat"), ("task_1/b.jpg", "dog")], "val": [("c.jpg", "cat")]}
