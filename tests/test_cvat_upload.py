"""Writing predictions into a task through the real cvat-sdk client against the CVAT double: idempotent, manual
work untouched, unknown labels reported, resumable after an interruption, COCO files imported."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import urllib3
from cvat_sdk import make_client, models
from cvat_sdk.core.proxies.annotations import AnnotationUpdateAction
from preannotate.cvat.client import CvatError, connect
from preannotate.cvat.upload import Journal, TaskWriter, import_file, parse_label_map, write_predictions
from preannotate.formats import coco, masks
from preannotate.shapes import FrameAnnotations, Label, Shape

from tests import cvat_double as double_module
from tests.conftest import encode, photo

cvat_double = double_module.cvat_double
logging.getLogger("cvat_sdk").setLevel(logging.ERROR)  # cvat-sdk 2.80 warns about the 2.42 server

LABELS = [
    {"name": "car", "type": "rectangle", "attributes": [
        {"name": "color", "input_type": "select", "values": ["red", "blue"]}]},
    {"name": "person", "type": "polygon"},
    {"name": "road", "type": "mask"},
]


@pytest.fixture
def client(cvat_double):
    with make_client(cvat_double.base_url, credentials=cvat_double.credentials) as sdk_client:
        yield sdk_client


@pytest.fixture
def task(cvat_double):
    """Ten 64x48 frames (``img_00.jpg`` ...). Frame 0 holds a manual box, a semi-auto box (an edited prediction)
    and an auto box from an earlier run; frame 1 a manual polygon."""
    frames = [(f"img_{i:02d}.jpg", encode(photo(64, 48, seed=i)), 64, 48) for i in range(10)]
    task_id = cvat_double.add_task("upload", frames, LABELS)
    car, person = cvat_double.label_id(task_id, "car"), cvat_double.label_id(task_id, "person")
    with make_client(cvat_double.base_url, credentials=cvat_double.credentials) as seed:
        seed.tasks.retrieve(task_id).update_annotations(models.PatchedLabeledDataRequest(shapes=[
            models.LabeledShapeRequest(type="rectangle", frame=0, label_id=car, points=[1, 1, 9, 9]),
            models.LabeledShapeRequest(type="rectangle", frame=0, label_id=car, points=[2, 2, 8, 8],
                                       source="semi-auto"),
            models.LabeledShapeRequest(type="rectangle", frame=0, label_id=car, points=[3, 3, 7, 7], source="auto"),
            models.LabeledShapeRequest(type="polygon", frame=1, label_id=person, points=[1, 1, 9, 1, 5, 8]),
        ]), action=AnnotationUpdateAction.CREATE)
    return task_id


def stored(cvat_double, task_id, source=None):
    """(frame, label name, type, source, points) of every stored shape, sorted."""
    names = {label["id"]: label["name"] for label in cvat_double.labels.values()}
    return sorted((s["frame"], names[s["label_id"]], s["type"], s["source"], tuple(s["points"]))
                  for s in cvat_double.annotations(task_id)["shapes"] if source in (None, s["source"]))


def predictions() -> dict[int, list[Shape]]:
    bitmap = np.zeros((48, 64), dtype=bool)
    bitmap[10:20, 30:44] = True
    return {
        0: [Shape("car", "rectangle", [10, 12, 30, 40], score=0.9, rotation=370.0, attributes={"color": "blue"}),
            Shape("bicycle", "rectangle", [1, 1, 5, 5], score=0.8)],
        1: [Shape("human", "polygon", [5, 5, 20, 5, 12, 30], score=0.7)],
        2: [Shape("road", "mask", masks.bitmap_to_cvat_rle(bitmap), score=0.6),
            Shape("person", "mask", masks.bitmap_to_cvat_rle(bitmap), score=0.5)],
        3: [],
        4: [Shape("car", "rectangle", [0, 0, 10, 10], score=0.4)],
    }


def test_writing_twice_gives_the_same_shapes_and_keeps_manual_work(cvat_double, client, task, tmp_path):
    before = stored(cvat_double, task)
    report = write_predictions(client, task, predictions(), label_map="human=person", batch_frames=2,
                               state_dir=tmp_path)
    # 5 of 7 shapes written; the earlier auto box of frame 0 replaced; 'bicycle' is no task label
    assert (report.frames, report.created, report.deleted) == (5, 5, 1)
    assert report.unmapped == {"bicycle": 1}
    first = stored(cvat_double, task)
    assert [s for s in first if s[3] != "auto"] == [s for s in before if s[3] != "auto"]  # manual, semi-auto kept
    auto = [s[:3] for s in first if s[3] == "auto"]
    assert auto == [(0, "car", "rectangle"), (1, "person", "polygon"), (2, "person", "polygon"),
                    (2, "road", "mask"), (4, "car", "rectangle")]  # a mask on a polygon label becomes its outline

    shapes = {(s["frame"], s["type"]): s for s in cvat_double.annotations(task)["shapes"] if s["source"] == "auto"}
    assert shapes[(0, "rectangle")]["rotation"] == 10.0 and shapes[(0, "rectangle")]["points"] == [10, 12, 30, 40]
    color = next(a["id"] for a in cvat_double.labels[cvat_double.label_id(task, "car")]["attributes"])
    assert shapes[(0, "rectangle")]["attributes"] == [{"spec_id": color, "value": "blue"}]
    decoded = masks.cvat_rle_to_bitmap(shapes[(2, "mask")]["points"], 64, 48)
    assert decoded.sum() == 140 and decoded[10:20, 30:44].all()

    again = write_predictions(client, task, predictions(), label_map={"human": "person"}, batch_frames=2,
                              state_dir=tmp_path)
    assert (again.created, again.deleted) == (5, 5)
    assert stored(cvat_double, task) == first  # no duplicates
    assert list(tmp_path.iterdir()) == []  # the journal goes once everything is written


def test_a_frame_written_empty_loses_its_auto_shapes_only(cvat_double, client, task, tmp_path):
    report = write_predictions(client, task, {0: []}, state_dir=tmp_path)
    assert (report.created, report.deleted) == (0, 1)
    assert [s[3] for s in stored(cvat_double, task) if s[0] == 0] == ["manual", "semi-auto"]


def test_replace_replaces_every_shape_of_the_frames_written(cvat_double, client, task, tmp_path):
    report = write_predictions(client, task, {0: [Shape("car", "rectangle", [5, 5, 6, 6])]}, replace=True,
                               state_dir=tmp_path)
    assert (report.created, report.deleted) == (1, 3)
    assert stored(cvat_double, task) == [(0, "car", "rectangle", "auto", (5, 5, 6, 6)),
                                         (1, "person", "polygon", "manual", (1, 1, 9, 1, 5, 8))]


def test_an_interrupted_write_resumes_where_it_stopped(cvat_double, client, task, tmp_path):
    # batch 1 (frames 0, 1) is written, batch 2 (2, 3) fails
    cvat_double.fail_next(r"action=create", 500, method="PATCH", after=1)
    with pytest.raises(CvatError, match="500"):
        write_predictions(client, task, predictions(), label_map="human=person", batch_frames=2, state_dir=tmp_path)
    journal = json.loads(next(tmp_path.iterdir()).read_text())
    assert journal["frames"] == "0-1" and journal["task"] == task
    assert [s[0] for s in stored(cvat_double, task, "auto")] == [0, 1]  # frame 2's shapes never arrived

    cvat_double.clear_requests()
    report = write_predictions(client, task, predictions(), label_map="human=person", batch_frames=2,
                               state_dir=tmp_path)
    assert report.resumed == 2 and report.frames == 3  # frames 0 and 1 were done
    assert cvat_double.count(r"action=create", "PATCH") == 2  # frames 2-3, then 4
    assert [s[:3] for s in stored(cvat_double, task, "auto")] == [
        (0, "car", "rectangle"), (1, "person", "polygon"), (2, "person", "polygon"), (2, "road", "mask"),
        (4, "car", "rectangle")]
    assert list(tmp_path.iterdir()) == []


def test_a_batch_done_but_not_journaled_is_redone_without_duplicates(cvat_double, client, task, tmp_path):
    write_predictions(client, task, predictions(), state_dir=tmp_path)
    expected = stored(cvat_double, task)
    # An interruption after the server saved a batch but before the journal recorded it: the batch runs again.
    Journal.open(tmp_path, client, task, "unrelated").add([0])
    write_predictions(client, task, predictions(), state_dir=tmp_path)
    assert stored(cvat_double, task) == expected


def test_a_journal_it_cannot_read_starts_the_write_afresh(client, task, tmp_path, caplog):
    """An unreadable journal (here an earlier version's half-open lists) is never misread as frames written."""
    journal = Journal.open(tmp_path, client, task, "input")
    journal.path.write_text(json.dumps({**journal.header, "frames": [[0, 2]]}))
    assert Journal.open(tmp_path, client, task, "input").frames == set()
    assert "ignoring unreadable journal" in caplog.text


def test_unknown_task_and_frames_are_clear_errors(client, task, tmp_path):
    with pytest.raises(CvatError, match="task 999999 was not found"):
        write_predictions(client, 999999, {}, state_dir=tmp_path)
    with pytest.raises(CvatError, match="frames 0..9"):
        write_predictions(client, task, {10: []}, state_dir=tmp_path)
    with pytest.raises(ValueError, match="NAME=TASK_LABEL"):
        parse_label_map("car")


def test_import_coco_results_by_our_export_convention(cvat_double, client, task, tmp_path):
    """image id = frame + 1, category id = task label position (car 1, person 2, road 3), as formats.coco exports."""
    frame = FrameAnnotations(3, 64, 48, shapes=[Shape("car", "rectangle", [4, 5, 24, 35], score=0.9),
                                                Shape("person", "polygon", [1, 1, 30, 1, 15, 20], score=0.3)])
    labels = [Label(spec["name"]) for spec in LABELS]
    results = coco.to_results([(4, frame)], labels)
    assert [r["category_id"] for r in results] == [1, 2]
    path = tmp_path / "results.json"
    path.write_text(json.dumps(results + [{"image_id": 99, "category_id": 1, "bbox": [0, 0, 1, 1], "score": 1}]))

    report = import_file(client, task, path, threshold=0.5, state_dir=tmp_path / "state")
    assert (report.frames, report.created, report.unmatched_images) == (1, 1, ["image_id 99"])
    assert stored(cvat_double, task, "auto")[-1] == (3, "car", "rectangle", "auto", (4, 5, 24, 35))
    report = import_file(client, task, path, state_dir=tmp_path / "state")  # no threshold: the person too
    assert (report.created, report.deleted) == (2, 1)
    assert [s[:3] for s in stored(cvat_double, task, "auto") if s[0] == 3] == [(3, "car", "rectangle"),
                                                                               (3, "person", "polygon")]


def test_import_coco_dataset_and_results_with_their_coco_file(cvat_double, client, task, tmp_path):
    dataset = {
        "images": [{"id": 7, "file_name": "some/dir/img_05.jpg", "width": 64, "height": 48},
                   {"id": 8, "file_name": "img_06.jpg", "width": 64, "height": 48},
                   {"id": 9, "file_name": "elsewhere.jpg", "width": 64, "height": 48}],
        "categories": [{"id": 3, "name": "vehicle"}, {"id": 5, "name": "car"}],
        "annotations": [{"id": 1, "image_id": 7, "category_id": 5, "bbox": [1, 2, 10, 20], "score": 0.8},
                        {"id": 2, "image_id": 7, "category_id": 3, "bbox": [3, 3, 5, 5]}],
    }
    path = tmp_path / "dataset.json"
    path.write_text(json.dumps(dataset))
    report = import_file(client, task, path, fmt="coco", state_dir=tmp_path / "state")
    assert report.unmapped == {"vehicle": 1} and report.unmatched_images == ["elsewhere.jpg"]
    assert report.frames == 2  # img_06 has no annotation: written empty
    assert stored(cvat_double, task, "auto")[-1] == (5, "car", "rectangle", "auto", (1, 2, 11, 22))

    report = import_file(client, task, path, fmt="coco", label_map="vehicle=car", state_dir=tmp_path / "state")
    assert report.created == 2 and not report.unmapped
    assert len(stored(cvat_double, task, "auto")) == 3  # frame 0's earlier auto box + two on frame 5

    results = tmp_path / "results.json"
    results.write_text(json.dumps([{"image_id": 8, "category_id": 5, "bbox": [0, 0, 4, 4], "score": 0.9}]))
    import_file(client, task, results, coco_file=path, state_dir=tmp_path / "state")
    assert stored(cvat_double, task, "auto")[-1] == (6, "car", "rectangle", "auto", (0, 0, 4, 4))

    path.write_text(json.dumps({**dataset, "images": dataset["images"][2:]}))
    with pytest.raises(CvatError, match="none of the 1 images"):
        import_file(client, task, path, fmt="coco", state_dir=tmp_path / "state")


def test_a_coco_dataset_naming_an_unknown_category_says_so(client, task, tmp_path):
    path = tmp_path / "dataset.json"  # it was once said to be a segmentation that is neither polygons nor RLE
    path.write_text(json.dumps({"images": [{"id": 1, "file_name": "img_05.jpg"}],
                                "categories": [{"id": 1, "name": "car"}],
                                "annotations": [{"id": 1, "image_id": 1, "category_id": 9, "bbox": [1, 2, 3, 4]}]}))
    with pytest.raises(ValueError, match=r"^dataset.json: category_id 9 is not among its categories$"):
        import_file(client, task, path, fmt="coco", state_dir=tmp_path / "state")


def test_writes_go_through_an_access_token_client_too(cvat_double, task, tmp_path):
    """Uploads are raw JSON calls through cvat-sdk's API client: they must carry a token as well as a session."""
    login = urllib3.request("POST", cvat_double.base_url + "/api/auth/login",
                            json={"username": cvat_double.username, "password": cvat_double.password})
    with connect(cvat_double.base_url, access_token=login.json()["key"]) as token_client:
        report = write_predictions(token_client, task, {5: [Shape("car", "rectangle", [1, 2, 3, 4])]},
                                   state_dir=tmp_path)
    assert report.created == 1 and stored(cvat_double, task, "auto")[-1] == (5, "car", "rectangle", "auto",
                                                                             (1, 2, 3, 4))


def test_frames_a_person_annotated_include_tracks(cvat_double, client, task, tmp_path):
    write_predictions(client, task, {4: [Shape("car", "rectangle", [1, 1, 2, 2])]}, state_dir=tmp_path)
    car = cvat_double.label_id(task, "car")
    client.tasks.retrieve(task).update_annotations(models.PatchedLabeledDataRequest(tracks=[
        models.LabeledTrackRequest(frame=6, label_id=car, shapes=[
            models.TrackedShapeRequest(type="rectangle", frame=6, points=[1, 1, 5, 5]),
            models.TrackedShapeRequest(type="rectangle", frame=9, points=[1, 1, 5, 5], outside=True)])]),
        action=AnnotationUpdateAction.CREATE)
    # frame 0: manual and semi-auto boxes; 1: a polygon; 6-8: the track; not 4, which has only a prediction
    assert TaskWriter(client, task).human_frames() == {0, 1, 6, 7, 8}
