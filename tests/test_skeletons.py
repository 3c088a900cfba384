"""Skeletons and points on every path a shape takes: CVAT's label API and annotation JSON (read), its PATCH
(written), a detector function's response (the contract), and the lambda manager's conversion in the CVAT double.

The JSON of a skeleton label and of a stored skeleton is what CVAT 2.42's serializers emit (``LabelSerializer``
with nested ``SublabelSerializer``, the svg stored with ``data-label-id``; ``LabeledShapeSerializerFromDB`` with
``elements``), built from its source (cvat/apps/engine/serializers.py): no skeleton was recorded."""

from __future__ import annotations

import pytest
from cvat_sdk import make_client
from preannotate.cvat import encoding
from preannotate.cvat.annotations import frames_from_annotations, read_labels
from preannotate.cvat.upload import TaskWriter
from preannotate.serving.contract import response_to_shapes, shapes_to_response
from preannotate.shapes import (
    Label,
    Shape,
    as_skeleton,
    from_skeleton,
    keypoint_names,
    skeleton_edges,
    skeleton_svg,
)

from tests.conftest import encode, photo

SVG_WITH_IDS = ('<line x1="20" y1="20" x2="50" y2="40" data-type="edge" data-node-from="1" data-node-to="2"></line>\n'
                '<line x1="50" y1="40" x2="80" y2="60" data-type="edge" data-node-from="2" data-node-to="3"></line>\n'
                '<circle r="0.75" cx="20" cy="20" data-type="element node" data-element-id="1" data-node-id="1" '
                'data-label-id="31"></circle>\n'
                '<circle r="0.75" cx="50" cy="40" data-type="element node" data-element-id="2" data-node-id="2" '
                'data-label-id="32"></circle>\n'
                '<circle r="0.75" cx="80" cy="60" data-type="element node" data-element-id="3" data-node-id="3" '
                'data-label-id="33"></circle>')


def part(label_id: int, name: str) -> dict:
    return {"id": label_id, "name": name, "color": "#aabbcc", "attributes": [], "type": "points", "has_parent": True}


DOG = {"id": 30, "name": "dog", "color": "#112233", "attributes": [], "type": "skeleton", "svg": SVG_WITH_IDS,
       "sublabels": [part(31, "nose"), part(32, "back"), part(33, "tail")], "task_id": 8, "parent_id": None,
       "has_parent": False}
PIN = {"id": 34, "name": "pin", "color": "#445566", "attributes": [], "type": "points", "sublabels": [], "task_id": 8,
       "parent_id": None, "has_parent": False}
LABELS = [DOG, PIN]
META = {"size": 2, "frames": [{"width": 100, "height": 80, "name": "a.png"}, {"width": 100, "height": 80,
                                                                           "name": "b.png"}], "deleted_frames": []}


def stored_point(shape_id: int, label_id: int, x: float, y: float, frame: int = 0, outside: bool = False,
                 occluded: bool = False) -> dict:
    return {"id": shape_id, "label_id": label_id, "type": "points", "frame": frame, "group": 0, "source": "manual",
            "occluded": occluded, "outside": outside, "z_order": 0, "rotation": 0.0, "points": [x, y],
            "attributes": []}


def stored_skeleton(elements: list[dict], frame: int = 0) -> dict:
    return {"id": 40, "label_id": 30, "type": "skeleton", "frame": frame, "group": 0, "source": "manual",
            "occluded": False, "outside": False, "z_order": 0, "rotation": 0.0, "points": [], "attributes": [],
            "elements": elements}


# --- the vocabulary ---------------------------------------------------------------------------------------------

def test_a_skeleton_label_is_read_with_its_keypoints_and_its_drawing_named():
    dog, pin = read_labels(LABELS)
    assert (dog.name, dog.type, dog.id) == ("dog", "skeleton", 1)
    assert [(s.name, s.type, s.id) for s in dog.sublabels] == [("nose", "points", None), ("back", "points", None),
                                                               ("tail", "points", None)]
    assert 'data-label-name="nose"' in dog.svg and "data-label-id" not in dog.svg  # CVAT's ids are per server
    assert skeleton_edges(dog) == [(1, 2), (2, 3)]
    assert keypoint_names(dog) == ("nose", "back", "tail") and keypoint_names(pin) == ("pin",)
    assert read_labels([DOG, {**part(31, "nose"), "parent_id": 30}]) == [dog]  # a part listed alone is no label


