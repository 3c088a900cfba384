"""Training jobs: the store, the runner (one at a time, in a process of its own, surviving restarts) and the training
routes of a function (``/train``, ``/jobs``, ``/webhook``, ``/cron``).

The runner's mechanics are tested with a small real process in place of training (it writes progress, then exits
as told); training itself is exercised end to end in test_training_jobs.py.
"""

from __future__ import annotations

import json
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from preannotate.models import ModelStore
from preannotate.serving.core import App, ModelProvider, Request
from preannotate.serving.training import TrainingRoutes
from preannotate.training.jobs import FINISHED, JobRunner, JobStore

from tests.conftest import FIXTURES, job_activity, wait_for, wait_while_advancing

# Stands in for a training process: progress lines, then success (a version), failure, or a clean stop on SIGTERM.
FAKE_TRAINING = textwrap.dedent("""
    import json, signal, sys, time
    from pathlib import Path
    from preannotate.training.jobs import JobStore
    store, job_id = sys.argv[1], sys.argv[2]
    jobs = JobStore(store)
    request = jobs.get(job_id).request
    signal.signal(signal.SIGTERM, signal.SIG_IGN if request.get("ignore_sigterm") else lambda *_: sys.exit(143))
    print("training", job_id, flush=True)
    (jobs.work_dir(job_id) / "run").mkdir(exist_ok=True)
    with open(jobs.work_dir(job_id) / "run" / "metrics.jsonl", "a") as metrics:
        for step in range(1, 4):
            metrics.write(json.dumps({"step": step, "total_steps": 3, "loss": 1.0 / step, "eta_s": 3 - step}) + "\\n")
            metrics.flush()
            time.sleep(request.get("sleep", 0))
    if request.get("fail"):
        print("CUDA out of memory", flush=True)
        sys.exit(3)
    jobs.update(job_id, lambda j: setattr(j, "version", 7))
""")


def fake_command(store_root: Path, job_id: str) -> list[str]:
    return [sys.executable, "-c", FAKE_TRAINING, str(store_root), job_id]




@pytest.fixture
def jobs(tmp_path) -> JobStore:
    return JobStore(tmp_path)


@pytest.fixture
def runner(jobs):
    runner = JobRunner(jobs, command=fake_command, poll_s=0.05).start()
    yield runner
    runner.stop()


def finished(jobs: JobStore, job_id: str):
    """The job once it has ended, however long its process takes while it advances."""
    return wait_while_advancing(lambda: (j := jobs.get(job_id)).state in FINISHED and j, job_activity(jobs, job_id),
                                f"job {job_id}")


def test_jobs_run_one_at_a_time_in_order_and_record_their_outcome(jobs, runner):
    first = jobs.create({"sleep": 0.2})
    second = jobs.create({"fail": True})
    runner.wake()
    # while the first runs, the second waits
    wait_for(lambda: jobs.get(first.id).state == "running")
    assert jobs.get(second.id).state == "queued"
    done = finished(jobs, first.id)
    assert done.state == "succeeded" and (done.version, done.attempts) == (7, 1) and done.finished >= done.started
    failed = finished(jobs, second.id)
    assert failed.state == "failed"
    assert "exited with code 3" in failed.error and "CUDA out of memory" in failed.error
    described = jobs.describe(jobs.get(first.id))
    assert (described["step"], described["total_steps"], described["log_tail"]) == (3, 3, [f"training {first.id}"])


def test_a_job_waits_out_its_debounce(jobs, runner):
    job = jobs.create({}, not_before=time.time() + 0.6)
    runner.wake()
    done = finished(jobs, job.id)
    assert done.state == "succeeded" and done.started >= job.not_before


def test_cancel_stops_a_running_job_and_drops_a_queued_one(jobs, runner, tmp_path):
    app = App(ModelProvider("nothing", ModelStore(tmp_path)))
    TrainingRoutes(app, jobs, runner, environ={"PREANNOTATE_API_AUTH": "none"})
    running = jobs.create({"sleep": 60})  # a step a minute: cancelled long before its third
    queued = jobs.create({})
    runner.wake()
    wait_while_advancing(lambda: jobs.progress(running.id).get("step"), job_activity(jobs, running.id),
                         "the first step")
    reply = app.handle(Request("POST", f"/jobs/{queued.id}/cancel"))
    assert reply.status == 200 and reply.body["state"] == "cancelled"
    assert app.handle(Request("POST", f"/jobs/{running.id}/cancel")).body["cancel_requested"] is True
    stopped = finished(jobs, running.id)
    assert stopped.state == "cancelled" and stopped.version is None
    assert jobs.progress(running.id)["step"] < 3  # stopped, not run to the end
    assert jobs.get(queued.id).started is None  # never started


