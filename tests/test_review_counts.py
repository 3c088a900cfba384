"""What people changed on a pre-annotated task (``cvat.review.review_counts``, ``preannotate review``), through the
CVAT double: a task pre-annotated, then edited as CVAT 2.42's editor saves a review — a box dragged (its source
becomes ``semi-auto``), one deleted, one relabelled (it stays ``auto``), boxes drawn (``manual``, or ``semi-auto``
with an AI tool) — and the counts read back."""

from __future__ import annotations

import hashlib
import logging
from types import SimpleNamespace

import numpy as np
import pytest
from cvat_sdk import make_client
from cvat_sdk.core.proxies.annotations import AnnotationUpdateAction
from preannotate.annotate import annotate_task
from preannotate.cli import main as cli
from preannotate.cvat.review import (
    CONFIDENCE_ATTRIBUTE,
    CONFIDENCE_LABEL,
    SHAPES_ATTRIBUTE,
    JobReview,
    ReviewCounts,
    count_jobs,
    ensure_confidence_label,
    review_counts,
)
from preannotate.models import Manifest
from preannotate.shapes import Label, Shape

from tests import cvat_double as double_module
from tests.conftest import encode, photo

cvat_double = double_module.cvat_double
logging.getLogger("cvat_sdk").setLevel(logging.ERROR)  # cvat-sdk 2.80 warns about the 2.42 server

FILES = [encode(photo(64, 48, seed=10 + i), "PNG") for i in range(4)]
LABELS = [{"name": "car", "type": "rectangle"}, {"name": "person", "type": "rectangle"}]


def key(image) -> str:
    return hashlib.sha1(np.ascontiguousarray(image).tobytes()).hexdigest()


class Scripted:
    """A detector with fixed answers per frame: 3 cars on frame 0, 2 on frame 1, 1 on frame 2, nothing on 3."""

    def __init__(self):
        from preannotate.frames import decode_rgb

        self.labels = [Label("car", "rectangle", id=1), Label("person", "rectangle", id=2)]
        self.manifest = Manifest("ssdlite320_mobilenet_v3_large", self.labels, name="scripted", version=1)
        self.familiar = None
        self.answers = {key(decode_rgb(data)): [Shape("car", "rectangle", [2.0 + 12 * i, 2.0, 10.0 + 12 * i, 10.0],
                                                      score=0.9, source="auto") for i in range(3 - frame)]
                        for frame, data in enumerate(FILES)}

    def detect(self, images, threshold):
        return [[s for s in self.answers[key(image)] if s.score >= threshold] for image in images]

    def detect_scored(self, images, threshold):
        return [(shapes, 0.0) for shapes in self.detect(images, threshold)]


@pytest.fixture
def task(cvat_double, tmp_path):
    """A task of 4 frames pre-annotated by ``Scripted`` (6 boxes arrived), nobody's job started."""
    task_id = cvat_double.add_task("review", [(f"f{i}.png", data, 64, 48) for i, data in enumerate(FILES)], LABELS)
    with make_client(cvat_double.base_url, credentials=cvat_double.credentials) as client:
        annotate_task(client, task_id, detector=Scripted(), progress=False, state_dir=tmp_path / "state",
                      cache_dir=tmp_path / "chunks")
    return task_id


def review_like_cvats_editor(cvat_double, client, task_id) -> None:
    """What a reviewer's save sends (cvat-core's annotations-saver: update keeps ids, the editor sets sources)."""
    shapes = sorted((s for s in cvat_double.annotations(task_id)["shapes"]), key=lambda s: (s["frame"], s["id"]))
    first, second = [s for s in shapes if s["frame"] == 0][:2], [s for s in shapes if s["frame"] == 1][0]
    car, person = (cvat_double.label_id(task_id, name) for name in ("car", "person"))
    keep = ("id", "type", "frame", "label_id", "points", "rotation", "occluded", "outside", "z_order", "group",
            "source", "attributes")
    moved = {**{k: v for k, v in first[0].items() if k in keep}, "points": [1.0, 1.0, 12.0, 12.0],
             "source": "semi-auto"}  # dragged: computeNewSource(auto) is semi-auto
    relabelled = {**{k: v for k, v in second.items() if k in keep}, "label_id": person}  # a label change keeps auto
    annotations = client.tasks.retrieve(task_id)
    annotations.update_annotations({"shapes": [moved, relabelled]}, action=AnnotationUpdateAction.UPDATE)
    annotations.update_annotations({"shapes": [{k: v for k, v in first[1].items() if k in keep}]},
                                   action=AnnotationUpdateAction.DELETE)
    annotations.update_annotations({"shapes": [
        {"type": "rectangle", "frame": 1, "label_id": car, "points": [30, 30, 40, 40], "source": "manual"},
        {"type": "rectangle", "frame": 3, "label_id": car, "points": [5, 5, 25, 25], "source": "semi-auto"}]},
        action=AnnotationUpdateAction.CREATE)  # drawn by hand, and with an AI tool
    (job,) = annotations.get_jobs()
    client.jobs.retrieve(job.id).update({"state": "in progress"})  # the editor's first save does this


def test_review_counts_what_people_changed_relative_to_what_arrived(cvat_double, task):
    with make_client(cvat_double.base_url, credentials=cvat_double.credentials) as client:
        (before,) = review_counts(client, task)
        assert not before.started and before.counts == ReviewCounts(frames=4, arrived=6, kept=6)
        review_like_cvats_editor(cvat_double, client, task)
        (job,) = review_counts(client, task)
    assert job.started and job.state == "in progress"
    assert job.counts == ReviewCounts(frames=4, arrived=6, kept=4, moved=1, deleted=1, added=2)
    assert (job.counts.objects, job.counts.edits) == (7, 4) and job.counts.per_100 == pytest.approx(400 / 7)