def test_edges_follow_the_nodes_names_not_their_order_in_the_drawing():
    # The drawing lists the tail's node first: its edge still joins the keypoints by name.
    svg = ('<line data-node-from="7" data-node-to="9"></line>'
           '<circle data-node-id="9" data-label-name="nose"></circle>'
           '<circle data-node-id="7" data-label-name="tail"></circle>')
    dog = Label("dog", "skeleton", sublabels=(Label("nose", "points"), Label("tail", "points")), svg=svg)
    assert skeleton_edges(dog) == [(2, 1)]
    made = Label("dog", "skeleton", sublabels=dog.sublabels, svg=skeleton_svg(["nose", "tail"], [(1, 2)]))
    assert skeleton_edges(made) == [(1, 2)]
    with pytest.raises(ValueError, match=r"the skeleton edge \(1, 3\) joins keypoints it does not have \(1 to 2\)"):
        skeleton_svg(["nose", "tail"], [(1, 3)])


def test_a_points_label_is_learned_as_a_skeleton_of_one_keypoint():
    pin = Shape("pin", "points", [5.0, 6.0], frame=3, occluded=True, score=0.7)
    skeleton = as_skeleton(pin)
    assert (skeleton.type, skeleton.points, skeleton.frame) == ("skeleton", [], 3)
    assert [(e.label, e.points, e.occluded) for e in skeleton.elements] == [("pin", [5.0, 6.0], True)]
    back = from_skeleton(skeleton, Label("pin", "points"))
    assert (back.type, back.points, back.occluded, back.score) == ("points", [5.0, 6.0], True, 0.7)
    hidden = Shape("pin", "skeleton", [], elements=[Shape("pin", "points", [1.0, 1.0], outside=True)])
    assert from_skeleton(hidden, Label("pin", "points")) is None  # a hidden point is no point
    with pytest.raises(ValueError, match="holds 3 points: a model learns one point per points shape"):
        as_skeleton(Shape("pin", "points", [1, 2, 3, 4, 5, 6]))


# --- read ---------------------------------------------------------------------------------------------------

def test_a_stored_skeleton_is_read_with_its_keypoints_in_the_labels_order():
    # CVAT lists elements in any order and may lack one (a skeleton drawn before a part was added to the label).
    skeleton = stored_skeleton([stored_point(43, 33, 80, 60, outside=True), stored_point(41, 31, 20, 20),
                                stored_point(42, 32, 50, 40, occluded=True)])
    result = frames_from_annotations({"shapes": [skeleton, {**stored_point(44, 34, 7, 8)}]}, LABELS, META)
    dog, pin = result.frames[0].shapes
    assert (dog.label, dog.type, dog.points) == ("dog", "skeleton", [])
    assert [(e.label, e.points, e.outside, e.occluded) for e in dog.elements] == [
        ("nose", [20.0, 20.0], False, False), ("back", [50.0, 40.0], False, True),
        ("tail", [80.0, 60.0], True, False)]
    assert (pin.label, pin.type, pin.points) == ("pin", "points", [7.0, 8.0])
    assert dog.bbox() == (20.0, 20.0, 50.0, 40.0)  # its visible keypoints
    lacking = stored_skeleton([stored_point(41, 31, 20, 20), stored_point(43, 33, 40, 30)])
    filled = frames_from_annotations({"shapes": [lacking]}, LABELS, META).frames[0].shapes[0]
    assert [(e.label, e.points, e.outside) for e in filled.elements] == [
        ("nose", [20.0, 20.0], False), ("back", [30.0, 25.0], True), ("tail", [40.0, 30.0], False)]


def test_a_skeleton_track_is_interpolated_keypoint_by_keypoint():
    def key(frame, points, kind="points", outside=False):
        return {"type": kind, "frame": frame, "points": points, "outside": outside, "rotation": 0.0,
                "occluded": False, "z_order": 0, "attributes": []}

    def part_track(label_id, *keyframes):
        return {"id": label_id * 10, "label_id": label_id, "frame": 0, "group": 0, "source": "manual",
                "shapes": list(keyframes), "attributes": []}

    track = {"id": 9, "label_id": 30, "frame": 0, "group": 0, "source": "manual", "attributes": [],
             "shapes": [key(0, [], "skeleton"), key(2, [], "skeleton")],
             "elements": [part_track(31, key(0, [0, 0]), key(2, [20, 10])),
                          part_track(32, key(0, [10, 10]), key(1, [10, 10], outside=True)),
                          part_track(33, key(0, [30, 30]), key(2, [30, 50]))]}
    meta = {**META, "size": 3, "frames": META["frames"] + [META["frames"][0]]}
    frames = frames_from_annotations({"tracks": [track]}, LABELS, meta).frames
    on = {n: frames[n].shapes[0] for n in frames}
    assert [(e.points, e.outside) for e in on[1].elements] == [([10.0, 5.0], False), ([10.0, 10.0], True),
                                                                ([30.0, 40.0], False)]
    assert all(s.track_id == 9 and s.type == "skeleton" for s in on.values())