def test_a_job_interrupted_by_a_restart_runs_again(jobs):
    job = jobs.create({})
    jobs.update(job.id, lambda j: (setattr(j, "state", "running"), setattr(j, "attempts", 1)))  # its runner died
    runner = JobRunner(jobs, command=fake_command, poll_s=0.05).start()
    try:
        resumed = finished(jobs, job.id)
    finally:
        runner.stop()
    assert resumed.state == "succeeded" and resumed.attempts == 2


def test_a_stopped_runner_stops_its_job_and_the_next_runner_resumes_it(jobs):
    """What a local server does when it stops: the job's process ends with it, the job stays to be resumed."""
    job = jobs.create({"sleep": 3600})
    runner = JobRunner(jobs, command=fake_command, poll_s=0.05).start()
    wait_for(lambda: jobs.progress(job.id).get("step"), what="the job's first step")
    process = runner.process
    runner.stop()
    assert process.poll() == 143 and jobs.get(job.id).state == "running"  # SIGTERM'd, waited for, not finished
    jobs.update(job.id, lambda j: j.request.update(sleep=0))
    runner = JobRunner(jobs, command=fake_command, poll_s=0.05).start()
    try:
        resumed = wait_for(lambda: (j := jobs.get(job.id)).state == "succeeded" and j, what="the resumed job")
    finally:
        runner.stop()
    assert resumed.attempts == 2


def test_a_job_that_does_not_stop_on_sigterm_is_killed_when_asked(jobs):
    job = jobs.create({"sleep": 3600, "ignore_sigterm": True})
    runner = JobRunner(jobs, command=fake_command, poll_s=0.05).start()
    wait_for(lambda: jobs.progress(job.id).get("step"), what="the job's first step")
    process = runner.process
    runner.stop(timeout=0.5)  # SIGTERM'd: it goes on (a slower machine only makes that more so)
    assert process.poll() is None
    runner.kill()
    runner.stop()
    assert process.poll() == -9 and jobs.get(job.id).state == "running"


def test_only_the_runner_holding_the_store_lock_trains(jobs):
    with jobs.runner_lock() as mine:
        assert mine
        job = jobs.create({})
        runner = JobRunner(jobs, command=fake_command, poll_s=0.05).start()
        time.sleep(0.4)
        assert jobs.get(job.id).state == "queued"  # another process (here: this lock) is training
    try:
        assert finished(jobs, job.id).state == "succeeded"
    finally:
        runner.stop()


# ------------------------------------------------------------------------- routes


@pytest.fixture
def routed(tmp_path):
    """An app with training routes whose jobs are recorded but not run (no runner in this process)."""

    def make(**environ):
        if "PREANNOTATE_API_TOKEN" not in environ:
            environ.setdefault("PREANNOTATE_API_AUTH", "none")  # these tests are about the routes, not their guard
        app = App(ModelProvider("fasterrcnn_mobilenet_v3_large_320_fpn", ModelStore(tmp_path)))
        routes = TrainingRoutes(app, JobStore(tmp_path), None, environ=environ)
        return app, routes.jobs
    return make


@pytest.mark.parametrize("body, message", [
    ({}, "'tasks' (CVAT task ids) or 'project'"),
    ({"tasks": ["7"]}, "'tasks' must be a list of CVAT task ids"),
    ({"project": -1}, "'project' must be a CVAT project id"),
    ({"tasks": [7], "model": "yolo"}, "unknown model 'yolo'"),
    ({"tasks": [7], "hyperparameters": "batch-size=0"}, "batch-size: 0 (must be at least 1)"),
    ({"tasks": [7], "hyperparameters": "learning-rat=0.1"}, "initial-learning-rate"),
    ({"tasks": [7], "epochs": 3}, "unknown field(s) epochs"),
    ({"tasks": [7], "promote": "yes"}, "'promote' must be one of auto, always, never"),
    ([7], "must be a JSON object"),
])
def test_a_bad_train_request_is_a_400_naming_the_problem_and_records_nothing(routed, body, message):
    app, jobs = routed()
    reply = app.handle(Request("POST", "/train", body=body))
    assert reply.status == 400 and message in reply.body["error"]
    assert jobs.all() == []


