"""CVAT → a dataset folder, one path (``cvat.export``) for ``preannotate export`` and for training, against the CVAT
test double: one label policy, the same folder either way."""

from __future__ import annotations

import json

import pytest
from cvat_sdk import make_client, models
from cvat_sdk.core.proxies.annotations import AnnotationUpdateAction
from preannotate.cvat.export import cvat_provenance, export, export_finished, merged_labels
from preannotate.cvat.review import CONFIDENCE_LABEL, ensure_confidence_label
from preannotate.shapes import Label

from tests.conftest import encode, photo


@pytest.fixture
def client(cvat_double, monkeypatch, tmp_path):
    monkeypatch.setenv("PREANNOTATE_CACHE", str(tmp_path / "cache"))
    with make_client(cvat_double.base_url, credentials=cvat_double.credentials) as sdk_client:
        yield sdk_client


def test_merged_labels_are_every_name_once_in_the_order_first_seen():
    first = [Label("car", "rectangle", id=1), Label("sign", "polygon", id=2)]
    second = [Label("person", "mask", id=1), Label("car", "polygon", id=2)]
    assert merged_labels([first, second]) == [Label("car", "rectangle", id=1), Label("sign", "polygon", id=2),
                                              Label("person", "mask", id=3)]
    assert merged_labels([]) == []


@pytest.fixture
def project_task(cvat_double, client):
    """A project whose confidence label stands between its classes (a label added after the first
    pre-annotation), and a task of two frames, a box on each, its one job completed."""
    project = cvat_double.add_project("streets", [{"name": "car", "type": "rectangle"}])
    frames = [(f"img_{i}.jpg", encode(photo(64, 48, seed=i)), 64, 48) for i in range(2)]
    task = cvat_double.add_task("streets", frames, project_id=project)
    ensure_confidence_label(client, task)  # added to the project
    client.projects.api.partial_update(project, patched_project_write_request=models.PatchedProjectWriteRequest(
        labels=[models.PatchedLabelRequest(name="sign", type="polygon")]))
    assert [label.name for label in client.projects.retrieve(project).get_labels()] == ["car", CONFIDENCE_LABEL,
                                                                                        "sign"]
    car = cvat_double.label_id(task, "car")
    client.tasks.retrieve(task).update_annotations(models.PatchedLabeledDataRequest(shapes=[
        models.LabeledShapeRequest(type="rectangle", frame=frame, label_id=car, points=[4, 4, 30, 20])
        for frame in (0, 1)]), action=AnnotationUpdateAction.CREATE)
    for job in client.jobs.list(task_id=task):
        client.jobs.retrieve(job.id).update({"state": "completed"})
    return project, task


def labels_of(folder) -> list[tuple[int, str]]:
    return [(label["id"], label["name"]) for label in json.loads((folder / "labels.json").read_text())]


def test_the_confidence_label_is_no_class_wherever_it_stands(client, project_task, tmp_path):
    """Its review tags are not a class: left out before the classes are numbered (once the export numbered
    ``sign`` 3 of 2 classes, after the label it had dropped)."""
    project, task = project_task
    for name, where in (("task", {"task": task}), ("project", {"project": project})):
        export(client, tmp_path / name, "coco", progress=False, **where)
        assert labels_of(tmp_path / name) == [(1, "car"), (2, "sign")], name
        categories = json.loads((tmp_path / name / "annotations" / "instances_train.json").read_text())["categories"]
        assert [(c["id"], c["name"]) for c in categories] == [(1, "car"), (2, "sign")]
    trained = export_finished(client, {"tasks": [task]}, tmp_path / "training", train_on=("completed",))
    assert labels_of(trained) == [(1, "car"), (2, "sign")]


def test_preannotate_export_and_training_write_the_same_folder(client, project_task, tmp_path):
    """Every frame of a project whose jobs are all finished: the same folder through either door, and training's
    records what it learned from besides."""
    project, task = project_task
    export(client, tmp_path / "exported", "coco", project=project, val_fraction=0.5, seed=3, progress=False)
    trained = export_finished(client, {"project": project}, tmp_path / "training", train_on=("completed",),
                              val_fraction=0.5, seed=3)

    def files(folder):
        return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*"))
                if path.is_file() and path.name not in ("cvat.json", "COMPLETE")}

    assert files(trained) == files(tmp_path / "exported")
    assert {f"images/task_{task}/img_0.jpg", "annotations/instances_val.json"} <= set(files(trained))
    learned = cvat_provenance(trained)["cvat"]
    assert learned["frames"] == {str(task): "0-1"} and learned["train_on"] == ["completed"]
    assert cvat_provenance(tmp_path / "exported") == {}