# --- written -------------------------------------------------------------------------------------------------

SUBLABEL_IDS = {"nose": 31, "back": 32, "tail": 33}


def dog_shape(*elements: Shape, score: float | None = 0.9) -> Shape:
    return Shape("dog", "skeleton", [], score=score, elements=list(elements))


def test_a_skeleton_is_written_with_one_element_per_sublabel():
    shape = dog_shape(Shape("tail", "points", [80, 60], outside=True), Shape("nose", "points", [20, 20]),
                      Shape("paw", "points", [1, 1]))  # a part the task's skeleton lacks is left out
    body = encoding.labeled_shape(shape, frame=4, label_id=30, label_type="skeleton", sublabel_ids=SUBLABEL_IDS)
    assert (body["type"], body["points"], body["source"]) == ("skeleton", [], "auto")
    assert [(e["label_id"], e["type"], e["points"], e["outside"], e["frame"]) for e in body["elements"]] == [
        (31, "points", [20.0, 20.0], False, 4), (32, "points", [50.0, 40.0], True, 4),  # missing: at the centroid
        (33, "points", [80.0, 60.0], True, 4)]
    hidden = dog_shape(Shape("nose", "points", [1, 1], outside=True))
    assert encoding.labeled_shape(hidden, frame=0, label_id=30, sublabel_ids=SUBLABEL_IDS) is None  # CVAT drops it
    assert encoding.labeled_shape(shape, frame=0, label_id=30) is None  # a label with no parts takes no skeleton


def test_the_contract_carries_every_keypoint_and_reads_cvats_own_skeleton_function():
    shape = dog_shape(Shape("nose", "points", [20, 20]), Shape("tail", "points", [80, 60], outside=True))
    item, point = shapes_to_response([shape, Shape("pin", "points", [3, 4], score=0.5)])
    assert item == {"confidence": "0.9000", "label": "dog", "type": "skeleton", "attributes": [],
                    "elements": [{"label": "nose", "type": "points", "points": [20.0, 20.0], "outside": False},
                                 {"label": "tail", "type": "points", "points": [80.0, 60.0], "outside": True}]}
    assert point == {"confidence": "0.5000", "label": "pin", "type": "points", "attributes": [], "points": [3.0, 4.0]}
    back = response_to_shapes([item])[0]
    assert [(e.label, e.points, e.outside) for e in back.elements] == [("nose", [20.0, 20.0], False),
                                                                      ("tail", [80.0, 60.0], True)]
    # serverless/pytorch/mmpose/hrnet32/nuclio/main.py answers so (outside as 0/1, a confidence per element)
    hrnet = {"confidence": "0.8", "label": "body", "type": "skeleton",
             "elements": [{"label": "1", "type": "points", "outside": 0, "points": [1.5, 2.5], "confidence": "0.9"},
                          {"label": "2", "type": "points", "outside": 1, "points": [3.0, 4.0], "confidence": "0.1"}]}
    body = response_to_shapes([hrnet], frame=2)[0]
    assert (body.type, body.score, body.frame) == ("skeleton", 0.8, 2)
    assert [(e.label, e.points, e.outside) for e in body.elements] == [("1", [1.5, 2.5], False),
                                                                      ("2", [3.0, 4.0], True)]


@pytest.fixture
def skeleton_task(cvat_double):
    frames = [(f"f{i}.png", encode(photo(100, 80, seed=i)), 100, 80) for i in range(2)]
    svg = SVG_WITH_IDS.replace('data-label-id="31"', 'data-label-name="nose"').replace(
        'data-label-id="32"', 'data-label-name="back"').replace('data-label-id="33"', 'data-label-name="tail"')
    labels = [{"name": "dog", "type": "skeleton", "svg": svg,
               "sublabels": [{"name": "nose"}, {"name": "back"}, {"name": "tail"}]},
              {"name": "pin", "type": "points"}]
    return cvat_double.add_task("skeletons", frames, labels)