def test_preannotate_review_prints_the_counts_once_a_job_is_started(cvat_double, task, monkeypatch, tmp_path, capsys):
    for key_, value in {"CVAT_URL": cvat_double.base_url, "CVAT_USERNAME": cvat_double.credentials[0],
                        "CVAT_PASSWORD": cvat_double.credentials[1]}.items():
        monkeypatch.setenv(key_, value)
    command = ["review", "--task", str(task), "--out", str(tmp_path / "review.csv")]
    assert cli(command) == 0
    assert f"review: no job of task {task} has been started yet" in capsys.readouterr().out
    with make_client(cvat_double.base_url, credentials=cvat_double.credentials) as client:
        review_like_cvats_editor(cvat_double, client, task)
    assert cli(command) == 0
    printed = capsys.readouterr().out
    table = printed[printed.index(f"review of task {task} so far"):].splitlines()
    assert table[1].split() == ["job", "state", "frames", "arrived", "kept", "moved", "deleted", "added", "edits",
                                "per", "100", "objects"]
    assert table[2].split()[4:] == ["4", "6", "4", "1", "1", "2", "57"]  # after "N in progress, annotation"
    assert table[3].split() == ["all", "4", "6", "4", "1", "1", "2", "57"]
    assert "a job still in progress count as kept" in printed and "relabelled shape stays auto" in printed


@pytest.mark.parametrize(("arrived", "sources", "expected"), [
    (3, ["auto"] * 3, ReviewCounts(1, 3, kept=3)),
    (3, [], ReviewCounts(1, 3, deleted=3)),
    (0, ["manual", "manual"], ReviewCounts(1, 0, added=2)),
    (2, ["auto", "semi-auto"], ReviewCounts(1, 2, kept=1, moved=1)),
    (1, ["semi-auto", "semi-auto"], ReviewCounts(1, 1, moved=1, added=1)),  # one moved, one drawn with an AI tool
    (1, ["auto", "semi-auto"], ReviewCounts(1, 1, kept=1, added=1)),
    (1, ["auto", "auto"], ReviewCounts(1, 1, kept=1, foreign=1)),  # another writer's auto shape
    (2, ["file", "manual"], ReviewCounts(1, 2, deleted=2, added=2)),
])
def test_one_frames_counts(arrived, sources, expected):
    counts = ReviewCounts()
    counts.add_frame(arrived, sources)
    assert counts == expected


def test_frames_pre_annotated_before_the_count_was_recorded_are_left_out_and_tracks_are_drawn():
    labels = [SimpleNamespace(id=9, name=CONFIDENCE_LABEL, attributes=[  # as cvat-sdk's models have them
        SimpleNamespace(id=1, name=CONFIDENCE_ATTRIBUTE), SimpleNamespace(id=2, name=SHAPES_ATTRIBUTE)])]
    tag = lambda frame, shapes: {"frame": frame, "label_id": 9, "attributes": [  # noqa: E731
        {"spec_id": 1, "value": "50"}, {"spec_id": 2, "value": shapes}]}
    annotations = {"tags": [tag(0, "1"), tag(1, "-1"), tag(2, "0")],  # frame 1: the default, read for an old tag
                   "shapes": [{"frame": 0, "source": "auto"}, {"frame": 1, "source": "auto"}],
                   "tracks": [{"shapes": [{"frame": 2, "outside": False}, {"frame": 3, "outside": False},
                                          {"frame": 2, "outside": True}]}]}
    (job,) = count_jobs(annotations, labels, [JobReview(1, "completed", "acceptance", 0, 3)])
    assert job.counts == ReviewCounts(frames=2, arrived=1, kept=1, added=1, uncounted=1)


def test_a_confidence_label_made_by_an_earlier_version_gets_the_shapes_attribute(cvat_double):
    project = cvat_double.add_project("old", [*LABELS, {"name": CONFIDENCE_LABEL, "type": "tag", "attributes": [
        {"name": CONFIDENCE_ATTRIBUTE, "input_type": "number", "values": ["0", "100", "1"], "default_value": "100",
         "mutable": False}]}])
    task_id = cvat_double.add_task("old", [("f.png", FILES[0], 64, 48)], project_id=project)
    with make_client(cvat_double.base_url, credentials=cvat_double.credentials) as client:
        before = next(label for label in client.projects.retrieve(project).get_labels()
                      if label.name == CONFIDENCE_LABEL)
        ensure_confidence_label(client, task_id)
        after = next(label for label in client.projects.retrieve(project).get_labels()
                     if label.name == CONFIDENCE_LABEL)
        ensure_confidence_label(client, task_id)  # nothing more to add
        again = next(label for label in client.projects.retrieve(project).get_labels()
                     if label.name == CONFIDENCE_LABEL)
    assert after.id == before.id
    assert [(a.name, a.id) for a in after.attributes][0] == (CONFIDENCE_ATTRIBUTE, before.attributes[0].id)
    assert [a.name for a in after.attributes] == [CONFIDENCE_ATTRIBUTE, SHAPES_ATTRIBUTE]
    assert [a.to_dict() for a in again.attributes] == [a.to_dict() for a in after.attributes]
