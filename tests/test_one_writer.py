"""One writer per task, played through the CVAT test double in the order a real CVAT 2.42 runs it: a task created
(``create:task``, before its data), its upload (four ``update:task``), a request of CVAT's lambda manager (the
*Automatic annotation* menu) on the same task, saves by a person. The function pre-annotates the task once, never
while the lambda manager has a request queued or running there, and the task ends with one set of ``auto`` shapes.
A random-init SSDlite (5 boxes a frame) on frames of 96x64 keeps it to seconds."""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest
from cvat_sdk import make_client, models
from cvat_sdk.api_client.exceptions import ApiException
from cvat_sdk.core.proxies.annotations import AnnotationUpdateAction
from preannotate import worker
from preannotate.cvat import lambda_requests, webhooks
from preannotate.cvat.client import connect
from preannotate.cvat.review import CONFIDENCE_LABEL
from preannotate.models import ModelStore, create_detector, publish_detector
from preannotate.serving.core import App
from preannotate.serving.http import make_server
from preannotate.serving.training import TrainingRoutes
from preannotate.shapes import parse_label_list
from preannotate.training import triggers
from preannotate.training.jobs import Job, JobRunner, JobStore
from preannotate.training.triggers import TrainingPolicy

from tests.conftest import FIXTURES, encode, photo
from tests.cvat_double import CvatDouble

SECRET = "hook-secret"
FUNCTION = "pth-preannotate-shapes"
LABELS = [{"name": "box", "type": "rectangle"}, {"name": "disc", "type": "rectangle"}]
THRESHOLD = 0.3  # the served one; random-init SSDlite scores every box 1/3, and keeps the 5 best
PER_FRAME = 5


@pytest.fixture(scope="module")
def detector():
    return create_detector("ssdlite320_mobilenet_v3_large", parse_label_list("box,disc", "rectangle"),
                           hyperparameters={"score_threshold": THRESHOLD, "max_total_detections": PER_FRAME})


@dataclass
class Function:
    """The function deployed for a project: its routes (``/``, ``/webhook``) served over HTTP, its job runner driven
    by the test (``run_next``), CVAT's webhook and the lambda manager pointing at it."""

    app: App
    jobs: JobStore
    runner: JobRunner
    store: ModelStore
    project: int

    def run_next(self) -> Job:
        """What the runner does next, now: the first queued job (a wait it asked for taken as over) is run in its
        own process to its end. Returns its record."""
        queued = [job for job in self.jobs.all() if job.state == "queued"]
        assert queued, "no job is queued"
        self.jobs.update(queued[0].id, lambda j: setattr(j, "not_before", 0.0))
        self.runner._run_next()
        return self.jobs.get(queued[0].id)

    def annotate_jobs(self, task_id: int) -> list[Job]:
        return [job for job in self.jobs.all() if job.request.get("kind") == "annotate"
                and job.request.get("task") == task_id]