def test_the_double_keeps_skeleton_labels_as_cvat_does(cvat_double, skeleton_task):
    with make_client(cvat_double.base_url, credentials=cvat_double.credentials) as client:
        labels = [label.to_dict() for label in client.tasks.retrieve(skeleton_task).get_labels()]
    assert [label["name"] for label in labels] == ["dog", "pin"]  # the parts are nested, not listed
    dog = labels[0]
    assert [(s["name"], s["type"], s["has_parent"]) for s in dog["sublabels"]] == [
        ("nose", "points", True), ("back", "points", True), ("tail", "points", True)]
    assert f'data-label-id="{dog["sublabels"][0]["id"]}"' in dog["svg"] and "data-label-name" not in dog["svg"]
    assert skeleton_edges(read_labels(labels)[0]) == [(1, 2), (2, 3)]


def test_skeletons_and_points_round_trip_through_cvat_and_a_rerun_replaces_them(cvat_double, skeleton_task):
    dog = dog_shape(Shape("nose", "points", [20, 20]), Shape("back", "points", [50, 40], occluded=True),
                    Shape("tail", "points", [80, 60], outside=True))
    pin = Shape("pin", "points", [7, 8], score=0.6)
    with make_client(cvat_double.base_url, credentials=cvat_double.credentials) as client:
        report = TaskWriter(client, skeleton_task).write({0: [dog, pin]})
        assert report.created == 2 and not report.unmapped
        stored = cvat_double.annotations(skeleton_task)["shapes"]
        skeleton = next(s for s in stored if s["type"] == "skeleton")
        assert skeleton["points"] == [] and len({e["id"] for e in skeleton["elements"]}) == 3
        assert all(set(e) >= {"id", "label_id", "type", "frame", "outside", "points"} and "elements" not in e
                   for e in skeleton["elements"])
        task = client.tasks.retrieve(skeleton_task)
        read = frames_from_annotations(task.get_annotations(), task.get_labels(), task.get_meta())
        dog_read, pin_read = sorted(read.frames[0].shapes, key=lambda s: s.type, reverse=True)
        assert [(e.label, e.points, e.occluded, e.outside) for e in dog_read.elements] == [
            ("nose", [20.0, 20.0], False, False), ("back", [50.0, 40.0], True, False),
            ("tail", [80.0, 60.0], False, True)]
        assert (pin_read.type, pin_read.points) == ("points", [7.0, 8.0])
        moved = dog_shape(Shape("nose", "points", [25, 25]), Shape("back", "points", [55, 45]))
        again = TaskWriter(client, skeleton_task).write({0: [moved]})
        assert (again.deleted, again.created) == (2, 1)
        task = client.tasks.retrieve(skeleton_task)
        read = frames_from_annotations(task.get_annotations(), task.get_labels(), task.get_meta())
    (only,) = read.frames[0].shapes
    assert [(e.points, e.outside) for e in only.elements] == [([25.0, 25.0], False), ([55.0, 45.0], False),
                                                              ([40.0, 35.0], True)]


def test_the_lambda_manager_fills_missing_keypoints_and_drops_hidden_skeletons(cvat_double, skeleton_task):
    task = cvat_double.tasks[skeleton_task]
    spec = [Label("dog", "skeleton", sublabels=(Label("nose", "points"), Label("tail", "points"))).to_dict(),
            Label("pin", "points").to_dict(), Label("other", "rectangle").to_dict()]
    from tests.cvat_double import LambdaFunction

    mapping = cvat_double._lambda_mapping(LambdaFunction("f", "http://x", spec), task)
    assert set(mapping) == {"dog", "pin"} and set(mapping["dog"]["sublabels"]) == {"nose", "tail"}
    items = shapes_to_response([dog_shape(Shape("nose", "points", [10, 10]), Shape("tail", "points", [30, 20])),
                                dog_shape(Shape("nose", "points", [1, 1], outside=True)),
                                Shape("pin", "points", [3, 4])])
    converted = cvat_double._lambda_convert(task, mapping, 1, items)["shapes"]
    assert [s["type"] for s in converted] == ["skeleton", "points"]  # the all-outside skeleton is dropped
    assert [(e["points"], e["outside"]) for e in converted[0]["elements"]] == [
        ([10.0, 10.0], False), ([20.0, 15.0], True), ([30.0, 20.0], False)]  # back: not returned, at the centroid


# --- the function's spec ----------------------------------------------------------------------------------------