def test_a_job_learns_from_the_jobs_whose_finishing_starts_it_unless_told_otherwise(routed):
    app, jobs = routed(PREANNOTATE_TRAIN_ON="all")
    reply = app.handle(Request("POST", "/train", body=json.dumps({"tasks": [7]}).encode()))
    assert jobs.get(reply.body["job"]).request["hyperparameters"] == "train-on=all"
    reply = app.handle(Request("POST", "/train", body=json.dumps({"tasks": [7], "hyperparameters": "train-on=validation"
                                                                  }).encode()))
    assert jobs.get(reply.body["job"]).request["hyperparameters"] == "train-on=validation"


def test_train_answers_202_at_once_with_the_job(routed):
    app, jobs = routed(PREANNOTATE_TRAIN_HYPERPARAMETERS="num-steps=50")
    reply = app.handle(Request("POST", "/train", body=json.dumps({"tasks": [7, 8]}).encode()))
    assert reply.status == 202 and reply.body["state"] == "queued"  # recorded, not trained: a runner trains it
    job = jobs.get(reply.body["job"])
    assert job.request == {"tasks": [7, 8], "project": None, "model": "fasterrcnn_mobilenet_v3_large_320_fpn",
                           "name": "fasterrcnn_mobilenet_v3_large_320_fpn",
                           "hyperparameters": "num-steps=50; train-on=completed,acceptance",  # PREANNOTATE_TRAIN_ON's
                           "from_model": None, "promote": "auto"}
    listed = app.handle(Request("GET", "/jobs")).body["jobs"]
    assert [j["id"] for j in listed] == [job.id]
    assert app.handle(Request("GET", f"/jobs/{job.id}")).body["state"] == "queued"
    assert app.handle(Request("GET", "/jobs/nope")).status == 404


def test_with_an_api_token_training_routes_need_it_but_detection_does_not(routed):
    app, jobs = routed(PREANNOTATE_API_TOKEN="t0ken")
    refused = app.handle(Request("POST", "/train", body={"tasks": [7]}))
    assert refused.status == 401 and refused.headers["WWW-Authenticate"] == "Bearer"
    assert app.handle(Request("GET", "/jobs", headers={"Authorization": "Bearer wrong"})).status == 401
    accepted = app.handle(Request("POST", "/train", body={"tasks": [7]}, headers={"authorization": "Bearer t0ken"}))
    assert accepted.status == 202 and len(jobs.all()) == 1
    assert app.handle(Request("POST", "/", body={})).status == 400  # CVAT's call: no credentials, still served


def _delivery(name: str) -> dict:
    return json.loads((FIXTURES / "webhooks" / f"{name}.json").read_text())


def _post_delivery(app: App, name: str, decoded: bool = True):
    recorded = _delivery(name)
    body = json.loads(recorded["body_raw"]) if decoded else recorded["body_raw"].encode()
    return app.handle(Request("POST", "/webhook", body=body, headers=recorded["headers"]))


def test_a_signed_completed_job_starts_training_on_its_project(routed):
    app, jobs = routed(PREANNOTATE_WEBHOOK_SECRET="s3cret")
    reply = _post_delivery(app, "update_job.state_completed")
    assert reply.status == 202 and reply.body["reason"] == "job 7 state=completed"
    job = jobs.get(reply.body["job"])
    assert job.request["project"] == 6 and job.trigger == "webhook: job 7 state=completed"


def test_unsigned_or_wrongly_signed_deliveries_get_401_and_start_nothing(routed):
    app, jobs = routed(PREANNOTATE_WEBHOOK_SECRET="another")
    assert _post_delivery(app, "update_job.state_completed").status == 401
    recorded = _delivery("update_job.state_completed")
    headers = {k: v for k, v in recorded["headers"].items() if k != "X-Signature-256"}
    assert app.handle(Request("POST", "/webhook", body=recorded["body_json"], headers=headers)).status == 401
    assert jobs.all() == []


