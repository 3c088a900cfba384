"""Pre-annotating tasks through the real cvat-sdk client against the CVAT double, with a real (random-init) model
from a store: predictions arrive as the model made them, re-runs replace, manual work stays, interrupted runs
resume, and a deployed function (the local HTTP door) gives the same result as the model in process."""

from __future__ import annotations

import logging
import threading

import pytest
import torch
from cvat_sdk import make_client, models
from cvat_sdk.core.proxies.annotations import AnnotationUpdateAction
from preannotate.annotate import FunctionError, annotate_project, annotate_task, resolve_detector
from preannotate.cvat.client import CvatError
from preannotate.frames import decode_rgb
from preannotate.models import ModelStore, create_detector, publish_detector
from preannotate.serving.core import App, ModelProvider
from preannotate.serving.http import make_server
from preannotate.shapes import parse_label_list

from tests import cvat_double as double_module
from tests.conftest import encode, photo

cvat_double = double_module.cvat_double
logging.getLogger("cvat_sdk").setLevel(logging.ERROR)  # cvat-sdk 2.80 warns about the 2.42 server

FILES = [encode(photo(64, 48, seed=i)) for i in range(6)]


@pytest.fixture
def client(cvat_double):
    with make_client(cvat_double.base_url, credentials=cvat_double.credentials) as sdk_client:
        yield sdk_client


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """``boxes``: a random-init Faster R-CNN for ``car,person``, seeded so that it finds both on these frames
    (unseeded random heads tend to give every box one class)."""
    torch.manual_seed(2)
    detector = create_detector("fasterrcnn_mobilenet_v3_large_320_fpn", parse_label_list("car,person"),
                               hyperparameters={"score_threshold": 0.333})
    store = ModelStore(tmp_path_factory.mktemp("annotate-store"))
    publish_detector(detector, store, "boxes")
    return store


@pytest.fixture
def options(store, tmp_path):
    """Everything a run needs besides the task: the test store, a fresh journal and chunk cache, no progress bar."""
    return {"store": store.root, "state_dir": tmp_path / "state", "cache_dir": tmp_path / "chunks",
            "progress": False}


@pytest.fixture(scope="module")
def expected(store):
    """What the ``boxes`` model finds on each frame at threshold 0 (random weights still score every box)."""
    detector = resolve_detector("boxes", store.root)
    found = {frame: detector.detect([decode_rgb(data)], 0.0)[0] for frame, data in enumerate(FILES)}
    labels = {shape.label for shapes in found.values() for shape in shapes}
    assert labels == {"car", "person"}, "the seeded model should find both labels"
    return found


def add_task(cvat_double, name="annotate", **kwargs) -> int:
    """Six 64x48 frames; labels ``car`` (the model has it) and ``truck`` (it has not; its ``person`` is missing)."""
    frames = [(f"img_{i}.jpg", data, 64, 48) for i, data in enumerate(FILES)]
    labels = None if "project_id" in kwargs else [{"name": "car", "type": "rectangle"}, {"name": "truck"}]
    return cvat_double.add_task(name, frames, labels, **kwargs)


def auto_shapes(cvat_double, task_id) -> list[tuple[int, int, tuple[float, ...]]]:
    return sorted((s["frame"], s["label_id"], tuple(s["points"])) for s in cvat_double.annotations(task_id)["shapes"]
                  if s["source"] == "auto")


def as_expected(cvat_double, task_id, expected, frames=range(6)) -> list[tuple[int, int, tuple[float, ...]]]:
    car = cvat_double.label_id(task_id, "car")
    return sorted((f, car, tuple(float(p) for p in s.points)) for f in frames for s in expected[f] if s.label == "car")


def add_manual_box(client, task_id, label_id, frame) -> None:
    client.tasks.retrieve(task_id).update_annotations(models.PatchedLabeledDataRequest(shapes=[
        models.LabeledShapeRequest(type="rectangle", frame=frame, label_id=label_id, points=[1, 1, 9, 9])]),
        action=AnnotationUpdateAction.CREATE)


def test_annotate_writes_the_models_predictions_and_a_rerun_replaces_them(cvat_double, client, options, expected):
    task = add_task(cvat_double)
    add_manual_box(client, task, cvat_double.label_id(task, "truck"), 2)
    cvat_double.clear_requests()
    report = annotate_task(client, task, detector="boxes", threshold=0.0, upload_every=2, **options)

    assert auto_shapes(cvat_double, task) == as_expected(cvat_double, task, expected)
    persons = sum(s.label == "person" for shapes in expected.values() for s in shapes)
    assert report.unshared_labels == ["person"] and report.unmapped == {"person": persons}
    assert (report.frames, report.annotated, report.resumed) == (6, 6, 0)
    assert report.created == len(auto_shapes(cvat_double, task)) and report.frames_per_second > 0
    assert cvat_double.count(r"action=create", "PATCH") == 3  # frames 0-1, 2-3, 4-5

    again = annotate_task(client, task, detector="boxes", threshold=0.0, batch_size=3, **options)
    assert again.deleted == report.created
    assert len(auto_shapes(cvat_double, task)) == report.created  # replaced, not duplicated
    manual = [s for s in cvat_double.annotations(task)["shapes"] if s["source"] == "manual"]
    assert [(s["frame"], s["points"]) for s in manual] == [(2, [1.0, 1.0, 9.0, 9.0])]


