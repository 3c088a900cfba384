"""The loop inside CVAT's own menu, end to end through the CVAT test double and a stand-in Nuclio dashboard: a
function deployed once for a project (before any training), a job finished in CVAT, its signed webhook training a
version in the function's own job process, the function's spec brought in step through the dashboard, a new task
pre-annotated once its upload finishes, and the frames of a class the model never saw ranked first for review."""

from __future__ import annotations

import json
import threading
import time

import pytest
import yaml
from cvat_sdk import make_client
from preannotate.cli import main as cli
from preannotate.cvat import encoding
from preannotate.cvat.review import CONFIDENCE_LABEL
from preannotate.models import Manifest, ModelStore
from preannotate.serving.core import App, Request
from preannotate.serving.http import make_server
from preannotate.serving.training import TrainingRoutes
from preannotate.training.synthetic import generate

from tests import nuclio_dashboard_double
from tests.conftest import job_activity, wait_while_advancing

nuclio_dashboard = nuclio_dashboard_double.nuclio_dashboard  # the fixture, for this module

SECRET = "hook-secret"
FUNCTION = "pth-preannotate-shapes"
LABELS = [{"name": "box", "type": "rectangle"}, {"name": "disc", "type": "any"}, {"name": "triangle", "type": "any"}]


def _frames(task):
    return [(frame.name, data, frame.width, frame.height)
            for (number, frame), (_, data) in zip(sorted(task.annotations.frames.items()),
                                                  task.images.encoded(sorted(task.annotations.frames)), strict=True)]


def _annotations(task, label_ids):
    return {"shapes": [encoding.labeled_shape(shape, frame=number, label_id=label_ids[shape.label], source="manual")
                       for number, frame in task.annotations.frames.items() for shape in frame.shapes]}