def test_the_spec_lists_skeletons_with_their_parts_for_a_keypoint_model_only():
    from preannotate.cvat import lambda_spec
    from preannotate.functions import validate_label_spec

    project = read_labels(LABELS) + [Label("car", "rectangle"), Label("thing", "any")]
    listed, impossible = lambda_spec.spec_labels(project, "skeleton")
    assert [(label.name, label.type) for label in listed] == [("dog", "skeleton"), ("pin", "points")]
    assert [label.name for label in impossible] == ["car", "thing"]  # a skeleton maps to no "any" label
    dog = listed[0].to_dict()
    assert [(part["name"], part["type"]) for part in dog["sublabels"]] == [("nose", "points"), ("back", "points"),
                                                                           ("tail", "points")]
    assert dog["svg"] == project[0].svg and 'data-label-name="tail"' in dog["svg"]
    assert validate_label_spec(lambda_spec.spec_text(listed)) == []
    boxes, impossible = lambda_spec.spec_labels(project, "rectangle")
    assert [label.name for label in boxes] == ["car", "thing"]
    assert [label.name for label in impossible] == ["dog", "pin"]
    assert lambda_spec.label_types("skeleton") == ("skeleton", "points")
    with pytest.raises(ValueError, match="no model returns 'keypoints' shapes"):
        lambda_spec.fills("keypoints")


def test_a_skeleton_spec_without_its_parts_or_drawing_is_refused():
    from preannotate.functions import validate_label_spec

    problems = validate_label_spec('[{"name": "dog", "type": "skeleton"}]')
    assert problems == ["spec label 'dog': a skeleton needs 'svg': CVAT would hide every model",
                        "spec label 'dog': a skeleton needs 'sublabels': CVAT would hide every model"]
    twice = '[{"name": "dog", "type": "skeleton", "svg": "", "sublabels": [{"name": "a"}, {"name": "a"}]}]'
    assert validate_label_spec(twice) == ["spec label 'dog': a sublabel name appears twice: CVAT skips the function"]


# --- review work -------------------------------------------------------------------------------------------------

def test_skeletons_and_points_are_matched_by_keypoint_similarity_in_the_edit_count():
    from preannotate.shapes import keypoint_similarity
    from preannotate.training.edits import review_frame

    truth = [dog_shape(Shape("nose", "points", [20, 20]), Shape("back", "points", [50, 40]),
                       Shape("tail", "points", [80, 60], outside=True), score=None),
             Shape("pin", "points", [10, 10])]
    near = dog_shape(Shape("nose", "points", [21, 21]), Shape("back", "points", [51, 39]),
                     Shape("tail", "points", [0, 0]))  # the hidden tail is not judged
    loose = dog_shape(Shape("nose", "points", [22, 23]), Shape("back", "points", [53, 38]))
    assert keypoint_similarity([near, loose], truth[:1])[:, 0] == pytest.approx([0.954, 0.736], abs=0.001)
    point = Shape("pin", "points", [11, 10], score=0.8)  # a box IoU would never match a point (it has no area)
    assert review_frame(truth, [near, point]).edits(2).total == 0
    review = review_frame(truth, [loose, point])
    assert (review.false, review.missed, review.loose) == ([], [], [0])  # one keypoint to drag: a move
    far = Shape("pin", "points", [40, 40], score=0.8)
    review = review_frame(truth, [near, far])
    assert (review.false, review.missed) == ([1], [1])  # the far point: a delete and an add


def test_a_projects_skeleton_reaches_the_spec_with_its_parts(cvat_double):
    from preannotate.cvat import lambda_spec
    from preannotate.deploy import project_labels

    project = cvat_double.add_project("poses", [
        {"name": "dog", "type": "skeleton", "svg": skeleton_svg(["nose", "tail"], [(1, 2)]),
         "sublabels": [{"name": "nose"}, {"name": "tail"}]}, {"name": "car", "type": "rectangle"}])
    with make_client(cvat_double.base_url, credentials=cvat_double.credentials) as client:
        labels = project_labels(client, project)
    assert [(label.name, label.type, label.id) for label in labels] == [("dog", "skeleton", None),
                                                                        ("car", "rectangle", None)]
    listed, impossible = lambda_spec.spec_labels(labels, "skeleton")
    assert [s.name for s in listed[0].sublabels] == ["nose", "tail"] and skeleton_edges(listed[0]) == [(1, 2)]
    assert [label.name for label in impossible] == ["car"]