@pytest.fixture
def function(cvat_double: CvatDouble, tmp_path: Path, monkeypatch):
    project = cvat_double.add_project("shapes", LABELS)
    env = {"CVAT_URL": cvat_double.base_url, "CVAT_USERNAME": cvat_double.credentials[0],
           "CVAT_PASSWORD": cvat_double.credentials[1], "PREANNOTATE_MODEL": "shapes",
           "PREANNOTATE_MODEL_STORE": str(tmp_path / "store"), "PREANNOTATE_WEBHOOK_SECRET": SECRET,
           "PREANNOTATE_API_AUTH": "none", "PREANNOTATE_ANNOTATE_ON": "task", "PREANNOTATE_TRAIN_PROJECT": str(project),
           "PREANNOTATE_TRAIN_MODEL": "ssdlite320_mobilenet_v3_large", "PREANNOTATE_DEVICE": "cpu"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)  # the function's environment, which its job processes inherit
    app = App.from_environment(env)
    routes = TrainingRoutes.attach(app, environ=env, start_runner=False)
    server = make_server(app, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    cvat_double.add_webhook(url + "/webhook", SECRET, ["create:task", "update:task", "update:job"], project)
    cvat_double.add_lambda_function(FUNCTION, url + "/", LABELS)
    try:
        yield Function(app, routes.jobs, JobRunner(routes.jobs, poll_s=0.05), ModelStore(tmp_path / "store"), project)
    finally:
        server.shutdown()
        server.server_close()


def _frames(count: int) -> list:
    return [(f"frame_{i}.jpg", encode(photo(seed=i)), 96, 64) for i in range(count)]


def _answers(deliveries, event: str) -> list[dict]:
    return [json.loads(d.response) for d in deliveries if d.event == event]


def _menu(cvat_double: CvatDouble, task_id: int) -> str:
    """A person picks the function in CVAT's *Automatic annotation* menu for the task."""
    with make_client(cvat_double.base_url, credentials=cvat_double.credentials) as client:
        made, _ = client.api_client.lambda_api.create_requests(
            models.FunctionCallRequest(function=FUNCTION, task=task_id, threshold=THRESHOLD))
        with pytest.raises(ApiException) as refused:  # CVAT's own rule: one request per task
            client.api_client.lambda_api.create_requests(models.FunctionCallRequest(function=FUNCTION, task=task_id))
        assert refused.value.status == 409
    return made.id


def _auto_shapes_by_frame(cvat_double: CvatDouble, task_id: int) -> dict[int, list[dict]]:
    by_frame: dict[int, list[dict]] = {}
    for shape in cvat_double.annotations(task_id)["shapes"]:
        if shape["source"] == "auto":
            by_frame.setdefault(shape["frame"], []).append(shape)
    return by_frame


def _iou(a: list[float], b: list[float]) -> float:
    width = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    height = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - width * height
    return width * height / union if union else 0.0


def _one_set(shapes: list[dict]) -> bool:
    """One detector's answer on a frame: its non-maximum suppression leaves no two boxes of a label on top of each
    other, while two writers' answers would be the same boxes twice."""
    return len(shapes) == PER_FRAME and not any(
        a["label_id"] == b["label_id"] and _iou(a["points"], b["points"]) > 0.9
        for i, a in enumerate(shapes) for b in shapes[i + 1:])


def test_the_function_waits_for_the_menu_and_the_task_holds_one_set_of_auto_shapes(cvat_double, function,
                                                                                   detector):
    publish_detector(detector, function.store, "shapes")
    new = cvat_double.add_task("new", _frames(4), project_id=function.project, pending_upload=True)
    created = _answers(cvat_double.wait_for_deliveries(), "create:task")
    (job,) = function.annotate_jobs(new)
    assert created == [{"job": job.id, "state": "queued", "reason": f"task {new}: pre-annotation queued "
                                                                     f"(create:task in project {function.project})"}]
    cvat_double.deliveries.clear()
    cvat_double.finish_upload(new)
    uploaded = _answers(cvat_double.wait_for_deliveries(), "update:task")
    assert [answer.get("job") for answer in uploaded] == [None, None, job.id, None]  # the mode set: data is there
    assert "not its data" in uploaded[0]["reason"] and "not its data" in uploaded[3]["reason"]
    assert function.annotate_jobs(new) == [function.jobs.get(job.id)]

    # the menu, on the same task, before the function's job has run: the job waits, and writes nothing
    request = _menu(cvat_double, new)
    waited = function.run_next()
    assert waited.state == "queued" and waited.attempts == 1
    assert waited.skipped.startswith(f"task {new}: CVAT's lambda manager has request {request} of function "
                                     f"{FUNCTION} on task {new}: queued, 0%")
    assert cvat_double.annotations(new)["shapes"] == []
    cvat_double.run_lambda_request(request, frames=2)  # running, half-way
    waited = function.run_next()
    assert waited.state == "queued" and "started, 50%" in waited.skipped
    assert cvat_double.annotations(new)["shapes"] == []

    cvat_double.deliveries.clear()
    assert cvat_double.run_lambda_request(request)["status"] == "finished"
    menu = _auto_shapes_by_frame(cvat_double, new)
    assert sorted(menu) == [0, 1, 2, 3] and all(_one_set(shapes) for shapes in menu.values())
    # its saves change the task (update:task, only updated_date): no pre-annotation is queued for them
    saved = _answers(cvat_double.wait_for_deliveries(), "update:task")
    assert saved and all(answer["started"] is None and "not its data" in answer["reason"] for answer in saved)

    # a person's saves: a shape drawn on frame 3, the task renamed; nothing is queued for them either
    cvat_double.deliveries.clear()
    with make_client(cvat_double.base_url, credentials=cvat_double.credentials) as client:
        client.jobs.retrieve(cvat_double.tasks[new].job_ids[0]).update_annotations(
            models.PatchedLabeledDataRequest(shapes=[models.LabeledShapeRequest(
                type="rectangle", frame=3, label_id=cvat_double.label_id(new, "disc"), points=[5, 5, 30, 30])]),
            action=AnnotationUpdateAction.CREATE)
        client.tasks.retrieve(new).update({"name": "new, looked at"})
    person = _answers(cvat_double.wait_for_deliveries(), "update:task")
    assert len(person) == 2 and all(answer["started"] is None for answer in person)
    assert function.annotate_jobs(new) == [function.jobs.get(job.id)]

    # the menu is done: the function writes, in place of the auto shapes there; the frame a person drew on is theirs
    done = function.run_next()
    assert done.state == "succeeded", function.jobs.log_tail(job.id)
    assert done.version == 1 and done.outcome["frames"] == 3 and done.outcome["skipped_annotated"] == 1
    assert done.outcome["waited_for"] == [f"request {request} of function {FUNCTION} on task {new}"]
    stored = _auto_shapes_by_frame(cvat_double, new)
    assert sorted(stored) == [0, 1, 2, 3] and all(_one_set(shapes) for shapes in stored.values())
    assert done.outcome["shapes"] == sum(len(stored[frame]) for frame in (0, 1, 2))  # frames 0-2: the function's
    assert stored[3] == menu[3]  # frame 3 kept the menu's, beside the person's shape
    assert [s["source"] for s in cvat_double.annotations(new)["shapes"]].count("manual") == 1
    confidence = cvat_double.label_id(new, CONFIDENCE_LABEL)
    assert sorted(t["frame"] for t in cvat_double.annotations(new)["tags"] if t["label_id"] == confidence) == [0, 1, 2]

    # the function's own writes send update:task too: they queue nothing, and the task is never queued again
    cvat_double.deliveries.clear()
    with make_client(cvat_double.base_url, credentials=cvat_double.credentials) as client:
        client.tasks.retrieve(new).update({"name": "new, reviewed"})
    assert all(answer["started"] is None for answer in _answers(cvat_double.wait_for_deliveries(), "update:task"))
    assert len(function.annotate_jobs(new)) == 1


def test_what_the_lambda_manager_or_a_person_saves_starts_no_pre_annotation(cvat_double, function, detector):
    """The issue's chain: a task uploaded before the first version (not pre-annotated), then the menu on it once the
    model serves: its writes send update:task, which used to queue the function's own pre-annotation of the task."""
    early = cvat_double.add_task("early", _frames(2), project_id=function.project)
    before = [answer for answer in _answers(cvat_double.wait_for_deliveries(), "update:task") if "reason" in answer]
    assert any("not trained yet" in answer["reason"] for answer in before)
    publish_detector(detector, function.store, "shapes")

    cvat_double.deliveries.clear()
    request = _menu(cvat_double, early)
    cvat_double.run_lambda_request(request)
    with make_client(cvat_double.base_url, credentials=cvat_double.credentials) as client:
        client.jobs.retrieve(cvat_double.tasks[early].job_ids[0]).update({"state": "in progress"})
    answers = _answers(cvat_double.wait_for_deliveries(), "update:task")
    assert answers and all(answer["started"] is None for answer in answers)
    assert function.annotate_jobs(early) == []
    assert all(_one_set(shapes) for shapes in _auto_shapes_by_frame(cvat_double, early).values())


def _annotate_job(function: Function, task_id: int) -> Job:
    return function.jobs.create({"kind": "annotate", "task": task_id, "model": "shapes", "reason": "test"})


def test_a_menu_request_that_starts_while_the_function_writes_stops_it_and_it_writes_again(
        cvat_double, function, detector, monkeypatch):
    """Between two of the function's batches a person starts the menu: the job stops before its next batch, waits,
    and once the request has ended writes every frame again, so the frames it had written lose the menu's copy."""
    import preannotate.annotate
    from preannotate.cvat import upload

    publish_detector(detector, function.store, "shapes")
    task_id = cvat_double.add_task("busy", _frames(3), project_id=function.project)
    job = _annotate_job(function, task_id)
    monkeypatch.setattr(preannotate.annotate, "annotate_task", _one_frame_a_batch(preannotate.annotate.annotate_task))
    requests: list[str] = []
    write = upload.TaskWriter.write

    def write_then_menu(self, *args, **kwargs):
        report = write(self, *args, **kwargs)
        if not requests:
            requests.append(_menu(cvat_double, task_id))
        return report

    monkeypatch.setattr(upload.TaskWriter, "write", write_then_menu)
    with pytest.raises(worker.NotReady, match=r"CVAT's lambda manager has request .*: queued, 0%: this "
                                              r"pre-annotation writes once it has ended, every frame again"):
        worker.annotate_job(job, function.store.root, {})
    assert sorted(_auto_shapes_by_frame(cvat_double, task_id)) == [0]  # one batch went in before the menu began
    assert not (function.jobs.directory(job.id) / "journal").exists()  # the next run writes every frame again
    cvat_double.run_lambda_request(requests[0])
    assert len(_auto_shapes_by_frame(cvat_double, task_id)[0]) == 2 * PER_FRAME  # two writers' sets on frame 0

    outcome = worker.annotate_job(job, function.store.root, {})
    assert outcome["frames"] == 3 and outcome["shapes"] == 3 * PER_FRAME
    stored = _auto_shapes_by_frame(cvat_double, task_id)
    assert sorted(stored) == [0, 1, 2] and all(_one_set(shapes) for shapes in stored.values())


def test_a_menu_request_made_during_the_last_batch_is_seen_at_the_end(cvat_double, function, detector, monkeypatch):
    from preannotate.cvat import upload

    publish_detector(detector, function.store, "shapes")
    task_id = cvat_double.add_task("late", _frames(2), project_id=function.project)
    job = _annotate_job(function, task_id)
    write = upload.TaskWriter.write
    requests: list[str] = []

    def write_then_menu(self, *args, **kwargs):
        report = write(self, *args, **kwargs)
        requests.append(_menu(cvat_double, task_id))
        cvat_double.run_lambda_request(requests[-1])  # it runs and ends before the job looks again
        return report

    monkeypatch.setattr(upload.TaskWriter, "write", write_then_menu)
    with pytest.raises(worker.NotReady, match="came while this job wrote"):
        worker.annotate_job(job, function.store.root, {})
    monkeypatch.setattr(upload.TaskWriter, "write", write)
    worker.annotate_job(job, function.store.root, {})
    stored = _auto_shapes_by_frame(cvat_double, task_id)
    assert sorted(stored) == [0, 1] and all(_one_set(shapes) for shapes in stored.values())


def test_a_job_that_waited_too_long_for_the_menu_leaves_the_task_and_says_why(cvat_double, function, detector):
    publish_detector(detector, function.store, "shapes")
    task_id = cvat_double.add_task("stuck", _frames(1), project_id=function.project)
    request = _menu(cvat_double, task_id)  # never run: an auto-annotation worker that is down
    job = _annotate_job(function, task_id)
    job.outcome["waiting_since"] = 0.0
    outcome = worker.annotate_job(job, function.store.root, {"PREANNOTATE_LAMBDA_WAIT_S": "3600"})
    assert outcome == {"skipped": f"task {task_id}: CVAT's lambda manager has request {request} of function "
                                  f"{FUNCTION} on task {task_id}: queued, 0%, for more than 60 minutes: the task is "
                                  "left to it"}
    assert cvat_double.annotations(task_id)["shapes"] == []


def _one_frame_a_batch(annotate_task):
    def annotate(*args, **kwargs):
        return annotate_task(*args, upload_every=1, batch_size=1, **kwargs)
    return annotate


# ------------------------------------------------------------------------------------------ the pieces

def test_the_lambda_requests_of_a_task_as_cvat_lists_them(cvat_double, function):
    task_id = cvat_double.add_task("listed", _frames(1), project_id=function.project)
    with connect() as client:
        assert lambda_requests.requests_on(client, task_id) == []
        lambda_requests.check_idle(client, task_id)
        request = _menu(cvat_double, task_id)
        (listed,) = lambda_requests.requests_on(client, task_id)
        assert (listed.id, listed.function, listed.task, listed.job, listed.status, listed.active) == \
            (request, FUNCTION, task_id, None, "queued", True)
        assert lambda_requests.requests_on(client, 7) == []  # another task's
        with pytest.raises(lambda_requests.LambdaBusy, match=f"task {task_id}: CVAT's lambda manager has request "):
            lambda_requests.check_idle(client, task_id)
        cvat_double.lambda_functions[FUNCTION].url = "http://127.0.0.1:9/"  # the function is down: it fails
        assert cvat_double.run_lambda_request(request)["status"] == "failed"
        assert lambda_requests.active_on(client, task_id) == []  # failed requests are not listed
        lambda_requests.check_idle(client, task_id)


@pytest.mark.parametrize("name, counts", [
    ("create_task", True),
    ("update_task.data_attached", False),
    ("update_task.jobs_created", False),
    ("update_task.mode_overlap_set", True),
    ("update_task.annotation_save_on_job", False),
])
def test_only_the_create_and_the_end_of_the_upload_start_a_pre_annotation(name, counts):
    payload = json.loads((FIXTURES / "webhooks" / f"{name}.json").read_text())["body_json"]
    policy = TrainingPolicy.from_environment({"PREANNOTATE_ANNOTATE_ON": "task", "PREANNOTATE_TRAIN_PROJECT": "6"})
    answer = triggers.qualifying_change(payload, policy)
    assert isinstance(answer, triggers.NewTask) == counts, answer
    assert webhooks.upload_finished(payload) == (name == "update_task.mode_overlap_set")
    if not counts:
        assert answer.startswith("task 7: update:task changed updated_date") and "not its data" in answer


def test_the_job_records_are_the_ledger_once_per_task_and_once_per_version(tmp_path):
    jobs = JobStore(tmp_path)
    first = triggers.queue_annotation(jobs, 12, "shapes", "create:task in project 6")
    assert triggers.queue_annotation(jobs, 12, "shapes", "upload finished in project 6").job.id == first.job.id
    jobs.update(first.job.id, lambda j: (setattr(j, "state", "succeeded"), setattr(j, "version", 3)))
    again = triggers.queue_annotation(jobs, 12, "shapes", "upload finished in project 6")  # a re-delivery
    assert again.job is None and again.reason == f"task 12: already pre-annotated by version 3 (job {first.job.id})"
    same = triggers.queue_annotation(jobs, 12, "shapes", "re-annotate: shapes@3 promoted", version=3)
    assert same.job is None and "version 3" in same.reason
    newer = triggers.queue_annotation(jobs, 12, "shapes", "re-annotate: shapes@4 promoted", version=4)
    assert newer.job.request == {"kind": "annotate", "task": 12, "model": "shapes",
                                 "reason": "re-annotate: shapes@4 promoted", "version": 4}
    jobs.update(newer.job.id, lambda j: setattr(j, "state", "failed"))  # no record: queued again
    assert triggers.queue_annotation(jobs, 12, "shapes", "re-annotate: shapes@4 promoted", version=4).job
    left = triggers.queue_annotation(jobs, 13, "shapes", "create:task in project 6").job
    jobs.update(left.id, lambda j: (setattr(j, "state", "skipped"), setattr(j, "skipped", "people work on it")))
    assert triggers.queue_annotation(jobs, 13, "shapes", "create:task in project 6").reason == \
        f"task 13: left by job {left.id}: people work on it"
