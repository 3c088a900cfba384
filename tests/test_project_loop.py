"""The loop inside CVAT's own menu, piece by piece through the CVAT test double: a function deployed for a project
before any training, its spec following the model, training on what people finished only."""

from __future__ import annotations

import json
import shlex
import threading

import pytest
import yaml
from preannotate import functions
from preannotate.cli import main as cli
from preannotate.cvat import lambda_spec
from preannotate.models import ModelStore
from preannotate.serving.core import App, Request
from preannotate.shapes import parse_label_list

from tests import nuclio_dashboard_double


@pytest.fixture
def cvat_env(cvat_double, monkeypatch):
    monkeypatch.setenv("CVAT_URL", cvat_double.base_url)
    monkeypatch.setenv("CVAT_USERNAME", cvat_double.credentials[0])
    monkeypatch.setenv("CVAT_PASSWORD", cvat_double.credentials[1])
    return cvat_double


def _deploy(capsys, *args: str) -> tuple[int, list[str], str]:
    code = cli(["deploy", *args])
    captured = capsys.readouterr()
    return code, captured.out.splitlines(), captured.err


def _env(config: dict) -> dict[str, str]:
    return {e["name"]: e["value"] for e in config["spec"]["env"]}


# ------------------------------------------------------------------------------------------ deploy for a project

def test_deploy_for_a_project_before_any_training_lists_the_project_labels(cvat_env, tmp_path, capsys):
    """Project 6 has car (rectangle), person (polygon), road (mask), sign (any) and daytime (tag)."""
    store, out = tmp_path / "store", tmp_path / "fn"
    code, lines, err = _deploy(capsys, "--model", "streets", "--train-project", "6", "--store", str(store),
                               "--out", str(out), "--dry-run")
    assert code == 0, err
    assert lines[1].startswith("# streets is not trained yet: the function answers 503 until a job of project 6")
    assert [line for line in lines if line.startswith("# left out")] == [
        "# left out of the spec: person (polygon): the model cannot return polygon shapes, so CVAT could map "
        "nothing to it",
        "# left out of the spec: road (mask): the model cannot return mask shapes, so CVAT could map nothing to it",
        "# left out of the spec: daytime (tag): the model cannot return tag shapes, so CVAT could map nothing to it"]
    config = yaml.safe_load((out / "function.yaml").read_text())
    spec = json.loads(config["metadata"]["annotations"]["spec"])
    assert [(label["name"], label["type"]) for label in spec] == [("car", "rectangle"), ("sign", "rectangle")]
    assert [a["name"] for a in spec[0]["attributes"]] == ["color", "parked"]
    env = _env(config)
    assert env["PREANNOTATE_MODEL"] == "streets" and env["PREANNOTATE_TRAIN_PROJECT"] == "6"
    assert env["PREANNOTATE_TRAIN_MODEL"] == "ssdlite320_mobilenet_v3_large"  # the recommended default
    assert env["PREANNOTATE_ANNOTATE_ON"] == "task" and json.loads(env[lambda_spec.FUNCTION_LABELS_ENV]) == \
        ["car", "sign"]
    assert "not trained yet" in config["spec"]["description"]
    nuctl = shlex.split(lines[-1])
    assert nuctl[:2] == ["nuctl", "deploy"] and nuctl[nuctl.index("--path") + 1] == str(out)

    # a mask model takes the polygon and mask labels (CVAT maps mask to polygon), and the rectangle one: it serves
    # each mask fitted to the label's shape (a rectangle, rotated where people rotate them; issue 23)
    code, lines, err = _deploy(capsys, "--model", "streets", "--train-project", "6", "--arch", "maskrcnn_resnet50_fpn",
                               "--store", str(store), "--out", str(out), "--dry-run")
    assert code == 0, err
    spec = json.loads(yaml.safe_load((out / "function.yaml").read_text())["metadata"]["annotations"]["spec"])
    assert [(label["name"], label["type"]) for label in spec] == [("car", "rectangle"), ("person", "mask"),
                                                                   ("road", "mask"), ("sign", "mask")]

    # the TensorFlow default, for the users of the TF OD API: a tf- function on the TensorFlow base image
    code, lines, err = _deploy(capsys, "--model", "streets-tf", "--train-project", "6", "--arch",
                               "keras_ssd_mobilenet_v2_fpnlite_320", "--store", str(store), "--out", str(out),
                               "--dry-run")
    assert code == 0, err
    assert lines[0].startswith("# function tf-preannotate-streets-tf rendered in")
    config = yaml.safe_load((out / "function-gpu.yaml").read_text())
    assert config["metadata"]["name"] == "tf-preannotate-streets-tf"
    assert config["metadata"]["annotations"]["framework"] == "tensorflow"
    assert config["spec"]["build"]["baseImage"] == "cvat.preannotate.base-tf:gpu"
    assert _env(config)["PREANNOTATE_TRAIN_MODEL"] == "keras_ssd_mobilenet_v2_fpnlite_320"
    spec = json.loads(config["metadata"]["annotations"]["spec"])
    assert [(label["name"], label["type"]) for label in spec] == [("car", "rectangle"), ("sign", "rectangle")]
    assert functions.validate_directory(out) == []

    # the default classifier takes the project's tag label (and the "any" one), which CVAT fills with its tags
    code, lines, err = _deploy(capsys, "--model", "streets-tags", "--train-project", "6", "--arch",
                               "efficientnet_b4", "--store", str(store), "--out", str(out), "--dry-run")
    assert code == 0, err
    config = yaml.safe_load((out / "function.yaml").read_text())
    spec = json.loads(config["metadata"]["annotations"]["spec"])
    assert [(label["name"], label["type"]) for label in spec] == [("sign", "tag"), ("daytime", "tag")]
    assert _env(config)["PREANNOTATE_TRAIN_MODEL"] == "efficientnet_b4"
    assert functions.validate_directory(out) == []