def test_a_skeleton_whose_parts_are_unknown_is_not_listed():
    from preannotate.cvat import lambda_spec
    from preannotate.cvat.export import merged_labels

    # a function knows only the names of its deployed spec (worker.update_spec): a skeleton named there alone
    listed, impossible = lambda_spec.spec_labels([Label("dog", "skeleton")], "skeleton")
    assert listed == [] and [label.name for label in impossible] == ["dog"]
    dog = read_labels(LABELS)[0]
    assert merged_labels([[dog], [Label("dog", "skeleton")]]) == [dog]  # an export keeps the parts


def test_a_skeleton_added_to_a_project_by_patch_gets_its_parts(cvat_double):
    project = cvat_double.add_project("later", [{"name": "car", "type": "rectangle"}])
    with make_client(cvat_double.base_url, credentials=cvat_double.credentials) as client:
        client.projects.retrieve(project).update({"labels": [
            {"name": "cat", "type": "skeleton", "svg": skeleton_svg(["ear", "tail"], [(1, 2)]),
             "sublabels": [{"name": "ear", "type": "points"}, {"name": "tail", "type": "points"}]}]})
        labels = read_labels([label.to_dict() for label in client.projects.retrieve(project).get_labels()])
    cat = labels[1]
    assert [s.name for s in cat.sublabels] == ["ear", "tail"] and skeleton_edges(cat) == [(1, 2)]


# --- exported and read back ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["coco", "tfrecord"])
def test_a_task_with_skeletons_exports_its_keypoints_and_trains_from_them(cvat_double, skeleton_task, monkeypatch,
                                                                         tmp_path, capsys, fmt):
    """``preannotate export`` as a user types it: the COCO folder holds CVAT's *COCO Keypoints 1.0* file beside the
    instances, the records their keypoint keys; either reads back (what training reads) with the same skeletons."""
    from preannotate.cli import main as cli
    from preannotate.formats.dataset import read_dataset, training_split

    dog = dog_shape(Shape("nose", "points", [20, 20]), Shape("back", "points", [50, 40], occluded=True),
                    Shape("tail", "points", [80, 60], outside=True))
    with make_client(cvat_double.base_url, credentials=cvat_double.credentials) as client:
        TaskWriter(client, skeleton_task).write({0: [dog, Shape("pin", "points", [7, 8], score=0.6)],
                                                 1: [dog_shape(Shape("nose", "points", [30, 30]),
                                                               Shape("back", "points", [60, 50]),
                                                               Shape("tail", "points", [90, 70]))]})
    for key, value in (("CVAT_URL", cvat_double.base_url), ("CVAT_USERNAME", cvat_double.credentials[0]),
                       ("CVAT_PASSWORD", cvat_double.credentials[1]), ("PREANNOTATE_CACHE", str(tmp_path / "c"))):
        monkeypatch.setenv(key, value)
    out = tmp_path / fmt
    assert cli(["export", "--task", str(skeleton_task), "--format", fmt, "--out", str(out)]) == 0, \
        capsys.readouterr().err
    if fmt == "coco":
        import json

        written = json.loads((out / "annotations" / "person_keypoints_train.json").read_text())
        assert [(c["name"], c["keypoints"]) for c in written["categories"]] == [
            ("dog", ["nose", "back", "tail"]), ("pin", ["pin"])]
        assert [a["num_keypoints"] for a in written["annotations"]] == [2, 1, 3]
    labels, splits = read_dataset(out)
    assert [(label.name, label.type, [s.name for s in label.sublabels]) for label in labels] == [
        ("dog", "skeleton", ["nose", "back", "tail"]), ("pin", "points", [])]

    def keypoints(frames):  # (the records keep float32 shares of the frame: to a hundredth of a pixel)
        return sorted((frame.frame, shape.label, shape.type, tuple(round(v, 2) for v in shape.points),
                       tuple((e.label, tuple(round(v, 2) for v in e.points), e.occluded, e.outside)
                             for e in shape.elements))
                      for frame in frames for shape in frame.shapes)

    assert keypoints(frame for frame, _ in splits["train"]) == [
        (0, "dog", "skeleton", (), (("nose", (20.0, 20.0), False, False), ("back", (50.0, 40.0), True, False),
                                    ("tail", (80.0, 60.0), False, True))),
        (0, "pin", "points", (7.0, 8.0), ()),
        (1, "dog", "skeleton", (), (("nose", (30.0, 30.0), False, False), ("back", (60.0, 50.0), False, False),
                                    ("tail", (90.0, 70.0), False, False)))]
    trained_labels, train_items, _ = training_split(out)
    assert trained_labels[0].sublabels == labels[0].sublabels and keypoints(f for f, _ in train_items) == \
        keypoints(frame for frame, _ in splits["train"])
