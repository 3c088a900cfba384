"""COCO keypoints, field for field against what CVAT 2.42's *COCO Keypoints 1.0* export writes for the same task
(``fixtures/coco-keypoints``: ``task.json`` run through Datumaro's converter by ``make_cvat_export.py``), read back,
and imported into a task through the CVAT double."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from cvat_sdk import make_client
from preannotate.cvat.annotations import frames_from_annotations
from preannotate.cvat.upload import import_file
from preannotate.formats import coco
from preannotate.shapes import KEYPOINT_SIGMA, FrameAnnotations, Label, Shape, skeleton_edges, skeleton_svg

from tests.conftest import encode, photo

HERE = Path(__file__).parent / "fixtures" / "coco-keypoints"
TASK = json.loads((HERE / "task.json").read_text())
CVAT = json.loads((HERE / "cvat_person_keypoints.json").read_text())
STATE = {"visible": (False, False), "occluded": (False, True), "outside": (True, False)}  # (outside, occluded)


def our_labels() -> list[Label]:
    labels = []
    for position, label in enumerate(TASK["labels"], start=1):
        if label["type"] == "skeleton":
            labels.append(Label(label["name"], "skeleton", id=position, svg=label["svg"],
                                sublabels=tuple(Label(name, "points") for name in label["sublabels"])))
        else:
            labels.append(Label(label["name"], label["type"], id=position))
    return labels


def our_frames() -> list[tuple[FrameAnnotations, str]]:
    pairs = []
    for frame in TASK["frames"]:
        shapes = []
        for shape in frame["shapes"]:
            elements = [Shape(e["label"], "points", e["points"], outside=STATE[e["state"]][0],
                              occluded=STATE[e["state"]][1]) for e in shape.get("elements", [])]
            shapes.append(Shape(shape["label"], shape["type"], [] if elements else shape["points"],
                                attributes=shape.get("attributes", {}), occluded=shape.get("occluded", False),
                                elements=elements))
        pairs.append((FrameAnnotations(frame["frame"], frame["width"], frame["height"], frame["name"], shapes),
                      frame["name"]))
    return pairs


def test_skeletons_are_written_as_cvats_coco_keypoints_export_writes_them():
    ours = coco.to_coco_keypoints(our_frames(), our_labels())
    by_name = {c["name"]: c for c in ours["categories"]}
    for theirs in CVAT["categories"]:
        mine = by_name[theirs["name"]]
        assert mine["supercategory"] == theirs["supercategory"]
        assert sorted(mine["skeleton"]) == sorted(theirs["skeleton"])
        assert mine["keypoints"] == (theirs["keypoints"] or (["pin"] if theirs["name"] == "pin" else []))
    assert [c["id"] for c in CVAT["categories"]] == [1, 5, 6]  # CVAT counts the dog's 3 parts
    assert [c["id"] for c in ours["categories"]] == [1, 2, 3]  # ours: the labels 1..N, as our instances file
    assert [{k: image[k] for k in ("id", "width", "height", "file_name")} for image in ours["images"]] == [
        {k: image[k] for k in ("id", "width", "height", "file_name")} for image in CVAT["images"]]
    skeletons = [a for a in ours["annotations"] if a["category_id"] == by_name["dog"]["id"]]
    assert len(skeletons) == len(CVAT["annotations"]) == 2
    for mine, theirs in zip(skeletons, CVAT["annotations"], strict=True):
        assert {k: v for k, v in mine.items() if k != "category_id"} == {
            k: v for k, v in theirs.items() if k != "category_id"}
    pin, = [a for a in ours["annotations"] if a["category_id"] == by_name["pin"]["id"]]  # CVAT leaves points out
    assert (pin["keypoints"], pin["num_keypoints"], pin["bbox"]) == ([4.0, 5.0, 2], 1, [4.0, 5.0, 0.0, 0.0])


def test_cvats_keypoints_file_reads_back_as_skeletons():
    labels, pairs = coco.from_coco(CVAT)
    dog = labels[0]
    assert (dog.name, dog.type, [s.name for s in dog.sublabels]) == ("dog", "skeleton", ["nose", "back", "tail"])
    assert sorted(skeleton_edges(dog)) == [(1, 2), (2, 3)]
    assert [(label.name, label.type) for label in labels[1:]] == [("pin", "any"), ("car", "any")]
    first = pairs[0][0].shapes[0]
    assert (first.type, first.attributes, first.occluded) == ("skeleton", {"breed": "husky"}, False)
    assert [(e.label, e.points, e.outside, e.occluded) for e in first.elements] == [
        ("nose", [10.5, 12.25], False, False), ("back", [30.0, 20.0], False, True), ("tail", [55.0, 40.0], True, False)]


def test_our_keypoints_file_reads_back_whole():
    pairs = our_frames()
    labels, back = coco.from_coco(json.loads(json.dumps(coco.to_coco_keypoints(pairs, our_labels()))))
    assert [(label.name, label.type) for label in labels] == [("dog", "skeleton"), ("pin", "points"), ("car", "any")]
    shapes = back[0][0].shapes
    assert [s.type for s in shapes] == ["skeleton", "skeleton", "points"]
    assert shapes[2].points == [4.0, 5.0]
    original = [s for s in pairs[0][0].shapes if s.type == "skeleton"]
    assert [[(e.label, e.points, e.outside, e.occluded) for e in s.elements] for s in shapes[:2]] == [
        [(e.label, [round(p, 2) for p in e.points], e.outside, e.occluded) for e in s.elements] for s in original]


def test_points_shapes_of_several_points_and_other_labels_are_counted_not_written():
    skipped: Counter[str] = Counter()
    frame = FrameAnnotations(0, 10, 10, shapes=[Shape("pin", "points", [1, 2, 3, 4]), Shape("cat", "skeleton", [])])
    dataset = coco.to_coco_keypoints([(frame, "a.png")], [Label("pin", "points", id=1)], skipped)
    assert dataset["annotations"] == [] and skipped == {"points": 1, "skeleton": 1}


def test_a_keypoints_annotation_that_does_not_fit_its_category_is_named():
    category = {"id": 1, "name": "dog", "keypoints": ["nose", "tail"], "skeleton": [[1, 2]]}
    item = {"image_id": 1, "category_id": 1, "keypoints": [1, 2, 2]}
    with pytest.raises(ValueError, match=r"a.json: annotation #1: its keypoints are not \[x, y, v\] for each of its "
                                         r"category's 2 keypoints"):
        coco.read_shapes([item], "annotation", "a.json", lambda c: "dog", {1: (0, 10, 10)},
                         keypoints=coco.dataset_keypoints({"categories": [category]}))


def test_cvats_keypoints_file_imports_into_a_task_as_skeletons(cvat_double, tmp_path):
    frames = [(frame["name"], encode(photo(frame["width"], frame["height"])), frame["width"], frame["height"])
              for frame in TASK["frames"]]
    dog = TASK["labels"][0]
    task_id = cvat_double.add_task("import", frames, [
        {"name": "dog", "type": "skeleton", "svg": skeleton_svg(dog["sublabels"], [(1, 2), (2, 3)]),
         "sublabels": [{"name": name} for name in dog["sublabels"]], "attributes": [
             {"name": "breed", "input_type": "text", "values": [""]}]},
        {"name": "car", "type": "rectangle"}])
    path = tmp_path / "person_keypoints_default.json"
    path.write_text(json.dumps(CVAT))
    with make_client(cvat_double.base_url, credentials=cvat_double.credentials) as client:
        report = import_file(client, task_id, path, "coco", state_dir=tmp_path)
        task = client.tasks.retrieve(task_id)
        read = frames_from_annotations(task.get_annotations(), task.get_labels(), task.get_meta())
    assert report.created == 2
    husky, pug = sorted(read.frames[0].shapes, key=lambda s: s.attributes["breed"])
    assert husky.source == "auto" and husky.attributes == {"breed": "husky"}
    assert [(e.label, e.points, e.outside) for e in husky.elements] == [
        ("nose", [10.5, 12.25], False), ("back", [30.0, 20.0], False), ("tail", [55.0, 40.0], True)]
    assert [e.points for e in pug.elements] == [[60.0, 10.0], [70.5, 15.5], [90.0, 33.33]]


# --- TFRecord ---------------------------------------------------------------------------------------------------

def test_tfrecord_carries_every_objects_keypoints_as_the_tf_od_api_reads_them():
    pytest.importorskip("tensorflow")
    from preannotate.formats import tfrecord

    labels = our_labels()
    frame, name = our_frames()[0]
    image = encode(photo(frame.width, frame.height))
    example = tfrecord.frame_example(frame, image, labels, filename=name, source_id="0", with_masks=True)
    feature = example.features.feature

    def values(key, kind="float_list"):
        return list(getattr(feature[f"image/object/keypoint/{key}"], kind).value)

    # 4 objects (husky, car, pug, pin), each with all 4 keypoints: the dog's 3, then the pin's 1
    assert [t.decode() for t in feature["image/object/class/text"].bytes_list.value] == ["dog", "car", "dog", "pin"]
    assert [t.decode() for t in values("text", "bytes_list")] == ["nose", "back", "tail", "pin"] * 4
    assert values("visibility", "int64_list") == [2, 1, 0, 0, 0, 0, 0, 0, 2, 2, 2, 0, 0, 0, 0, 2]
    assert values("num", "int64_list") == [2, 0, 3, 1]
    assert values("x")[:3] == pytest.approx([10.5 / 96, 30 / 96, 55 / 96])
    assert values("y")[-1] == pytest.approx(5 / 64)
    xmin = list(feature["image/object/bbox/xmin"].float_list.value)
    assert xmin[0] == pytest.approx(10.5 / 96) and len(feature["image/object/mask"].bytes_list.value) == 4
    read, _, _ = tfrecord.parse_example(example.SerializeToString(), labels)
    assert [s.type for s in read.shapes] == ["skeleton", "mask", "skeleton", "points"]
    husky = read.shapes[0]
    assert [(e.label, e.outside, e.occluded) for e in husky.elements] == [("nose", False, False),
                                                                          ("back", False, True), ("tail", True, False)]
    assert husky.elements[0].points == pytest.approx([10.5, 12.25], abs=1e-4)
    assert read.shapes[3].points == pytest.approx([4.0, 5.0], abs=1e-4)


def test_tfrecord_without_keypoint_labels_has_no_keypoint_keys():
    pytest.importorskip("tensorflow")
    from preannotate.formats import tfrecord

    frame = FrameAnnotations(0, 32, 32, shapes=[Shape("car", "rectangle", [1, 1, 9, 9])])
    example = tfrecord.frame_example(frame, encode(photo(32, 32)), [Label("car", "rectangle")], filename="a.jpg",
                                     source_id="0")
    assert not [key for key in example.features.feature if "keypoint" in key]


def test_predicted_skeletons_are_keypoint_results_pycocotools_evaluates():
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    labels = our_labels()
    truth = coco.to_coco_keypoints(our_frames(), labels)
    ground = COCO()
    ground.dataset = truth
    ground.createIndex()
    predicted = [(image_id, frame) for image_id, (frame, _) in enumerate(our_frames(), start=1)]
    for _, frame in predicted:
        for shape in frame.shapes:
            shape.score = 0.9
    results = coco.to_keypoint_results(predicted, labels)
    assert [r["category_id"] for r in results] == [1, 1, 2]
    dog = [label.id for label in labels if label.name == "dog"]
    evaluation = COCOeval(ground, ground.loadRes(results), "keypoints")
    evaluation.params.catIds = dog
    evaluation.params.kpt_oks_sigmas = np.full(3, KEYPOINT_SIGMA)
    evaluation.evaluate()
    evaluation.accumulate()
    evaluation.summarize()
    assert evaluation.stats[0] == pytest.approx(1.0)  # the truth, predicted: AP 1