def test_deploy_for_a_project_whose_labels_no_model_output_fits_says_so(cvat_env, tmp_path, capsys):
    project = cvat_env.add_project("tags only", [{"name": "day", "type": "tag"}, {"name": "cat", "type": "points"}])
    code, _, err = _deploy(capsys, "--model", "x", "--train-project", str(project), "--store", str(tmp_path),
                           "--out", str(tmp_path / "fn"), "--dry-run")
    assert code == 2 and "none of the labels (day (tag), cat (points)) can take them" in err
    assert not (tmp_path / "fn").exists()


def test_the_function_of_an_untrained_model_answers_503_with_what_to_do(tmp_path, monkeypatch):
    store = tmp_path / "store"
    app = App.from_environment({"PREANNOTATE_MODEL": "streets", "PREANNOTATE_MODEL_STORE": str(store),
                                "PREANNOTATE_TRAIN_PROJECT": "6",
                                lambda_spec.FUNCTION_LABELS_ENV: '["car", "sign"]'})
    from tests.conftest import b64, encode, photo

    reply = app.handle(Request("POST", "/", {"image": b64(encode(photo()))}))
    assert reply.status == 503 and reply.body == {
        "error": "not trained yet: finish a job in CVAT project 6 (its webhook starts training) or POST /train"}
    health = app.handle(Request("GET", "/health")).body
    assert health["model"]["state"] == reply.body["error"] and "cvat_unmapped" not in health["model"]


def test_health_names_the_labels_cvat_would_drop_and_the_command_that_fixes_it(tmp_path):
    from preannotate.models import create_detector, publish_detector

    store = ModelStore(tmp_path)
    publish_detector(create_detector("ssdlite320_mobilenet_v3_large", parse_label_list("car,sign,bus")), store,
                     "streets")
    app = App.from_environment({"PREANNOTATE_MODEL": "streets", "PREANNOTATE_MODEL_STORE": str(tmp_path),
                                "PREANNOTATE_TRAIN_PROJECT": "6",
                                lambda_spec.FUNCTION_LABELS_ENV: '["car", "sign"]'})
    for path in ("/health", "/models"):
        body = app.handle(Request("GET", path)).body
        served = body["model"] if path == "/health" else body["serving"]
        assert served["cvat_unmapped"] == ["bus"]
        assert served["fix"].startswith("CVAT drops the shapes of bus: the function's spec lacks them; run "
                                        "`preannotate deploy --model streets --train-project 6`")


# ------------------------------------------------------------------------------------------ finished jobs only

