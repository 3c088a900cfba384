"""The whole path in small, as a user runs it against the CVAT test double: a job people finished, ``preannotate
train`` on it (a few steps from random weights), the version in the store, ``preannotate annotate`` of a new task
(the model's shapes written as ``auto``, a re-run replacing them, a person's shapes left alone) and ``preannotate
review`` ranking its frames. The long version, through CVAT's menu and a function, is test_menu_loop.py."""

from __future__ import annotations

import pytest
from cvat_sdk import make_client
from cvat_sdk.core.proxies.annotations import AnnotationUpdateAction
from preannotate.cli import main as cli
from preannotate.cvat import encoding
from preannotate.cvat.review import CONFIDENCE_LABEL
from preannotate.models import Manifest, ModelStore
from preannotate.training.synthetic import generate

LABELS = [{"name": "box", "type": "rectangle"}, {"name": "disc", "type": "any"}]
TINY = "init=random; num-steps=3; batch-size=2; image-size=96; num-validations=1; max-total-detections=5"


def frames_of(task, prefix: str = ""):
    numbers = sorted(task.annotations.frames)
    return [(f"{prefix}{frame.name}", data, frame.width, frame.height)
            for frame, (_, data) in zip((task.annotations.frames[n] for n in numbers), task.images.encoded(numbers),
                                         strict=True)]


def auto_shapes(cvat_double, task_id: int) -> list[dict]:
    return [s for s in cvat_double.annotations(task_id)["shapes"] if s["source"] == "auto"]


@pytest.fixture
def cvat_env(cvat_double, monkeypatch, tmp_path):
    for key, value in {"CVAT_URL": cvat_double.base_url, "CVAT_USERNAME": cvat_double.credentials[0],
                       "CVAT_PASSWORD": cvat_double.credentials[1], "PREANNOTATE_CACHE": str(tmp_path / "cache")
                       }.items():
        monkeypatch.setenv(key, value)
    return cvat_double


def test_a_finished_job_trains_a_version_that_pre_annotates_a_new_task(cvat_env, tmp_path, capsys):
    cvat_double, store = cvat_env, tmp_path / "store"
    labelled = generate(8, width=96, height=72, seed=1, labels=("box", "disc"), empty_fraction=0)
    task = cvat_double.add_task("labelled", frames_of(labelled), LABELS)
    ids = {label["name"]: cvat_double.label_id(task, label["name"]) for label in LABELS}
    with make_client(cvat_double.base_url, credentials=cvat_double.credentials) as client:
        client.tasks.retrieve(task).update_annotations({"shapes": [
            encoding.labeled_shape(shape, frame=number, label_id=ids[shape.label], source="manual")
            for number, frame in labelled.annotations.frames.items() for shape in frame.shapes]},
            action=AnnotationUpdateAction.CREATE)
        # nothing finished yet: nothing to learn from, said in one sentence
        assert cli(["train", "--task", str(task), "--model", "ssdlite320_mobilenet_v3_large", "-H", TINY,
                    "--store", str(store), "--name", "shapes", "--out", str(tmp_path / "run")]) == 2
        assert "nothing finished to learn from" in capsys.readouterr().err
        (job,) = client.tasks.retrieve(task).get_jobs()
        client.jobs.retrieve(job.id).update({"state": "completed"})

    assert cli(["train", "--task", str(task), "--model", "ssdlite320_mobilenet_v3_large", "-H", TINY,
                "--store", str(store), "--name", "shapes", "--out", str(tmp_path / "run")]) == 0
    printed = capsys.readouterr().out
    assert "on 6 frames, validating on 2" in printed and "published shapes@1 after 3 steps" in printed, printed
    manifest = Manifest.read(ModelStore(store).resolve("shapes"))
    assert [label.name for label in manifest.labels] == ["box", "disc"]
    learned = manifest.provenance["cvat"]
    assert list(learned["jobs"]) == [str(job.id)] and list(learned["frames"]) == [str(task)]

    # a new task: the model's boxes go in as auto shapes, beside a box a person drew
    new = cvat_double.add_task("new", frames_of(generate(4, width=96, height=72, seed=2, labels=("box",)), "new_"),
                               LABELS)
    box = cvat_double.label_id(new, "box")
    with make_client(cvat_double.base_url, credentials=cvat_double.credentials) as client:
        client.tasks.retrieve(new).update_annotations({"shapes": [
            {"type": "rectangle", "frame": 1, "label_id": box, "points": [1, 1, 9, 9], "source": "manual"}]},
            action=AnnotationUpdateAction.CREATE)
    annotate = ["annotate", "--task", str(new), "--model", "shapes", "--store", str(store), "--threshold", "0"]
    assert cli(annotate) == 0
    assert f"task {new}: 4 frames annotated" in capsys.readouterr().out
    first = auto_shapes(cvat_double, new)
    assert first and {s["frame"] for s in first} == {0, 1, 2, 3} and {s["type"] for s in first} == {"rectangle"}
    assert len(first) <= 4 * 5  # max-total-detections=5, from the manifest

    assert cli(annotate) == 0  # again: replaced, not added to
    assert f"{len(first)} earlier auto shapes replaced" in capsys.readouterr().out
    again = auto_shapes(cvat_double, new)
    assert sorted((s["frame"], s["points"]) for s in again) == sorted((s["frame"], s["points"]) for s in first)
    assert [(s["frame"], s["points"]) for s in cvat_double.annotations(new)["shapes"] if s["source"] == "manual"] \
        == [(1, [1.0, 1.0, 9.0, 9.0])]
    confidence = cvat_double.label_id(new, CONFIDENCE_LABEL)
    assert sorted(t["frame"] for t in cvat_double.annotations(new)["tags"] if t["label_id"] == confidence) == [
        0, 1, 2, 3]  # one confidence tag per frame, not two

    # the frames least sure first, for review
    assert cli(["review", "--task", str(new), "--out", str(tmp_path / "review.csv")]) == 0
    assert "4 frames ranked, least confident first" in capsys.readouterr().out
    rows = (tmp_path / "review.csv").read_text().splitlines()
    assert rows[0] == "rank,frame,name,confidence" and len(rows) == 5
    assert sorted(int(row.split(",")[1]) for row in rows[1:]) == [0, 1, 2, 3]