@pytest.mark.slow
def test_deploy_once_then_only_annotate_and_review(cvat_double, nuclio_dashboard, tmp_path, monkeypatch, capsys):
    for key, value in {"CVAT_URL": cvat_double.base_url, "CVAT_USERNAME": cvat_double.credentials[0],
                       "CVAT_PASSWORD": cvat_double.credentials[1]}.items():
        monkeypatch.setenv(key, value)
    project = cvat_double.add_project("shapes", LABELS)

    # 1. deploy for the project, before any training
    store_root, out = tmp_path / "store", tmp_path / "function"
    assert cli(["deploy", "--model", "shapes", "--train-project", str(project), "--store", str(store_root),
                "--out", str(out), "--dry-run"]) == 0
    config = yaml.safe_load((out / "function.yaml").read_text())
    config["metadata"]["name"] = FUNCTION
    nuclio_dashboard.add_function(config)
    env = {e["name"]: e["value"] for e in config["spec"]["env"]}
    env.update({"PREANNOTATE_MODEL_STORE": str(store_root), "PREANNOTATE_WEBHOOK_SECRET": SECRET,
                "PREANNOTATE_API_AUTH": "none", "PREANNOTATE_TRAIN_DEBOUNCE": "2s",
                "PREANNOTATE_TRAIN_HYPERPARAMETERS": "init=random; num-steps=150; batch-size=8; num-validations=1",
                "PREANNOTATE_NUCLIO_DASHBOARD": nuclio_dashboard.url, "NUCLIO_FUNCTION_NAME": FUNCTION})
    for key, value in env.items():
        monkeypatch.setenv(key, value)  # the function's environment, which its job processes inherit
    app = App.from_environment(env)
    routes = TrainingRoutes.attach(app, environ=env)
    server = make_server(app, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        assert app.handle(Request("GET", "/health")).body["model"]["state"].startswith(
            f"not trained yet: finish a job in CVAT project {project}")
        cvat_double.add_webhook(url + "/webhook", SECRET, ["update:job", "create:task", "update:task"], project)

        # a label added to the project after the deploy: the function's spec lacks it until training learns it
        with make_client(cvat_double.base_url, credentials=cvat_double.credentials) as client:
            client.projects.retrieve(project).update({"labels": [{"name": "bar", "type": "rectangle"}]})
        # 2. the annotated task: boxes and discs only; an untouched task the model must not learn from
        seen = generate(64, width=160, height=120, seed=1, labels=("box", "disc"))
        ids = {label["name"]: label["id"] for label in cvat_double.labels.values()
               if label.get("project_id") == project}
        annotated = cvat_double.add_task("annotated", _frames(seen), project_id=project, segment_size=32,
                                         annotations=_annotations(seen, ids))
        assert len(cvat_double.annotations(annotated)["shapes"]) == sum(
            len(frame.shapes) for frame in seen.annotations.frames.values())
        untouched = cvat_double.add_task("untouched", _frames(generate(8, 160, 120, seed=2)), project_id=project)
        cvat_double.wait_for_deliveries()
        assert not routes.jobs.all(), "task deliveries before the first version queue nothing"

        with make_client(cvat_double.base_url, credentials=cvat_double.credentials) as client:
            first, second = sorted(job.id for job in client.tasks.retrieve(annotated).get_jobs())
            client.jobs.retrieve(first).update({"state": "completed"})
            client.jobs.retrieve(second).update({"stage": "acceptance"})
        answers = [json.loads(d.response) for d in cvat_double.wait_for_deliveries() if d.event == "update:job"]
        started = [answer for answer in answers if answer.get("job")]  # annotation saves send update:job too
        assert len(started) == 2 and len({answer["job"] for answer in started}) == 1  # the second joined the first

        store = ModelStore(store_root)
        (training,) = routes.jobs.all()
        finished = wait_while_advancing(lambda: (j := routes.jobs.get(training.id)).finished and j,
                                        job_activity(routes.jobs, training.id), "the training job")
        assert finished.state == "succeeded" and store.serving("shapes") == finished.version == 1
        manifest = Manifest.read(store.resolve("shapes"))
        learned = manifest.provenance["cvat"]
        assert sorted(learned["jobs"]) == [str(first), str(second)] and list(learned["frames"]) == [str(annotated)]
        assert learned["frames"][str(annotated)] == "0-63"
        assert all(job in learned["unfinished_jobs"] for job in cvat_double.tasks[untouched].job_ids)
        # 3. the spec follows the model: "bar" went into the function through the dashboard, without a rebuild
        nuclio_dashboard.settle()
        deployed = nuclio_dashboard.function(FUNCTION)
        spec = [label["name"] for label in json.loads(deployed["metadata"]["annotations"]["spec"])]
        assert "bar" in spec and nuclio_dashboard.builds == []
        assert finished.outcome["cvat_unmapped"] == ["bar"]  # said in the job's record before the update

        # 4. a new task: the webhook arrives before its data; it is pre-annotated once the upload finished
        unseen = generate(6, width=160, height=120, seed=8, labels=("triangle",), empty_fraction=0)
        familiar = generate(6, width=160, height=120, seed=7, labels=("box", "disc"), empty_fraction=0)
        frames = _frames(familiar) + [(f"unseen_{name}", *rest) for name, *rest in _frames(unseen)]
        new = cvat_double.add_task("new", frames, project_id=project, pending_upload=True)
        cvat_double.wait_for_deliveries()
        (job,) = [j for j in routes.jobs.all() if j.request.get("kind") == "annotate"]
        assert job.request["task"] == new
        time.sleep(2)
        assert cvat_double.annotations(new)["shapes"] == []  # nothing written before the data is there
        cvat_double.finish_upload(new)
        cvat_double.wait_for_deliveries()
        writes = job_activity(routes.jobs, job.id)  # the job's log and record, and what it sends to CVAT
        done = wait_while_advancing(lambda: (j := routes.jobs.get(job.id)).state in ("succeeded", "failed") and j,
                                    lambda: (writes(), cvat_double.count()), "the pre-annotation")
        assert done.state == "succeeded", routes.jobs.log_tail(job.id)
        assert done.version == manifest.version and done.outcome["task"] == new
        stored = cvat_double.annotations(new)
        assert stored["shapes"] and {shape["source"] for shape in stored["shapes"]} == {"auto"}
        confidence_label = cvat_double.label_id(new, CONFIDENCE_LABEL)
        assert sorted(tag["frame"] for tag in stored["tags"] if tag["label_id"] == confidence_label) == list(range(12))
        # a later save of the task (update:task again) queues nothing more
        with make_client(cvat_double.base_url, credentials=cvat_double.credentials) as client:
            client.jobs.retrieve(client.tasks.retrieve(new).get_jobs()[0].id).update({"assignee": None})
        cvat_double.wait_for_deliveries()
        assert len([j for j in routes.jobs.all() if j.request.get("kind") == "annotate"]) == 1

        # 5. least confident first: the triangles, a class the model never saw, rank first
        capsys.readouterr()
        assert cli(["review", "--task", str(new), "--top", "6", "--out", str(tmp_path / "review.csv")]) == 0
        printed = capsys.readouterr().out.splitlines()
        top = [line.split()[1] for line in printed[1:7]]
        assert all(int(frame) >= 6 for frame in top), printed  # frames 6-11 are the unseen ones
        assert (tmp_path / "review.csv").read_text().count("\n") == 13
    finally:
        server.shutdown()
        routes.runner.stop()