def test_training_reads_only_the_frames_of_finished_jobs(cvat_env, tmp_path):
    """Task 7: job 7 (frames 0-2) completed, job 8 (3-5) in stage acceptance; task 8: job 9 new."""
    from preannotate.cvat.client import connect
    from preannotate.cvat.reader import read_finished
    from preannotate.hyperparameters import Hyperparameters
    from preannotate.training.recipe import NothingFinished, cvat_provenance, export_from_cvat

    with connect() as client:
        both = read_finished(client, 7)
        assert sorted(both.annotations.frames) == [0, 1, 2, 3, 4, 5] and sorted(both.jobs) == [7, 8]
        completed_only = read_finished(client, 7, ("completed",))
        assert sorted(completed_only.annotations.frames) == [0, 1, 2] and completed_only.unfinished == [8]
        assert read_finished(client, 8).annotations.frames == {} and read_finished(client, 8).unfinished == [9]

        hp = Hyperparameters().updated("val-fraction=0")
        dataset = export_from_cvat(client, {"tasks": [7, 8]}, tmp_path / "dataset", hp)
        learned = cvat_provenance(dataset)["cvat"]
        assert learned["frames"] == {"7": "0-5"} and sorted(learned["jobs"]) == ["7", "8"]
        assert learned["unfinished_jobs"] == [9] and learned["train_on"] == ["completed", "acceptance"]
        images = json.loads((dataset / "annotations" / "instances_train.json").read_text())["images"]
        assert len(images) == 6  # task 8's three frames, untouched, are not empty frames to learn from

        with pytest.raises(NothingFinished, match=r"nothing finished to learn from in task\(s\) 8: no job is "
                                                  r"completed or acceptance yet"):
            export_from_cvat(client, {"tasks": [8]}, tmp_path / "none", hp)
        # train-on=all: unfinished jobs count, with only the shapes people made
        everything = export_from_cvat(client, {"tasks": [8]}, tmp_path / "all", hp.updated("train-on=all"))
        assert cvat_provenance(everything)["cvat"]["jobs"].keys() == {"9"}


def test_a_training_job_with_nothing_finished_says_so_and_trains_nothing(cvat_env, tmp_path):
    from preannotate.training.execute import execute_job
    from preannotate.training.jobs import JobStore

    jobs = JobStore(tmp_path)
    job = jobs.create({"tasks": [8], "project": None, "model": "ssdlite320_mobilenet_v3_large", "name": "x",
                       "hyperparameters": "", "promote": "auto"})
    outcome = execute_job(job, jobs.work_dir(job.id), tmp_path, threading.Event())
    assert outcome == {"skipped": "nothing finished to learn from in task(s) 8: no job is completed or acceptance "
                                  "yet (train-on=completed+acceptance); finish a job in CVAT, or set train-on=all "
                                  "to learn from every shape and tag people made"}
    assert ModelStore(tmp_path).versions("x") == []