def test_ping_and_other_events_are_answered_without_training(routed):
    app, jobs = routed(PREANNOTATE_WEBHOOK_SECRET="s3cret")
    assert _post_delivery(app, "ping.project_webhook", decoded=False).body == {"pong": True, "started": None}
    saved = _post_delivery(app, "update_job.annotation_save_on_job")
    assert saved.status == 200 and saved.body["started"] is None
    assert jobs.all() == []


def test_training_waits_for_enough_new_frames_and_debounces(routed):
    app, jobs = routed(PREANNOTATE_WEBHOOK_SECRET="s3cret", PREANNOTATE_TRAIN_MIN_NEW_FRAMES="5",
                       PREANNOTATE_TRAIN_DEBOUNCE="10m")
    first = _post_delivery(app, "update_job.state_completed")  # job 7: 3 frames
    assert first.status == 200 and "3 of 5 new frames" in first.body["reason"]
    again = _post_delivery(app, "update_job.state_completed")  # the same job again counts once
    assert "3 of 5" in again.body["reason"]
    second = _post_delivery(app, "update_job.stage_acceptance")  # job 8: 3 more frames
    assert second.status == 202
    job = jobs.get(second.body["job"])
    assert job.not_before > time.time() + 500  # waits out the debounce window
    # more finished work inside the window joins the waiting job instead of queueing another
    for _ in range(2):
        _post_delivery(app, "update_job.state_completed")
        _post_delivery(app, "update_job.stage_acceptance")
    assert [j.id for j in jobs.all()] == [job.id]


def test_cron_without_a_target_does_nothing_and_says_so(routed):
    app, jobs = routed()
    reply = app.handle(Request("POST", "/cron", body=b""))
    assert reply.status == 200 and "PREANNOTATE_TRAIN_PROJECT" in reply.body["reason"] and jobs.all() == []


# ------------------------------------------------------------------------- cron and promotion


def _publish_learned(store_root: Path, name: str, tasks: dict[str, str], map_: float | None = None,
                     jobs: dict[str, str] | None = None) -> int:
    from preannotate.models.artifact import Manifest
    from preannotate.shapes import parse_label_list

    def write(directory):
        (directory / "model.pt").write_bytes(b"w")
        return Manifest(architecture="fasterrcnn_mobilenet_v3_large_320_fpn", labels=parse_label_list("car"),
                        metrics={} if map_ is None else {"map": map_},
                        provenance={"cvat": {"server": "x", "tasks": tasks, "jobs": jobs or {}}})
    return ModelStore(store_root).publish(name, write)


def test_cron_records_a_job_that_retrains_only_when_finished_jobs_changed(cvat_double, monkeypatch, tmp_path):
    """The cron event only records a job (no call to CVAT inside it); the job's process asks CVAT whether a job
    people finished changed since the served version learned it (a save in an unfinished job does not count)."""
    from preannotate.training.execute import execute_job

    monkeypatch.setenv("CVAT_URL", cvat_double.base_url)
    monkeypatch.setenv("CVAT_USERNAME", cvat_double.credentials[0])
    monkeypatch.setenv("CVAT_PASSWORD", cvat_double.credentials[1])
    app = App(ModelProvider("cars", ModelStore(tmp_path)))
    routes = TrainingRoutes(app, JobStore(tmp_path), None, environ={
        "PREANNOTATE_TRAIN_TASKS": "7,8", "PREANNOTATE_TRAIN_MODEL": "fasterrcnn_mobilenet_v3_large_320_fpn"})
    requests_before = len(cvat_double.requests)
    first = app.handle(Request("POST", "/cron", from_platform_cron=True))
    assert first.status == 202 and len(cvat_double.requests) == requests_before  # CVAT not asked in the event
    assert routes.jobs.get(first.body["job"]).request["only_if_changed"] is True
    assert app.handle(Request("POST", "/cron", from_platform_cron=True)).body["reason"] == \
        "cron: a training job is already queued or running"
    routes.jobs.update(first.body["job"], lambda j: setattr(j, "state", "succeeded"))

    def check(job_id: str) -> dict:
        job = routes.jobs.get(job_id)
        return execute_job(job, routes.jobs.work_dir(job_id), tmp_path, threading.Event())

    def cron() -> str:
        reply = app.handle(Request("POST", "/cron", from_platform_cron=True))
        assert reply.status == 202
        return reply.body["job"]

    # jobs 7 (completed) and 8 (stage acceptance) of task 7 are finished; job 9 of task 8 is new
    learned = {str(job): cvat_double.jobs[job].record["updated_date"].replace("Z", "+00:00") for job in (7, 8)}
    _publish_learned(tmp_path, "cars", {}, jobs=learned)  # as the job recorded what it learned
    cvat_double.jobs[9].record["updated_date"] = "2030-01-01T00:00:00.000000Z"  # a save in the unfinished job
    unchanged = cron()
    assert check(unchanged) == {"skipped": "finished jobs unchanged since cars@1"}
    routes.jobs.update(unchanged, lambda j: setattr(j, "state", "skipped"))

    cvat_double.jobs[8].record["updated_date"] = "2030-01-01T00:00:00.000000Z"  # a reviewer saved job 8 again
    changed = cron()
    from preannotate.cvat.client import connect
    from preannotate.training.triggers import annotations_changed

    with connect() as client:
        request = routes.jobs.get(changed).request
        assert annotations_changed(client, request, learned, "cars@1", ("completed", "acceptance")) == \
            (True, "job(s) 8 finished, changed or reopened since cars@1")
        cvat_double.jobs[8].record["stage"] = "annotation"  # reopened: no longer finished
        cvat_double.jobs[8].record["updated_date"] = learned["8"]
        assert annotations_changed(client, request, learned, "cars@1", ("completed", "acceptance")) == \
            (True, "job(s) 8 finished, changed or reopened since cars@1")