def test_threshold_frames_range_and_only_unannotated(cvat_double, client, options, expected):
    task = add_task(cvat_double)
    add_manual_box(client, task, cvat_double.label_id(task, "car"), 3)
    report = annotate_task(client, task, detector="boxes", threshold=0.0, frames=range(2, 6), only_unannotated=True,
                           **options)
    assert (report.frames, report.skipped_annotated, report.annotated) == (4, 1, 3)
    assert auto_shapes(cvat_double, task) == as_expected(cvat_double, task, expected, frames=[2, 4, 5])

    # The model's own threshold (0.333 in its manifest) keeps only the boxes scoring that much.
    report = annotate_task(client, task, detector="boxes", frames=range(0, 1), **options)
    kept = [s for s in expected[0] if s.score >= 0.333]
    assert 0 < len(kept) < len(expected[0])  # this model's person boxes score just under it
    assert sum(report.unmapped.values()) == sum(s.label == "person" for s in kept)
    assert [p for f, _, p in auto_shapes(cvat_double, task) if f == 0] == sorted(
        tuple(s.points) for s in kept if s.label == "car")


def test_an_interrupted_run_resumes_without_redoing_or_duplicating(cvat_double, client, options, expected):
    task = add_task(cvat_double)
    cvat_double.fail_next(r"action=create", 500, method="PATCH", after=1)  # the second upload fails
    with pytest.raises(CvatError, match="500"):
        annotate_task(client, task, detector="boxes", threshold=0.0, upload_every=3, **options)
    assert {f for f, _, _ in auto_shapes(cvat_double, task)} == {0, 1, 2}  # the first upload went through

    report = annotate_task(client, task, detector="boxes", threshold=0.0, upload_every=3, **options)
    assert (report.resumed, report.annotated) == (3, 3)
    assert auto_shapes(cvat_double, task) == as_expected(cvat_double, task, expected)
    assert list(options["state_dir"].iterdir()) == []  # done: the journal is gone


@pytest.fixture
def function_url(store):
    """The ``boxes`` model behind the local HTTP door (what ``preannotate serve`` runs)."""
    server = make_server(App(ModelProvider("boxes", store)), port=0)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


def test_a_deployed_function_gives_what_the_model_gives(cvat_double, client, options, expected, function_url):
    task = add_task(cvat_double)
    report = annotate_task(client, task, function_url=function_url, threshold=0.0, workers=3, upload_every=4,
                           **options)
    assert auto_shapes(cvat_double, task) == as_expected(cvat_double, task, expected)
    assert report.unmapped["person"] > 0 and report.annotated == 6

    with pytest.raises(FunctionError, match="answered 404"):
        annotate_task(client, task, function_url=function_url + "nowhere", **options)


def test_annotate_project_runs_every_task_of_the_project(cvat_double, client, options, expected):
    other = add_task(cvat_double, "in project 6", project_id=6)  # project 6 labels: car, person, road, sign, ...
    recorded = [s for s in cvat_double.annotations(7)["shapes"]]
    reports = annotate_project(client, 6, detector="boxes", threshold=0.5, frames=range(0, 2), **options)
    assert sorted(reports) == [7, other]
    assert all(r.annotated == 2 and not r.unshared_labels for r in reports.values())
    assert [s for s in cvat_double.annotations(7)["shapes"] if s["source"] != "auto"] == [
        s for s in recorded if s["source"] != "auto"]


def test_bad_arguments_and_unknown_task(client, options):
    with pytest.raises(ValueError, match="not both"):
        annotate_task(client, 7, **options)
    with pytest.raises(CvatError, match="task 999999 was not found"):
        annotate_task(client, 999999, detector="boxes", **options)


def test_a_chunk_that_cannot_be_fetched_stops_the_run_with_its_error(cvat_double, client, options):
    task = add_task(cvat_double)
    cvat_double.fail_next(rf"/api/tasks/{task}/data\?.*type=chunk", 500, times=3)  # every attempt CvatFrames makes
    with pytest.raises(CvatError, match="chunk 0"):
        annotate_task(client, task, detector="boxes", **options)
    assert auto_shapes(cvat_double, task) == []