def test_preannotate_train_with_nothing_finished_says_so(cvat_env, tmp_path, capsys):
    code = cli(["train", "--task", "8", "--model", "ssdlite320_mobilenet_v3_large", "--store", str(tmp_path),
                "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and "nothing finished to learn from in task(s) 8" in err
    assert not (tmp_path / "run" / "checkpoints").exists()


# ------------------------------------------------------------------------------------------ the spec follows the model

nuclio_dashboard = nuclio_dashboard_double.nuclio_dashboard  # the fixture, for this module


def test_a_promoted_version_with_new_labels_updates_the_function_through_the_nuclio_dashboard(
        nuclio_dashboard, tmp_path, caplog):
    from preannotate import functions, worker
    from preannotate.models import ARCHITECTURES, create_detector, publish_detector

    arch = ARCHITECTURES["ssdlite320_mobilenet_v3_large"]
    deployed = parse_label_list("car,sign", "rectangle")
    config = functions.function_config(arch, deployed, gpu=False, model="streets", name="pth-preannotate-streets",
                                       train_project=6)
    nuclio_dashboard.add_function(config)
    store = ModelStore(tmp_path)
    publish_detector(create_detector(arch.name, parse_label_list("car,bus")), store, "streets")  # learned "bus"
    env = {**_env(config), "PREANNOTATE_NUCLIO_DASHBOARD": nuclio_dashboard.url,
           "NUCLIO_FUNCTION_NAME": "pth-preannotate-streets"}

    assert worker.sync_function_spec(tmp_path, "streets", env) == ["bus"]
    nuclio_dashboard.settle()
    after = nuclio_dashboard.function("pth-preannotate-streets")
    spec = json.loads(after["metadata"]["annotations"]["spec"])
    assert [(label["name"], label["type"]) for label in spec] == [("car", "rectangle"), ("bus", "rectangle"),
                                                                   ("sign", "rectangle")]  # sign stays mapped
    assert json.loads(_env(after)[lambda_spec.FUNCTION_LABELS_ENV]) == ["car", "bus", "sign"]
    assert _env(after)["PREANNOTATE_TRAIN_PROJECT"] == "6" and nuclio_dashboard.builds == []  # no image rebuilt
    assert after["status"]["state"] == "ready"

    # in step now (the function restarted with the new environment): nothing more is sent
    requests = len(nuclio_dashboard.requests)
    assert worker.sync_function_spec(tmp_path, "streets", {**env, **{lambda_spec.FUNCTION_LABELS_ENV:
                                                                     '["car", "bus", "sign"]'}}) == []
    assert len(nuclio_dashboard.requests) == requests

    # no dashboard: the job's log says which labels CVAT drops and the command that fixes it
    del env["PREANNOTATE_NUCLIO_DASHBOARD"]
    with caplog.at_level("WARNING", logger="preannotate.worker"):
        assert worker.sync_function_spec(tmp_path, "streets", env) == ["bus"]
    assert "CVAT drops the shapes of bus: the function's spec lacks them; run `preannotate deploy --model streets " \
           "--train-project 6`" in caplog.text


# ------------------------------------------------------------------------------------------ pre-annotation jobs

def _photo_frames(count: int):
    from tests.conftest import encode, photo

    return [(f"f{i}.jpg", encode(photo(seed=i)), 96, 64) for i in range(count)]


def test_new_task_events_queue_one_pre_annotation_job_per_task(tmp_path):
    from preannotate.training.jobs import JobStore
    from preannotate.training.triggers import TrainingPolicy, Triggers, qualifying_change, queue_annotation

    policy = TrainingPolicy.from_environment({"PREANNOTATE_ANNOTATE_ON": "task", "PREANNOTATE_TRAIN_PROJECT": "6"})
    triggers = Triggers(JobStore(tmp_path), policy)
    created = qualifying_change({"event": "create:task", "task": {"id": 12, "project_id": 6}}, policy)
    first = triggers.on_new_task(created, "shapes")
    assert first.job.request == {"kind": "annotate", "task": 12, "model": "shapes",
                                 "reason": "create:task in project 6"}
    uploaded = {"event": "update:task", "task": {"id": 12, "project_id": 6, "mode": "annotation"},
                "before_update": {"mode": "", "updated_date": "2026-11-21T21:07:33.892549Z", "overlap": None}}
    again = triggers.on_new_task(qualifying_change(uploaded, policy), "shapes")
    assert again.job.id == first.job.id and again.reason.endswith("already queued (job " + first.job.id + ")")
    saved = {**uploaded, "before_update": {"updated_date": "2026-11-21T21:07:34.144503Z"}}
    assert qualifying_change(saved, policy) == "task 12: update:task changed updated_date, not its data (an " \
        "annotation save, by a person or CVAT's lambda manager, or an edit): it starts no pre-annotation"
    triggers.jobs.update(first.job.id, lambda j: (setattr(j, "state", "succeeded"), setattr(j, "version", 3)))
    assert triggers.on_new_task(created, "shapes").job is None  # a re-delivery later: done already
    assert queue_annotation(triggers.jobs, 12, "shapes", "re-annotate: shapes@4 promoted", version=4).job is not None
    assert qualifying_change({"event": "create:task", "task": {"id": 13, "project_id": 7}}, policy) == \
        "task 13: project 7 is not one this function pre-annotates"
    off = TrainingPolicy.from_environment({})
    assert qualifying_change({"event": "create:task", "task": {"id": 13, "project_id": 6}}, off) == \
        "create:task: new tasks are not pre-annotated (set PREANNOTATE_ANNOTATE_ON=task)"
    with pytest.raises(ValueError, match="PREANNOTATE_ANNOTATE_ON is 'tasks'"):
        TrainingPolicy.from_environment({"PREANNOTATE_ANNOTATE_ON": "tasks"})


def test_a_job_that_must_wait_is_queued_again_later(tmp_path):
    import time

    from preannotate.training.jobs import RETRY_S, TRY_LATER, Job, _finish

    job = Job(id="x", request={}, state="running")
    before = time.time()
    _finish(job, TRY_LATER, [])
    assert job.state == "queued" and job.not_before >= before + RETRY_S and job.finished is None


def test_the_annotate_job_waits_for_the_upload_and_leaves_started_tasks_to_people(cvat_env, published_store,
                                                                                     tmp_path):
    from preannotate import worker
    from preannotate.training.jobs import JobStore

    jobs = JobStore(published_store.root)
    pending = cvat_env.add_task("uploading", _photo_frames(3), project_id=6, pending_upload=True)
    job = jobs.create({"kind": "annotate", "task": pending, "model": "boxes", "reason": "create:task"})
    with pytest.raises(worker.NotReady, match=f"task {pending}: its data is still uploading"):
        worker.annotate_job(job, published_store.root, {})
    with pytest.raises(RuntimeError, match=f"task {pending} still has no data after 0 minutes: its upload failed"):
        worker.annotate_job(job, published_store.root, {"PREANNOTATE_UPLOAD_WAIT_S": "0"})  # waited long enough
    cvat_env.finish_upload(pending)
    outcome = worker.annotate_job(job, published_store.root, {})
    assert outcome["task"] == pending and outcome["version"] == 1 and outcome["frames"] == 3
    assert outcome["model"].startswith("boxes@1")
    tags = cvat_env.annotations(pending)["tags"]
    assert sorted(tag["frame"] for tag in tags) == [0, 1, 2] and {tag["source"] for tag in tags} == {"auto"}

    started = cvat_env.add_task("started", _photo_frames(2), project_id=6)
    cvat_env.jobs[cvat_env.tasks[started].job_ids[0]].record["state"] = "in progress"
    job = jobs.create({"kind": "annotate", "task": started, "model": "boxes", "reason": "update:task"})
    assert worker.annotate_job(job, published_store.root, {}) == {
        "skipped": f"task {started}: people already work on job(s) {cvat_env.tasks[started].job_ids[0]}; it is left "
                   "to them"}
    assert cvat_env.annotations(started)["shapes"] == []


def test_a_promotion_re_annotates_only_the_tasks_no_one_started(cvat_env, tmp_path):
    from preannotate import worker
    from preannotate.training.jobs import JobStore

    untouched = cvat_env.add_task("untouched", _photo_frames(2), project_id=6)
    started = cvat_env.add_task("started", _photo_frames(2), project_id=6)
    cvat_env.jobs[cvat_env.tasks[started].job_ids[0]].record["stage"] = "validation"
    jobs = JobStore(tmp_path)
    training = jobs.create({"project": 6, "name": "streets", "model": "ssdlite320_mobilenet_v3_large"})
    worker.after_promotion(jobs, training, {"version": 2, "promoted": True}, {"PREANNOTATE_REANNOTATE": "unreviewed"})
    queued = [job.request for job in jobs.all() if job.request.get("kind") == "annotate"]
    assert queued == [{"kind": "annotate", "task": untouched, "model": "streets",
                       "reason": "re-annotate: streets@2 promoted", "version": 2}]  # tasks 7 and 8 are started
    worker.after_promotion(jobs, training, {"version": 2, "promoted": True}, {})  # not asked: nothing more
    assert len([job for job in jobs.all() if job.request.get("kind") == "annotate"]) == 1
    (queued,) = [job for job in jobs.all() if job.request.get("kind") == "annotate"]
    jobs.update(queued.id, lambda j: (setattr(j, "state", "succeeded"), setattr(j, "version", 2)))
    env = {"PREANNOTATE_REANNOTATE": "unreviewed"}
    worker.after_promotion(jobs, training, {"version": 2, "promoted": True}, env)  # the same version: done already
    worker.after_promotion(jobs, training, {"version": 3, "promoted": True}, env)  # a newer one: once more
    assert [job.request.get("version") for job in jobs.all() if job.request.get("kind") == "annotate"] == [2, 3]
