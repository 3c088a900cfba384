"""read_task / read_job / read_project through the real cvat-sdk client against the CVAT 2.42 double."""

from __future__ import annotations

import json
import logging
from collections import Counter

import pytest
import urllib3
from cvat_sdk import models
from cvat_sdk.core.proxies.annotations import AnnotationUpdateAction
from preannotate.cvat.annotations import frames_from_annotations
from preannotate.cvat.client import CvatError, connect
from preannotate.cvat.reader import read_job, read_project, read_task

from tests import cvat_double as double_module
from tests.conftest import encode, photo
from tests.cvat_double import load_fixture

cvat_double = double_module.cvat_double


@pytest.fixture
def client(cvat_double):
    with connect(cvat_double.base_url, username="admin", password=cvat_double.password) as sdk_client:
        yield sdk_client


def warnings(caplog) -> list[str]:
    """What the reader said about shapes left out (at INFO: the command writing the dataset tells the user)."""
    return [r.getMessage() for r in caplog.records if r.name == "preannotate.cvat.reader"]


@pytest.fixture(autouse=True)
def _reader_log(caplog):
    caplog.set_level(logging.INFO, logger="preannotate.cvat.reader")


def outlines(frame) -> list[tuple]:
    return sorted((s.label, s.type, tuple(round(p, 3) for p in s.points)) for s in frame.shapes)


def test_read_task(client, caplog):
    result = read_task(client, 7)
    expected = frames_from_annotations(load_fixture("api/GET_api_tasks_ID_annotations.json"),
                                       load_fixture("api/GET_api_labels__task_id=ID.json"),
                                       load_fixture("api/GET_api_tasks_ID_data_meta.json"))
    assert result.frames == expected.frames  # the SDK models read like the recorded JSON
    assert [(label.id, label.name, label.type) for label in result.labels] == [
        (1, "car", "rectangle"), (2, "person", "polygon"), (3, "road", "mask"), (4, "sign", "any"),
        (5, "daytime", "tag")]
    assert [(f.width, f.height, f.name) for f in result.frames.values()] == [
        (96 if i % 2 == 0 else 80, 64 if i % 2 == 0 else 60, f"frame_{i:02d}.jpg") for i in range(6)]
    assert {s.type for f in result.frames.values() for s in f.shapes} >= {"rectangle", "polygon", "mask", "ellipse"}
    assert result.frames[0].tags == ["daytime"]
    # Polygon track 6 has keyframes on frames 3 and 5 only: frame 4 is interpolated as CVAT's export shows it.
    tracked = [s for s in result.frames[4].shapes if s.track_id == 6]
    assert [s.points for s in tracked] == [[15.0, 12.5, 35.0, 12.5, 25.0, 35.0]]
    rectangle_track = [s.frame for f in result.frames.values() for s in f.shapes if s.track_id == 4]
    assert rectangle_track == [0, 1, 2]  # the piece in job 7, closed by the outside shape on frame 3
    assert result.skipped == Counter({"points": 1, "polyline": 1})
    assert warnings(caplog) == ["task 7 has 2 per-frame shapes a detector cannot learn from (1 points, "
                                "1 polyline); detector datasets leave them out"]


def test_read_task_counts_what_a_detector_cannot_learn_and_reads_every_label_page(cvat_double, client, caplog):
    names = [f"label{i:02d}" for i in range(12)]  # more than one page of /api/labels (10 a page)
    frame = ("a.png", encode(photo(32, 24), "PNG"), 32, 24)
    task_id = cvat_double.add_task("skipped", [frame] * 4, [{"name": n} for n in names])
    ids = [cvat_double.label_id(task_id, name) for name in names]
    client.tasks.retrieve(task_id).update_annotations(models.PatchedLabeledDataRequest(
        shapes=[
            models.LabeledShapeRequest(type="cuboid", frame=0, label_id=ids[0], points=list(range(16))),
            models.LabeledShapeRequest(type="points", frame=1, label_id=ids[1], points=[3, 4, 5, 6]),
            models.LabeledShapeRequest(type="rectangle", frame=1, label_id=ids[2], points=[1, 1, 9, 9]),
        ],
        tracks=[models.LabeledTrackRequest(frame=1, label_id=ids[11], shapes=[
            models.TrackedShapeRequest(type="polyline", frame=1, points=[0, 0, 10, 10]),
            models.TrackedShapeRequest(type="polyline", frame=3, points=[2, 2, 12, 12])])],
    ), action=AnnotationUpdateAction.CREATE)
    result = read_task(client, task_id)
    assert [label.name for label in result.labels] == names
    assert cvat_double.count(r"/api/labels\?.*page=2") == 1
    assert result.skipped == Counter({"polyline": 3, "cuboid": 1, "points": 1})
    assert [s.points for s in result.frames[2].shapes] == [[1.0, 1.0, 11.0, 11.0]]  # the track, interpolated
    assert [s.type for s in result.frames[1].shapes] == ["points", "rectangle", "polyline"]  # kept, but counted
    assert warnings(caplog) == [f"task {task_id} has 5 per-frame shapes a detector cannot learn from (1 cuboid, "
                                "1 points, 3 polyline); detector datasets leave them out"]