def test_cron_over_http_needs_the_token_and_a_nuclio_cron_event_does_not(tmp_path):
    app = App(ModelProvider("cars", ModelStore(tmp_path)))
    TrainingRoutes(app, JobStore(tmp_path), None, environ={"PREANNOTATE_TRAIN_TASKS": "7",
                                                         "PREANNOTATE_TRAIN_MODEL": "ssdlite320_mobilenet_v3_large"})
    assert app.handle(Request("POST", "/cron")).status == 403  # no token configured: closed
    assert app.handle(Request("POST", "/cron", from_platform_cron=True)).status == 202


def test_without_a_token_the_training_routes_are_closed_and_health_says_so(tmp_path):
    app = App(ModelProvider("cars", ModelStore(tmp_path)))
    routes = TrainingRoutes(app, JobStore(tmp_path), None, environ={})
    refused = app.handle(Request("POST", "/train", body={"tasks": [7], "model": "ssdlite320_mobilenet_v3_large"}))
    assert refused.status == 403 and "PREANNOTATE_API_TOKEN" in refused.body["error"]
    assert app.handle(Request("GET", "/jobs")).status == 403 and routes.jobs.all() == []
    assert app.handle(Request("GET", "/health")).body["training_routes"].startswith("closed")
    opened = App(ModelProvider("cars", ModelStore(tmp_path)))
    TrainingRoutes(opened, JobStore(tmp_path), None, environ={"PREANNOTATE_API_AUTH": "none"})
    assert opened.handle(Request("GET", "/health")).body["training_routes"].startswith("open")
    tokened = App(ModelProvider("cars", ModelStore(tmp_path)))
    TrainingRoutes(tokened, JobStore(tmp_path), None, environ={"PREANNOTATE_API_TOKEN": "t"})
    assert tokened.handle(Request("GET", "/health")).body["training_routes"].startswith("token")


@pytest.mark.parametrize("promote, new, served, expected", [
    ("auto", 0.50, 0.40, True), ("auto", 0.30, 0.40, False), ("auto", 0.30, None, True), ("auto", None, 0.4, False),
    ("always", 0.10, 0.40, True), ("never", 0.90, 0.40, False),
])
def test_a_worse_version_is_kept_but_not_served_unless_asked(promote, new, served, expected):
    from preannotate.models.artifact import Manifest
    from preannotate.shapes import parse_label_list
    from preannotate.training.recipe import should_promote

    serving = Manifest(architecture="x", labels=parse_label_list("a"), metrics={} if served is None else
                       {"map": served})
    assert should_promote(promote, {} if new is None else {"map": new}, serving).served is expected
    assert should_promote("auto", {"map": 0.0}, None).served is True  # the first version is always served