def test_read_job_covers_its_range_only(client, caplog):
    task = read_task(client, 7)
    first, second = read_job(client, 7), read_job(client, 8)
    assert list(first.frames) == [0, 1, 2] and list(second.frames) == [3, 4, 5]  # task-relative numbers
    for job in (first, second):
        assert job.labels == task.labels
        assert all(outlines(frame) == outlines(task.frames[n]) for n, frame in job.frames.items())
    assert first.skipped == Counter() and second.skipped == Counter({"points": 1, "polyline": 1})
    assert [m.split(" has ")[0] for m in warnings(caplog)] == ["task 7", "job 8"]  # nothing to say about job 7


def test_read_project_reads_every_task(cvat_double, client, caplog):
    frame = ("a.png", encode(photo(32, 24), "PNG"), 32, 24)
    added = [cvat_double.add_task(f"extra {i}", [frame] * 2, project_id=6) for i in range(9)]
    added.append(cvat_double.add_task("extra 9", [frame] * 2, project_id=6, annotations={"shapes": [
        {"type": "rectangle", "frame": 1, "label_id": 18, "points": [2, 2, 20, 12]},
        {"type": "points", "frame": 0, "label_id": 21, "points": [5, 5]}]}))
    cvat_double.add_task("elsewhere", [frame], [{"name": "cat"}])  # not in the project
    cvat_double.clear_requests()
    result = read_project(client, 6)
    assert sorted(result) == [7, *added]  # 11 tasks: two pages of /api/tasks
    assert cvat_double.count(r"^/api/tasks\?.*page=2") == 1
    assert cvat_double.count(r"^/api/labels\?") == 1  # the project's labels, read once for all its tasks
    assert warnings(caplog) == ["project 6 has 3 per-frame shapes a detector cannot learn from (2 points, "
                                "1 polyline); detector datasets leave them out"]  # once, for all its tasks
    assert result[7].frames == read_task(client, 7).frames
    last = result[added[-1]]
    assert [label.name for label in last.labels] == ["car", "person", "road", "sign", "daytime"]
    assert [(s.label, s.points) for s in last.frames[1].shapes] == [("car", [2.0, 2.0, 20.0, 12.0])]
    assert all(not f.shapes for i in added[:-1] for f in result[i].frames.values())


@pytest.mark.parametrize("read, what", [(read_task, "task"), (read_job, "job"), (read_project, "project")])
def test_unknown_objects_are_named(cvat_double, client, read, what):
    with pytest.raises(CvatError, match=rf"^{what} 999999 was not found on {cvat_double.base_url}$"):
        read(client, 999999)


def test_revoked_credentials(cvat_double):
    login = urllib3.request("POST", cvat_double.base_url + "/api/auth/login",
                            json={"username": "admin", "password": cvat_double.password})
    key = json.loads(login.data)["key"]
    with connect(cvat_double.base_url, access_token=key) as client:
        assert len(read_task(client, 8).frames) == 3
        urllib3.request("POST", cvat_double.base_url + "/api/auth/logout", headers={"Authorization": f"Token {key}"})
        with pytest.raises(CvatError, match=r"rejected the credentials: Invalid token\. \(401\)$") as error:
            read_task(client, 8)
    assert key not in str(error.value)
